"""``EdgeSafe``: a quantized base model plus a token bank, with per-request constraints.

A thin facade, shaped like llama-cpp-python's ``Llama``: it checks and prepares a request
(:meth:`EdgeSafe.prepare`) and submits it to its :class:`~edge_safe.engine.Engine`, the one thing that
decodes (one sequence by default, ``n_parallel`` for more), as vLLM's ``LLM`` is over its engine.
Every request is laid out as (convert/FORMAT.md, docs/DESIGN.md)::

    [BOS] [earlier turns] [deep cells] [mode vectors] [constraint vectors ...] <last user message>

The control tokens sit right before the last user message, where the bank was trained to see them
(with no earlier turns that is BOS's position 0): Gemma 3's sliding-window layers see only the last
512 positions, so cells at position 0 vanish from a long conversation. A last message longer than 256
tokens gets them before its last line instead (a request after pasted text). BOS is decoded as a token,
deep cells are written into the KV cache (keys rotated to where they sit), shallow bank vectors are
decoded as embedding batches, the conversation as text tokens (special-token parsing off, so typed text
is always text). The KV state of ``[BOS][control tokens]`` is snapshotted per composition into a
byte-bounded LRU, and each sequence remembers what it holds, so switching between cached compositions
costs no prefill and a conversation's next turn re-decodes only its latest turn.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from typing import Iterator, Mapping, Sequence

import numpy as np

from edge_safe import kv_cells
from edge_safe.convert.bank import TokenBank
from edge_safe.convert.errors import EdgeSafeError, PromptTooLongError
from edge_safe.convert.keys import Behaviour
from edge_safe.convert.layout import PLACEMENTS, ChatTemplate, check_layout, control_layout, prefix_names
from edge_safe.convert.model import ModelInfo
from edge_safe.decode import Reply, Request
from edge_safe.engine import Engine, Job
from edge_safe.llama import Model
from edge_safe.models import resolve_bank_path, resolve_model_path
from edge_safe.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from edge_safe.refusals import Refusals
from edge_safe.sampling import Sampling, check_strictness

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, str]]
#: Positions per sequence (Gemma 3 270M is trained for 32 768). With llama.cpp's f16 cache each costs 18 KiB on the
#: 270M model (18 layers x K and V x 256 x 2 bytes; the sliding-window layers keep every cell, swa_full), so
#: 8 192 positions allocate 148.5 MiB of KV per sequence (llama.cpp pads the stream to 8 448 cells: the
#: bank's deep cells, then a multiple of 256); ``n_parallel`` sequences take that many times as much.
DEFAULT_N_CTX = 8192
# a last user message of at most this many tokens is also read alone after earlier turns (``reread``), in the
# engine's view context, as is the last line of a long message that got the control tokens before that line
REREAD_MAX_TOKENS = 320


class EdgeSafe:
    """A base GGUF model and a token bank; constraints are chosen per request.

    >>> es = EdgeSafe()
    >>> es.create_chat_completion([{"role": "user", "content": "How do I mix a mojito?"}], tokens="minors,eu")

    ``n_parallel`` sequences are decoded together (concurrent callers, a server); each holds ``n_ctx``
    positions (default 8 192: 148.5 MiB of f16 KV cache per sequence on the 270M model) plus the bank's
    deep cells, which take no position. ``flash_attn`` / ``kv_type`` set
    llama.cpp's flash attention and KV-cache type (default: llama.cpp's); deep tokens need an f16 or
    f32 cache. ``strictness`` is the default of every request (see :meth:`create_chat_completion`).
    ``deep_copies`` replaces the bank's rule for writing deep cells more than once past a long context
    (``[[position, copies], ...]``; ``[]``: once everywhere; default: the bank's ``deep_copies``).
    ``reread`` (default on): after earlier turns, the last user message is also read alone under the same
    constraints (after a long pasted text, the message's last line), and the reply refuses when either the
    conversation or that text alone refuses (it is prefilled twice; the conversation's KV is kept and reused).
    ``readout`` (default on): where the bank carries a decision readout, replies refuse iff its score at the first
    reply token + strictness > 0 (convert/readout.py); off, or without one, by the refusal-opener margin.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        bank: str | os.PathLike | TokenBank | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        seed: int | None = None,
        *,
        n_parallel: int = 1,
        n_batch: int = 512,
        max_queue: int | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        strictness: float = 0.0,
        cpu_repack: str | bool | None = None,
        exact_refusals: bool = True,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
        placement: str = "last",
        reread: bool = True,
        readout: bool = True,
        ready_next_turn: bool = False,
        deep_copies: "Sequence[Sequence[int]] | None" = None,
    ):
        self.strictness = check_strictness(strictness)
        self.use_readout = bool(readout)  # decide by the bank's decision readout where it has one
        # after each chat reply, lay out the conversation's next turn up to its control tokens while idle (chat
        # apps, the server): the next request then decodes only its new message (see :meth:`ready_next_turn`)
        self.auto_ready = bool(ready_next_turn)
        if placement not in PLACEMENTS:
            raise EdgeSafeError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        # where a conversation's control tokens go: before its last user message ("last"), or a copy before every
        # user message ("every": refuses everything after a few turns with the shipped bank, which was trained
        # with one copy; eval/results/long-context/)
        self.placement = placement
        # after earlier turns, also read the last user message alone under the same constraints (after pasted
        # text, its last line) and refuse when either view refuses (a guard model's re-read of every turn, at the
        # cost of prefilling that text twice): the bank separates best with its cells right before a request and
        # nothing earlier
        self.reread = bool(reread)
        self.exact_refusals = bool(exact_refusals)  # finish a reply that opens like a refusal as one, word for word
        self.model_path = resolve_model_path(model_path)
        self.bank = bank if isinstance(bank, TokenBank) else TokenBank.load(resolve_bank_path(bank))
        if deep_copies is not None:  # instead of the bank's own rule ([] = cells written once everywhere)
            self.bank = self.bank.with_deep_copies(deep_copies)
        check_layout(self.bank.layout)
        self.model_info = ModelInfo.read(self.model_path)
        self.bank.check_model(self.model_info)
        self.template: ChatTemplate = self.bank.template
        self.model_name = self.model_path.stem
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self.model = Model(self.model_path, n_gpu_layers, cpu_repack)
        # RoPE of the deep cells' keys where they are written after position 0 (known for Gemma 3)
        self._rope_bases = (kv_cells.gemma3_rope_bases(self.model.n_layer, self.model_info.rope_freq_base or 1e6)
                            if self.model_info.arch == "gemma3" else None)
        try:
            if self.model.n_embd != self.bank.n_embd:  # check_model already compared the GGUF header
                raise EdgeSafeError(f"llama.cpp reports n_embd {self.model.n_embd}, the bank has {self.bank.n_embd}")
            deep_cells = sum(t.n_vectors for t in self.bank.tokens.values() if t.is_deep) * self.bank.max_copies
            shallow = sum(t.n_vectors for t in self.bank.tokens.values() if not t.is_deep)
            view_n_ctx = 1 + shallow + REREAD_MAX_TOKENS + 16 if self.reread else 0  # + blank tokens
            self.engine = Engine(self.model, n_ctx, n_parallel, n_batch=n_batch, n_threads=n_threads,
                                 extra_cells=deep_cells, flash_attn=flash_attn, kv_type=kv_type,
                                 prefix_cache_bytes=prefix_cache_bytes, max_queue=max_queue,
                                 check_bos_state=self._check_bos_state if deep_cells else None,
                                 rope_bases=self._rope_bases, view_n_ctx=view_n_ctx)
        except BaseException:
            self.model.close()
            raise
        self.refusals = Refusals(self.bank, self.template, self.tokenize)

    # -- names ------------------------------------------------------------------------

    @property
    def tokens(self) -> list[str]:
        """Constraint token names, in bank order."""
        return list(self.bank.constraints)

    @property
    def modes(self) -> list[str]:
        return list(self.bank.modes)

    @property
    def profiles(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.bank.profiles.items()}

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def n_threads(self) -> int:
        return self.engine.ctx.n_threads

    @property
    def n_parallel(self) -> int:
        return self.engine.n_parallel

    @property
    def prefix_cache(self):
        return self.engine.prefix_cache

    def compose(self, tokens: str | Sequence[str] | None = None, mode: str | None = None) -> tuple[list[str], str | None]:
        """Canonical (constraints, mode) for a request: profiles expanded, deduped, bank order.

        With constraints active and no mode, the bank's default mode (``positive``) is used if it has one.
        """
        constraints = self.bank.resolve(tokens)
        mode = self.bank.check_mode(mode)
        if mode is None and constraints:
            mode = self.bank.default_mode
        return constraints, mode

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as typed text (no BOS, special-token parsing off)."""
        self._check_open()
        return self.model.tokenize(text, add_bos=False, special=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self.model.token_to_piece(int(t)) for t in ids).decode("utf-8", errors="replace")

    def is_refusal(self, text: str) -> bool:
        """True when ``text`` is one of the bank's refusals."""
        return self.bank.is_refusal(text)

    # -- the llama-cpp-python-shaped API -------------------------------------------------

    def create_chat_completion(
        self,
        messages: Messages,
        *,
        tokens: str | Sequence[str] | None = None,
        mode: str | None = None,
        strictness: float | None = None,
        max_tokens: int | None = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> dict | Iterator[dict]:
        """An OpenAI-shaped ``chat.completion`` (or ``chat.completion.chunk`` dicts with ``stream=True``).

        ``tokens`` (names or profiles, list or comma string) and ``mode`` choose the control tokens;
        ``strictness`` (default: the instance's, 0) is added to the logits of the active constraints'
        refusal opener until the first visible reply token: > 0 refuses more, < 0 less. Greedy unless
        ``temperature > 0``; the refuse/answer decision never depends on sampling. The reply carries
        ``edge_safe`` (what was applied, whether it refused) and ``timings`` (what it cost).
        """
        req = self.prepare(messages, tokens=tokens, mode=mode, stop=stop, strictness=strictness)
        job = self._reply(req, max_tokens, Sampling(temperature, top_p, top_k, min_p, repeat_penalty), seed)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}
        if stream:
            after = lambda content: self._after_reply(messages, content, job, tokens, mode)  # noqa: E731
            return _Chunks(self._chat_chunks(head, job, after), job)
        content = _join(job)
        self._after_reply(messages, content, job, tokens, mode)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": job.stats.finish_reason}],
                **self._tail(job, content)}

    def create_completion(
        self,
        prompt: str,
        *,
        tokens: str | Sequence[str] | None = None,
        mode: str | None = None,
        strictness: float | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> dict | Iterator[dict]:
        """An OpenAI-shaped ``text_completion`` of ``prompt``, answered as one user turn of the bank's chat
        template (the control tokens were trained in it); keywords as :meth:`create_chat_completion`."""
        if not isinstance(prompt, str):
            raise EdgeSafeError(f"prompt must be a string, got {type(prompt).__name__}")
        req = self.prepare([{"role": "user", "content": prompt}], tokens=tokens, mode=mode, stop=stop,
                           strictness=strictness)
        job = self._reply(req, max_tokens, Sampling(temperature, top_p, top_k, min_p, repeat_penalty), seed)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}
        if stream:
            return _Chunks(self._text_chunks(head, job), job)
        text = _join(job)
        return {**head, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": job.stats.finish_reason}],
                **self._tail(job, text)}

    def submit(self, messages: Messages, *, max_tokens: int | None = 256, sampling: Sampling | None = None,
               seed: int | None = None, until=None, **request) -> Job:
        """Queue one reply and return its :class:`~edge_safe.engine.Job` (iterate it for the text pieces;
        ``job.stats`` says what it cost; ``job.close()`` cancels it). ``until(text_so_far)`` ends the reply
        once it returns True. ``request``: ``tokens``, ``mode``, ``stop``, ``strictness``."""
        return self._reply(self.prepare(messages, **request), max_tokens, sampling or Sampling(), seed, until)

    def ready_next_turn(self, messages: Messages, *, tokens=None, mode: str | None = None) -> bool:
        """Lay out, while the engine is idle, what the next turn of ``messages`` (a conversation that ends
        with the reply the user was shown) holds before its user message: the earlier turns and the
        control tokens right after them, where the next request will have them. That request then decodes
        only its own message (the work is done while the user types; a request that comes in first
        interrupts it). Nothing changes what any request computes: a sequence holds only cells a fresh
        request would compute too. False when there is nothing to lay out (no control tokens, or a
        layout that keeps them with BOS). Returns at once."""
        self._check_open()
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        req = self.prepare(msgs + [{"role": "user", "content": "?"}], tokens=tokens, mode=mode)
        if not req.key or req.splits[-1] == 0:
            return False
        self.engine.ready(dataclasses.replace(req, prompt=req.prompt[: req.splits[-1]]))
        return True

    def _after_reply(self, messages: Messages, content: str, job, tokens, mode) -> None:
        if self.auto_ready and job.error is None and not job.cancelled and not isinstance(messages, str):
            with contextlib.suppress(EdgeSafeError):  # the conversation is past the context: nothing to ready
                self.ready_next_turn(list(messages) + [{"role": "assistant", "content": content}], tokens=tokens,
                                     mode=mode)

    def reset(self) -> None:
        """Forget the conversations held in the KV cache; the next request restores its prefix snapshot
        and prefills its prompt. Prefix snapshots are kept (``prefix_cache.clear()`` drops them)."""
        self._check_open()
        self.engine.forget()

    def close(self) -> None:
        """Free the engine, its context and the model now (also done by ``with EdgeSafe() as es:``)."""
        if self.model.closed:
            return
        self.engine.close()
        self.engine.prefix_cache.clear()
        self.model.close()

    def __enter__(self) -> "EdgeSafe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------

    def prepare(self, messages: Messages | str, *, tokens=None, mode: str | None = None, stop=None,
                strictness: float | None = None, extra: int = 0) -> Request:
        """Check a request and lay it out, before any decoding, so errors surface at call time (also for
        streams). ``extra`` positions are reserved beyond the prompt (forced tokens of a probe)."""
        self._check_open()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        strictness = self.strictness if strictness is None else check_strictness(strictness)
        constraints, mode = self.compose(tokens, mode)
        names = prefix_names(mode, constraints)
        movable = bool(names) and (self._rope_bases is not None or not self._deep_of(names))
        prompt, splits = self._layout(messages, movable)
        # the calibration's offsets were measured on one message read on its own (edge-safe train calibrate): a
        # prompt after earlier turns or pasted text decides without them, its reread view (that message or line
        # read alone) with them
        on_its_own = splits == (0,) and not _earlier_turns(messages)
        req = self._request(constraints, mode, prompt, strictness, stop, splits, calibrated=on_its_own)
        if self.reread and self.engine.view_ctx is not None and constraints \
                and self.bank.behaviour(mode) == Behaviour.CONSTRAINED and messages[-1].get("role") == "user":
            req.reread = self._reread(messages, constraints, mode, strictness, stop, movable)
        needed = req.n_positions + extra
        if needed >= self.n_ctx:
            forced = f" + {extra} forced tokens" if extra else ""
            raise PromptTooLongError(
                f"the prompt needs {needed} positions (1 BOS + {len(req.vectors)} control-token vectors + "
                f"{len(prompt)} prompt tokens{forced}) plus room to answer, but the context holds {self.n_ctx}; "
                "pass a larger --n-ctx (EdgeSafe(n_ctx=...)) or shorten the prompt or conversation"
            )
        return req

    def _layout(self, messages: Messages, movable: bool) -> tuple[list[int], tuple[int, ...]]:
        """The prompt's token ids and where the control tokens go among them (see module doc): before the last
        user message (``placement="last"``) or before every one (``"every"``), and, in a last message longer
        than 256 tokens, before its last line instead of its start."""
        tokenize = lambda text: self.model.tokenize(text, add_bos=False, special=False)  # noqa: E731 typed text is text
        if not movable:
            return tokenize(self.template.render(messages)), (0,)
        return control_layout(self.template, messages, tokenize, self.placement)

    def _reread(self, messages: Messages, constraints, mode, strictness, stop, movable: bool) -> Request | None:
        """What is read alone besides the request (``reread``): after earlier turns, its last user message; where
        that message is long and got the control tokens before its last line (a request after pasted text), that
        line. None when neither applies or the text is longer than ``REREAD_MAX_TOKENS``. A short single message
        is read once: reading the last line of every multi-line message alone refused more ordinary ShareGPT first
        turns (1.3 % against 0.5 %, validation part) and separated them worse (docs/DESIGN.md)."""
        last, splits = self._layout(messages[-1:], movable)
        if splits != (0,):  # cut: the control tokens sit before its last line, which is read alone
            content = str(messages[-1]["content"]).strip()
            last, splits = self._layout([{"role": "user", "content": content[content.rfind("\n") + 1:]}], movable)
        elif not _earlier_turns(messages):
            return None
        if splits != (0,) or len(last) > REREAD_MAX_TOKENS:
            return None
        return self._request(constraints, mode, last, strictness, stop, splits)

    def _request(self, constraints: list[str], mode: str | None, prompt: list[int], strictness: float,
                 stop=None, splits: tuple[int, ...] = (0,), calibrated: bool = True) -> Request:
        names = prefix_names(mode, constraints)
        vectors = self.bank.prefix_vectors(names) if names else np.zeros((0, self.model.n_embd), np.float32)
        behaviour = self.bank.behaviour(mode)
        constrained = bool(constraints) and behaviour == Behaviour.CONSTRAINED
        readout = self.bank.readout if self.use_readout and constrained else None
        if readout is not None and calibrated:  # the calibration's offset for this composition folded into its bias
            readout = readout.composed(constraints)
        openers = self.refusals.openers(constraints) if (strictness or readout is not None) and constrained else []
        guided = [] if not self.exact_refusals else (
            [mode] if behaviour == Behaviour.REFUSE_ALL else constraints if constrained else [])
        alone = (lambda name: self._request([name], mode, prompt, 0.0, splits=splits, calibrated=calibrated)) \
            if len(constraints) > 1 else None
        return Request(constraints, mode, tuple(names), vectors, prompt, tuple(self.template.stop) + _as_stops(stop),
                       strictness=strictness, openers=openers, refusals=self.refusals.sequences(guided),
                       deep=self._deep_of(names), alone=alone, splits=splits, deep_copies=self.bank.deep_copies,
                       readout=readout)

    def _deep_of(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """The deep entries' (keys, values) among ``names``, or None when none is deep."""
        if not names:
            return None
        keys, values = self.bank.deep_cells(names)
        return (keys, values) if len(keys) else None

    def _check_bos_state(self, state: kv_cells.SeqState) -> list[list[int]]:
        """A parsed BOS-only sequence state checked against the bank's deep geometry (raises
        KVLayoutError / KVCacheTypeError); the layer map of its sections."""
        n_layer, n_k, n_v = self.bank.deep_geometry
        if self.model.n_layer != n_layer:
            raise EdgeSafeError(f"llama.cpp reports {self.model.n_layer} layers, the bank's deep tokens have {n_layer}; "
                                f"pass the model the bank was made for ({self.bank.base_name})")
        held = [s.pos.tolist() for s in state.sections]
        if any(p != [0] for p in held):
            raise kv_cells.layout_error(f"the BOS-only state holds cells at positions {held}, expected one at 0")
        owners = {ids for s in state.sections for ids in s.seq_ids}
        if len(owners) != 1 or len(next(iter(owners))) != 1:
            raise kv_cells.layout_error(f"the BOS-only state's cells belong to sequences {sorted(owners)}, expected one")
        return kv_cells.check_geometry(state, self.model_info.arch, n_layer, n_k, n_v)

    def _reply(self, req: Request, max_tokens: int | None, sampling: Sampling, seed: int | None, until=None) -> Job:
        if max_tokens is None:
            max_tokens = self.n_ctx
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise EdgeSafeError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
        if seed is not None:
            rng = np.random.default_rng(seed)
        else:
            with self._rng_lock:
                rng = np.random.default_rng(self._rng.integers(2**63))
        holder: list[Job] = []
        policy = Reply(req, self.model, sampling, rng, max_tokens, self.n_ctx, lambda piece: holder[0].put(piece),
                       self.refusals.openers, until)
        job = self.engine.submit(req, policy)
        holder.append(job)
        return job

    def _extra(self, job: Job, content: str) -> dict:
        req, st = job.request, job.stats
        refused_by = st.refusal or self.bank.refusal_of(content)
        out = {"tokens": list(req.constraints), "mode": req.mode, "prefix_positions": len(req.vectors),
               "strictness": req.strictness, "refusal": refused_by is not None, "refused_by": refused_by}
        if req.n_deep:
            out["deep_cells"] = req.n_deep
            if req.stats.deep_copies > 1:
                out["deep_copies"] = req.stats.deep_copies
        if st.reread:  # the request was also read alone (after earlier turns, or a long message's last line)
            out["reread"] = st.reread  # what that view decided: "refuse" or "answer"
        return out

    def _tail(self, job: Job, content: str) -> dict:
        st = job.stats
        return {"usage": {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
                          "total_tokens": st.prompt_tokens + st.completion_tokens},
                "timings": st.timings(), "edge_safe": self._extra(job, content)}

    def _chat_chunks(self, head: dict, job: Job, after=None) -> Iterator[dict]:
        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        yield chunk({"role": "assistant"})
        content = []
        for piece in job:
            content.append(piece)
            yield chunk({"content": piece})
        if after is not None:
            after("".join(content))
        yield {**chunk({}, job.stats.finish_reason), **self._tail(job, "".join(content))}

    def _text_chunks(self, head: dict, job: Job) -> Iterator[dict]:
        def chunk(text: str, finish: str | None = None) -> dict:
            return {**head, "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        content = []
        for piece in job:
            content.append(piece)
            yield chunk(piece)
        yield {**chunk("", job.stats.finish_reason), **self._tail(job, "".join(content))}

    def _check_open(self) -> None:
        if self.model.closed:
            raise EdgeSafeError("this EdgeSafe has been closed; create a new one")


class _Chunks:
    """A stream's chunk iterator: ``close()`` cancels the request even before the first chunk was read
    (closing a generator that never started runs none of its code)."""

    def __init__(self, chunks: Iterator[dict], job: Job):
        self._chunks, self.job = chunks, job

    def __iter__(self) -> "_Chunks":
        return self

    def __next__(self) -> dict:
        return next(self._chunks)

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self.job.close()


def _earlier_turns(messages: Messages) -> bool:
    """Whether user or assistant turns come before the last message."""
    return any(m.get("role") in ("user", "assistant") for m in messages[:-1])


def _join(job: Job) -> str:
    try:
        return "".join(job)
    finally:
        job.close()


def _as_stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(str(s) for s in stop)
