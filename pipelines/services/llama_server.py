"""llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, same arguments), where an answer is a
function of its request alone, and the shared prompt prefix (system prompt and few-shot examples) is still
evaluated once rather than per request.

Why not llama-cpp-python's own reuse: it keeps the last request's KV cache and reuses its longest common
prefix with the next prompt, so the prompt's remaining tokens are evaluated in chunks that start wherever
the match ended. Floating-point results depend on how the tokens are chunked, so identical requests (same
messages, seed, temperature 0) got different answers after different histories (`tests/test_teacher.py`'s
fault-injected rerun differed from the clean run in about one run of three). The teacher cache, resumed
runs and fault-tolerant retries all need an answer to depend on its request alone.

What this launcher does instead: a prompt is always evaluated in chunks of `n_batch` tokens counted from
its first token, exactly as from an empty cache. At every chunk boundary inside the prompt it notes the
prefix; a prefix seen a second time (it is shared: a task's system prompt and examples) has its KV cache
saved, and a later prompt that starts with a saved prefix restores it and evaluates only the chunks after
it. The restored cells hold what evaluating the prefix from scratch holds, in the same cells, and the
chunks after it are the same chunks, so the answer is the one from an empty cache, bit for bit (a test
checks, in several orders). `--prefix_reuse false` evaluates every prompt from scratch.

Greedy sampling under a JSON grammar, checked lazily (as llama.cpp's own `common_sampler` does): llama-cpp-python
runs the grammar over all 49,152 vocabulary entries for every generated token (measured here: 3.8 ms a token,
against 9.4 ms for the decode itself). At temperature 0 the answer is the first maximum of the penalized logits among the tokens the grammar
allows, so this launcher takes the first maximum among all tokens and asks the grammar about that one token;
only when the grammar rejects it is the whole vocabulary checked. Either way the token is the one the full
check would pick, so answers are unchanged (the test compares with `--lazy_grammar false`).
`--lazy_grammar false` keeps llama-cpp-python's sampler.
"""
from __future__ import annotations

import ctypes
import hashlib
import sys
from collections import Counter, OrderedDict

import llama_cpp
import numpy as np
from llama_cpp.server.__main__ import main

from pipelines.services.embedded_teacher import GRAMMAR_LINE, PROMPT_LINE

_generate, _eval, _init_sampler = llama_cpp.Llama.generate, llama_cpp.Llama.eval, llama_cpp.Llama._init_sampler
MAX_SAVED_PREFIXES = 8  # a few tasks' shared prefixes (~12 MB of KV cache each for SmolLM2-135M at 512 tokens)


def prefix_key(tokens) -> str:
    return hashlib.sha1(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def clear_cache(llm: llama_cpp.Llama) -> None:
    """No tokens, every KV cell free again (filled from the first), as for a first request."""
    llm.reset()
    memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
    if memory is not None:
        llama_cpp.llama_memory_clear(memory, True)


class PrefixStates:
    """Saved KV caches of shared prompt prefixes (at chunk boundaries), least recently used dropped first."""

    def __init__(self, capacity: int = MAX_SAVED_PREFIXES):
        self.capacity, self.saved, self.seen = capacity, OrderedDict(), Counter()

    def restore(self, llm: llama_cpp.Llama, tokens: list[int]) -> int:
        """Restores the longest saved prefix of `tokens` that leaves at least one token to evaluate; returns its
        length (0: the cache is cleared, as for a first request)."""
        clear_cache(llm)
        n = llm.n_batch
        for end in range((len(tokens) - 1) // n * n, 0, -n):
            data = self.saved.get(prefix_key(tokens[:end]))
            if data is None:
                continue
            self.saved.move_to_end(prefix_key(tokens[:end]))
            buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buffer, len(data), 0) != len(data):
                clear_cache(llm)
                return 0
            llm.input_ids[:end] = tokens[:end]
            llm.n_tokens = end
            llm._requires_eval = True  # the logits come from the suffix's evaluation, not from the restore
            return end
        return 0

    def passed(self, llm: llama_cpp.Llama, prompt: list[int]) -> None:
        """Called at each chunk boundary inside the prompt: a prefix seen twice is shared, and is saved."""
        end = llm.n_tokens
        key = prefix_key(prompt[:end])
        self.seen[key] += 1
        if self.seen[key] >= 2 and key not in self.saved:
            size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
            buffer = (ctypes.c_uint8 * size)()
            written = llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buffer, size, 0)
            self.saved[key] = bytes(buffer)[:written]
            while len(self.saved) > self.capacity:
                self.saved.popitem(last=False)


STATES = PrefixStates()


def generate_with_shared_prefixes(self: llama_cpp.Llama, tokens, *args, **kwargs):
    tokens = list(tokens)
    restored = STATES.restore(self, tokens)
    print(f"{PROMPT_LINE}{len(tokens)} tokens, {restored} restored from a shared prefix, {len(tokens) - restored} "
          f"evaluated", file=sys.stderr, flush=True)
    self._visinstruct_prompt = tokens  # the eval hook saves shared prefixes of this prompt
    return _generate(self, tokens, *args, **kwargs)


def eval_at_chunk_boundaries(self: llama_cpp.Llama, tokens):
    """The original eval, one chunk at a time, so the state at each chunk boundary inside the prompt can be
    saved; the chunks are the ones the original eval makes (n_batch tokens from an aligned start)."""
    prompt = getattr(self, "_visinstruct_prompt", None)
    n, tokens = self.n_batch, list(tokens)
    while tokens:
        take = n - self.n_tokens % n if self.n_tokens % n else n
        _eval(self, tokens[:take])
        tokens = tokens[take:]
        if prompt is not None and self.n_tokens % n == 0 and self.n_tokens < len(prompt) and \
                prompt[: self.n_tokens] == self.input_ids[: self.n_tokens].tolist():
            STATES.passed(self, prompt)


def from_empty_cache(self: llama_cpp.Llama, tokens, *args, **kwargs):
    clear_cache(self)
    return _generate(self, tokens, *args, **kwargs)


class TokenCandidates:
    """A llama_token_data_array over numpy storage (id, logit, p per entry), as llama_sampler_sample builds it."""

    def __init__(self, size: int):
        self.rows = np.zeros(size, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)],
                                                  align=True))
        self.array = llama_cpp.llama_token_data_array(
            data=self.rows.ctypes.data_as(llama_cpp.llama_token_data_p), size=size, selected=-1, sorted=False)
        self.pointer = ctypes.pointer(self.array)

    def fill(self, ids, logits) -> None:
        self.rows["id"], self.rows["logit"], self.rows["p"] = ids, logits, 0.0
        self.array.selected, self.array.sorted = -1, False

    def first_max(self) -> int:
        return int(self.rows["id"][np.argmax(self.rows["logit"])])  # argmax: the first of equal maxima, as greedy


class LazyGrammarGreedy:
    """llama-cpp-python's sampler chain for temperature 0 with a grammar (penalties, grammar, greedy), with the
    grammar asked about the greedy token first and about the whole vocabulary only when it rejects that token."""

    def __init__(self, llm: llama_cpp.Llama, grammar, penalty_repeat: float, penalty_freq: float,
                 penalty_present: float):
        self.n_vocab = llm._n_vocab
        self.penalties = llama_cpp.llama_sampler_init_penalties(
            self.n_vocab, llm.last_n_tokens_size, penalty_repeat, penalty_freq, penalty_present)
        self.grammar = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
        if not self.grammar:
            raise ValueError("llama.cpp could not parse the request's grammar")
        self.ids = np.arange(self.n_vocab, dtype=np.intc)
        self.all, self.one = TokenCandidates(self.n_vocab), TokenCandidates(1)
        self.sampled = self.full_checks = 0

    def sample(self, ctx, idx: int = -1) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, idx), shape=(self.n_vocab,))
        self.all.fill(self.ids, logits)
        llama_cpp.llama_sampler_apply(self.penalties, self.all.pointer)
        token = self.all.first_max()
        self.one.fill(token, self.all.rows["logit"][token])
        llama_cpp.llama_sampler_apply(self.grammar, self.one.pointer)
        if not np.isfinite(self.one.rows["logit"][0]):  # rejected: the full check, on the same penalized logits
            llama_cpp.llama_sampler_apply(self.grammar, self.all.pointer)
            token = self.all.first_max()
            self.full_checks += 1
        llama_cpp.llama_sampler_accept(self.penalties, token)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        self.sampled += 1
        return token

    def close(self) -> None:
        print(f"{GRAMMAR_LINE}{self.sampled} tokens sampled, {self.full_checks} checked against the whole "
              f"vocabulary", file=sys.stderr, flush=True)
        for sampler in (self.penalties, self.grammar):
            llama_cpp.llama_sampler_free(sampler)
        self.penalties = self.grammar = None


def lazy_grammar_sampler(self: llama_cpp.Llama, *args, **kwargs):
    """LazyGrammarGreedy where the request is greedy, grammar-constrained and plain; llama-cpp-python's chain
    otherwise."""
    options = {name: kwargs.get(name, default) for name, default in
               [("temp", 0.8), ("grammar", None), ("logits_processor", None), ("mirostat_mode", 0),
                ("repeat_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0)]}
    if args or options["temp"] != 0.0 or options["grammar"] is None or options["logits_processor"] is not None \
            or options["mirostat_mode"] != 0:
        return _init_sampler(self, *args, **kwargs)
    self._visinstruct_sampler = LazyGrammarGreedy(self, options["grammar"], options["repeat_penalty"],
                                                  options["frequency_penalty"], options["presence_penalty"])
    return self._visinstruct_sampler


def closing_lazy_samplers(generate):
    """`generate`, with the request's LazyGrammarGreedy closed (its counts logged) when the answer is done."""
    def wrapped(self: llama_cpp.Llama, *args, **kwargs):
        try:
            yield from generate(self, *args, **kwargs)
        finally:
            sampler, self._visinstruct_sampler = getattr(self, "_visinstruct_sampler", None), None
            if sampler is not None:
                sampler.close()
    return wrapped


def install(prefix_reuse: bool, lazy_grammar: bool) -> None:
    generate = generate_with_shared_prefixes if prefix_reuse else from_empty_cache
    if prefix_reuse:
        llama_cpp.Llama.eval = eval_at_chunk_boundaries
    if lazy_grammar:
        llama_cpp.Llama._init_sampler = lazy_grammar_sampler
        generate = closing_lazy_samplers(generate)
    llama_cpp.Llama.generate = generate


def take_flag(argv: list[str], name: str, default: bool) -> bool:
    """Removes `--name true|false` from argv (llama_cpp.server does not know it); returns its value."""
    if name in argv:
        i = argv.index(name)
        value = argv[i + 1].lower() in ("1", "true", "yes")
        del argv[i:i + 2]
        return value
    return default


if __name__ == "__main__":
    install(take_flag(sys.argv, "--prefix_reuse", True), take_flag(sys.argv, "--lazy_grammar", True))
    main()
