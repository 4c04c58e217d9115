"""How `edge-safe eval` runs one request on one system (the bank or a baseline).

A :class:`System` says which runtime answers and how a composition becomes a
request: as bank tokens (``tokens``), as the rules written in a system line
(``text``), or not at all (``none``). The :class:`Runner` sends requests,
judges replies with early stopping, memoises identical requests and keeps the
progress bar and timings.

:meth:`Runner.prefetch` and :meth:`Runner.prefetch_margins` queue a whole list of cases at once on
the system's runtime (its ``n_parallel`` sequences decode them together), each reply stopping as soon
as its verdict is settled, and memoise the results; :meth:`Runner.decide` and :meth:`Runner.margin`
then read them. Every request takes the one decode path of the runtime; a decision can move with the
batch it was decoded in only at a near-tie (llama.cpp's batch-dependent rounding; eval/README.md).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from edge_safe.convert.bank import TokenBank, from_text_bank, from_text_token
from edge_safe.convert.errors import EdgeSafeError
from edge_safe.eval.metrics import Judge
from edge_safe.probe import Probe


@dataclass
class System:
    name: str  # none | text-rules | from-text | bank | bank-permuted
    label: str  # for tables and plots
    es: object  # the EdgeSafe that answers
    via: str  # "tokens" (bank entries) | "text" (rules as a system line) | "none"


class Runner:
    """Requests to systems: verdicts with early stopping, and logits; memoised, timed, with a progress bar."""

    def __init__(self, bank: TokenBank, tokenize, progress: bool = True):
        refusals = bank.refusals()
        if not refusals:
            raise EdgeSafeError("the bank has no refusal texts, so refusals cannot be judged; "
                                "evaluate a bank whose tokens carry refusals")
        self.bank = bank
        self.judge = Judge(refusals.values())
        self.max_tokens = max(len(tokenize(" " + t)) for t in refusals.values()) + 2
        self.progress = progress
        self.timing = {"decide": [0, 0.0], "logits": [0, 0.0]}
        self._memo: dict = {}
        self._bar = None

    # -- requests ----------------------------------------------------------------------------

    def request(self, system: System, constraints: Sequence[str], mode: str | None = None) -> dict | None:
        """Request fields for a composition (and mode) on a system; None if it cannot express it."""
        if system.via == "none":
            return {"tokens": None, "mode": None, "system": None} if mode is None else None
        if system.via == "tokens":
            if mode and mode not in system.es.modes:
                return None
            return {"tokens": list(constraints), "mode": mode, "system": None}
        lines = [self.bank.tokens[c].rule.strip() for c in constraints]
        if mode:
            tok = self.bank.tokens.get(mode)
            if tok is None or not tok.rule:
                return None
            lines.insert(0, tok.rule.strip())
        return {"tokens": None, "mode": None, "system": "\n".join(lines) or None}

    def decide(self, system: System, prompt, req: dict, what: str = "") -> tuple[str, str]:
        """(verdict, reply so far): greedy generation that stops once the verdict cannot change.

        ``prompt`` is one user request, or a conversation (a list of messages: its reply is judged)."""
        key = self._key(system, prompt, req)
        if key not in self._memo:
            t0 = time.perf_counter()
            self._memo[key] = self._judge(self._submit(system, prompt, req))
            self._time("decide", t0)
        self.tick(what or system.name)
        return self._memo[key]

    def prefetch(self, system: System, items: Sequence[tuple[object, dict]]) -> None:
        """Queue every (prompt, request) not yet memoised at once, so the runtime's ``n_parallel``
        sequences decide them together; :meth:`decide` then reads them."""
        todo: dict[tuple, tuple[object, dict]] = {}
        for p, r in items:
            k = self._key(system, p, r)
            if k not in self._memo:
                todo.setdefault(k, (p, r))
        if not todo:
            return
        t0 = time.perf_counter()
        with system.es.engine.together():  # the same batches on every run (reproducible figures)
            jobs = [self._submit(system, p, r) for p, r in todo.values()]
        for k, job in zip(todo, jobs):
            self._memo[k] = self._judge(job)
        self.timing["decide"][0] += len(todo)
        self.timing["decide"][1] += time.perf_counter() - t0

    def _submit(self, system: System, prompt, req: dict):
        """The reply job of a request, ending as soon as its verdict is settled."""
        settled = lambda text: self.judge.settled(text) is not None  # noqa: E731
        return system.es.submit(_messages(prompt, req), tokens=req["tokens"], mode=req["mode"],
                                max_tokens=self.max_tokens, until=settled)

    def _judge(self, job) -> tuple[str, str]:
        try:
            text = "".join(job)
        finally:
            job.close()
        return self.judge.settled(text) or self.judge.verdict(text), text

    @staticmethod
    def _key(system: System, prompt, req: dict) -> tuple:
        return (system.name, _hashable(prompt), tuple(req["tokens"] or ()), req["mode"], req["system"])

    def logits(self, system: System, prompt, req: dict, continuation=None, what: str = "") -> np.ndarray:
        """First-reply-token logits (n_vocab,), or teacher-forced logits (len, n_vocab) of a continuation."""
        t0 = time.perf_counter()
        probe, msgs = Probe(system.es), _messages(prompt, req)
        if continuation is None:
            out = probe.first_token_logits(msgs, tokens=req["tokens"], mode=req["mode"])
        else:
            out = probe.forced_logits(msgs, continuation, tokens=req["tokens"], mode=req["mode"])
        self._time("logits", t0)
        self.tick(what or system.name)
        return out

    def margin(self, system: System, prompt, constraints: Sequence[str], what: str = "") -> float:
        """The refusal margin (:meth:`Probe.refusal_margin <edge_safe.probe.Probe.refusal_margin>`) of a
        prompt (or a conversation) under a composition (counted with the logit requests)."""
        key = ("margin", system.name, _hashable(prompt), tuple(constraints))
        out = self._memo.get(key)  # prefetched
        if out is None:
            t0 = time.perf_counter()
            out = Probe(system.es).refusal_margin(prompt, tokens=list(constraints))
            self._time("logits", t0)
        self.tick(what or system.name)
        return out

    def prefetch_margins(self, system: System, items: Sequence[tuple[object, Sequence[str]]]) -> None:
        """Every (prompt, constraints) margin queued at once, for :meth:`margin`."""
        todo = {k: (p, c) for p, c in items if (k := ("margin", system.name, _hashable(p), tuple(c))) not in self._memo}
        if not todo:
            return
        t0 = time.perf_counter()
        probe = Probe(system.es)
        with probe.together():  # the same batches on every run (reproducible figures)
            jobs = [probe.refusal_margin(p, tokens=list(c), wait=False) for p, c in todo.values()]
        for k, job in zip(todo, jobs):
            self._memo[k] = job.result()
        self.timing["logits"][0] += len(todo)
        self.timing["logits"][1] += time.perf_counter() - t0

    def refusal_of(self, reply: str) -> str | None:
        """Name of the token whose refusal the reply is."""
        return self.bank.refusal_of(reply)

    # -- progress and timing -----------------------------------------------------------------

    def start(self, total: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc="eval", unit="req", file=sys.stderr, disable=not self.progress,
                         dynamic_ncols=True, mininterval=0.5)

    def tick(self, what: str, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.set_description(what, refresh=False)
            self._bar.update(n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _time(self, kind: str, t0: float) -> None:
        self.timing[kind][0] += 1
        self.timing[kind][1] += time.perf_counter() - t0

    def timings(self) -> dict:
        per = lambda t: round(t[1] / t[0], 4) if t[0] else None  # noqa: E731
        d, lg = self.timing["decide"], self.timing["logits"]
        return {"decisions": d[0], "s_per_decision": per(d), "logit_requests": lg[0], "s_per_logit_request": per(lg)}


def _hashable(prompt):
    return prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)


def _messages(prompt, req: dict) -> list[dict]:
    """The conversation of a request: its system line (text-rules baseline), then the user request or turns."""
    head = [{"role": "system", "content": req["system"]}] if req["system"] else []
    return head + ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))


# --- banks for the baselines -------------------------------------------------------------------


def text_bank_of(bank: TokenBank, info, tokenize) -> TokenBank:
    """A from-text bank of ``bank``'s own rules (constraints, and modes that have a rule)."""
    entries = [bank.tokens[n] for n in bank.constraints] + [bank.tokens[m] for m in bank.modes if bank.tokens[m].rule]
    tokens = [from_text_token(info, tokenize, t.name, t.rule, kind=t.kind, description=t.description,
                              refusal=t.refusal) for t in entries]
    return from_text_bank(info, tokens, bank.profiles)


def reversed_bank(bank: TokenBank) -> TokenBank:
    """A copy whose canonical order lists the constraints in reverse: the runtime injects them reversed."""
    order = bank.modes + bank.constraints[::-1]
    out = replace(bank, tokens={n: bank.tokens[n] for n in order})
    out.validate()
    return out
