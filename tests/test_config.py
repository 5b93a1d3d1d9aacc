"""Config: YAML + `--set` overrides of any field, one-sentence errors, a hash that names versions."""
from __future__ import annotations

import pytest

from schemas.config import load_config
from schemas.errors import UserError
from tests.conftest import REPO

SAMPLE = REPO / "configs" / "sample.yaml"


def test_overrides_are_typed_and_nested():
    config = load_config(SAMPLE, ["crawl.timeout=5", "validate.max_pixels=1000", "name=mine"])
    assert config.crawl.timeout == 5.0 and config.validate_.max_pixels == 1000 and config.name == "mine"


def test_fingerprint_ignores_where_outputs_go_but_not_what_changes_data():
    base = load_config(SAMPLE)
    assert base.fingerprint() == load_config(SAMPLE, ["output_root=/elsewhere", "ray.address=ray://x:10001"]).fingerprint()
    assert base.fingerprint() != load_config(SAMPLE, ["validate.min_side=64"]).fingerprint()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["crawl.timout=5"], "Unknown config field 'crawl.timout'"),
        (["crawl.timeout=-1"], "Bad config value crawl.timeout=-1"),
        (["crawl.timeout=soon"], "Bad config value crawl.timeout='soon'"),
        (["name=has space"], "Bad config value name="),
        (["name=.."], "name '..' is not a directory of its own under output_root"),
        (["name=."], "name '.' is not a directory of its own under output_root"),
        (["crawl"], "is not of the form section.field=value"),
        (["crawl.timeout=[1,"], "the value is not valid YAML (expected the node content"),
        (["crawl.timeout=!!python/name:os.system"], "the value is not valid YAML"),
        (["publish.push_to_hub=true"], "publish.push_to_hub needs publish.hub_repo"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(SAMPLE, overrides)
    text = str(err.value)
    assert message in text and text.count("\n") == 0 and text.endswith(".")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("crawl: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 0xe9 at offset 9\); save it as UTF-8 YAML\.$"):
        load_config(latin1)


def test_run_directory_stays_inside_output_root(tmp_path):
    from pipelines.run import RunDirectory

    config = load_config(SAMPLE, [f"output_root={tmp_path / 'out'}", "name=ok..name"])  # dots inside a name are fine
    assert RunDirectory.open(config, "ray").final.parent == tmp_path / "out" / "ok..name"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(UserError, match="outside output_root"):
        RunDirectory.open(load_config(SAMPLE, [f"output_root={tmp_path / 'out'}", "name=link"]), "ray")


def test_version_changes_with_the_clip_weights_bytes(tmp_path):
    from pipelines.run import RunDirectory

    urls, weights = tmp_path / "urls.parquet", tmp_path / "w.pt"
    urls.write_bytes(b"list")
    weights.write_bytes(b"old weights")
    config = load_config(SAMPLE, [f"crawl.url_list={urls}", f"clip.pretrained={weights}", f"output_root={tmp_path}"])
    before = RunDirectory.open(config, "ray").version
    assert RunDirectory.open(config, "ray").version == before  # deterministic
    weights.write_bytes(b"new weights, same path")
    assert RunDirectory.open(config, "ray").version != before
    assert RunDirectory.open(config, "beam").version != RunDirectory.open(config, "ray").version


@pytest.mark.parametrize("module", ["pipelines.build_instruct_beam", "pipelines.train", "evals.vlm_eval"])
def test_every_cli_reads_its_config_the_same_way(module, tmp_path, capsys):
    """One reading of `--config` and `--set` for every CLI that builds a config (schemas/flags.py): the same
    sentence for the same mistake, exit 2, before anything runs."""
    import importlib

    from schemas.errors import exit_on_user_error

    main = importlib.import_module(module).main
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes("name: café\n".encode("latin-1"))
    for argv, sentence in ((["--set", "seed=[1,"], "error: Override 'seed=[1,': the value is not valid YAML ("),
                           (["--config", str(not_utf8)], f"error: Config file {not_utf8} is not UTF-8 text (byte 0xe9")):
        with pytest.raises(SystemExit) as exit_:
            exit_on_user_error(lambda: main(argv))
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(sentence) and "\n" not in err and "Traceback" not in err
