"""The one module that touches llama.cpp's low-level API (ctypes, ``llama_batch``).

llama-cpp-python's high-level ``Llama`` only builds *token* batches; injecting
control-token vectors needs embedding batches, so edge-safe drives the C API
directly. Everything native lives in :class:`Model` (weights, vocabulary) and
:class:`Context` (KV cache, batches), each freed deterministically by its ``close``
(an ``ExitStack``); a model frees its contexts before itself.

Facts this module relies on (each checked by a test under tests/):

- ``llama_batch_init(n, n_embd, 1)`` allocates a batch whose ``embd`` field takes
  raw vectors; llama.cpp feeds them to layer 0 unscaled (token inputs of gemma3
  are multiplied by sqrt(n_embd) inside the graph, raw embeddings are not).
- A batch larger than ``n_batch`` aborts the whole process (GGML_ASSERT), so every
  decode here is chunked by ``n_batch``; positions are always consecutive.
- Gemma 3 uses sliding-window attention layers; ``swa_full=True`` keeps the whole
  window so that partial ``llama_memory_seq_rm`` and sequence snapshots work.
- On Intel CPUs with AMX, a native build of llama.cpp repacks Q4_K weights into its AMX
  buffer and the first decode dies with SIGSEGV (upstream llama.cpp bug 20824). Every model this
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
    repacked Q4_K matmul crashes the first decode (upstream llama.cpp bug 20824); elsewhere (AVX2,
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
             "matmul crashes, upstream llama.cpp bug 20824); %s=on forces them", ENV_CPU_REPACK)


_params_lock = threading.Lock()


def plain_llama(model_path: str | os.PathLike, *, cpu_repack: str | bool | None = None, **kwargs) -> "C.Llama":
    """llama-cpp-python's high-level ``Llama`` loaded with the same CPU buffer choice as
    :class:`Model` (for baselines that must compare like with like).

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


def _kv_override_array(overrides: dict[str, int | float | bool]):
    """llama.cpp's zero-terminated ``llama_model_kv_override`` array for numeric header overrides."""
    arr = (C.llama_model_kv_override * (len(overrides) + 1))()
    for i, (key, value) in enumerate(overrides.items()):
        arr[i].key = key.encode("utf-8")
        if isinstance(value, bool):
            arr[i].tag, arr[i].value.val_bool = C.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            arr[i].tag, arr[i].value.val_i64 = C.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            arr[i].tag, arr[i].value.val_f64 = C.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        else:
            raise EdgeSafeError(f"kv override {key!r} must be a number or a bool, got {value!r}")
    arr[len(overrides)].key = b"\0"
    return arr


KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}  # ggml_type ids


class Model:
    """A loaded GGUF: weights and vocabulary, shared by the contexts made on it (freed last)."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, cpu_repack: str | bool | None = None,
                 kv_overrides: dict[str, int | float | bool] | None = None):
        _init_backend()
        self.path = Path(path)
        self.cpu_repack = resolve_cpu_repack(cpu_repack)  # use_extra_bufts, decided before anything loads
        self._stack = ExitStack()
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = int(n_gpu_layers)
        mparams.use_extra_bufts = self.cpu_repack
        if kv_overrides:  # e.g. {"gemma3.attention.sliding_window": 4096} for a measurement
            self._overrides = _kv_override_array(kv_overrides)  # kept alive while llama.cpp reads it
            mparams.kv_overrides = self._overrides
        model = C.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise ModelNotFoundError(f"llama.cpp could not load {self.path} (is it a GGUF model file? run with -v for details)")
        self._stack.callback(C.llama_model_free, model)
        self.model = model
        self.vocab = C.llama_model_get_vocab(model)
        self.n_embd = C.llama_model_n_embd(model)
        self.n_layer = int(C.llama_model_n_layer(model))
        # positions a sliding-window layer attends to (0: none); llama.cpp keeps only the cells of the last n_swa
        # positions of a sequence in those layers, swa_full or not
        self.n_swa = int(C.llama_model_n_swa(model))
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.bos = C.llama_vocab_bos(self.vocab)
        self.eos = C.llama_vocab_eos(self.vocab)
        self._pieces: dict[int, bytes] = {}  # token -> bytes, filled as tokens are met (dict ops are atomic)

    def close(self) -> None:
        """Free the contexts made on this model, then the weights (idempotent)."""
        self.model = None
        self._stack.close()

    @property
    def closed(self) -> bool:
        return self.model is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        """The bytes a token stands for (special tokens render as nothing); thread-safe."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))


class Context:
    """A llama.cpp context of ``n_seq`` sequences on a :class:`Model`, decoded in token batches whose
    rows each name their sequence (the batching engine's), or one sequence at a time (``seq=0``).

    - One KV stream per sequence (``kv_unified=False``), ``n_ctx + extra_cells`` cells each: a
      sequence's cells sit in position order, as in a fresh single-sequence context, so attention sums
      in the same order and (with the plain CPU kernels) its logits are bit-identical to a one-sequence
      decode. ``extra_cells`` are cells that take no position (a bank's deep control tokens). One
      shared stream was faster under load but gave wrong replies in the server load test
      (llama-cpp-python 0.3.36), so it is not offered.
    - ``swa_full=True``: Gemma 3's sliding-window layers keep every cell, so partial removal and
      sequence snapshots stay exact.
    - ``llama_state_seq_set_data`` takes the destination sequence id and ignores the one stored in the
      snapshot, so one cached prefix serves every sequence; cells of one sequence are masked out of
      every other sequence's attention (checked bit for bit in tests/test_engine.py).
    - A batch larger than ``n_batch`` would abort the process (GGML_ASSERT): every decode is checked
      or chunked.
    - ``flash_attn`` / ``kv_type`` set llama.cpp's flash attention (off: V is stored transposed) and
      the K/V cache type (None: llama.cpp's defaults, flash attention auto and an f16 cache).
    """

    def __init__(self, model: Model, n_ctx: int = 2048, *, n_seq: int = 1, n_batch: int = 512,
                 n_threads: int | None = None, extra_cells: int = 0, flash_attn: bool | None = None,
                 kv_type: str | None = None, owns_model: bool = False):
        if model.closed:
            raise EdgeSafeError("the model is closed; load it again")
        if not isinstance(n_seq, int) or n_seq < 1:
            raise EdgeSafeError(f"the number of parallel sequences must be a whole number >= 1, got {n_seq!r}")
        self.model, self.n_seq, self.extra_cells = model, n_seq, int(extra_cells)
        self.flash_attn, self.kv_type = flash_attn, kv_type
        self.n_vocab, self.n_embd = model.n_vocab, model.n_embd
        self._stack = ExitStack()
        try:
            self._open(int(n_ctx), int(n_batch), n_threads)
        except BaseException:
            self._stack.close()
            if owns_model:
                model.close()
            raise
        if owns_model:
            self._stack.callback(model.close)  # LIFO: after this context's own resources
        else:
            model._stack.callback(self.close)  # the model frees its contexts before itself

    @classmethod
    def load(cls, path: str | os.PathLike, n_ctx: int = 2048, *, n_gpu_layers: int = 0,
             cpu_repack: str | bool | None = None, **kwargs) -> "Context":
        """A context on a model of its own (both freed by :meth:`close`): one sequence unless ``n_seq``."""
        return cls(Model(path, n_gpu_layers, cpu_repack), n_ctx, owns_model=True, **kwargs)

    def _open(self, n_ctx: int, n_batch: int, n_threads: int | None) -> None:
        cparams = C.llama_context_default_params()
        per_seq = n_ctx + self.extra_cells
        cparams.n_ctx = self.n_seq * per_seq  # split evenly over the streams
        cparams.n_batch = cparams.n_ubatch = min(n_batch, n_ctx)
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = False  # a KV stream per sequence (see the class doc)
        cparams.swa_full = True
        cparams.n_threads = cparams.n_threads_batch = self.n_threads = int(n_threads or default_threads())
        cparams.no_perf = True
        if self.flash_attn is not None:
            cparams.flash_attn_type = 1 if self.flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        if self.kv_type is not None:
            if self.kv_type not in KV_TYPES:
                raise EdgeSafeError(f"unknown KV cache type {self.kv_type!r}; use one of {', '.join(KV_TYPES)}")
            cparams.type_k = cparams.type_v = KV_TYPES[self.kv_type]
        ctx = C.llama_init_from_model(self.model.model, cparams)
        if not ctx:
            raise EdgeSafeError(f"llama.cpp could not create a context of {self.n_seq} sequence(s) x {n_ctx} "
                                "positions (lower --parallel or --n-ctx)")
        self._stack.callback(C.llama_free, ctx)
        self.ctx = ctx
        # llama.cpp pads a stream up (to 256); keep the asked limit
        self.n_ctx = min(n_ctx, C.llama_n_ctx(ctx) // self.n_seq - self.extra_cells)
        self.n_batch = C.llama_n_batch(ctx)
        self.memory = C.llama_get_memory(ctx)
        self._scratch = np.empty(0, dtype=np.uint8)  # save_seq_scratch's reused buffer
        n = self.n_batch
        self._tok = C.llama_batch_init(n, 0, 1)
        self._stack.callback(C.llama_batch_free, self._tok)
        self._emb = C.llama_batch_init(n, self.n_embd, 1)
        self._stack.callback(C.llama_batch_free, self._emb)
        for b in (self._tok, self._emb):
            for i in range(n):
                b.n_seq_id[i] = 1
        self._token = np.ctypeslib.as_array(self._tok.token, shape=(n,))
        self._pos = {id(b): np.ctypeslib.as_array(b.pos, shape=(n,)) for b in (self._tok, self._emb)}
        self._want = {id(b): np.ctypeslib.as_array(b.logits, shape=(n,)) for b in (self._tok, self._emb)}
        self._embd = np.ctypeslib.as_array(self._emb.embd, shape=(n, self.n_embd))  # (n_batch, n_embd)
        log.info("context on %s: %d sequence(s) x %d positions (+%d cells), n_batch=%d, threads=%d, cpu_repack=%s",
                 self.model.path.name, self.n_seq, self.n_ctx, self.extra_cells, n, self.n_threads,
                 self.model.cpu_repack)

    def close(self) -> None:
        """Free the batches and the context (and the model, when it owns it); idempotent."""
        self.ctx = None
        self._stack.close()

    @property
    def closed(self) -> bool:
        return self.ctx is None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the bindings may already be gone
            pass

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model's vocabulary, for callers that hold only the context ----------------------

    @property
    def bos(self) -> int:
        return self.model.bos

    @property
    def n_layer(self) -> int:
        return self.model.n_layer

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos, special)

    def token_to_piece(self, token: int) -> bytes:
        return self.model.token_to_piece(token)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    # -- decoding --------------------------------------------------------------------

    def _check_seq(self, seq: int) -> None:
        if self.ctx is None:  # a freed context would crash llama.cpp
            raise EdgeSafeError("this llama.cpp context is closed")
        if not 0 <= seq < self.n_seq:
            raise EdgeSafeError(f"sequence {seq} is outside 0..{self.n_seq - 1}")

    def decode_rows(self, tokens: Sequence[int], seqs: Sequence[int], pos: Sequence[int],
                    want: Sequence[bool]) -> None:
        """One decode of token rows, each with its own sequence, position and logits flag.

        At most ``n_batch`` rows; per sequence the positions must continue that sequence
        consecutively. Row i's logits: :meth:`logits` ``(i)``."""
        n = len(tokens)
        if self.ctx is None:
            raise EdgeSafeError("this llama.cpp context is closed")
        if not 0 < n <= self.n_batch:
            raise EdgeSafeError(f"a decode takes 1..{self.n_batch} rows, got {n}")
        b = self._tok
        self._token[:n] = tokens
        self._pos[id(b)][:n] = pos
        self._want[id(b)][:n] = want
        for i, s in enumerate(seqs):
            b.seq_id[i][0] = s
        self._decode(b, n)

    def decode_tokens(self, tokens: Sequence[int], pos0: int, want_logits: bool = True, seq: int = 0) -> None:
        """Decode ``tokens`` into ``seq`` alone at positions pos0.., n_batch at a time; logits for the last."""
        self._check_seq(seq)
        tokens = list(tokens)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            k = len(chunk)
            last = want_logits and start + k == len(tokens)
            self.decode_rows(chunk, [seq] * k, range(pos0 + start, pos0 + start + k), [False] * (k - 1) + [last])

    def decode_embeddings(self, vectors: np.ndarray, pos0: int, want_logits: bool = False, seq: int = 0) -> None:
        """Decode raw input vectors (n, n_embd) into ``seq`` alone at positions pos0.., n_batch at a time."""
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
            if want_logits and start + k == len(vectors):
                self._want[id(b)][k - 1] = 1
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

    def logits(self, row: int = -1) -> np.ndarray:
        """Logits (n_vocab,) of batch row ``row`` of the last decode (-1: its last output), as a view
        valid until the next decode."""
        ptr = C.llama_get_logits_ith(self.ctx, row)
        if not ptr:
            raise EdgeSafeError(f"no logits for row {row}: the last decode did not ask for them")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -- KV memory per sequence ------------------------------------------------------------

    def clear(self) -> None:
        """Drop every sequence's cells."""
        C.llama_memory_clear(self.memory, True)

    def seq_rm(self, seq: int = 0, p0: int = -1, p1: int = -1) -> bool:
        """Drop positions [p0, p1) of ``seq`` (-1: open end); False if llama.cpp refuses. Other sequences
        are untouched."""
        self._check_seq(seq)
        return bool(C.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def truncate(self, pos: int, seq: int = 0) -> bool:
        """Drop every position >= pos of ``seq``; False if llama.cpp refuses."""
        return self.seq_rm(seq, pos, -1)

    def pos_range(self, seq: int = 0) -> tuple[int, int]:
        """(smallest, largest) position held for ``seq``; (-1, -1) when it holds none."""
        self._check_seq(seq)
        return C.llama_memory_seq_pos_min(self.memory, seq), C.llama_memory_seq_pos_max(self.memory, seq)

    def pos_max(self, seq: int = 0) -> int:
        """Largest position held for ``seq``, -1 if empty."""
        return self.pos_range(seq)[1]

    def save_seq(self, seq: int = 0) -> bytes:
        """Snapshot one sequence's KV cells (restorable into any sequence of a context like this one)."""
        self._check_seq(seq)
        size = C.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if n == 0:
            raise EdgeSafeError(f"llama.cpp could not snapshot sequence {seq}")
        return bytes(memoryview(buf)[:n])

    def save_seq_scratch(self, seq: int = 0, spare: int = 0) -> tuple[np.ndarray, int]:
        """Snapshot ``seq`` into this context's scratch buffer, with at least ``spare`` bytes free after it:
        (the buffer, the snapshot's length). The buffer is reused (grown, never shrunk, freed with
        the context), so writing cells after a long context neither allocates nor faults
        in a new state-sized block each time (measured: a fresh 17 MB block took up to 44 ms to fault in,
        the reused one 3 ms). Valid until the next call; for a snapshot that is kept, use :meth:`save_seq`."""
        self._check_seq(seq)
        size = C.llama_state_seq_get_size(self.ctx, seq)
        need = size + max(0, int(spare))
        if len(self._scratch) < need:
            self._scratch = np.empty(need + need // 8, dtype=np.uint8)  # headroom: the state grows a turn at a time
        buf = self._scratch
        n = C.llama_state_seq_get_data(self.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq)
        if n == 0:
            raise EdgeSafeError(f"llama.cpp could not snapshot sequence {seq}")
        return buf, n

    def load_seq(self, blob: bytes | bytearray | memoryview | np.ndarray, seq: int = 0) -> None:
        """Replace ``seq``'s cells with a snapshot (taken from any sequence of a context like this one): bytes,
        or any contiguous byte buffer (read, not copied)."""
        self._check_seq(seq)
        self.seq_rm(seq)  # frees just these cells; memory_clear(data=True) would zero the whole buffer
        if isinstance(blob, bytes):
            buf = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))  # no copy of the bytes
        else:
            arr = np.frombuffer(blob, dtype=np.uint8)  # a view: no copy
            blob = arr
            buf = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if C.llama_state_seq_set_data(self.ctx, buf, len(blob), seq) == 0:
            self.seq_rm(seq)
            raise EdgeSafeError(f"llama.cpp could not restore a snapshot into sequence {seq}")
