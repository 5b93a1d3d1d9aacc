"""Processes the pipeline starts end when the process that started them dies, however it dies.

`dies_with_parent()` is a Popen `preexec_fn`: on Linux the child asks the kernel for SIGTERM when its
parent dies (prctl PR_SET_PDEATHSIG), so a `kill -9` of the pipeline does not leave the embedded
llama.cpp server holding its port and two cores; `follow_parent()` makes a multiprocessing worker
(img2dataset's crawl pool and stats printer) exit once its parent is gone. Daemons that outlive their
starter by design (a `ray start --head`) are tracked with `OwnerLock` instead: a file naming the
owner's PID, which the next run finds and, when that owner is dead, cleans up after.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_SECONDS = 1.0
_FOLLOWING = False


def dies_with_parent():
    """A preexec_fn for subprocess.Popen (None where the kernel has no parent-death signal). The parent must
    be the thread that lives as long as the child should (Linux sends the signal when the *thread* ends)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


def follow_parent() -> None:
    """Called inside a multiprocessing (spawn) worker: the worker exits when its parent process is gone. A pool
    worker otherwise outlives a killed parent (it holds its own queue's write end, so it never sees EOF).
    A watcher thread, not PR_SET_PDEATHSIG: Pool starts replacement workers from its handler thread, and the
    kernel signals a child when the *thread* that forked it ends, which would kill a worker holding the
    pool's queue lock and hang Pool.terminate()."""
    global _FOLLOWING
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None or _FOLLOWING:
        return  # not a multiprocessing child (a Ray worker: Ray reaps it), or watched already
    _FOLLOWING = True

    def watch() -> None:
        while os.getppid() == parent.pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)  # reparented: the parent died without stopping us

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnerLock:
    """`<tmp>/visinstruct-<name>.json` = {"owner_pid": ...}: who started a shared daemon and must stop it."""

    def __init__(self, name: str):
        self.path = Path(tempfile.gettempdir()) / f"visinstruct-{name}.json"

    def owner(self) -> int | None:
        try:
            return int(json.loads(self.path.read_text())["owner_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def orphaned(self) -> bool:
        """True when the recorded owner is dead: what it started is left over and nobody will stop it."""
        owner = self.owner()
        return owner is not None and owner != os.getpid() and not pid_alive(owner)

    def take(self) -> None:
        self.path.write_text(json.dumps({"owner_pid": os.getpid()}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
