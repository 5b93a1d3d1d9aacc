"""Shared command line: `--config FILE` plus any number of `--set section.field=value` overrides."""
from __future__ import annotations

import argparse

from schemas.config import PipelineConfig, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="configs/sample.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set crawl.timeout=5 (repeatable)")
    return p


def parse_config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)
