"""``EdgeSafe``: a quantized base model plus a token bank, with per-request constraints.

Every request is laid out as (DESIGN.md, convert/layout.py)::

    [BOS] [mode vectors] [constraint vectors ...] <chat template with the conversation>

BOS is decoded as a token, the bank vectors as embedding batches, the rendered
conversation as text tokens (special-token parsing off, so typed text is always
text). The KV state of ``[BOS][mode][constraints]`` is snapshotted per
composition into a byte-bounded LRU, and the sequence remembers which prompt
tokens it holds, so switching between cached compositions and continuing a
conversation cost no repeated prefill.
"""
from __future__ import annotations

import codecs
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np

from edge_safe import kv_cells
from edge_safe.llama import LlamaModel
from edge_safe.convert.bank import TokenBank
from edge_safe.convert.errors import EdgeSafeError, PromptTooLongError
from edge_safe.convert.layout import ChatTemplate, check_layout, prefix_names
from edge_safe.convert.model import ModelInfo
from edge_safe.models import resolve_bank_path, resolve_model_path
from edge_safe.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from edge_safe.refusals import RefusalGuide, Sequences, opener_margin, refusal_sequences
from edge_safe.sampling import check_sampling, check_strictness, sample

log = logging.getLogger(__name__)

DEFAULT_MODE = "positive"  # used when constraints are active, no mode is given and the bank has it
Messages = Sequence[Mapping[str, str]]


@dataclass
class RequestStats:
    """What the last request cost; read it from :attr:`EdgeSafe.last_stats`."""

    tokens: list[str]  # active constraints, bank order
    mode: str | None
    prefix_positions: int  # positions taken by the injected vectors (BOS not counted)
    prefix_source: str  # "reused" (already in KV) | "cache" (snapshot restored) | "built" (prefilled)
    prompt_tokens: int  # BOS + conversation text tokens
    prefilled_tokens: int  # conversation tokens decoded for this request (the rest were in KV)
    completion_tokens: int = 0
    ttft_s: float = 0.0  # call -> first generated token sampled
    decode_s: float = 0.0  # first -> last generated token
    finish_reason: str | None = None
    refusal: str | None = None  # the token whose refusal text the runtime completed exactly (None: no refusal)
    deep_cells: int = 0  # KV cells written for deep control tokens (they take no position and no prefill)


@dataclass
class _Request:
    constraints: list[str]
    mode: str | None
    key: tuple[str, ...]  # prefix composition: the injected names in layout order
    vectors: np.ndarray  # (n_vectors, n_embd)
    prompt: list[int]  # conversation tokens after the prefix
    stops: tuple[str, ...]
    t_call: float
    strictness: float = 0.0  # added to the refusal openers' logits until the reply's first visible token
    openers: list[int] = field(default_factory=list)  # those token ids (empty: no bias applies)
    refusals: Sequences = field(default_factory=list)  # refusals a reply opening with "Sorry" is finished as
    deep: tuple[np.ndarray, np.ndarray] | None = None  # deep entries' (keys, values), written at position 0
    stats: RequestStats = field(init=False)

    def __post_init__(self):
        self.stats = RequestStats(self.constraints, self.mode, len(self.vectors), "", 1 + len(self.prompt), 0,
                                  deep_cells=self.n_deep)

    @property
    def n_deep(self) -> int:
        return 0 if self.deep is None else len(self.deep[0])


class EdgeSafe:
    """A base GGUF model and a token bank; constraints are chosen per request.

    >>> es = EdgeSafe()
    >>> es.generate("How do I mix a mojito?", tokens="minors,eu")

    A bank may hold *deep* tokens (key/value rows per layer) besides shallow ones (input
    vectors). A request's deep cells are written into the KV cache at BOS's position 0,
    with no forward pass; its shallow vectors are decoded after BOS at positions 1.. as
    ever, and the conversation follows them. Deep cells take no position: the context is
    enlarged by the bank's deep cells, so ``n_ctx`` positions stay for the conversation.
    ``flash_attn`` / ``kv_type`` set llama.cpp's flash attention and KV-cache type
    (default: llama.cpp's); deep tokens need an f16 or f32 cache.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        bank: str | os.PathLike | TokenBank | None = None,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        seed: int | None = None,
        *,
        n_batch: int = 512,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        strictness: float = 0.0,
        cpu_repack: str | bool | None = None,
        exact_refusals: bool = True,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
    ):
        self.strictness = check_strictness(strictness)
        self.exact_refusals = bool(exact_refusals)  # finish a reply that opens like a refusal as one, word for word
        self.model_path = resolve_model_path(model)
        self.bank = bank if isinstance(bank, TokenBank) else TokenBank.load(resolve_bank_path(bank))
        check_layout(self.bank.layout)
        self.model_info = ModelInfo.read(self.model_path)
        self.bank.check_model(self.model_info)
        self.template: ChatTemplate = self.bank.template
        self.model_name = self.model_path.stem
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.last_stats: RequestStats | None = None
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # one request at a time uses the context (servers share one EdgeSafe)
        self._owner: int | None = None  # thread holding the lock, to refuse re-entry instead of deadlocking
        self._held: tuple[tuple[str, ...], list[int]] | None = None  # (prefix key, prompt tokens in KV)
        self._refusal_ids: dict[str, Sequences] = {}  # token -> its refusal's token ids, as written after the header
        deep_cells = sum(t.n_vectors for t in self.bank.tokens.values() if t.is_deep)
        self._llm = LlamaModel(self.model_path, n_ctx=n_ctx, n_batch=n_batch,
                               n_gpu_layers=n_gpu_layers, n_threads=n_threads, cpu_repack=cpu_repack,
                               flash_attn=flash_attn, kv_type=kv_type, extra_cells=deep_cells)
        if self._llm.n_embd != self.bank.n_embd:  # check_model already compared the GGUF header
            self.close()
            raise EdgeSafeError(f"llama.cpp reports n_embd {self._llm.n_embd}, the bank has {self.bank.n_embd}")
        self._bos_state: tuple[kv_cells.SeqState, list[list[int]]] | None = None  # parsed BOS-only KV state
        if deep_cells:
            try:
                self._bos_state = self._parse_bos_state()  # fail now (quantized cache, unknown blob), not mid-request
            except BaseException:
                self.close()
                raise

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
        return self._llm.n_ctx

    @property
    def n_threads(self) -> int:
        return self._llm.n_threads

    def compose(self, tokens: str | Sequence[str] | None = None, mode: str | None = None) -> tuple[list[str], str | None]:
        """Canonical (constraints, mode) for a request: profiles expanded, deduped, bank order.

        With constraints active and no mode, the bank's ``positive`` mode is used if it has one.
        """
        constraints = self.bank.resolve(tokens)
        mode = self.bank.check_mode(mode)
        if mode is None and constraints and DEFAULT_MODE in self.bank.modes:
            mode = DEFAULT_MODE
        return constraints, mode

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as typed text (no BOS, special-token parsing off)."""
        self._check_open()
        return self._llm.tokenize(text, add_bos=False, special=False)

    def is_refusal(self, text: str) -> bool:
        """True when ``text`` is one of the bank's refusals."""
        return self.bank.is_refusal(text)

    # -- public generation API -------------------------------------------------------

    def generate(
        self,
        prompt: str,
        tokens: str | Sequence[str] | None = None,
        mode: str | None = None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        system: str | None = None,
        seed: int | None = None,
        strictness: float | None = None,
    ) -> str | Iterator[str]:
        """Answer one prompt: the cleaned reply, or an iterator of text pieces with ``stream=True``.

        The pieces of a stream join to exactly the non-streamed reply. ``strictness`` (default:
        the instance's, 0) is added to the logits of the active constraints' refusal opener until
        the first visible reply token: > 0 refuses more (fewer misses, more over-refusal), < 0 less. It only
        acts with constraints active (in the ``positive`` mode, or a bank without modes).
        """
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        req = self._prepare(messages, tokens, mode, stop, strictness=strictness)
        pieces = self._stream(req, max_tokens, temperature, top_p, seed)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        messages: Messages,
        tokens: str | Sequence[str] | None = None,
        mode: str | None = None,
        stream: bool = False,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        strictness: float | None = None,
    ) -> dict | Iterator[dict]:
        """OpenAI-shaped chat completion (or ``chat.completion.chunk`` dicts with ``stream=True``);
        ``strictness`` as in :meth:`generate`."""
        req = self._prepare(messages, tokens, mode, stop, strictness=strictness)
        pieces = self._stream(req, max_tokens, temperature, top_p, seed)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}
        if stream:
            return self._chunks(head, req, pieces)
        content = "".join(pieces)
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": req.stats.finish_reason}],
            "usage": _usage(req.stats),
            "edge_safe": self._extra(req, content),
        }

    def first_token_logits(
        self, messages: Messages | str, tokens: str | Sequence[str] | None = None, mode: str | None = None
    ) -> np.ndarray:
        """Logits (n_vocab,) of the first reply token: a copy (for tests, SAM and evaluation)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        req = self._prepare(messages, tokens, mode, None)
        with self._using():
            self.last_stats = req.stats
            self._prefill(req)
            return self._llm.logits().copy()

    def forced_logits(
        self, messages: Messages | str, continuation: Sequence[int],
        tokens: str | Sequence[str] | None = None, mode: str | None = None,
    ) -> np.ndarray:
        """Teacher-forced logits (len(continuation), n_vocab): row j predicts ``continuation[j]``
        after the prompt and ``continuation[:j]``. Each token is decoded alone, as in generation,
        so row argmaxes reproduce a greedy reply's token ids."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = [int(t) for t in continuation]
        if not ids or min(ids) < 0 or max(ids) >= self._llm.n_vocab:
            raise EdgeSafeError(f"continuation must be 1+ token ids in 0..{self._llm.n_vocab - 1}; got {ids[:8]}")
        req = self._prepare(messages, tokens, mode, None, extra=len(ids) - 1)
        out = np.empty((len(ids), self._llm.n_vocab), dtype=np.float32)  # (len, n_vocab)
        n_past = 1 + len(req.vectors) + len(req.prompt)
        with self._using():
            self.last_stats = req.stats
            self._prefill(req)
            out[0] = self._llm.logits()
            for j, tok in enumerate(ids[:-1]):
                self._llm.decode_tokens([tok], n_past + j)
                self._held[1].append(tok)
                out[j + 1] = self._llm.logits()
        return out

    def refusal_margin(
        self, messages: Messages | str, tokens: str | Sequence[str] | None = None, max_blank: int = 4
    ) -> float:
        """How far a request is from being refused, in logits: under greedy decoding its reply opens
        with the active constraints' refusal opener iff ``strictness > -margin``.

        The margin is the best opener logit minus the best other logit at the first reply token,
        maximised over the whitespace-only tokens greedy decoding puts first (at most
        ``max_blank``), because ``strictness`` stays on until the first visible token. A deployment
        can read the strictness it needs off the margins of its own traffic; ``edge-safe eval``
        draws the bank's whole defense / over-refusal curve from them."""
        req, idx = self._margin_request(messages, tokens, max_blank)
        n_past = 1 + len(req.vectors) + len(req.prompt)
        best = -np.inf
        with self._using():
            self.last_stats = req.stats
            self._prefill(req)
            for j in range(max_blank + 1):
                margin, other = opener_margin(self._llm.logits(), idx)
                best = max(best, margin)
                if j == max_blank or self._llm.is_eog(other) or self._llm.token_to_piece(other).strip():
                    break  # the greedy reply (below the threshold) starts with a visible token or ends
                self._llm.decode_tokens([other], n_past + j)
                self._held[1].append(other)
        return best

    def _margin_request(self, messages: Messages | str, tokens, max_blank: int) -> tuple[_Request, np.ndarray]:
        """The checked request of a refusal-margin probe and its opener ids (shared with the Engine)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(max_blank, int) or max_blank < 0:
            raise EdgeSafeError(f"max_blank must be a whole number >= 0, got {max_blank!r}")
        req = self._prepare(messages, tokens, None, None, extra=max_blank)
        if not req.constraints:
            raise EdgeSafeError("refusal_margin needs active constraints (tokens=...): without them nothing is refused")
        idx = np.asarray(self.refusal_openers(req.constraints), dtype=np.int64)
        if not len(idx):
            raise EdgeSafeError(f"the tokens {', '.join(req.constraints)} carry no refusal text, so there is no "
                                "refusal opener to measure")
        return req, idx

    def reset(self) -> None:
        """Forget the conversation held in the KV cache; the next request restores its prefix
        snapshot and prefills its prompt. Prefix snapshots are kept (``prefix_cache.clear()`` drops them)."""
        with self._using():
            self._held = None

    def close(self) -> None:
        """Free the model and context now (also done by ``with EdgeSafe() as es:``)."""
        if self._llm.closed:
            return
        with self._using():
            self._held = None
            self.prefix_cache.clear()
            self._llm.close()

    def __enter__(self) -> "EdgeSafe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._llm.closed:
            raise EdgeSafeError("this EdgeSafe has been closed; create a new one")

    @contextmanager
    def _using(self) -> Iterator[None]:
        self._check_open()
        if self._owner == threading.get_ident():
            raise EdgeSafeError(
                "this EdgeSafe is busy with an unfinished stream in the same thread; "
                "finish or close() that iterator before starting another request"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def _prepare(self, messages: Messages, tokens, mode, stop, extra: int = 0,
                 strictness: float | None = None) -> _Request:
        """Validate everything before any decoding, so errors surface at call time (also for streams)."""
        t_call = time.perf_counter()
        self._check_open()
        strictness = self.strictness if strictness is None else check_strictness(strictness)
        constraints, mode = self.compose(tokens, mode)
        names = prefix_names(mode, constraints)
        vectors = self.bank.prefix_vectors(names) if names else np.zeros((0, self._llm.n_embd), np.float32)
        deep = self._deep_of(names)
        text = self.template.render(messages)
        prompt = self._llm.tokenize(text, add_bos=False, special=False)  # typed text is text
        needed = 1 + len(vectors) + len(prompt) + extra
        if needed >= self._llm.n_ctx:
            forced = f" + {extra} forced tokens" if extra else ""
            raise PromptTooLongError(
                f"the prompt needs {needed} positions (1 BOS + {len(vectors)} control-token vectors + "
                f"{len(prompt)} prompt tokens{forced}) plus room to answer, but the context holds {self._llm.n_ctx}; "
                "pass a larger --n-ctx (EdgeSafe(n_ctx=...)) or shorten the prompt or conversation"
            )
        stops = tuple(self.template.stop) + _as_stops(stop)
        biased = strictness and constraints and mode in (DEFAULT_MODE, None)  # not rejective/negative
        openers = self.refusal_openers(constraints) if biased else []
        return _Request(constraints, mode, tuple(names), vectors, prompt, stops, t_call, strictness, openers,
                        self._guided(constraints, mode), deep)

    def _guided(self, constraints: list[str], mode: str | None) -> Sequences:
        """The refusals a reply of this request is finished as once it opens like one: the active
        constraints' (in the positive mode, or a bank without modes), the rejective mode's own; none
        in the negative mode (unrestricted: a reply that starts "Sorry" is free text there)."""
        if not self.exact_refusals:
            return []
        names = [mode] if mode == "rejective" else constraints if mode in (DEFAULT_MODE, None) else []
        return self._refusal_sequences(names)

    def _refusal_sequences(self, names: Sequence[str]) -> Sequences:
        """The named tokens' refusals as token ids, as the model writes them after the reply header
        (with and without the leading space; tokens without a refusal have none). Cached per token."""
        todo = [n for n in names if n not in self._refusal_ids]
        if todo:
            header = self.template.render([{"role": "user", "content": "x"}])
            tok = lambda text: self._llm.tokenize(text, add_bos=False, special=False)  # noqa: E731
            for n in todo:
                refusal = self.bank.tokens[n].refusal
                self._refusal_ids[n] = refusal_sequences(tok, header, {n: refusal}) if refusal else []
        return [seq for n in names for seq in self._refusal_ids[n]]

    def refusal_openers(self, constraints: Sequence[str]) -> list[int]:
        """Token ids that start the active constraints' refusals, sorted and distinct: the first token of
        each refusal as the model writes it after the reply header (where training puts it:
        ``<template prompt> <refusal>``) and as it is spelt without the leading space, since a model
        can open a reply either way (" Sorry" or "Sorry")."""
        return sorted({ids[0] for _, ids in self._refusal_sequences(constraints)})

    def _prefill(self, req: _Request) -> None:
        """Bring the KV cache to ``[BOS][vectors][req.prompt]`` with the fewest decodes."""
        llm, n_prefix = self._llm, 1 + len(req.vectors)
        held, common = self._held, 0
        if held is not None and held[0] == req.key:
            common = min(_common_prefix(held[1], req.prompt), len(req.prompt) - 1)  # re-decode >= 1 for logits
            req.stats.prefix_source = "reused" if llm.truncate(n_prefix + common) else ""
        if not req.stats.prefix_source:
            common = 0
            self._held = None
            blob = self.prefix_cache.get(req.key)
            if blob is not None:
                llm.load_seq(blob)
                req.stats.prefix_source = "cache"
            else:
                if req.deep is not None:  # BOS + the deep cells at position 0, written, not decoded
                    llm.load_seq(self._deep_state(req))
                else:
                    llm.clear()
                    llm.decode_tokens([llm.bos], 0, want_logits=False)
                if len(req.vectors):
                    llm.decode_embeddings(req.vectors, 1)
                if self.prefix_cache.max_bytes:
                    self.prefix_cache.put(req.key, llm.save_seq())
                req.stats.prefix_source = "built"
        # The KV now holds a verified prefix; record it before decoding more, so an
        # interrupt or a failed decode leaves bookkeeping that is still true.
        self._held = (req.key, list(req.prompt[:common]))
        llm.decode_tokens(req.prompt[common:], n_prefix + common)
        self._held[1].extend(req.prompt[common:])
        req.stats.prefilled_tokens = len(req.prompt) - common

    def _parse_bos_state(self) -> tuple[kv_cells.SeqState, list[list[int]]]:
        """The KV state of the BOS-only sequence, parsed, and which model layers each of its sections holds.

        Every field of the blob is read from this real state (kv_cells), and its layers, row widths and
        cache types are checked against the bank's deep tokens before anything is written."""
        llm = self._llm
        n_layer, n_k, n_v = self.bank.deep_geometry
        if llm.n_layer != n_layer:
            raise EdgeSafeError(f"llama.cpp reports {llm.n_layer} layers, the bank's deep tokens have {n_layer}; "
                                f"pass the model the bank was made for ({self.bank.base_name})")
        self._held = None
        llm.clear()
        llm.decode_tokens([llm.bos], 0, want_logits=False)
        blob = llm.save_seq()
        llm.clear()
        return self._check_bos_state(blob)

    def _check_bos_state(self, blob: bytes) -> tuple[kv_cells.SeqState, list[list[int]]]:
        """A BOS-only sequence state, parsed and checked against the bank's deep geometry (raises
        KVLayoutError / KVCacheTypeError); with the layer map of its sections. Also used on the batching
        engine's context, whose blobs list one KV stream per sequence."""
        n_layer, n_k, n_v = self.bank.deep_geometry
        state = kv_cells.parse(blob)
        held = [s.pos.tolist() for s in state.sections]
        if any(p != [0] for p in held):
            raise kv_cells.layout_error(f"the BOS-only state holds cells at positions {held}, expected one at 0")
        owners = {ids for s in state.sections for ids in s.seq_ids}
        if len(owners) != 1 or len(next(iter(owners))) != 1:
            raise kv_cells.layout_error(f"the BOS-only state's cells belong to sequences {sorted(owners)}, expected one")
        return state, kv_cells.check_geometry(state, self.model_info.arch, n_layer, n_k, n_v)

    def _deep_of(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """The deep entries' (keys, values) among ``names``, or None when none is deep."""
        if self._bos_state is None or not names:
            return None
        keys, values = self.bank.deep_cells(names)
        return (keys, values) if len(keys) else None

    def _deep_state(self, req: _Request, bos_state: tuple[kv_cells.SeqState, list[list[int]]] | None = None) -> bytes:
        """The blob of [BOS] + the request's deep cells, all at position 0 of BOS's sequence: ``bos_state``
        (default: this runtime's own, from :meth:`_parse_bos_state`) with the cells appended."""
        state, groups = bos_state or self._bos_state
        keys, values = req.deep
        seq_id = state.sections[0].seq_ids[0][0]  # llama.cpp loads a blob into the sequence it is given, whatever it says
        return kv_cells.serialise(kv_cells.with_cells(state, keys, values, groups, pos=0, seq_id=seq_id))

    def _stream(self, req: _Request, max_tokens: int, temperature: float, top_p: float,
                seed: int | None) -> Iterator[str]:
        check_sampling(temperature, top_p)
        if max_tokens < 1:
            raise EdgeSafeError(f"max_tokens must be >= 1, got {max_tokens}")
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        return self._generate(req, max_tokens, temperature, top_p, rng)

    def _generate(self, req, max_tokens, temperature, top_p, rng) -> Iterator[str]:
        with self._using():
            llm, st = self._llm, req.stats
            self.last_stats = st
            self._prefill(req)
            out = _StopFilter(req.stops)
            st.finish_reason = "length"
            t_first = None
            n_past = 1 + len(req.vectors) + len(req.prompt)
            biased = bool(req.openers)  # until the reply's first visible token (a "\n\n" may come first)
            guide = RefusalGuide(req.refusals, choose=lambda names: self._violated(req, names)) if req.refusals else None
            for i in range(max_tokens):
                logits = llm.logits()
                if biased:
                    logits = logits.copy()  # llama.cpp's buffer stays as decoded
                    logits[req.openers] += req.strictness
                if guide is not None:
                    logits = guide.constrain(logits)  # a masked copy while the reply is on a refusal
                tok = sample(logits, temperature, top_p, rng)
                if t_first is None:
                    t_first = time.perf_counter()
                    st.ttft_s = t_first - req.t_call
                if llm.is_eog(tok):
                    st.finish_reason = "stop"
                    break
                st.completion_tokens += 1
                raw = llm.token_to_piece(tok)
                visible = bool(raw.strip())
                biased = biased and not visible
                piece, stopped = out.feed(raw)
                if piece:
                    yield piece
                if guide is not None and guide.step(tok, visible):
                    st.refusal, stopped = guide.refusal, True  # the refusal is complete: the reply ends with it
                rest = guide.remaining() if guide is not None and not stopped else None
                if rest is not None:  # one refusal left: write it out, no decoding needed
                    room = max_tokens - 1 - i
                    for t in rest[:room]:
                        st.completion_tokens += 1
                        piece, _ = out.feed(llm.token_to_piece(t))
                        if piece:
                            yield piece
                    if len(rest) <= room:
                        st.refusal, st.finish_reason = guide.refusal, "stop"
                    break
                if stopped:
                    st.finish_reason = "stop"
                    break
                if i == max_tokens - 1 or n_past >= llm.n_ctx:
                    break  # "length": the budget or the context is used up
                llm.decode_tokens([tok], n_past)
                self._held[1].append(tok)
                n_past += 1
            tail = out.finish()
            if tail:
                yield tail
            st.decode_s = time.perf_counter() - (t_first or time.perf_counter())
            log.debug("request %s mode=%s: prefix %s, %d prefilled, %d generated, ttft %.3fs, %s",
                      req.constraints, req.mode, st.prefix_source, st.prefilled_tokens,
                      st.completion_tokens, st.ttft_s, st.finish_reason)

    def _violated(self, req: _Request, names: list[str]) -> str:
        """Which of several active constraints a refusal should name: the one that, active alone (same
        mode, same conversation), refuses the request most surely (largest refusal-opener margin).
        Leaves the KV holding the last of those compositions, and says so in ``_held``."""
        best: tuple[float, int, str] | None = None
        for rank, name in enumerate(names):
            key = tuple(prefix_names(req.mode, [name]))
            sub = _Request([name], req.mode, key, self.bank.prefix_vectors(key), req.prompt, (), req.t_call,
                           deep=self._deep_of(key))
            self._prefill(sub)
            margin, _ = opener_margin(self._llm.logits(), np.asarray(self.refusal_openers([name]), dtype=np.int64))
            best = max(best, (margin, -rank, name)) if best else (margin, -rank, name)
        return best[2]

    def _chunks(self, head: dict, req: _Request, pieces: Iterator[str]) -> Iterator[dict]:
        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        yield chunk({"role": "assistant"})
        content = []
        try:
            for piece in pieces:
                content.append(piece)
                yield chunk({"content": piece})
        finally:  # a consumer that stops early (client gone) releases the model now, not at GC
            pieces.close()
        last = chunk({}, req.stats.finish_reason)
        last["usage"] = _usage(req.stats)
        last["edge_safe"] = self._extra(req, "".join(content))
        yield last

    def _extra(self, req: _Request, content: str) -> dict:
        refused_by = req.stats.refusal or self.bank.refusal_of(content)
        out = {"tokens": list(req.constraints), "mode": req.mode, "prefix_positions": len(req.vectors),
               "strictness": req.strictness, "refusal": refused_by is not None, "refused_by": refused_by}
        if req.n_deep:
            out["deep_cells"] = req.n_deep
        return out


class _StopFilter:
    """Turns token bytes into reply text pieces whose concatenation is ``clean_reply(raw)``.

    UTF-8 is decoded incrementally (a character split over tokens is emitted once
    complete); text that may be the start of a stop string, leading whitespace
    and trailing whitespace are held back until the next piece decides them.
    """

    def __init__(self, stops: tuple[str, ...]):
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _as_stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(str(s) for s in stop)


def _usage(st: RequestStats) -> dict:
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
            "total_tokens": st.prompt_tokens + st.completion_tokens}

