"""The one way from a command line to a pydantic config, for every CLI that builds one (the pipeline,
the trainer, the VLM eval): a YAML file (`--config`), `--set section.field=value` overrides (the value
read as YAML) and, where a CLI offers them, one `--field-name V` flag per top-level plain field. A
bad file, override or value ends in one sentence (`UserError`), never a pydantic traceback.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from schemas.errors import UserError


def add_config_flags(p: argparse.ArgumentParser, model: type[BaseModel], *, config_default: str | None = None,
                     config_help: str = "YAML config", field_flags: bool = False) -> argparse.ArgumentParser:
    """Adds `--config`, `--set` (repeatable) and, with field_flags, `--field-name V` per plain field of model."""
    p.add_argument("--config", default=config_default,
                   help=config_help + (" (default: %(default)s)" if config_default else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set a.b=5 (repeatable; the value is read as YAML)")
    for name in (plain_fields(model) if field_flags else []):
        field = model.model_fields[name]
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar="V",
                       help=field.description or f"(default: {field.default})")
    return p


def plain_fields(model: type[BaseModel]) -> list[str]:
    """Top-level fields that are not sections (nested models): each is offered as `--field-name`."""
    return [name for name, field in model.model_fields.items()
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))]


def config_tree(model: type[BaseModel], args: argparse.Namespace, example: str) -> dict[str, Any]:
    """`read_tree` of an `add_config_flags` command line: the `--field-name` flags given (list fields
    comma-separated: `--types caption,detail`) set between the file and the overrides."""
    fields = {name: getattr(args, name).split(",") if "list[" in str(model.model_fields[name].annotation)
              else getattr(args, name) for name in plain_fields(model) if name in vars(args)}
    return read_tree(getattr(args, "config", None) or None, getattr(args, "overrides", []), example, fields)


def read_tree(path: str | Path | None, overrides: list[str], example: str,
              fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML file's mapping (no file: empty), then `fields` set on it, then the `--set` overrides."""
    tree = read_yaml(path, example) if path is not None else {}
    tree.update(fields or {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def validated(model: type[BaseModel], tree: dict[str, Any], example: str):
    """model from tree; a validation error is one sentence that names the field and `example`."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, example)) from None


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """`crawl.timeout=5` -> tree["crawl"]["timeout"] = 5 (the value is parsed as YAML)."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise UserError(f"Override {assignment!r} is not of the form section.field=value.")
    node = tree
    *parents, leaf = path.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"Override {assignment!r}: {part!r} is a value, not a section.")
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"Override {assignment!r}: the value is not valid YAML ({yaml_problem(err)}); "
                        f"close its brackets or quote it.") from None


def describe_validation_error(err: ValidationError, example: str = "configs/sample.yaml") -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    extra = f" ({len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"Unknown config field {where!r}; check the spelling against {example}{extra}."
    if first["type"] == "missing":
        return f"Config field {where!r} is required; set it (see {example}){extra}."
    if first["type"] == "value_error" and not where:  # a whole-config rule (a model validator's own words)
        return f"Bad config: {first['ctx']['error']}{extra}."
    if first["type"] == "value_error":  # our validators' own words, without pydantic's "Value error, "
        return f"Bad config value {where}={first.get('input')!r}: {first['ctx']['error']}{extra}."
    return f"Bad config value {where}={first.get('input')!r}: {first['msg']}{extra}."


def yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, on one line ('expected ... at line 1, column 4')."""
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def read_yaml(path: str | Path, example: str = "configs/sample.yaml") -> dict[str, Any]:
    """A YAML mapping from a file; a missing file, bad YAML or a non-mapping is one sentence."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist; pass --config with a YAML file such as {example}.")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"Config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}); save it as UTF-8 YAML.") from None
    except OSError as err:
        raise UserError(f"Config file {path} cannot be read ({err.strerror or err}).") from None
    except yaml.YAMLError as err:
        raise UserError(f"Config file {path} is not valid YAML ({yaml_problem(err)}).") from None
    if not isinstance(tree, dict):
        raise UserError(f"Config file {path} must hold a mapping of sections, not {type(tree).__name__}.")
    return tree
