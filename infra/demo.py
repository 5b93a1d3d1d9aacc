"""The README's main command, end to end on the embedded default: data, then the proof that it works.

    python -m infra.demo [--config configs/sample.yaml] [--set section.field=value ...]
    python -m infra.demo --set proof.enabled=false      # only the data part: stop at the published dataset

Renders the sample world (once), serves it on 127.0.0.1, starts a local Ray head (127.0.0.1 only), submits
`pipelines/build_instruct.py` with `ray job submit` (Ray's own log goes to
`<output_root>/<name>/ray_job.log`; the terminal shows our progress lines), prints the per-reason summary,
and stops the head and the server again, also when something fails. Then `infra.proof` trains Stage 1,
Stage 2 with and without the negatives, evaluates both arms on the held-out images and writes the report.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from infra.local_cluster import HOST, dashboard_url, ray_executable, start_head, stop_head
from pipelines.services.processes import dies_with_parent
from infra.world_noise import prepare_world
from infra.world_server import WorldServer
from schemas.errors import disk_full_is_user_error, exit_on_user_error
from pipelines.cli import parser
from pipelines.manifest import code_revision, format_summary
from pipelines.run import RunDirectory, check_output_root
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
    """The settings that point a run at a rendered sample world: its URL list, annotations and noise manifest, and
    its held-out images as the eval-leak guard's references (the proof evaluates on them)."""
    instances = world_dir / "annotations" / "instances_train.json"
    return [f"crawl.url_list={world_dir / 'urls.parquet'}", f"objects.annotations=[{instances}]",
            f"evaluate.noise_manifest={world_dir / 'noise_manifest.parquet'}", f"evaluate.ground_truth=[{instances}]",
            f"eval_guard.folders=[{world_dir / 'images' / 'val'}]"]


# Lines of the job's output that are ours (progress and errors), shown in the terminal; Ray's INFO logging,
# its progress bars and the rest stay in the log file.
OURS = re.compile(r"\[pipeline\]|generate: \d+ images|embedded teacher|is complete already|^error:|warning: URL host|Traceback|Error:")
HEARTBEAT_SECONDS = 30
NOISE = re.compile(r"\x1b\[[0-9;]*m|^\(.*?pid=\d+\)\s*|^\[pipeline\]\s*")  # colours, the actor's name, our tag


def run_job(command: list[str], log_path: Path) -> int:
    """Runs `ray job submit`, its output into `log_path`; prints our lines and a heartbeat with the elapsed time."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started, done = time.perf_counter(), threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            print(f"[data] Ray job running, {time.perf_counter() - started:.0f} s (log: {log_path})", flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    with log_path.open("w") as log:
        job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               preexec_fn=dies_with_parent())  # a killed demo's head is stopped by the next start_head
        for line in job.stdout:
            log.write(line)
            if OURS.search(line):
                print(f"[data] {NOISE.sub('', NOISE.sub('', line.strip()))}", flush=True)
        code = job.wait()
    done.set()
    if code != 0:
        print("".join(log_path.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
    print(f"[data] Ray job finished in {time.perf_counter() - started:.0f} s (exit {code}); its log: {log_path}")
    return code


def run_demo(config_path: str, overrides: list[str]) -> Path:
    config = load_config(config_path, overrides)
    check_output_root(config)  # a file, a read-only directory or a full disk: one sentence before the world renders
    with disk_full_is_user_error(config.world.dir):
        world_dir = prepare_world(config.world).resolve()
    # The job runs in a copy of the repo (--working-dir), so every path it gets is absolute.
    overrides = [*overrides, f"output_root={Path(config.output_root).resolve()}", *world_overrides(world_dir)]
    config = load_config(config_path, overrides)
    with WorldServer(world_dir, config.world.host, config.world.port, config.world.slow_seconds) as server:
        print(f"serving the sample world at {server.base_url}")
        started = start_head()
        print(f"Ray head started, bound to {HOST} only, at {dashboard_url()}" if started
              else f"Ray head already running at {dashboard_url()} (not started by the demo)")
        try:
            log = Path(config.output_root).resolve() / config.name / "ray_job.log"
            returncode = run_job(submit_command(str(Path(config_path).resolve()), overrides), log)
        finally:
            if started:
                stop_head()
                print("Ray head stopped")
    print("sample world server stopped")
    if returncode != 0:
        raise UserError(f"the Ray job failed (exit {returncode}); the end of its log is above.")
    final = RunDirectory.open(config, engine="ray").final
    manifest = json.loads((final / "manifest.json").read_text())
    print("\n" + format_summary(manifest))
    print(f"\nHugging Face dataset: {final / 'hf'}   (datasets.load_from_disk)\nLLaVA export: {final / 'llava'}"
          f"\ndataset card: {final / 'README.md'}\nmanifest: {final / 'manifest.json'}")
    if config.proof.enabled:
        from evals.ab_report import summary_lines
        from infra.proof import run_proof

        print("\nThe proof: Stage 1 -> Stage 2 with and without negatives -> evals (proof.enabled=false skips it)")
        print("\n".join(summary_lines(run_proof(config, final, world_dir))))
    return final


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    exit_on_user_error(lambda: run_demo(args.config, args.overrides))


if __name__ == "__main__":
    main()
