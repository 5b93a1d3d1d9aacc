"""Start and stop a local Ray head (`ray start --head`), the cluster the demo and tests submit jobs to.

    python -m infra.local_cluster start      # head on 127.0.0.1, dashboard/job API on :8265
    python -m infra.local_cluster stop
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DASHBOARD_PORT = 8265
GCS_PORT = 6390  # not Ray's 6379 default, so a Redis on this machine does not collide


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def dashboard_url(port: int = DASHBOARD_PORT) -> str:
    return f"http://127.0.0.1:{port}"


def head_is_up(port: int = DASHBOARD_PORT) -> bool:
    try:
        with urllib.request.urlopen(f"{dashboard_url(port)}/api/version", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_head(num_cpus: int | None = None, port: int = DASHBOARD_PORT, wait_seconds: float = 90) -> bool:
    """Starts a head unless one answers already; returns True when this call started it (and should stop it)."""
    if head_is_up(port):
        return False
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [ray_executable(), "start", "--head", "--port", str(GCS_PORT), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(port), "--disable-usage-stats"]
    if num_cpus:
        command += ["--num-cpus", str(num_cpus)]
    started = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if started.returncode != 0:  # Ray's own warnings stay out of the terminal unless the start failed
        raise RuntimeError(f"ray start --head failed (exit {started.returncode}): {started.stderr.strip()[-2000:]}")
    deadline = time.monotonic() + wait_seconds
    while not head_is_up(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"ray start --head did not bring up the job API at {dashboard_url(port)} in {wait_seconds:.0f}s")
        time.sleep(1)
    return True


def stop_head() -> None:
    subprocess.run([ray_executable(), "stop", "--force"], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    if args.action == "start":
        print("started" if start_head(args.num_cpus) else "a head is running already", dashboard_url())
    else:
        stop_head()
        print("stopped")


if __name__ == "__main__":
    main()
