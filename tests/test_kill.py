"""`kill -9` of the pipeline's main process alone: nothing it started stays alive (the embedded llama.cpp
server, img2dataset's crawl workers and stats printer), and the next run resumes and completes, with
nothing of the refused URLs in its list anywhere in its outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import REPO
from tests.hostile_server import CANARY, HostileServer


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below pid (from /proc)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def test_a_killed_run_leaves_nothing_running_and_the_next_run_completes(tmp_path):
    with HostileServer() as server:
        secret = tmp_path / "secret.jpg"
        secret.write_bytes(CANARY * 100)
        refused = [secret.as_uri(), server.url("/redirect/" + quote("http://169.254.169.254/canary.jpg", safe="")),
                   server.url("/redirect/" + quote(server.url("/canary.jpg").replace("127.0.0.1", "10.0.0.1"), safe=""))]
        urls = tmp_path / "urls.csv"  # six images, one that trickles so the crawl is still busy at the kill, refused ones
        urls.write_text("url,caption\n" + "".join(f"{server.url(f'/ok/{i}.jpg')},a photo of a cat\n" for i in range(6))
                        + f"{server.url('/trickle.jpg')},a photo of a dog\n" + "".join(f"{u},a cat\n" for u in refused))
        command = [sys.executable, "pipelines/build_instruct_beam.py", "--config", "configs/sample.yaml",
                   "--set", f"output_root={tmp_path / 'out'}", "--set", f"crawl.url_list={urls}",
                   "--set", "crawl.download_deadline=6", "--set", "crawl.processes=1", "--set", "objects.annotations=[]", "--set", "eval_guard.folders=[]",
                   "--set", f"teacher.cache_dir={tmp_path / 'cache'}", "--set", "name=killed"]
        first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)  # its own group: only its PID is killed below
        deadline = time.monotonic() + 240
        started = {}
        while time.monotonic() < deadline and first.poll() is None:
            started = descendants(first.pid)
            crawling = any("spawn_main" in c for c in started.values()) and server.requests.get("/trickle.jpg")
            if crawling and any("pipelines.services.llama_server" in c for c in started.values()):
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the crawl was under way"
        assert any("pipelines.services.llama_server" in c for c in started.values()), started
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up and any(alive(pid) for pid in started):
            time.sleep(0.5)
        left = {pid: command for pid, command in started.items() if alive(pid)}
        assert left == {}, f"still running after the kill: {left}"

        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest_path, = (tmp_path / "out" / "killed").glob("v-*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["counts"]["input_urls"] == 10 and manifest["counts"]["accounted"] is True
    reasons = manifest["counts"]["stages"]["crawl"]["reasons"]
    assert reasons == {"download_error:deadline": 1, "download_error:blocked_scheme": 1,
                       "download_error:blocked_address": 2}
    assert Path(manifest["shards"]).is_dir()  # names where the shards are, not the renamed .partial directory
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # shards, records, exports, card, logs
    kinds = {p.relative_to(manifest_path.parent).parts[0] for p in written if manifest_path.parent in p.parents}
    assert {"shards", "dropped", "hf", "llava", "manifest.json", "README.md"} <= kinds, kinds
    assert any(p.name.endswith(".teacher.log") for p in written)
    assert not [p for p in written if CANARY in p.read_bytes()]
    assert CANARY.decode() not in second.stdout + second.stderr


def test_a_ray_head_left_by_a_killed_demo_is_stopped_by_the_next_start(capsys):
    from infra.local_cluster import HEAD_LOCK, head_is_up, start_head, stop_head

    if head_is_up():
        pytest.skip("a Ray head that this test did not start is running; it is not the test's to stop")
    demo = subprocess.Popen([sys.executable, "-c", "import time; from infra.local_cluster import start_head; "
                             "start_head(num_cpus=1); print('up', flush=True); time.sleep(600)"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert demo.stdout.readline().strip() == "up"
        assert HEAD_LOCK.owner() == demo.pid and not HEAD_LOCK.orphaned()
        os.kill(demo.pid, signal.SIGKILL)  # the demo dies without stopping its head
        demo.wait()
        assert head_is_up() and HEAD_LOCK.orphaned()
        assert start_head(num_cpus=1) is True  # the orphan is stopped and a head of this process's own started
        assert f"left running by a killed run (pid {demo.pid})" in capsys.readouterr().out
        assert HEAD_LOCK.owner() == os.getpid()
    finally:
        demo.kill()
        stop_head()
    assert not head_is_up() and HEAD_LOCK.owner() is None
