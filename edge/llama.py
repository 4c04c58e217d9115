"""The one module that touches llama.cpp's low-level API (ctypes, ``llama_batch``).

llama-cpp-python's high-level ``Llama`` only builds *token* batches; injecting
control-token vectors needs embedding batches, so edge-safe drives the C API
directly. Everything native lives in :class:`LlamaModel` and is freed
deterministically by :meth:`LlamaModel.close` (an ``ExitStack``).

Facts this module relies on (see DESIGN.md):

- ``llama_batch_init(n, n_embd, 1)`` allocates a batch whose ``embd`` field takes
  raw vectors; llama.cpp feeds them to layer 0 unscaled (token inputs of gemma3
  are multiplied by sqrt(n_embd) inside the graph, raw embeddings are not).
- A batch larger than ``n_batch`` aborts the whole process (GGML_ASSERT), so every
  decode here is chunked by ``n_batch``; positions are always consecutive.
- Gemma 3 uses sliding-window attention layers; ``swa_full=True`` keeps the whole
  window so that partial ``llama_memory_seq_rm`` and sequence snapshots work.
- On Intel CPUs with AMX, a native build of llama.cpp repacks Q4_K weights into its AMX
  buffer and the first decode dies with SIGSEGV (llama.cpp issue 20824). Every model this
  project loads goes through :func:`resolve_cpu_repack`: by default the extra (repacked)
  CPU buffer types are off exactly when the build has AMX, and kept everywhere else.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import llama_cpp as C
import numpy as np

from edge_safe.convert.errors import EdgeSafeError, ModelNotFoundError

log = logging.getLogger(__name__)
native_log = logging.getLogger("edge_safe.llama_cpp")

SEQ = 0  # the one sequence this runtime uses
ENV_CPU_REPACK = "EDGE_SAFE_CPU_REPACK"  # auto | on | off, for every model loaded in the process
CPU_REPACK_CHOICES = ("auto", "on", "off")

# enum ggml_log_level {NONE, DEBUG, INFO, WARN, ERROR, CONT}; CONT continues the previous line.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@C.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs every tensor and parameter while loading; route it to
    # `logging` at DEBUG (errors at WARNING) instead of raw stderr.
    lvl = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = lvl
    lvl = logging.WARNING if lvl >= logging.ERROR else logging.DEBUG
    if native_log.isEnabledFor(lvl):
        native_log.log(lvl, "%s", text.decode("utf-8", "replace").rstrip("\n"))


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        C.llama_log_set(_log_callback, ctypes.c_void_p(0))  # module-level: the reference lives forever
        C.llama_backend_init()
        _backend_ready = True


def default_threads() -> int:
    """Half the usable cores (llama-cpp-python's default).

    llama.cpp's threads meet at a barrier per op: when any of them is
    descheduled because another process holds a core, every step waits for it.
    Measured on 2 shared cores with one busy: 2 threads ran 28x slower than 1.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


@functools.lru_cache(maxsize=1)
def amx_in_build() -> bool:
    """True when this llama.cpp build uses Intel AMX (its system info says ``AMX_INT8 = 1``)."""
    return b"AMX_INT8 = 1" in C.llama_print_system_info()


def resolve_cpu_repack(setting: str | bool | None = None) -> bool:
    """Whether to load with llama.cpp's extra CPU buffer types (``use_extra_bufts``: the repacked
    Q4_K kernels, and the AMX buffer where the build has it).

    ``setting`` (else ``$EDGE_SAFE_CPU_REPACK``, else ``auto``): ``on``/``True`` keeps them,
    ``off``/``False`` drops them, ``auto`` drops them only when the build has AMX, whose
    repacked Q4_K matmul crashes the first decode (llama.cpp issue 20824); elsewhere (AVX2,
    AVX-512 without AMX, ARM) the repacked kernels are safe and faster, so they stay on.
    """
    where = "cpu_repack"
    if setting is None:
        setting, where = os.environ.get(ENV_CPU_REPACK) or "auto", f"${ENV_CPU_REPACK}"
    if isinstance(setting, bool):
        return setting
    value = str(setting).strip().lower()
    if value not in CPU_REPACK_CHOICES:
        raise EdgeSafeError(f"{where} must be one of {', '.join(CPU_REPACK_CHOICES)}; got {setting!r}")
    if value == "auto":
        if amx_in_build():
            _note_amx()
            return False
        return True
    return value == "on"


@functools.lru_cache(maxsize=1)
def _note_amx() -> None:
    log.info("llama.cpp was built with AMX: loading models without its repacked CPU buffers (AMX Q4_K "
             "matmul crashes, llama.cpp issue 20824); %s=on forces them", ENV_CPU_REPACK)


_params_lock = threading.Lock()


def plain_llama(model_path: str | os.PathLike, *, cpu_repack: str | bool | None = None, **kwargs) -> "C.Llama":
    """llama-cpp-python's high-level ``Llama`` loaded with the same CPU buffer choice as
    :class:`LlamaModel` (for baselines that must compare like with like).

    ``Llama`` takes no ``use_extra_bufts`` argument; its constructor reads
    ``llama_model_default_params()``, which is wrapped for the duration of the call.
    """
    import llama_cpp.llama as high

    use = resolve_cpu_repack(cpu_repack)
    low = high.llama_cpp
    original = low.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = use
        return p

    with _params_lock:
        low.llama_model_default_params = params
        try:
            llm = C.Llama(model_path=str(model_path), **kwargs)
        finally:
            low.llama_model_default_params = original
    if bool(llm.model_params.use_extra_bufts) != use:  # a llama-cpp-python that builds its params otherwise
        llm.close()
        raise EdgeSafeError("this llama-cpp-python version does not let edge-safe choose the CPU buffer types "
                            f"of a plain Llama; pin llama-cpp-python 0.3.x (have {C.__version__})")
    return llm


class VocabTokenizer:
    """A GGUF's own tokenizer, loaded vocab-only (no weights, about a second).

    Token ids are the runtime's exactly: no BOS is added and special-token text is not
    parsed (a prompt that *says* "<start_of_turn>" stays text). Shared by `convert
    from-text` and the trainer (which also needs BOS/EOS and detokenize).
    """

    def __init__(self, model_path: str | os.PathLike):
        self._llm = C.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self.bos_id = int(self._llm.token_bos())
        self.eos_ids = frozenset({int(self._llm.token_eos())})

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")


class DecodeError(EdgeSafeError):
    """llama_decode failed (no KV slot, invalid batch, ...)."""


class LlamaModel:
    """A loaded GGUF with one context, one sequence and reusable token/embedding batches."""

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        cpu_repack: str | bool | None = None,
        *,
        flash_attn: bool | None = None,
        kv_type: str | None = None,
        extra_cells: int = 0,
    ):
        _init_backend()
        self.path = Path(path)
        self.cpu_repack = resolve_cpu_repack(cpu_repack)  # use_extra_bufts, decided before anything loads
        # KV-cache settings (None: llama.cpp's defaults, flash attention auto and an f16 cache); extra_cells
        # enlarges the cache beyond n_ctx for cells that take no position (deep control tokens)
        self._flash_attn, self._kv_type = flash_attn, kv_type
        self.extra_cells = int(extra_cells)  # KV cells beyond n_ctx (a bank's deep cells; SeqContext streams too)
        self._stack = ExitStack()
        try:
            self._open(n_ctx, n_batch, n_gpu_layers, n_threads)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, n_ctx: int, n_batch: int, n_gpu_layers: int, n_threads: int | None) -> None:
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = int(n_gpu_layers)
        mparams.use_extra_bufts = self.cpu_repack
        model = C.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise ModelNotFoundError(f"llama.cpp could not load {self.path} (is it a GGUF model file? run with -v for details)")
        self._stack.callback(C.llama_model_free, model)
        self.model = model
        self.vocab = C.llama_model_get_vocab(model)
        self.n_embd = C.llama_model_n_embd(model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.bos = C.llama_vocab_bos(self.vocab)
        self.eos = C.llama_vocab_eos(self.vocab)

        threads = n_threads or default_threads()
        cparams = C.llama_context_default_params()
        cparams.n_ctx = int(n_ctx) + self.extra_cells
        cparams.n_batch = cparams.n_ubatch = int(min(n_batch, n_ctx))
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = self.n_threads = threads
        cparams.swa_full = True  # keep the full window: partial seq_rm + snapshots stay exact
        cparams.no_perf = True
        self._kv_params(cparams)
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise EdgeSafeError(f"llama.cpp could not create a context with n_ctx={n_ctx} (try a smaller --n-ctx)")
        self._stack.callback(C.llama_free, ctx)
        self.ctx = ctx
        # llama.cpp pads n_ctx up (to 256); keep the asked limit
        self.n_ctx = min(int(n_ctx), C.llama_n_ctx(ctx) - self.extra_cells)
        self.n_batch = C.llama_n_batch(ctx)
        self.memory = C.llama_get_memory(ctx)

        # One token batch and one embedding batch of n_batch rows, reused for every decode.
        self._tok = C.llama_batch_init(self.n_batch, 0, 1)
        self._stack.callback(C.llama_batch_free, self._tok)
        self._emb = C.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._stack.callback(C.llama_batch_free, self._emb)
        self._views = {id(b): self._batch_views(b) for b in (self._tok, self._emb)}
        self._piece_buf = ctypes.create_string_buffer(256)
        log.info("loaded %s: n_embd=%d n_vocab=%d n_ctx=%d n_batch=%d threads=%d cpu_repack=%s",
                 self.path.name, self.n_embd, self.n_vocab, self.n_ctx, self.n_batch, threads, self.cpu_repack)

    def _kv_params(self, cparams) -> None:
        """Flash attention on/off (off: llama.cpp stores V transposed) and the K/V cache type."""
        if self._flash_attn is not None:
            cparams.flash_attn_type = 1 if self._flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        if self._kv_type is not None:
            types = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}  # ggml_type ids
            if self._kv_type not in types:
                raise EdgeSafeError(f"unknown KV cache type {self._kv_type!r}; use one of {', '.join(types)}")
            cparams.type_k = cparams.type_v = types[self._kv_type]

    @property
    def n_layer(self) -> int:
        return int(C.llama_model_n_layer(self.model))

    def _batch_views(self, b) -> dict[str, np.ndarray]:
        n = self.n_batch
        for i in range(n):  # every row belongs to sequence 0, once and for all
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = SEQ
        views = {
            "pos": np.ctypeslib.as_array(b.pos, shape=(n,)),
            "logits": np.ctypeslib.as_array(b.logits, shape=(n,)),
        }
        if b.embd:
            views["embd"] = np.ctypeslib.as_array(b.embd, shape=(n, self.n_embd))  # (n_batch, n_embd)
        else:
            views["token"] = np.ctypeslib.as_array(b.token, shape=(n,))
        return views

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Free the batches, the context and the model (idempotent)."""
        self.ctx = self.model = None
        self._stack.close()

    @property
    def closed(self) -> bool:
        return self.ctx is None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the bindings may already be gone
            pass

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- vocabulary ------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special=False`` makes `<bos>` etc. in text plain text."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise EdgeSafeError(f"tokenization failed for a text of {len(data)} bytes")
        return list(buf[:n])

    def token_to_piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        buf = self._piece_buf
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    # -- decoding --------------------------------------------------------------------

    def decode_tokens(self, tokens: Sequence[int], pos0: int, want_logits: bool = True) -> None:
        """Decode ``tokens`` at positions pos0.. in chunks of n_batch; logits for the last one."""
        self._decode_chunks(self._tok, "token", tokens, pos0, want_logits)

    def decode_embeddings(self, vectors: np.ndarray, pos0: int, want_logits: bool = False) -> None:
        """Decode raw input vectors (n, n_embd) at positions pos0.. in chunks of n_batch."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.n_embd:
            raise EdgeSafeError(f"prefix vectors have shape {vectors.shape}; expected (n, {self.n_embd})")
        self._decode_chunks(self._emb, "embd", vectors, pos0, want_logits)

    def _decode_chunks(self, batch, field: str, items, pos0: int, want_logits: bool) -> None:
        """Fill ``batch.<field>`` n_batch rows at a time, positions consecutive from pos0; logits for the last."""
        v = self._views[id(batch)]
        for start in range(0, len(items), self.n_batch):
            chunk = items[start:start + self.n_batch]
            n = len(chunk)
            v[field][:n] = chunk
            v["pos"][:n] = np.arange(pos0 + start, pos0 + start + n)
            v["logits"][:n] = 0
            if want_logits and start + n == len(items):
                v["logits"][n - 1] = 1
            self._decode(batch, n)

    def _decode(self, batch, n: int) -> None:
        assert 0 < n <= self.n_batch  # an oversized batch would abort the process
        batch.n_tokens = n
        rc = C.llama_decode(self.ctx, batch)
        if rc != 0:
            raise DecodeError(
                f"llama_decode failed with code {rc} "
                f"({'no KV slot: the context is full' if rc == 1 else 'see -v output'})"
            )

    def logits(self) -> np.ndarray:
        """Logits of the last decoded output, as a view (n_vocab,) valid until the next decode."""
        ptr = C.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise EdgeSafeError("no logits available: the last decode requested none")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -- KV memory -------------------------------------------------------------------

    def clear(self) -> None:
        C.llama_memory_clear(self.memory, True)

    def truncate(self, pos: int) -> bool:
        """Drop every position >= pos of the sequence; False if llama.cpp refuses."""
        return bool(C.llama_memory_seq_rm(self.memory, SEQ, pos, -1))

    def pos_max(self) -> int:
        """Largest position held for the sequence, -1 if empty."""
        return C.llama_memory_seq_pos_max(self.memory, SEQ)

    def save_seq(self) -> bytes:
        """Snapshot the sequence's KV state."""
        size = C.llama_state_seq_get_size(self.ctx, SEQ)
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self.ctx, buf, size, SEQ)
        if n == 0:
            raise EdgeSafeError("llama.cpp could not snapshot the sequence state")
        return bytes(memoryview(buf)[:n])

    def load_seq(self, blob: bytes) -> None:
        """Replace the sequence's KV state with a snapshot from :meth:`save_seq`."""
        # seq_rm frees just our cells; memory_clear(data=True) would zero the whole buffer (~1 ms).
        C.llama_memory_seq_rm(self.memory, SEQ, -1, -1)
        buf = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))  # no copy of the bytes
        if C.llama_state_seq_set_data(self.ctx, buf, len(blob), SEQ) == 0:
            self.clear()
            raise EdgeSafeError("llama.cpp could not restore a sequence snapshot")


class SeqContext:
    """A second context on a loaded :class:`LlamaModel`: ``n_seq`` sequences decoded together in token
    batches whose rows each name their sequence (for :mod:`edge_safe.engine`).

    - ``unified=False`` (default, the engine's): one KV stream per sequence, ``n_ctx_seq`` cells each.
      A sequence's cells sit in position order, as in a fresh single-sequence context, so attention
      sums in the same order and (with the plain CPU kernels, ``cpu_repack`` off) its logits are
      bit-identical to a one-at-a-time decode. llama.cpp splits a batch into micro-batches with
      equal rows per sequence, so a step mixing decode rows and a prompt costs more than one.
      Snapshots record their stream count: these restore only into a context with as many streams.
    - ``unified=True``: one stream for all sequences (``n_seq * n_ctx_seq`` cells; snapshots
      interchangeable with :class:`LlamaModel`'s). Faster when prompts and decode rows mix, but with
      llama-cpp-python 0.3.36 it gave wrong replies under the server load test (not a near-tie: a
      reply opening "10..." instead of "Peru is a"), and a near-tie flipped in a smaller test; kept
      for experiments only, not used by the engine.
    - ``swa_full=True`` as in :class:`LlamaModel`: partial removal and snapshots stay exact; flash
      attention and the KV-cache type are ``llm``'s (the same cache layout and kernels as its context).
    - ``llama_state_seq_set_data`` takes the destination sequence id and ignores the one stored in
      the snapshot (checked: a snapshot of sequence 0 restored into sequences 1..3 gives the same
      logits as a fresh prefill, max diff 0.0), so one cached prefix serves every sequence.
    - Cells of one sequence are masked out of every other sequence's attention by llama.cpp
      (checked bit for bit in tests/test_engine.py).

    The weights are shared with ``llm``; this context is freed before the model (``llm.close``
    closes it first).
    """

    def __init__(self, llm: LlamaModel, n_seq: int, n_ctx_seq: int, n_batch: int | None = None,
                 n_threads: int | None = None, unified: bool = False):
        if llm.closed:
            raise EdgeSafeError("the model is closed; load it again")
        if n_seq < 1:
            raise EdgeSafeError(f"the number of parallel sequences must be >= 1, got {n_seq}")
        self.llm, self.n_seq, self.n_ctx_seq = llm, int(n_seq), int(n_ctx_seq)
        self.n_vocab, self.n_embd = llm.n_vocab, llm.n_embd
        self._stack = ExitStack()
        cparams = C.llama_context_default_params()
        cparams.n_ctx = self.n_seq * self.n_ctx_seq  # non-unified: split evenly, n_ctx_seq cells per stream
        cparams.n_batch = cparams.n_ubatch = int(n_batch or llm.n_batch)
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = bool(unified)  # False: a KV stream per sequence (see the class doc)
        cparams.swa_full = True
        cparams.n_threads = cparams.n_threads_batch = self.n_threads = int(n_threads or llm.n_threads)
        cparams.no_perf = True
        llm._kv_params(cparams)  # the model's flash-attention and KV-type settings: the same cache layout and kernels
        ctx = C.llama_init_from_model(llm.model, cparams)
        if not ctx:
            raise EdgeSafeError(f"llama.cpp could not create a context of {self.n_seq} sequences x {self.n_ctx_seq} "
                                "positions (lower --parallel or --n-ctx)")
        self._stack.callback(C.llama_free, ctx)
        self.ctx = ctx
        self.n_batch = C.llama_n_batch(ctx)
        self.memory = C.llama_get_memory(ctx)
        self._tok = C.llama_batch_init(self.n_batch, 0, 1)
        self._stack.callback(C.llama_batch_free, self._tok)
        self._emb = C.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._stack.callback(C.llama_batch_free, self._emb)
        n = self.n_batch
        for b in (self._tok, self._emb):
            for i in range(n):
                b.n_seq_id[i] = 1
        self._token = np.ctypeslib.as_array(self._tok.token, shape=(n,))
        self._pos = {id(b): np.ctypeslib.as_array(b.pos, shape=(n,)) for b in (self._tok, self._emb)}
        self._want = {id(b): np.ctypeslib.as_array(b.logits, shape=(n,)) for b in (self._tok, self._emb)}
        self._embd = np.ctypeslib.as_array(self._emb.embd, shape=(n, self.n_embd))  # (n_batch, n_embd)
        self._piece_buf = ctypes.create_string_buffer(256)  # its own: LlamaModel's is used by another thread
        llm._stack.callback(self.close)  # LIFO: this context goes before the model it uses
        log.info("sequence context: %d sequences x %d positions, n_batch=%d, threads=%d",
                 self.n_seq, self.n_ctx_seq, self.n_batch, self.n_threads)

    def close(self) -> None:
        """Free the batches and the context (idempotent)."""
        self.ctx = None
        self._stack.close()

    @property
    def closed(self) -> bool:
        return self.ctx is None

    def token_to_piece(self, token: int) -> bytes:
        """As :meth:`LlamaModel.token_to_piece`, with this context's own buffer (thread-safe across contexts)."""
        buf = self._piece_buf
        n = C.llama_token_to_piece(self.llm.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.llm.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _check_seq(self, seq: int) -> None:
        if self.ctx is None:  # a freed context would crash llama.cpp
            raise EdgeSafeError("this sequence context is closed")
        if not 0 <= seq < self.n_seq:
            raise EdgeSafeError(f"sequence {seq} is outside 0..{self.n_seq - 1}")

    # -- decoding --------------------------------------------------------------------

    def decode_rows(self, tokens: Sequence[int], seqs: Sequence[int], pos: Sequence[int],
                    want: Sequence[bool]) -> None:
        """One decode of token rows, each with its own sequence, position and logits flag.

        At most ``n_batch`` rows (more would abort the process); per sequence the positions must
        continue that sequence consecutively. Row i's logits: :meth:`logits` ``(i)``."""
        n = len(tokens)
        if self.ctx is None:
            raise EdgeSafeError("this sequence context is closed")
        if not 0 < n <= self.n_batch:
            raise EdgeSafeError(f"a decode takes 1..{self.n_batch} rows, got {n}")
        b = self._tok
        self._token[:n] = tokens
        self._pos[id(b)][:n] = pos
        self._want[id(b)][:n] = want
        for i, s in enumerate(seqs):
            b.seq_id[i][0] = s
        self._decode(b, n)

    def prefill(self, seq: int, bos: int, vectors: np.ndarray) -> None:
        """Clear ``seq`` and decode ``[BOS][vectors]`` into it alone (no logits): a prefix that is not cached."""
        self._check_seq(seq)
        self.seq_rm(seq)
        b = self._tok
        self._token[0], self._pos[id(b)][0], self._want[id(b)][0] = bos, 0, 0
        b.seq_id[0][0] = seq
        self._decode(b, 1)
        self.decode_vectors(seq, vectors, 1)

    def decode_vectors(self, seq: int, vectors: np.ndarray, pos0: int) -> None:
        """Decode raw input vectors (n, n_embd) into ``seq`` alone at positions pos0.. (no logits), n_batch at a time."""
        self._check_seq(seq)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.n_embd:
            raise EdgeSafeError(f"prefix vectors have shape {vectors.shape}; expected (n, {self.n_embd})")
        b = self._emb
        for start in range(0, len(vectors), self.n_batch):
            chunk = vectors[start:start + self.n_batch]
            k = len(chunk)
            self._embd[:k] = chunk
            self._pos[id(b)][:k] = np.arange(pos0 + start, pos0 + start + k)
            self._want[id(b)][:k] = 0
            for i in range(k):
                b.seq_id[i][0] = seq
            self._decode(b, k)

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = C.llama_decode(self.ctx, batch)
        if rc != 0:
            raise DecodeError(
                f"llama_decode failed with code {rc} "
                f"({'no KV slot: the context is full' if rc == 1 else 'see -v output'})"
            )

    def logits(self, row: int) -> np.ndarray:
        """Logits (n_vocab,) of batch row ``row`` of the last decode, as a view valid until the next decode."""
        ptr = C.llama_get_logits_ith(self.ctx, row)
        if not ptr:
            raise EdgeSafeError(f"no logits for row {row}: the last decode did not ask for them")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -- KV memory per sequence ------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """Drop positions [p0, p1) of ``seq`` (-1: open end); the cells of other sequences are untouched."""
        self._check_seq(seq)
        return bool(C.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def pos_range(self, seq: int) -> tuple[int, int]:
        """(smallest, largest) position held for ``seq``; (-1, -1) when it holds none."""
        self._check_seq(seq)
        return C.llama_memory_seq_pos_min(self.memory, seq), C.llama_memory_seq_pos_max(self.memory, seq)

    def save_seq(self, seq: int) -> bytes:
        """Snapshot one sequence's KV cells (restorable here into any sequence, or into a LlamaModel)."""
        self._check_seq(seq)
        size = C.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if n == 0:
            raise EdgeSafeError(f"llama.cpp could not snapshot sequence {seq}")
        return bytes(memoryview(buf)[:n])

    def load_seq(self, seq: int, blob: bytes) -> None:
        """Replace ``seq``'s cells with a snapshot (taken from any sequence, here or in a LlamaModel)."""
        self._check_seq(seq)
        self.seq_rm(seq)
        buf = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))  # no copy of the bytes
        if C.llama_state_seq_set_data(self.ctx, buf, len(blob), seq) == 0:
            self.seq_rm(seq)
            raise EdgeSafeError(f"llama.cpp could not restore a snapshot into sequence {seq}")
