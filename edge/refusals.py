"""Exact refusals: once a reply opens like a refusal, the runtime finishes it as one of the active
tokens' refusal texts, word for word.

A bank decides refuse/answer at the first visible reply token (the refusal opener, " Sorry" or
"Sorry"); what follows was free text, and a 270M model often trailed off ("Sorry, I can't help
you with alcohol.") or named another active category. Here the continuation is decoded over a
trie of the active refusals (each tokenized as the model writes it after the reply header, with
and without the leading space): at every step only tokens that keep the reply on some refusal
are allowed, greedy (or sampled) among those, so the model still picks *which* refusal at the
token where they differ, and the reply ends as soon as one is complete.

Telling a refusal from a reply that merely starts with the opener word ("Sorry to hear that,
here is how ..."): at the token right after the opener the model's own best continuation is
compared with the best token that continues a refusal. Within ``ESCAPE_LOGITS`` of each other,
the reply is a refusal and is finished exactly; further apart, the model clearly means something
else and decodes freely. The 4-logit margin is a judgement, not a tuned value: on the shipped
bank's test split 5 of its 436 refusal-like replies were not bank texts (eval/results/RESULTS.md).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

ESCAPE_LOGITS = 4.0  # a refusal continuation this far below the model's best token is not a refusal

Sequences = list[tuple[str, tuple[int, ...]]]  # (token name, refusal token ids)


def refusal_sequences(tokenize: Callable[[str], list[int]], header: str, refusals: dict[str, str]) -> Sequences:
    """Each refusal's token ids as the model writes it after ``header`` (the rendered prompt up to
    the reply): with a leading space (as trained: ``<prompt> <refusal>``) and without."""
    head = tokenize(header)
    out: Sequences = []
    for name, text in refusals.items():
        spaced = tokenize(header + " " + text)
        variants = {tuple(tokenize(text))}
        if spaced[: len(head)] == head and len(spaced) > len(head):
            variants.add(tuple(spaced[len(head):]))
        out += [(name, v) for v in sorted(variants) if v]
    return out


class Refusals:
    """The bank's refusal texts as token ids, as the model writes them after the reply header,
    tokenized once per token name (thread-safe: a dict filled with whole values)."""

    def __init__(self, bank, template, tokenize: Callable[[str], list[int]]):
        self._bank, self._tokenize = bank, tokenize
        self._header = template.render([{"role": "user", "content": "x"}])
        self._ids: dict[str, Sequences] = {}

    def sequences(self, names: Sequence[str]) -> Sequences:
        """The named tokens' refusals (with and without the leading space; tokens without a refusal
        have none)."""
        for n in names:
            if n not in self._ids:
                text = self._bank.tokens[n].refusal
                self._ids[n] = refusal_sequences(self._tokenize, self._header, {n: text}) if text else []
        return [seq for n in names for seq in self._ids[n]]

    def openers(self, names: Sequence[str]) -> list[int]:
        """Token ids that start the named tokens' refusals, sorted and distinct: the first token of each
        refusal as the model writes it after the reply header (where training puts it) and as it is
        spelt without the leading space, since a model can open a reply either way (" Sorry" or "Sorry")."""
        return sorted({ids[0] for _, ids in self.sequences(names)})


class RefusalGuide:
    """The per-request state: waiting for the first visible token, then (maybe) on a refusal.

    ``step(token, visible)`` records the chosen token; once the opener was written the guide is
    ``opened`` and :meth:`open` (given the next logits) decides whether the reply is a refusal (it
    returns the candidate refusals' names, several when more than one active constraint could be
    named: the caller then picks one with :meth:`keep`) or free text that starts with the word;
    ``constrain(logits)`` returns the logits to choose from (a masked copy while on a refusal);
    ``remaining()`` gives the rest of the refusal once only one is left, so it can be written out
    without decoding.
    """

    def __init__(self, sequences: Sequences, escape: float = ESCAPE_LOGITS):
        self.cands = list(sequences)
        self.escape = escape
        self.state = "waiting"  # -> "opened" -> "forced" | "off"; "done" once complete
        self.j = 0  # tokens of the refusal written so far
        self.refusal: str | None = None  # the name of the refusal being written / completed
        self.sure = False  # the reply was decided a refusal elsewhere (the last message read alone): no escape

    @property
    def active(self) -> bool:
        return self.state in ("opened", "forced")

    @property
    def openers(self) -> set[int]:
        """The first tokens of the candidate refusals."""
        return {ids[0] for _, ids in self.cands}

    def _allowed(self) -> np.ndarray:
        return np.fromiter({ids[self.j] for _, ids in self.cands}, dtype=np.int64)

    def open(self, logits: np.ndarray) -> list[str]:
        """At the token after the opener: a refusal (-> ``forced``; the candidate names) or a reply that
        merely starts with the word (-> ``off``; no names; never when ``sure``)."""
        if not self.sure and float(logits[self._allowed()].max()) < float(logits.max()) - self.escape:
            self.state = "off"
            return []
        self.state = "forced"
        return sorted({n for n, _ in self.cands})

    def keep(self, name: str) -> None:
        """Write the refusal of ``name`` (one of :meth:`open`'s names)."""
        self.cands = [(n, ids) for n, ids in self.cands if n == name]

    def constrain(self, logits: np.ndarray) -> np.ndarray:
        if self.state != "forced":
            return logits
        allowed = self._allowed()
        masked = np.full_like(logits, -np.inf)
        masked[allowed] = logits[allowed]
        return masked

    def step(self, token: int, visible: bool) -> bool:
        """Record the chosen token; True when it completed a refusal (the reply ends there)."""
        if self.state == "waiting":
            if not visible:
                return False  # blank tokens before the reply: the opener may still come
            self.cands = [(n, ids) for n, ids in self.cands if ids[0] == token]
            self.state = "opened" if self.cands else "off"
            self.j = 1
        elif self.state == "forced":
            self.cands = [(n, ids) for n, ids in self.cands if ids[self.j] == token]
            self.j += 1
        else:
            return False
        done = [n for n, ids in self.cands if len(ids) == self.j]
        if done and self.state != "off":
            self.refusal, self.state = done[0], "done"
            return True
        return False

    def remaining(self) -> tuple[int, ...] | None:
        """The refusal's tokens still to write, once it is on a refusal and only one is left."""
        if self.state != "forced" or len(self.cands) != 1:
            return None
        self.refusal = self.cands[0][0]
        return self.cands[0][1][self.j:]


def opener_margin(logits: np.ndarray, openers: np.ndarray) -> tuple[float, int]:
    """(best refusal-opener logit minus the best other logit, that other token) for one position;
    ``logits`` is left as it was."""
    rest = logits.copy()
    top = float(rest[openers].max())
    rest[openers] = -np.inf
    other = int(np.argmax(rest))
    return top - float(rest[other]), other
