"""The per-token state machines of a request: one object per request, fed one logits row per step.

The batching engine (:mod:`edge_safe.engine`) is the only thing that decodes; it feeds every running
request's policy the logits of its sequence's last position and decodes what the policy returns:

- a token id: decode it at the next position;
- ``None``: the request is over;
- :class:`Reload`: put another request's prefix and prompt into this request's sequence and feed the
  policy the logits of its last prompt token (the exact-refusal choice among several active
  constraints asks each one alone); ``save=True`` first snapshots the sequence, so that
- :class:`Resume` can put it back and decode a token there.

- :class:`View`: read another (short) request in the engine's view context, apart from the sequence.

A request after earlier turns carries ``reread``: its last user message alone, under the same constraints
(after a long pasted text: that message's last line, before which its control tokens sit).
Where the conversation's own first reply token opens no refusal, :class:`Reply` reads that message as a
:class:`View` and refuses when it refuses, as a guard model re-reads every turn (the conversation's KV stays
as it is, for its next turn); :class:`Margin` reports the larger margin of the two views, the same decision.

:class:`Reply` is generation (sampling, repeat penalty, ``strictness``, stop strings, exact refusals,
the stream of text pieces); :class:`Margin`, :class:`FirstLogits` and :class:`Forced` are the
evaluation probes (:mod:`edge_safe.probe`). One :class:`Request` is what the facade prepares
(:meth:`EdgeSafe.prepare <edge_safe.runtime.EdgeSafe.prepare>`) and every policy decodes.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from edge_safe.convert.bank import copies_at
from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.readout import Readout
from edge_safe.refusals import RefusalGuide, Sequences, opener_margin
from edge_safe.sampling import Sampling


@dataclass
class RequestStats:
    """What one request cost; it comes back with the request (``Job.stats``, a reply's ``timings``)."""

    tokens: list[str]  # active constraints, bank order
    mode: str | None
    prefix_positions: int  # positions taken by injected shallow vectors (BOS not counted)
    prompt_tokens: int  # BOS + conversation text tokens
    deep_cells: int = 0  # KV cells written for deep control tokens (they take no position and no prefill)
    deep_copies: int = 1  # times they were written where they sit (the bank's rule past a long context)
    prefix_source: str = ""  # "reused" (already in the sequence) | "cache" (snapshot restored) | "built"
    prefilled_tokens: int = 0  # conversation tokens decoded for this request (the rest were in KV)
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request prepared -> first generated token chosen
    decode_s: float = 0.0  # first -> last generated token
    finish_reason: str | None = None
    refusal: str | None = None  # the token whose refusal text was written exactly (None: no refusal)
    # after earlier turns: the last user message was also read alone under the same constraints ("answer" /
    # "refuse": what that view decided; "skipped": not read, the readout's score of the conversation's own view
    # being more than VIEW_WITHIN below refusing; None: not read, because there were no earlier turns or the
    # conversation's own view already refused)
    reread: str | None = None
    # seconds of each native step the engine ran for this request: restore, kv_write, bos, vectors, snapshot,
    # truncate, prompt (decodes holding its prompt rows), decode (its one-token decodes); for benchmarks
    steps: dict = field(default_factory=dict)
    t_prefilled: float = 0.0  # perf_counter when its prompt was decoded (first logits)

    def add_step(self, name: str, seconds: float) -> None:
        self.steps[name] = self.steps.get(name, 0.0) + seconds

    def timings(self) -> dict:
        """llama-server's ``timings`` names for what this request cost."""
        return {"prompt_n": self.prompt_tokens, "prompt_prefilled_n": self.prefilled_tokens,
                "prefix_source": self.prefix_source, "predicted_n": self.completion_tokens,
                "ttft_ms": round(self.ttft_s * 1e3, 3), "predicted_ms": round(self.decode_s * 1e3, 3)}


@dataclass(frozen=True)
class Marker:
    """Where a request's control tokens go among its prompt tokens: its deep cells are written at the
    position of the token before (BOS's, at the start), its ``width`` shallow vectors decoded after."""

    key: tuple[str, ...]  # the composition: injected names in layout order
    width: int  # positions its shallow vectors take (deep cells take none)


@dataclass
class Request:
    """A checked request: what to put in a sequence (prefix composition, prompt) and how to answer.

    The control tokens sit right before ``prompt[i]`` for each ``i`` in ``splits`` (user messages: the
    geometry they were trained in, wherever the conversation is long); a split at 0 puts them with BOS."""

    constraints: list[str]
    mode: str | None
    key: tuple[str, ...]  # prefix composition: the injected names in layout order
    vectors: np.ndarray  # (n_vectors, n_embd) shallow vectors decoded after BOS
    prompt: list[int]  # conversation tokens after the prefix
    stops: tuple[str, ...] = ()
    t_call: float = field(default_factory=time.perf_counter)
    strictness: float = 0.0  # added to the refusal openers' logits until the reply's first visible token
    openers: list[int] = field(default_factory=list)  # those token ids (empty: no bias applies)
    refusals: Sequences = field(default_factory=list)  # refusals a reply opening like one is finished as
    deep: tuple[np.ndarray, np.ndarray] | None = None  # deep entries' (keys, values), written at position 0
    alone: Callable[[str], "Request"] | None = None  # this request with one of its constraints active alone
    splits: tuple[int, ...] = (0,)  # prompt indices the control tokens go before (ascending)
    # ((position, copies), ...): deep cells sitting at or past `position` are written `copies` times (TokenBank)
    deep_copies: tuple[tuple[int, int], ...] = ()
    # after earlier turns: the last user message alone under the same constraints (the geometry the bank
    # separates best in); the reply refuses when either view refuses (None: no earlier turns, or not asked)
    reread: "Request | None" = None
    # the bank's decision readout (convert/readout.py): where set, the reply refuses iff its score at the first
    # reply token + strictness > 0 (per view), instead of iff a refusal opener is the greedy first token
    readout: "Readout | None" = None
    stats: RequestStats = field(init=False)

    def __post_init__(self):
        self.stats = RequestStats(list(self.constraints), self.mode, len(self.vectors), 1 + len(self.prompt),
                                  deep_cells=self.n_deep)

    @property
    def n_deep(self) -> int:
        return 0 if self.deep is None else len(self.deep[0])

    def copies_at(self, position: int) -> int:
        """How many times the deep cells are written when they sit at ``position``."""
        return copies_at(self.deep_copies, position)

    @property
    def n_positions(self) -> int:
        """Positions the request takes before its reply: BOS, the prompt, the shallow vectors."""
        return 1 + len(self.prompt) + len(self.vectors) * len(self.splits)

    @property
    def items(self) -> list:
        """What the sequence holds after BOS, in order: prompt token ids and the control tokens' :class:`Marker`
        (none without control tokens)."""
        if not self.key:
            return list(self.prompt)
        marker, out, start = Marker(self.key, len(self.vectors)), [], 0
        for i in self.splits:
            out += [*self.prompt[start:i], marker]
            start = i
        return out + self.prompt[start:]


@dataclass
class Reload:
    """Put ``request``'s prefix and prompt into the sequence (snapshotting it first when ``save``)."""

    request: Request
    save: bool = False


@dataclass
class Resume:
    """Restore the snapshot taken by ``Reload(save=True)`` and decode ``token`` at its next position (``None``:
    the request ends there)."""

    token: int | None


@dataclass
class View:
    """Read ``request`` (a short one: its control tokens with BOS) in the engine's view context, apart from the
    sequence: the policy's ``view_feed(logits)`` gets its logits (and returns a token to read on there, or
    None), then its ``after_view()`` gives the step for the sequence, whose KV the view never touches."""

    request: Request


Step = "int | Reload | Resume | View | None"


class StopFilter:
    """Turns token bytes into reply text pieces whose concatenation is the cleaned reply.

    UTF-8 is decoded incrementally (a character split over tokens is emitted once complete); text
    that may be the start of a stop string, leading whitespace and trailing whitespace are held back
    until the next piece decides them.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.raw = ""
        self.emitted = 0  # raw[:emitted] has been accounted for (emitted or skipped as leading space)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Add one token's bytes; returns (text safe to emit, stopped)."""
        return self._add(self._utf8.decode(data))

    def finish(self) -> str:
        """Flush at the end of generation (an incomplete UTF-8 tail becomes U+FFFD)."""
        piece, stopped = self._add(self._utf8.decode(b"", final=True))
        if stopped:
            return piece
        return piece + self._take(len(self.raw.rstrip()))

    def _add(self, text: str) -> tuple[str, bool]:
        if not text:
            return "", False
        search_from = max(0, len(self.raw) - self._longest)
        self.raw += text
        cut = min((i for i in (self.raw.find(s, search_from) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            self.raw = self.raw[:cut]
            return self._take(len(self.raw.rstrip())), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.raw.endswith(s[:k])), default=0)
        return self._take(len(self.raw[: len(self.raw) - hold].rstrip())), False

    def _take(self, end: int) -> str:
        if self.emitted == 0:  # still inside the leading whitespace
            stripped = self.raw.lstrip()
            if not stripped:
                return ""
            self.emitted = len(self.raw) - len(stripped)
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.raw[self.emitted:end], end
        return piece


class _Choice:
    """Which of several active constraints a refusal names: the one that, active alone (same mode, same
    conversation), refuses the request most surely (largest refusal-opener margin; bank order breaks ties)."""

    def __init__(self, req: Request, names: list[str], logits: np.ndarray, pos: int, openers: Callable):
        self.subs = [req.alone(n) for n in names]
        self.names, self.logits, self.pos, self.openers = names, np.array(logits), pos, openers
        self.margins: list[float] = []

    def next_request(self) -> Request | None:
        return self.subs[len(self.margins)] if len(self.margins) < len(self.subs) else None

    def add(self, logits: np.ndarray) -> None:
        name = self.names[len(self.margins)]
        self.margins.append(opener_margin(logits, np.asarray(self.openers([name]), dtype=np.int64))[0])

    def best(self) -> str:
        return self.names[int(np.argmax(self.margins))]  # first of equal margins: bank order


MAX_BLANK = 4  # blank tokens greedy decoding may put before a reply's first visible one, followed when deciding
# with a readout, the last message's view is read only where the conversation's own score (plus strictness) is at
# least -VIEW_WITHIN log-odds: further below, the view is skipped and the reply answers. Measured with bank v9 on
# the repo's validation requests after 1 500-3 000 tokens of pasted text or earlier turns: each of the 41 violating
# requests the view turned into a refusal scored -3.6 or more in the conversation's own view (1.4 log-odds of room
# left), while 53-64 % of real ShareGPT first turns score below -5 (under minors,eu / core), and skip its prefill.
VIEW_WITHIN = 5.0


@dataclass
class _View:
    """The conversation's first-token state while its last user message is read alone."""

    logits: np.ndarray  # the conversation's logits at the position it waits at
    pos: int
    blanks: int = 0  # blank tokens followed in the last message's view
    opener: int | None = None  # the refusal opener that view chose (None: it answers)


class _EarlierRows:
    """A policy that reads prompt rows before the first reply token (``earlier``: offsets back from the prompt's last
    row, as a readout's): the engine decodes their logits with the prompt (and each view) and hands each over with
    :meth:`take_earlier` before the first reply token's logits are fed."""

    earlier: tuple[int, ...] = ()

    def _read_rows(self, earlier: Sequence[int]) -> None:
        self.earlier = tuple(earlier)
        self._rows: dict[int, np.ndarray] = {}

    def take_earlier(self, offset: int, logits: np.ndarray) -> None:
        """The logits of the row ``offset`` tokens before the prompt's last one (of the view decoded now)."""
        self._rows[offset] = logits


class Reply(_EarlierRows):
    """One generation: sampling, repeat penalty, ``strictness``, stop strings and exact refusals.

    The refuse/answer decision does not depend on sampling: until the reply's first visible token the
    token is chosen greedily among the blank tokens and the refusal openers; if the greedy choice is
    a visible token that opens no refusal, the reply answers, and that token is sampled with the
    openers masked. After earlier turns, where the first choice opens no refusal (before the reply's first
    token, so the time to it includes the view), the last user message is read alone (``Request.reread``) and
    the reply refuses when that view's greedy choice (blank tokens followed, as :class:`Margin`) opens a
    refusal. Greedy sampling gives exactly the argmax reply. ``emit(piece)`` receives the text
    pieces (they join to the cleaned reply); ``until(text)`` ends the reply once it returns True.
    """

    def __init__(self, req: Request, model, sampling: Sampling, rng: np.random.Generator, max_tokens: int,
                 n_ctx: int, emit: Callable[[str], None], openers: Callable[[Sequence[str]], list[int]],
                 until: Callable[[str], bool] | None = None):
        self.req, self.st, self.model, self.n_ctx = req, req.stats, model, n_ctx
        self.sampling, self.rng, self.max_tokens = sampling, rng, max_tokens
        self.openers = openers
        self.out = StopFilter(req.stops)
        self.guide = RefusalGuide(req.refusals) if req.refusals else None
        self.decision = np.asarray(sorted(set(req.openers) | (self.guide.openers if self.guide else set())),
                                   dtype=np.int64)  # tokens that open a refusal
        self.deciding = True  # until the reply's first visible token
        self.history: list[int] = []  # the reply's tokens (sampled or written out as a refusal); the repeat penalty reads them
        self.st.finish_reason = "length"
        self.t_first: float | None = None
        self._emit, self.until, self.text, self.halted = emit, until, "", False
        self.choice: _Choice | None = None
        self.value: str | None = None
        # the last user message read alone (after earlier turns), at most once, while the conversation's own
        # first token opens no refusal; ``view`` holds that view's state while it is read
        self.reread = req.reread if len(self.decision) else None
        self.view: _View | None = None
        # with a readout: its verdict on the request (True: refuse), read at the first reply token, for the rest of
        # the deciding (an answer's blank tokens and first visible token are chosen with the openers masked)
        self.readout = req.readout if len(self.decision) else None
        # the last message's view decides by its own request's readout (with the calibration's offset, which a
        # prompt after earlier turns or pasted text goes without: EdgeSafe.prepare)
        self.view_readout = _view_readout(self.readout, self.reread)
        self._read_rows(self.readout.earlier if self.readout is not None else ())
        self.verdict: bool | None = None
        self.score: float | None = None  # the readout's score behind that verdict (the conversation's own view)

    def emit(self, piece: str) -> None:
        if piece and not self.halted:
            self.text += piece
            self._emit(piece)
            if self.until is not None and self.until(self.text):
                self.halted = True  # the caller has what it needs: stop here, no tail

    def feed(self, logits: np.ndarray, pos: int):
        """Choose what comes after ``logits`` (the sequence holds ``pos`` positions)."""
        if self.choice is not None:  # a candidate constraint's logits, alone
            self.choice.add(logits)
            sub = self.choice.next_request()
            if sub is not None:
                return Reload(sub)
            self.guide.keep(self.choice.best())
            logits, pos, self.choice = self.choice.logits, self.choice.pos, None
            return self._resume(self._choose(logits, pos))
        guide = self.guide
        if guide is not None and guide.state == "opened":
            names = guide.open(logits)
            # which constraint to name: asked alone in the view that decided the refusal
            asked = self.req.reread if guide.sure and self.req.reread is not None else self.req
            if len(names) > 1 and asked.alone is not None:
                self.choice = _Choice(asked, names, logits, pos, self.openers)
                if asked is not self.req:  # the last message with each candidate alone: views, apart
                    return View(self.choice.next_request())
                return Reload(self.choice.next_request(), save=True)
        if self.deciding and self.reread is not None and self._greedy(logits) not in self.decision:
            if self.readout is not None and self.score + self.req.strictness < -VIEW_WITHIN:
                self.reread, self.st.reread = None, "skipped"  # too far from refusing for the view to matter
                return self._choose(logits, pos)
            self.view, self.reread = _View(np.array(logits), pos), None  # read the last message alone first
            return View(self.req.reread)
        return self._choose(logits, pos)

    def _greedy(self, logits: np.ndarray) -> int:
        """The greedy choice while deciding (``strictness`` on the refusal openers; with a readout, the best
        opener where it refuses, else the best other token)."""
        req = self.req
        if self.readout is not None:
            if self.verdict is None:
                self.score = self.readout.score(logits, self._rows)
                self.verdict = self.score + req.strictness > 0
            return self._best(logits, self.verdict)
        if req.openers and req.strictness:
            logits = logits.copy()  # llama.cpp's buffer stays as decoded
            logits[req.openers] += req.strictness
        return int(np.argmax(logits))

    def _refuses(self, logits: np.ndarray) -> bool:
        """The readout's verdict on the last message's view's first reply token."""
        return self.view_readout.score(logits, self._rows) + self.req.strictness > 0

    def _best(self, logits: np.ndarray, opener: bool) -> int:
        """The best refusal opener (``opener``), or the best token that opens no refusal."""
        if opener:
            return int(self.decision[int(np.argmax(logits[self.decision]))])
        rest = np.array(logits, dtype=np.float32)
        rest[self.decision] = -np.inf
        return int(np.argmax(rest))

    def _visible(self, tok: int) -> bool:
        """Whether ``tok`` ends the deciding (a visible token or the end of the reply)."""
        return self.model.is_eog(tok) or bool(self.model.token_to_piece(tok).strip())

    def view_feed(self, logits: np.ndarray) -> int | None:
        """Logits of a :class:`View`: of a candidate constraint alone (choosing the refusal to name), or of
        the last message alone, whose blank tokens are followed (at most ``MAX_BLANK``, as :class:`Margin`)
        to its first visible choice. None once read."""
        if self.view is None:
            self.choice.add(logits)
            return None
        view = self.view
        if self.readout is not None:  # the readout decides at the view's first reply token
            if self._refuses(logits):
                view.opener = self._best(logits, True)
            return None
        best = self._greedy(logits)
        if best in self.decision:
            view.opener = best
        elif not self._visible(best) and view.blanks < MAX_BLANK:
            view.blanks += 1
            return best
        return None

    def after_view(self):
        """The step for the sequence once a view was read: the next candidate's view, or the conversation's
        own reply: an answer, or the refusal the last message alone opens."""
        if self.view is None:
            sub = self.choice.next_request()
            if sub is not None:
                return View(sub)
            self.guide.keep(self.choice.best())
            logits, pos, self.choice = self.choice.logits, self.choice.pos, None
            return self._choose(logits, pos)
        view, self.view = self.view, None
        self.st.reread = "answer" if view.opener is None else "refuse"
        logits = view.logits
        if view.opener is not None:  # the conversation's reply opens the refusal the last message alone opens
            logits[view.opener] = np.inf
            if self.readout is not None:
                self.verdict = True
            if self.guide is not None:
                self.guide.sure = True
        return self._choose(logits, view.pos)

    @staticmethod
    def _resume(step):
        """Back to the saved conversation: to decode ``step`` there, or to end there (``None``: a refusal written
        out), so that the sequence holds the conversation, not a view, for the next turn to reuse."""
        return Resume(step) if step is None or isinstance(step, int) else step

    def _pick(self, logits: np.ndarray) -> int:
        if self.deciding and len(self.decision):
            best = self._greedy(logits)  # the greedy choice decides: refusal, blank, or answer
            if self.sampling.temperature == 0 or best in self.decision or not self.model.token_to_piece(best).strip():
                return best
            logits = np.array(logits, dtype=np.float32)  # an answer: its first token sampled, no refusal opener
            logits[self.decision] = -np.inf
            return self.sampling.pick(logits, self.rng)
        return self.sampling.pick(self.sampling.penalise(logits, self.history), self.rng)

    def _choose(self, logits: np.ndarray, pos: int):
        st, guide = self.st, self.guide
        if guide is not None:
            logits = guide.constrain(logits)  # a masked copy while the reply is on a refusal
        tok = self._pick(logits)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            st.ttft_s = self.t_first - self.req.t_call
        if self.model.is_eog(tok):
            st.finish_reason = "stop"
            return self._end()
        st.completion_tokens += 1
        self.history.append(tok)
        raw = self.model.token_to_piece(tok)
        visible = bool(raw.strip())
        self.deciding = self.deciding and not visible
        piece, stopped = self.out.feed(raw)
        self.emit(piece)
        if guide is not None and guide.step(tok, visible):
            st.refusal, stopped = guide.refusal, True  # the refusal is complete: the reply ends with it
        rest = guide.remaining() if guide is not None and not stopped else None
        if rest is not None:  # one refusal left: written out, no decoding needed
            room = self.max_tokens - st.completion_tokens
            for t in rest[:room]:
                st.completion_tokens += 1
                self.history.append(t)
                self.emit(self.out.feed(self.model.token_to_piece(t))[0])
            if len(rest) <= room:
                st.refusal, st.finish_reason = guide.refusal, "stop"
            return self._end()
        if stopped:
            st.finish_reason = "stop"
            return self._end()
        if self.halted or st.completion_tokens >= self.max_tokens or pos >= self.n_ctx:
            return self._end()  # "length": the budget or the context is used up
        return tok

    def _end(self) -> None:
        if not self.halted:
            self.emit(self.out.finish())
        self.st.decode_s = time.perf_counter() - (self.t_first or time.perf_counter())
        self.value = self.text
        return None


def _view_readout(readout: Readout | None, reread: "Request | None") -> Readout | None:
    """The readout the last message's view decides by: its own request's (the same weights; its bias may carry the
    calibration's offset where the conversation's does not), else the conversation's."""
    if readout is None or reread is None or reread.readout is None:
        return readout
    return reread.readout


class Margin(_EarlierRows):
    """How far a request is from being refused, in logits: the best refusal-opener logit minus the best
    other logit at the first reply token, maximised over the blank tokens greedy decoding puts first
    (at most ``max_blank``), because ``strictness`` stays on until the first visible token; after earlier
    turns, the larger of the conversation's margin and its last user message's alone (``reread``), as
    :class:`Reply` refuses when either view refuses. With a readout, the scores ``s1`` (the conversation's) and
    ``s2`` (the last message's) give ``max(s1, min(s2, s1 + VIEW_WITHIN))``: a reply reads the second view only
    where ``s1 + strictness >= -VIEW_WITHIN``, so it refuses iff that value ``+ strictness > 0``."""

    def __init__(self, model, openers: Sequence[int], max_blank: int, reread: Request | None = None,
                 readout: Readout | None = None):
        self.model, self.idx, self.max_blank = model, np.asarray(openers, dtype=np.int64), max_blank
        self.j, self.value = 0, -np.inf
        self.reread = reread  # after earlier turns: the last user message alone, read next (the larger margin counts)
        self.readout = readout  # where set, the margin is its score at the first reply token (of each view)
        self.view_readout = _view_readout(readout, reread)  # the last message's view: its own request's
        self.first: float | None = None  # with a readout: the conversation's own view's score
        self._read_rows(readout.earlier if readout is not None else ())

    def feed(self, logits: np.ndarray, pos: int) -> "int | View | None":
        if self.readout is not None:  # read at the first reply token: this view is read
            if self.first is None:
                self.first = self.value = self.readout.score(logits, self._rows)
            else:  # the last message's view, which a reply reads only within VIEW_WITHIN of the first's
                score = self.view_readout.score(logits, self._rows)
                self.value = max(self.value, min(score, self.first + VIEW_WITHIN))
            return self._next_view()
        margin, other = opener_margin(logits, self.idx)
        self.value = max(self.value, margin)
        if self.j == self.max_blank or self.model.is_eog(other) or self.model.token_to_piece(other).strip():
            # the greedy reply (below the threshold) starts with a visible token or ends: this view is read
            return self._next_view()
        self.j += 1
        return other

    def _next_view(self) -> "View | None":
        """The last message's view, once (None: every view is read)."""
        if self.reread is None:
            return None
        view, self.reread, self.j = self.reread, None, 0
        return View(view)

    def view_feed(self, logits: np.ndarray) -> int | None:
        """The last message's view: read as the conversation was (its blank tokens followed)."""
        return self.feed(logits, 0)

    def after_view(self) -> None:
        return None


class FirstLogits(_EarlierRows):
    """The first reply token's logits (a copy; with ``earlier``, rows (1 + len(earlier), n_vocab): the first
    reply token's, then those of the rows ``earlier`` tokens before the prompt's last one)."""

    value: np.ndarray | None = None

    def __init__(self, earlier: Sequence[int] = ()):
        self._read_rows(earlier)

    def feed(self, logits: np.ndarray, pos: int) -> None:
        missing = [k for k in self.earlier if k not in self._rows]
        if missing:
            raise EdgeSafeError(f"no prompt row {missing[0]} tokens before the first reply token was decoded (the "
                                "prompt is shorter, or the row sits before control cells written since)")
        self.value = np.array(logits) if not self.earlier else np.stack([logits] + [self._rows[k] for k in self.earlier])
        return None


class Forced:
    """Teacher-forced logits (len(ids), n_vocab): row j predicts ids[j] after the prompt and ids[:j]."""

    def __init__(self, ids: Sequence[int], n_vocab: int):
        self.ids, self.j = list(ids), 0
        self.value = np.empty((len(self.ids), n_vocab), dtype=np.float32)

    def feed(self, logits: np.ndarray, pos: int) -> int | None:
        self.value[self.j] = logits
        self.j += 1
        return self.ids[self.j - 1] if self.j < len(self.ids) else None
