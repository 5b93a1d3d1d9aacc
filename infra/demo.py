"""The README's main command, end to end on the embedded default.

    python -m infra.demo [--config configs/sample.yaml] [--set section.field=value ...]

Renders the sample world (once), serves it on 127.0.0.1, starts a local Ray head, submits
`pipelines/build_instruct.py` with `ray job submit`, prints the per-reason summary, and stops
the head and the server again, also when something fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infra.local_cluster import dashboard_url, ray_executable, start_head, stop_head
from infra.world_noise import prepare_world
from infra.world_server import WorldServer
from pipelines.cli import exit_on_user_error, parser
from pipelines.run import RunDirectory, code_revision, format_summary
from schemas.config import load_config
from schemas.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def submit_command(config_path: str, overrides: list[str]) -> list[str]:
    flags = [a for o in overrides for a in ("--set", o)]
    # The job runs in a copy of the repo without .git: tell it which commit it is.
    runtime_env = json.dumps({"env_vars": {"VISINSTRUCT_CODE_REVISION": code_revision()}})
    return [ray_executable(), "job", "submit", "--address", dashboard_url(), "--working-dir", str(REPO),
            "--runtime-env-json", runtime_env, "--",
            sys.executable, "pipelines/build_instruct.py", "--config", config_path, *flags]


def world_overrides(world_dir: Path) -> list[str]:
    """The settings that point a run at a rendered sample world: its URL list, annotations and noise manifest."""
    instances = world_dir / "annotations" / "instances_train.json"
    return [f"crawl.url_list={world_dir / 'urls.parquet'}", f"objects.annotations=[{instances}]",
            f"evaluate.noise_manifest={world_dir / 'noise_manifest.parquet'}", f"evaluate.ground_truth=[{instances}]"]


def run_demo(config_path: str, overrides: list[str]) -> Path:
    config = load_config(config_path, overrides)
    world_dir = prepare_world(config.world).resolve()
    # The job runs in a copy of the repo (--working-dir), so every path it gets is absolute.
    overrides = [*overrides, f"output_root={Path(config.output_root).resolve()}", *world_overrides(world_dir)]
    config = load_config(config_path, overrides)
    with WorldServer(world_dir, config.world.host, config.world.port, config.world.slow_seconds) as server:
        print(f"serving the sample world at {server.base_url}")
        started = start_head()
        print(f"Ray head {'started' if started else 'already running'} at {dashboard_url()}")
        try:
            job = subprocess.run(submit_command(str(Path(config_path).resolve()), overrides), cwd=REPO)
        finally:
            if started:
                stop_head()
                print("Ray head stopped")
    print("sample world server stopped")
    if job.returncode != 0:
        raise UserError(f"the Ray job failed (exit {job.returncode}); its log is above.")
    final = RunDirectory.open(config, engine="ray").final
    manifest = json.loads((final / "manifest.json").read_text())
    print("\n" + format_summary(manifest))
    print(f"\nHugging Face dataset: {final / 'hf'}   (datasets.load_from_disk)\nLLaVA export: {final / 'llava'}"
          f"\ndataset card: {final / 'README.md'}\nmanifest: {final / 'manifest.json'}")
    return final


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    exit_on_user_error(lambda: run_demo(args.config, args.overrides))


if __name__ == "__main__":
    main()
