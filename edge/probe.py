"""Evaluation probes: what the model would do, read off its logits, on the same decode path as replies.

    probe = Probe(es)
    probe.refusal_margin("How do I get drunk fast?", tokens="minors")        # logits to the refuse/answer line
    with probe.together():                                                   # batched, reproducibly
        jobs = [probe.refusal_margin(q, tokens=t, wait=False) for q, t in cases]
    margins = [j.result() for j in jobs]

Every probe is a request on the :class:`EdgeSafe`'s engine with a policy of :mod:`edge_safe.decode`
(:class:`~edge_safe.decode.Margin`, :class:`~edge_safe.decode.FirstLogits`,
:class:`~edge_safe.decode.Forced`), so it sees exactly the KV a reply would see.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.decode import FirstLogits, Forced, Margin

if TYPE_CHECKING:  # importing the probe (e.g. for `edge-safe eval --help`) loads no llama.cpp
    from edge_safe.engine import Job
    from edge_safe.runtime import EdgeSafe, Messages


def margin_kind(es: "EdgeSafe") -> str:
    """What :meth:`Probe.refusal_margin` measures on ``es``, in words (for reports)."""
    if es.use_readout and es.bank.readout is not None:
        return ("the bank's decision readout at the first reply token (log-odds of refusing, a linear probe of "
                "that token's state: convert/readout.py)")
    return "the active constraints' best refusal-opener logit minus the best other logit at the first reply token"


class Probe:
    """The evaluation probes of one :class:`EdgeSafe`. ``wait=False`` returns the
    :class:`~edge_safe.engine.Job` (``.result()``), so many cases are decided together."""

    def __init__(self, es: "EdgeSafe"):
        self.es = es

    def refusal_openers(self, constraints: Sequence[str]) -> list[int]:
        """Token ids that open the constraints' refusals (as the model writes them after the reply header)."""
        return self.es.refusals.openers(constraints)

    def refusal_margin(self, messages: "Messages | str", tokens=None, max_blank: int = 4,
                       wait: bool = True) -> "float | Job":
        """How far a request is from being refused, in logits: under greedy decoding its reply opens
        with the active constraints' refusal opener iff ``strictness > -margin``.

        The margin is the best opener logit minus the best other logit at the first reply token,
        maximised over the whitespace-only tokens greedy decoding puts first (at most ``max_blank``),
        because ``strictness`` stays on until the first visible token; after earlier turns, the larger of
        the conversation's margin and its last user message's alone, the two views a reply decides by
        (``EdgeSafe(reread=True)``, the default). Where the bank has a decision readout (and
        ``EdgeSafe(readout=True)``, the default), the readout's log-odds at the first reply token instead
        (``max_blank`` unused): replies refuse iff ``strictness > -margin`` either way. A deployment can read the
        strictness it needs off the margins of its own traffic; ``edge-safe eval`` draws the bank's
        whole defense / over-refusal curve from them."""
        if isinstance(max_blank, bool) or not isinstance(max_blank, int) or max_blank < 0:
            raise EdgeSafeError(f"max_blank must be a whole number >= 0, got {max_blank!r}")
        req = self.es.prepare(messages, tokens=tokens, extra=max_blank)
        if not req.constraints:
            raise EdgeSafeError("refusal_margin needs active constraints (tokens=...): without them nothing is refused")
        openers = self.refusal_openers(req.constraints)
        if not openers:
            raise EdgeSafeError(f"the tokens {', '.join(req.constraints)} carry no refusal text, so there is no "
                                "refusal opener to measure")
        return self._run(req, Margin(self.es.model, openers, max_blank, req.reread, req.readout), wait)

    def first_token_logits(self, messages: "Messages | str", tokens=None, mode: str | None = None,
                           wait: bool = True, earlier: Sequence[int] = ()) -> "np.ndarray | Job":
        """Logits (n_vocab,) of the first reply token: a copy (for tests, SAM and evaluation). With ``earlier``
        (offsets >= 1), rows (1 + len(earlier), n_vocab): then those of the prompt rows that many tokens before
        its last one (what a readout with offsets reads)."""
        back = [int(k) for k in earlier]
        if any(k < 1 for k in back) or len(set(back)) != len(back):
            raise EdgeSafeError(f"earlier: distinct offsets >= 1 before the first reply token, got {list(earlier)}")
        return self._run(self.es.prepare(messages, tokens=tokens, mode=mode), FirstLogits(back), wait)

    def forced_logits(self, messages: "Messages | str", continuation: Sequence[int], tokens=None,
                      mode: str | None = None, wait: bool = True) -> "np.ndarray | Job":
        """Teacher-forced logits (len(continuation), n_vocab): row j predicts ``continuation[j]`` after
        the prompt and ``continuation[:j]``. Each token is decoded alone, as in generation, so row
        argmaxes reproduce a greedy reply's token ids."""
        ids = [int(t) for t in continuation]
        n_vocab = self.es.model.n_vocab
        if not ids or min(ids) < 0 or max(ids) >= n_vocab:
            raise EdgeSafeError(f"continuation must be 1+ token ids in 0..{n_vocab - 1}; got {ids[:8]}")
        req = self.es.prepare(messages, tokens=tokens, mode=mode, extra=len(ids) - 1)
        return self._run(req, Forced(ids, n_vocab), wait)

    @contextlib.contextmanager
    def together(self) -> Iterator["Probe"]:
        """Queue the probes (and replies) submitted inside the block as one batch (``Engine.together``)."""
        with self.es.engine.together():
            yield self

    def _run(self, req, policy, wait: bool):
        job = self.es.engine.submit(req, policy)
        return job.result() if wait else job
