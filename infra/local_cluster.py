"""Start and stop a local Ray head (`ray start --head`), the cluster the demo and tests submit jobs to.

    python -m infra.local_cluster start      # head on 127.0.0.1 only, dashboard/job API on :8265
    python -m infra.local_cluster stop

Every server of the head (GCS, raylet, dashboard, job API, Ray client) listens on 127.0.0.1 only: a Ray head
runs whatever code it is sent, and this one has no authentication. No other machine can join or submit.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipelines.services.processes import OwnerLock

DASHBOARD_PORT = 8265
GCS_PORT = 6390  # not Ray's 6379 default, so a Redis on this machine does not collide
HOST = "127.0.0.1"
# `ray start --node-ip-address 127.0.0.1` alone is not enough: Ray (2.60) swaps a loopback node address for the
# machine's network address, and the GCS and raylet then listen on every interface. Ray keeps a single-machine
# cluster on loopback where multi-node clusters are off (its Windows/macOS default); this variable turns them
# off here. Processes that attach to the head by address (`ray status`, a driver started outside it) need it
# too; jobs submitted through the job API inherit it from the head.
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
HEAD_LOCK = OwnerLock("ray-head")  # who started the head and must stop it


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def dashboard_url(port: int = DASHBOARD_PORT) -> str:
    return f"http://{HOST}:{port}"


def head_is_up(port: int = DASHBOARD_PORT) -> bool:
    try:
        with urllib.request.urlopen(f"{dashboard_url(port)}/api/version", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_head(num_cpus: int | None = None, port: int = DASHBOARD_PORT, wait_seconds: float = 90,
               owned: bool = True) -> bool:
    """Starts a head unless one answers already; returns True when this call started it (and should stop it).
    An `owned` head is recorded with this process's PID (HEAD_LOCK): if this process is killed before it stops
    the head, the next start_head finds the head orphaned and stops it (its jobs with it) before starting afresh.
    A head started from the command line (`owned=False`) belongs to the user and is never stopped that way."""
    if head_is_up(port):
        if not HEAD_LOCK.orphaned():
            return False
        print(f"stopping the Ray head left running by a killed run (pid {HEAD_LOCK.owner()})", flush=True)
        stop_head()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1", **LOOPBACK_ONLY_ENV,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [ray_executable(), "start", "--head", "--node-ip-address", HOST, "--port", str(GCS_PORT),
               "--dashboard-host", HOST, "--dashboard-port", str(port), "--disable-usage-stats"]
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
    if owned:
        HEAD_LOCK.take()
    else:
        HEAD_LOCK.clear()
    return True


def stop_head() -> None:
    subprocess.run([ray_executable(), "stop", "--force"], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    HEAD_LOCK.clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    if args.action == "start":
        if start_head(args.num_cpus, owned=False):
            print(f"started, bound to {HOST} only (GCS :{GCS_PORT}, job API {dashboard_url()})")
        else:
            print(f"a head is running already at {dashboard_url()} (not started here: its bindings are its own)")
    else:
        stop_head()
        print("stopped")


if __name__ == "__main__":
    main()
