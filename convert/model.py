"""What a token bank needs from a base-model GGUF, read without llama.cpp.

:class:`ModelInfo` reads the GGUF header (arch, n_embd, vocabulary size, name)
and the ``token_embd`` tensor straight from the file: the fingerprint a bank is
checked against, and dequantized embedding rows for ``from-text`` banks.

The header is read with :mod:`.gguf_file`, which skips the 262k-entry
vocabulary arrays, so reading a model costs milliseconds, not gguf-py's seconds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf.quants import dequantize

from .errors import EdgeSafeError, ModelNotFoundError
from .gguf_file import GGUFScanError, NotGGUFError, TensorInfo, scan_file
from .keys import ADAPTER_TYPE_TOKEN_BANK, GENERAL_TYPE_ADAPTER, Keys, Model

log = logging.getLogger(__name__)

#: Directory for edge-safe's caches (default ``~/.cache/edge-safe``).
ENV_CACHE = "EDGE_SAFE_CACHE"
FINGERPRINT_CACHE = "fingerprints.json"
_MAX_CACHE_ENTRIES = 64

#: Architectures whose llama.cpp graph multiplies *token* inputs by sqrt(n_embd).
SCALED_INPUT_ARCHS = ("gemma", "gemma2", "gemma3")


def input_scale(arch: str, n_embd: int) -> float:
    """How llama.cpp scales token inputs before layer 0 (raw embedding inputs are not scaled)."""
    return math.sqrt(n_embd) if arch in SCALED_INPUT_ARCHS else 1.0


def cache_dir() -> Path:
    """edge-safe's cache directory: ``$EDGE_SAFE_CACHE`` or ``~/.cache/edge-safe``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "edge-safe").expanduser()


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a base model that a token bank depends on."""

    path: Path
    arch: str
    n_embd: int
    n_vocab: int
    name: str
    _embd: TensorInfo = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    # KV geometry (what deep tokens must match); 0 when the header does not say
    n_layer: int = 0
    n_embd_k_gqa: int = 0  # width of one layer's key row: head_count_kv x key_length
    n_embd_v_gqa: int = 0
    rope_freq_base: float = 0.0  # 0 when the header does not say
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0: none or not said)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ModelInfo":
        """Read a model's header; every failure is a one-line :class:`ModelNotFoundError`."""
        path = Path(path).expanduser()
        kv, tensors, types = _read_header(path)
        if kv.get(Keys.Adapter.TYPE) == ADAPTER_TYPE_TOKEN_BANK:
            raise ModelNotFoundError(
                f"{path} is a token bank, not a model; pass it as --bank and the base model as --model"
            )
        if kv.get(Keys.General.TYPE) == GENERAL_TYPE_ADAPTER:
            raise ModelNotFoundError(
                f"{path} is a GGUF adapter ({kv.get(Keys.Adapter.TYPE, 'unknown type')}), not a model; "
                "pass the base model GGUF as --model"
            )
        arch = kv.get(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str) or not arch:
            raise ModelNotFoundError(f"{path} has no {Keys.General.ARCHITECTURE}; it is not a llama.cpp model GGUF")
        embd = tensors.get(Model.TOKEN_EMBD)
        if embd is None or len(embd.shape) != 2:
            raise ModelNotFoundError(
                f"{path} has no 2-D {Model.TOKEN_EMBD} tensor; edge-safe needs a model with a token embedding"
            )
        n_vocab, n_embd = embd.shape
        declared = kv.get(Model.EMBEDDING_LENGTH.format(arch=arch), n_embd)
        if declared != n_embd:
            raise ModelNotFoundError(
                f"{path}: {Model.EMBEDDING_LENGTH.format(arch=arch)} is {declared} but "
                f"{Model.TOKEN_EMBD} has {n_embd} columns; the file is inconsistent"
            )
        name = kv.get(Keys.General.NAME) or path.stem
        rope = kv.get(Model.ROPE_FREQ_BASE.format(arch=arch), 0.0)
        window = kv.get(Model.SLIDING_WINDOW.format(arch=arch), 0)
        return cls(path=path, arch=arch, n_embd=int(n_embd), n_vocab=int(n_vocab), name=str(name), _embd=embd,
                   rope_freq_base=float(rope) if isinstance(rope, (int, float)) else 0.0,
                   sliding_window=int(window) if isinstance(window, int) else 0,
                   **_kv_geometry(kv, types, arch, int(n_embd)))

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex of the raw ``token_embd`` bytes, cached on disk per (path, size, mtime)."""
        key = _cache_key(self.path)
        cache = _load_cache()
        if key in cache:
            return cache[key]
        digest = hashlib.sha256(self._embd_bytes()).hexdigest()
        log.debug("fingerprint of %s: %s", self.path, digest)
        cache[key] = digest
        _store_cache(cache)
        return digest

    def embedding_rows(self, ids: Sequence[int]) -> np.ndarray:
        """Exactly what llama.cpp feeds layer 0 for these token ids: float32 (len(ids), n_embd)."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise EdgeSafeError(f"token id {bad} is outside the vocabulary of {self.path} (0..{self.n_vocab - 1})")
        if not ids.size:
            return np.zeros((0, self.n_embd), dtype=np.float32)
        table = self._embd_bytes().reshape(self.n_vocab, -1)  # (n_vocab, bytes per row), memory-mapped
        try:
            rows = dequantize(np.ascontiguousarray(table[ids]), self._embd.qtype)
        except NotImplementedError as e:
            raise EdgeSafeError(
                f"{self.path}: {Model.TOKEN_EMBD} is {self._embd.qtype.name}, which gguf cannot dequantize; "
                "use a model whose token embedding is F32/F16/BF16 or a common quant type"
            ) from e
        rows = rows.reshape(len(ids), self.n_embd).astype(np.float32, copy=False)
        scale = input_scale(self.arch, self.n_embd)
        return rows * np.float32(scale) if scale != 1.0 else rows  # float32 multiply, as ggml_scale does

    def _embd_bytes(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._embd.offset, shape=(self._embd.n_bytes,))


def _kv_geometry(kv: dict, types: dict, arch: str, n_embd: int) -> dict[str, int]:
    """Layers and K/V row widths from a model header (0 where a value is missing or varies per layer)."""
    def num(key: str, default: int = 0) -> int:
        key = key.format(arch=arch)
        if key not in kv:
            return default
        value = kv[key]
        scalar = len(types.get(key, ())) == 1  # an array (per-layer values) is skipped: its length is no count
        return int(value) if scalar and isinstance(value, int) and not isinstance(value, bool) else 0

    n_head = num(Model.HEAD_COUNT)
    n_head_kv = num(Model.HEAD_COUNT_KV, n_head)
    head = n_embd // n_head if n_head else 0
    return {"n_layer": num(Model.BLOCK_COUNT), "n_embd_k_gqa": n_head_kv * num(Model.KEY_LENGTH, head),
            "n_embd_v_gqa": n_head_kv * num(Model.VALUE_LENGTH, head)}


def _read_header(path: Path) -> tuple[dict, dict[str, TensorInfo], dict]:
    """Metadata and tensor infos of a model GGUF, or a one-line ModelNotFoundError."""
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {path} (pass --model PATH to a .gguf file)")
    try:
        header = scan_file(path)
    except PermissionError as e:
        raise ModelNotFoundError(f"model file is not readable: {path} (check its permissions)") from e
    except NotGGUFError as e:
        raise ModelNotFoundError(f"{path} is not a GGUF file ({e}); pass --model PATH to a llama.cpp .gguf model") from e
    except (GGUFScanError, OSError) as e:  # empty file, truncation, garbage
        raise ModelNotFoundError(f"{path} is not a readable GGUF model ({e}); pass --model PATH to a .gguf file") from e
    return header.kv, header.tensors, header.types


# --- fingerprint cache -----------------------------------------------------


def _cache_key(path: Path) -> str:
    st = path.stat()
    return json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns])


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads((cache_dir() / FINGERPRINT_CACHE).read_text())
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        return {}


def _store_cache(cache: dict[str, str]) -> None:
    """Best effort: a cache that cannot be written only costs a re-hash next time."""
    entries = dict(list(cache.items())[-_MAX_CACHE_ENTRIES:])
    target = cache_dir() / FINGERPRINT_CACHE
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fingerprints.", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=0)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        log.debug("could not write the fingerprint cache %s: %s", target, e)
