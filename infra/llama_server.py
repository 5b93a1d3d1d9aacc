"""llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, same arguments), with every
request evaluated from an empty KV cache.

llama-cpp-python keeps the last request's KV cache and reuses its longest common prefix with the
next prompt, so what a request computes depends on the requests before it. Identical requests
(same messages, same seed, temperature 0) were seen to get different answers from one server
after different histories: `tests/test_teacher.py`'s fault-injected rerun differed from the clean
run in about one run of three, on the same teacher-cache key. The teacher cache, resumed runs and
fault-tolerant retries all need an answer to be a function of its request alone, so this launcher
clears the cache before each request. Prompt evaluation pays for it; generation does not change.
"""
from __future__ import annotations

import llama_cpp
from llama_cpp.server.__main__ import main

_generate = llama_cpp.Llama.generate


def generate_from_empty_cache(self: llama_cpp.Llama, tokens, *args, **kwargs):
    self.reset()  # no prefix to reuse: the whole prompt is evaluated
    memory = llama_cpp.llama_get_memory(self._ctx.ctx)
    if memory is not None:
        llama_cpp.llama_memory_clear(memory, True)  # every cache cell free again, filled from the first
    return _generate(self, tokens, *args, **kwargs)


if __name__ == "__main__":
    llama_cpp.Llama.generate = generate_from_empty_cache
    main()
