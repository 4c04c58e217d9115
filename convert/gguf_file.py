"""A small GGUF header scanner (numpy + gguf constants only).

gguf-py's ``GGUFReader`` builds Python objects for every metadata entry; for a
262k-word vocabulary that takes seconds. This scanner can *skip* arrays, so a
model's header reads in milliseconds, and it keeps them when reading a
kilobyte token bank. It raises :class:`GGUFScanError`; callers turn that into
their own one-line errors.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from .keys import Model

GGUF_VERSIONS = (2, 3)

_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}  # fmt: skip


class GGUFScanError(ValueError):
    """The bytes are not a well-formed GGUF header (message says what is wrong)."""


class NotGGUFError(GGUFScanError):
    """The file does not start with the GGUF magic."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols): ggml's ne reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class Header:
    version: int
    kv: dict[str, Any]  # scalars and strings as Python values; arrays as lists, or as their length if skipped
    types: dict[str, tuple[int, ...]]  # key -> (GGUFValueType, [element type])
    tensors: dict[str, TensorInfo]


@lru_cache(maxsize=None)
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct("<" + fmt)


class _Cursor:
    """Little-endian reader over a GGUF buffer (bytes or mmap)."""

    def __init__(self, buf: bytes | mmap.mmap, keep_arrays: bool):
        self.buf, self.pos, self.keep_arrays = buf, 0, keep_arrays

    def unpack(self, fmt: str) -> Any:
        s = _struct(fmt)
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise GGUFScanError("a string runs past the end of the file")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFScanError(f"a string is not valid UTF-8 ({e})") from None

    def value(self, vtype: int) -> tuple[Any, tuple[int, ...]]:
        """(value, type path); arrays are lists, or their length when not kept."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype]), (vtype,)
        if vtype == GGUFValueType.STRING:
            return self.string(), (vtype,)
        if vtype != GGUFValueType.ARRAY:
            raise GGUFScanError(f"unknown GGUF value type {vtype}")
        sub, count = self.unpack("I"), self.unpack("Q")
        if not self.keep_arrays and sub in _SCALARS:
            self.pos += count * _struct(_SCALARS[sub]).size
            return count, (vtype, sub)
        if not self.keep_arrays and sub == GGUFValueType.STRING:
            for _ in range(count):
                n = self.unpack("Q")  # read first: unpack moves pos
                self.pos += n
            return count, (vtype, sub)
        items = [self.value(sub)[0] for _ in range(count)]
        return (items if self.keep_arrays else count), (vtype, sub)


def parse_header(buf: bytes | mmap.mmap, *, keep_arrays: bool) -> Header:
    """Parse the metadata and tensor infos of a GGUF buffer."""
    try:
        return _parse(buf, keep_arrays)
    except GGUFScanError:
        raise
    except (struct.error, KeyError, ValueError, OverflowError):
        raise GGUFScanError("truncated or damaged header") from None


def scan_file(path: Path, *, keep_arrays: bool = False) -> Header:
    """Parse a GGUF file's header through a memory map (the data is not read)."""
    with open(path, "rb") as f:
        if f.read(4) != struct.pack("<I", GGUF_MAGIC):
            f.seek(0)
            raise NotGGUFError(f"it starts with {f.read(4)!r}, expected b'GGUF'")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse_header(buf, keep_arrays=keep_arrays)


def _parse(buf: bytes | mmap.mmap, keep_arrays: bool) -> Header:
    cur = _Cursor(buf, keep_arrays)
    if cur.unpack("I") != GGUF_MAGIC:
        raise NotGGUFError(f"it starts with {bytes(buf[:4])!r}, expected b'GGUF'")
    version = cur.unpack("I")
    if version not in GGUF_VERSIONS:
        raise GGUFScanError(f"GGUF version {version} is not supported (expected one of {GGUF_VERSIONS})")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    kv: dict[str, Any] = {}
    types: dict[str, tuple[int, ...]] = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key], types[key] = cur.value(cur.unpack("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
        qtype = GGMLQuantizationType(cur.unpack("I"))
        infos.append((name, tuple(reversed(dims)), qtype, cur.unpack("Q")))
    align = kv.get(Model.ALIGNMENT, 32)
    if types.get(Model.ALIGNMENT, (GGUFValueType.UINT32,)) != (GGUFValueType.UINT32,) or align <= 0 or align % 8:
        raise GGUFScanError(f"{Model.ALIGNMENT} must be a uint32 multiple of 8, got {align!r}")
    start = -(-cur.pos // align) * align
    tensors = {n: _tensor_info(n, shape, q, start + off) for n, shape, q, off in infos}
    for t in tensors.values():
        if t.offset + t.n_bytes > len(buf):
            raise GGUFScanError(f"tensor {t.name!r} runs past the end of the file (truncated?)")
    return Header(version, kv, types, tensors)


def _tensor_info(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, offset: int) -> TensorInfo:
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return TensorInfo(name, shape, qtype, offset, rows * (shape[-1] // block) * type_size)
