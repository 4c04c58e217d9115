"""What `edge-safe bench` times: one method per measurement, for edge-safe and its baselines.

Every method takes the round's prompt, sets up its own preconditions (reset KV,
evict or prime a prefix), times exactly one request and returns a dict of
figures. Nothing here orders or repeats measurements; :mod:`.benchmark` does.

- :class:`EdgeBench` -- the runtime (:class:`~edge_safe.runtime.EdgeSafe`) per composition:
  TTFT cold / warm / with the prefix held, forced greedy decode, each request split into the native
  steps the engine timed for it.
- :class:`LlamaBench` -- bare llama-cpp-python ``Llama`` (no rules), the rules as
  a text system line (cold, and warm through ``Llama``'s own KV prefix reuse), and
  a two-call guard (classify, then answer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.layout import prefix_names
from edge_safe.probe import Probe

PRIME_QUESTION = "Who wrote Hamlet?"  # primes caches and slots; never a measured prompt
GUARD_INSTRUCTION = ("You are a safety guard. Rules:\n{rules}\n"
                     "Reply Yes if the question below breaks a rule, else No.")
GUARD_TOKENS = 2  # the classifier call's reply length (" No" + one more), greedy, no stop strings


@dataclass(frozen=True)
class Composition:
    """One request configuration: a label and the canonical constraints and mode it means."""

    label: str  # as given: "none", "minors,eu", "rejective", "all"
    constraints: tuple[str, ...]  # bank order
    mode: str | None  # after the runtime's default (positive when constraints are on and the bank has it)

    @property
    def key(self) -> tuple[str, ...]:
        """The prefix-cache key: injected names in layout order."""
        return tuple(prefix_names(self.mode, self.constraints))

    def request(self) -> dict:
        return {"tokens": list(self.constraints) or None, "mode": self.mode}


class EdgeBench:
    """The edge-safe runtime, measured per composition. Each request's native steps (restore, KV write,
    prefill, ...) are timed by the engine itself and come back in its ``stats.steps``."""

    def __init__(self, es, decode_messages: list[dict], continuation: Sequence[int]):
        self.es = es
        self.probe = Probe(es)
        self.decode_messages = decode_messages
        self.continuation = list(continuation)  # forced greedy generation: N + 1 token ids

    def close(self) -> None:
        pass

    def ttft(self, comp: Composition, prompt: str, cold: bool) -> dict:
        """Call -> first token with the KV reset; cold: prefix built (not cached), warm: restored from the LRU."""
        es, cache = self.es, self.es.prefix_cache
        others = {}
        if cold:
            others = {k: cache.peek(k) for k in cache.keys() if k != comp.key}
            cache.clear()
        elif comp.key not in cache:
            self._request(comp, PRIME_QUESTION)
        es.reset()
        st = self._request(comp, prompt)
        for k, blob in others.items():  # put the other compositions back, LRU order kept
            cache.put(k, blob)
        _expect(st, "built" if cold else "cache", comp, "cold" if cold else "warm")
        steps = st.steps
        parts = {"prompt_prefill_s": steps.get("prompt", 0.0)}  # the prompt batch, with the first logits
        if cold and st.deep_cells:  # deep cells written with BOS (no decode), shallow vectors, snapshot, prompt
            parts.update(kv_write_s=steps.get("kv_write", 0.0), vectors_s=steps.get("vectors", 0.0),
                         snapshot_s=steps.get("snapshot", 0.0))
            positions = st.prefix_positions + st.prefilled_tokens  # decoded positions: BOS is written with the cells
        elif cold:  # BOS, vectors, snapshot, prompt
            parts.update(bos_s=steps.get("bos", 0.0), vectors_s=steps.get("vectors", 0.0),
                         snapshot_s=steps.get("snapshot", 0.0))
            positions = 1 + st.prefix_positions + st.prefilled_tokens
        else:  # restore (seq_rm + set_data), prompt
            parts["restore_s"] = steps.get("restore", 0.0)
            positions = st.prefilled_tokens
        return {"ttft_s": st.ttft_s, "positions": positions, "prompt_tokens": st.prefilled_tokens, **parts,
                "other_s": st.ttft_s - sum(parts.values())}  # render, tokenize, queue, sampling, Python

    def stay(self, comp: Composition, prompt: str) -> dict:
        """Call -> first token when the previous request had the same composition (prefix held in KV):
        nothing is restored, only the prompt's tokens after what the two share (the template's
        opening) are prefilled."""
        self.es.reset()
        self._request(comp, PRIME_QUESTION)
        st = self._request(comp, prompt)
        _expect(st, "reused", comp, "stay")
        return {"ttft_s": st.ttft_s, "positions": st.prefilled_tokens, "truncate_s": st.steps.get("truncate", 0.0)}

    def decode(self, comp: Composition) -> dict:
        """Tokens/s over a fixed greedy generation: the continuation's tokens decoded one at a
        time after the prompt (teacher-forced: each token alone, as in generation)."""
        self.es.reset()
        job = self.probe.forced_logits(self.decode_messages, self.continuation, wait=False, **comp.request())
        job.result()
        t_end = time.perf_counter()
        n = len(self.continuation) - 1
        st = job.stats
        if st.t_prefilled <= 0:
            raise EdgeSafeError("bench: the forced decode reported no prompt prefill")
        seconds = t_end - st.t_prefilled  # from the end of the prompt prefill
        return {"tokens_per_s": n / seconds, "tokens": n, "decode_s": seconds}

    def _request(self, comp: Composition, prompt: str):
        job = self.es.submit(prompt, max_tokens=1, **comp.request())
        for _ in job:
            pass
        return job.stats


def _expect(st, source: str, comp: Composition, what: str) -> None:
    if st.prefix_source != source:
        raise EdgeSafeError(f"bench: {what} request for {comp.label!r} took prefix path {st.prefix_source!r}, "
                            f"expected {source!r}; the measurement would not be what its name says")


class LlamaBench:
    """Bare llama-cpp-python (``llama_cpp.Llama``) and the text baselines built on it."""

    def __init__(self, model_path, n_ctx: int, n_batch: int, n_threads: int, n_gpu_layers: int, template):
        from edge_safe.llama import plain_llama  # the same CPU buffer choice as edge-safe: fair ratios

        self.llm = plain_llama(model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                   n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, verbose=False)
        self.template = template

    def close(self) -> None:
        self.llm.close()

    # -- prompts --------------------------------------------------------------------------

    def prompt(self, question: str, rules: str | None = None) -> str:
        return self.template.prompt(question, system=rules)

    def guard_prompt(self, question: str, rules: str) -> str:
        return self.template.prompt(question, system=GUARD_INSTRUCTION.format(rules=rules))

    def n_tokens(self, text: str) -> int:
        """Positions a prompt occupies (BOS included)."""
        return len(self.tokenize(text))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as llama-cpp-python sees it (BOS first)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    # -- measurements -----------------------------------------------------------------------

    def ttft(self, text: str, warm_from: str | None = None) -> dict:
        """Call -> first streamed token of ``create_completion``. Cold: fresh KV. Warm: the previous
        request on this Llama was ``warm_from`` (same rules), so its own prefix match reuses the KV."""
        self.llm.reset()
        reused = 0
        if warm_from is not None:
            self.llm.create_completion(warm_from, max_tokens=1, temperature=0.0)
            reused = _common_prefix(self.tokenize(warm_from), self.tokenize(text))
        seconds = self._first_token(text)
        return {"ttft_s": seconds, "positions": self.n_tokens(text) - reused}

    def guard(self, question: str, rules: str, warm: bool) -> dict:
        """Two calls: classify the request against the rules (GUARD_TOKENS tokens), then answer it
        without rules. TTFT = both, to the answer's first token. Warm: the classifier's previous
        request had the same rules, so ``Llama`` reuses their KV."""
        classify = self.guard_prompt(question, rules)
        self.llm.reset()
        reused = 0
        if warm:
            prime = self.guard_prompt(PRIME_QUESTION, rules)
            self.llm.create_completion(prime, max_tokens=1, temperature=0.0)
            reused = _common_prefix(self.tokenize(prime), self.tokenize(classify))
        t0 = time.perf_counter()
        verdict = self.llm.create_completion(classify, max_tokens=GUARD_TOKENS, temperature=0.0, stop=[])
        t_classified = time.perf_counter()
        self.llm.reset()
        answer = self.prompt(question)
        answer_s = self._first_token(answer)
        return {"ttft_s": t_classified - t0 + answer_s, "classify_s": t_classified - t0,
                "classify_tokens": verdict["usage"]["completion_tokens"],
                "positions": self.n_tokens(classify) - reused + self.n_tokens(answer)}

    def decode(self, text: str, n: int) -> dict:
        """Tokens/s of ``Llama.generate`` (eval + greedy sampler) over n steps after the first token."""
        ids, seconds = self.greedy(text, n + 1)
        return {"tokens_per_s": n / seconds, "tokens": n, "decode_s": seconds}

    def greedy(self, text: str, n: int) -> tuple[list[int], float]:
        """The first n greedy token ids after ``text`` (EOS does not stop it) and the seconds
        between the first and the last."""
        self.llm.reset()
        gen = self.llm.generate(self.tokenize(text), temp=0.0, reset=True)
        ids = [next(gen)]
        t1 = time.perf_counter()
        while len(ids) < n:
            ids.append(next(gen))
        seconds = time.perf_counter() - t1
        gen.close()
        return [int(i) for i in ids], seconds

    def _first_token(self, text: str) -> float:
        t0 = time.perf_counter()
        stream = self.llm.create_completion(text, max_tokens=1, temperature=0.0, stream=True)
        try:
            next(stream)
            return time.perf_counter() - t0
        finally:
            stream.close()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(b) - 1)  # Llama re-decodes at least one token for fresh logits
