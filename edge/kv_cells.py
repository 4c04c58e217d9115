"""Read and write the KV cells of one sequence's state blob (``llama_state_seq_get_data``).

Deep control tokens are key/value rows per layer. The runtime *writes* them into the
sequence's KV cache instead of prefilling anything: it takes the blob of a real state
(the BOS-only sequence), parses it, appends the deep cells, serialises it again and
loads it with ``llama_state_seq_set_data``; after a long context it splices the cells into the
sequence's blob instead (:func:`append_cells_in_place`), which walks the cells' bytes, not each cell. Layout of the blob (llama-cpp-python 0.3.36,
little-endian; docs/DESIGN.md "Writing KV cells"):

- an 8-byte header, copied through unchanged (below);
- one section per KV cache (Gemma 3: the full-attention cache, then the sliding-window
  cache): u32 ``n_stream``, then per stream u32 ``cell_count`` and, if > 0,
  - per cell: i32 ``pos``, u32 ``n_seq_id``, that many i32 sequence ids;
  - u32 ``v_trans``, u32 ``n_layer``;
  - per layer K: i32 ggml type, u64 row bytes, ``cell_count`` rows;
  - per layer V, ``v_trans`` 0: as K; ``v_trans`` 1 (flash attention off): i32 type,
    u32 element bytes, u32 ``n_embd_v_gqa``, then per element its value for every cell.

``n_stream`` is 1 in a single-sequence context (and with ``kv_unified``); a context with a KV
stream per sequence (``kv_unified=False``, the batching engine's) lists all its streams, every
one but the sequence's own with ``cell_count`` 0 (measured with 3 streams: the blob of sequence
2 holds streams 0 and 1 empty, then stream 2 with its cells). llama.cpp restores a blob into the
stream of the sequence it is loaded into, whichever stream held it, and refuses a blob with
another stream count. So a section is the cells of exactly one stream, and :func:`serialise`
writes the empty streams back around it. The header is two u32: a constant that llama.cpp
checks on load, then the id of the sequence the blob was taken from (0 in a single-sequence
context, whose blobs load into any sequence all the same); it is copied through unchanged.

Every field is parsed from the blob (nothing but this grammar is assumed); anything that
does not fit it raises :class:`KVLayoutError` and nothing is written. Plain numpy over
``bytes``: nothing here touches llama.cpp.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from edge_safe.convert.errors import EdgeSafeError

#: ggml type ids of the cache types deep cells can be written into, and their numpy types.
GGML_F32, GGML_F16 = 0, 1
_FLOAT_TYPES = {GGML_F32: np.dtype("<f4"), GGML_F16: np.dtype("<f2")}
_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 30: "bf16",
               20: "iq4_nl"}

#: Which model layers each KV section holds, per architecture whose cache is split
#: (llama.cpp's ``llama_kv_cache_iswa`` writes the full-attention cache first, then the
#: sliding-window one). Gemma 3: every 6th layer (5, 11, 17, ...) is full attention.
_SWA_PATTERN = {"gemma3": 6}


class KVLayoutError(EdgeSafeError):
    """A sequence state blob does not have the layout edge-safe writes deep cells into."""


class KVCacheTypeError(EdgeSafeError):
    """The KV cache is quantized (or another type deep cells cannot be written into)."""


@dataclass
class Section:
    """One KV cache of one stream: its cells and, per layer, raw K and V rows (cell-major)."""

    pos: np.ndarray  # int32 (n_cells,)
    seq_ids: list[tuple[int, ...]]  # per cell
    v_trans: int
    k_types: list[int]  # per layer, ggml type id
    v_types: list[int]
    k_rows: list[np.ndarray]  # per layer: uint8 (n_cells, row bytes)
    v_rows: list[np.ndarray]  # per layer: uint8 (n_cells, row bytes), de-transposed when v_trans == 1
    v_elem: list[int] = field(default_factory=list)  # per layer, element bytes of V (v_trans 1 only)
    n_stream: int = 1  # KV streams the blob lists for this cache (one per sequence without kv_unified)
    stream: int = 0  # the one of them holding the cells (the others are empty)

    @property
    def n_cells(self) -> int:
        return len(self.pos)

    @property
    def n_layer(self) -> int:
        return len(self.k_rows)


@dataclass
class SeqState:
    """A parsed ``llama_state_seq_get_data`` blob."""

    header: bytes  # the leading u64, copied through
    sections: list[Section]

    @property
    def n_layer(self) -> int:
        return sum(s.n_layer for s in self.sections)


class _Reader:
    def __init__(self, blob: bytes):
        self.b, self.o = memoryview(blob), 0

    def take(self, fmt: str):
        s = struct.Struct("<" + fmt)
        if self.o + s.size > len(self.b):
            raise layout_error(f"it ends inside a field at byte {self.o} of {len(self.b)}")
        out = s.unpack_from(self.b, self.o)
        self.o += s.size
        return out if len(out) > 1 else out[0]

    def raw(self, n: int) -> np.ndarray:
        if n < 0 or self.o + n > len(self.b):
            raise layout_error(f"a block of {n} bytes at byte {self.o} runs past its end ({len(self.b)} bytes)")
        out = np.frombuffer(self.b, dtype=np.uint8, count=n, offset=self.o)
        self.o += n
        return out


def layout_error(what: str) -> KVLayoutError:
    """The error for a blob that does not fit the grammar: what was found, and what to do."""
    return KVLayoutError(f"the KV state blob does not have the layout edge-safe expects ({what}); this llama.cpp build "
            "serialises sequence state differently, so deep control tokens cannot be written: use a bank of "
            "shallow tokens, or the llama-cpp-python version edge-safe was checked with (0.3.36)")


def parse(blob: bytes, *, max_layers: int = 4096, max_cells: int = 1 << 22, max_streams: int = 4096) -> SeqState:
    """Parse a sequence state blob; :class:`KVLayoutError` if it does not follow the grammar above."""
    r = _Reader(blob)
    header = bytes(r.raw(8))
    sections = []
    while r.o < len(r.b):
        si = len(sections)
        n_stream = r.take("I")
        if not 1 <= n_stream <= max_streams:
            raise layout_error(f"section {si} has {n_stream} streams, expected 1 to {max_streams}")
        section = None
        for stream in range(n_stream):
            n_cells = r.take("I")
            if n_cells > max_cells or 12 * n_cells > len(r.b) - r.o:  # each cell takes >= 12 bytes
                raise layout_error(f"section {si} claims {n_cells} cells, more than its bytes can hold")
            if n_cells == 0:
                continue
            if section is not None:
                raise layout_error(f"section {si} holds cells in streams {section.stream} and {stream}; "
                                   "parse the state of one sequence")
            section = _cells(r, si, n_cells, max_layers)
            section.n_stream, section.stream = n_stream, stream
        if section is None:
            raise layout_error(f"section {si} is empty; parse the state of a non-empty sequence")
        sections.append(section)
    if not sections:
        raise layout_error("it holds no KV section")
    return SeqState(header, sections)


def _cells(r: _Reader, si: int, n_cells: int, max_layers: int) -> Section:
    """One stream's cells and rows, read after its ``cell_count`` (section ``si``, for messages)."""
    pos = np.empty(n_cells, dtype=np.int32)
    seq_ids = []
    for i in range(n_cells):
        pos[i], n_seq = r.take("iI")
        if not 1 <= n_seq <= 64:
            raise layout_error(f"cell {i} of section {si} has {n_seq} sequence ids")
        ids = r.take(f"{n_seq}i")
        seq_ids.append(tuple(ids) if n_seq > 1 else (ids,))
    v_trans, n_layer = r.take("II")
    if v_trans not in (0, 1) or not 1 <= n_layer <= max_layers:
        raise layout_error(f"section {si} has v_trans={v_trans}, n_layer={n_layer}")
    k_types, k_rows = [], []
    for _ in range(n_layer):
        t, row = r.take("iQ")
        k_types.append(t)
        k_rows.append(r.raw(row * n_cells).reshape(n_cells, row))
    v_types, v_rows, v_elem = [], [], []
    for _ in range(n_layer):
        if v_trans == 0:
            t, row = r.take("iQ")
            v_rows.append(r.raw(row * n_cells).reshape(n_cells, row))
        else:
            t, el, n_embd_v = r.take("iII")
            if not 1 <= el <= 8:
                raise layout_error(f"V element size {el} in section {si}")
            cols = r.raw(el * n_embd_v * n_cells).reshape(n_embd_v, n_cells, el)
            v_rows.append(np.ascontiguousarray(cols.transpose(1, 0, 2)).reshape(n_cells, n_embd_v * el))
            v_elem.append(el)
        v_types.append(t)
    return Section(pos, seq_ids, v_trans, k_types, v_types, k_rows, v_rows, v_elem)


def serialise(state: SeqState) -> bytes:
    """The blob of ``state``; ``serialise(parse(b)) == b`` byte for byte."""
    out = [state.header]
    for s in state.sections:
        out.append(struct.pack("<I", s.n_stream))
        out.append(struct.pack("<I", 0) * s.stream)  # the streams before the cells' own are empty
        out.append(struct.pack("<I", s.n_cells))
        for p, ids in zip(s.pos.tolist(), s.seq_ids):
            out.append(struct.pack(f"<iI{len(ids)}i", p, len(ids), *ids))
        out.append(struct.pack("<II", s.v_trans, s.n_layer))
        for t, rows in zip(s.k_types, s.k_rows):
            out.append(struct.pack("<iQ", t, rows.shape[1]))
            out.append(rows.tobytes())
        for j, (t, rows) in enumerate(zip(s.v_types, s.v_rows)):
            if s.v_trans == 0:
                out.append(struct.pack("<iQ", t, rows.shape[1]))
                out.append(rows.tobytes())
            else:
                el = s.v_elem[j]
                n_embd_v = rows.shape[1] // el
                out.append(struct.pack("<iII", t, el, n_embd_v))
                out.append(np.ascontiguousarray(rows.reshape(s.n_cells, n_embd_v, el).transpose(1, 0, 2)).tobytes())
        out.append(struct.pack("<I", 0) * (s.n_stream - 1 - s.stream))  # and so are those after it
    return b"".join(out)


def append_cells(blob: bytes | memoryview, keys: np.ndarray, values: np.ndarray, groups: Sequence[Sequence[int]],
                 pos: int | Sequence[int] = 0, seq_id: int | None = None) -> bytes:
    """``serialise(with_cells(parse(blob), keys, values, groups, pos, seq_id))``, byte for byte, in one copy of
    the blob: the cells already held are spliced through as raw bytes instead of parsed and packed again, so
    writing a bank's cells after a long context costs a copy of its state, not a walk over its cells.

    ``seq_id`` None: the sequence id the blob's first cell carries (the one llama.cpp loads it into). Falls
    back to the full parse where V is stored transposed (flash attention off), whose rows interleave. Raises
    :class:`KVLayoutError` / :class:`KVCacheTypeError` as :func:`parse` and :func:`with_cells` do."""
    b = memoryview(blob).cast("B")
    plan = _splice_plan(b, keys, values, groups, pos, seq_id)
    if isinstance(plan, bytes):
        return plan
    return b"".join(b[p[0]:p[1]] if isinstance(p, tuple) else p for p in plan)


def append_cells_in_place(buf: np.ndarray, size: int, keys: np.ndarray, values: np.ndarray,
                          groups: Sequence[Sequence[int]], pos: int | Sequence[int] = 0,
                          seq_id: int | None = None) -> int:
    """:func:`append_cells` on the blob in ``buf[:size]`` (a writable uint8 array), written over it: the held
    cells' bytes move up in place, the new ones go between them. Returns the new blob's length. Needs
    ``len(buf) >= size +`` :func:`added_bytes` (else EdgeSafeError, ``buf`` untouched); no memory beyond
    ``buf`` is touched, so a long context's state is neither allocated nor faulted in again for each write."""
    if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.writeable or not buf.flags.c_contiguous:
        raise EdgeSafeError("append_cells_in_place needs a writable, contiguous 1-D uint8 array")
    plan = _splice_plan(memoryview(buf)[:size], keys, values, groups, pos, seq_id)
    if isinstance(plan, bytes):  # the parsed path (transposed V): one piece, written over the old bytes
        plan = [plan]
    total = sum(p[1] - p[0] if isinstance(p, tuple) else len(p) for p in plan)
    if total > len(buf):
        raise EdgeSafeError(f"the spliced state needs {total} bytes, the buffer holds {len(buf)}")
    # Every held span moves to an offset >= its own and the spans keep their order: moving them last to
    # first never overwrites a span not yet moved (memmove handles a span's overlap with itself).
    base = buf.ctypes.data
    end = total
    for p in reversed(plan):
        if isinstance(p, tuple):
            n = p[1] - p[0]
            end -= n
            ctypes.memmove(base + end, base + p[0], n)
        else:
            end -= len(p)
            buf[end:end + len(p)] = np.frombuffer(p, dtype=np.uint8)
    return total


def added_bytes(n_cells: int, n_sections: int, n_layer: int, width_k: int, width_v: int) -> int:
    """An upper bound on what appending ``n_cells`` cells adds to a blob (f32 rows; f16 rows add half)."""
    return n_cells * (12 * n_sections + 4 * n_layer * (width_k + width_v))


def _splice_plan(b: memoryview, keys: np.ndarray, values: np.ndarray, groups: Sequence[Sequence[int]],
                 pos: int | Sequence[int], seq_id: int | None) -> list | bytes:
    """The new blob as a list of pieces in order: ``(start, end)`` spans of ``b`` kept as they are, and
    ``bytes`` written here; or the whole new blob as bytes where V is transposed (the parsed path)."""
    keys, values = _as_cells(keys, values)
    n = keys.shape[0]
    if keys.shape[1] != sum(len(g) for g in groups):
        raise EdgeSafeError(f"deep cells of {keys.shape[1]} layers for a cache of {sum(len(g) for g in groups)}")
    positions = np.broadcast_to(np.asarray(pos, dtype=np.int32), (n,))
    r = _Reader(b)
    if len(r.b) < 8:
        raise layout_error(f"it is {len(r.b)} bytes long, shorter than its header")
    pieces: list = [(0, 8)]
    r.o = 8
    sections = 0
    while r.o < len(r.b):
        if sections >= len(groups):
            raise layout_error(f"it holds more than the {len(groups)} KV sections the model's layers map to")
        layers = groups[sections]
        start = r.o
        n_stream = r.take("I")
        if not 1 <= n_stream <= 4096:
            raise layout_error(f"section {sections} has {n_stream} streams, expected 1 to 4096")
        n_cells, stream = 0, 0
        while stream < n_stream:
            n_cells = r.take("I")
            if n_cells:
                break
            stream += 1
        if not n_cells:
            raise layout_error(f"section {sections} is empty; parse the state of a non-empty sequence")
        if 12 * n_cells > len(r.b) - r.o:
            raise layout_error(f"section {sections} claims {n_cells} cells, more than its bytes can hold")
        pieces.append((start, r.o - 4))
        pieces.append(struct.pack("<I", n_cells + n))
        meta = r.o
        cols = np.frombuffer(r.b, dtype="<i4", count=3 * n_cells, offset=meta).reshape(n_cells, 3)
        if np.all(cols[:, 1] == 1):  # one sequence id per cell: 12 bytes each
            r.o += 12 * n_cells
            first_seq = int(cols[0, 2])
        else:  # cells shared by several sequences: walk them
            first_seq = None
            for i in range(n_cells):
                _, n_seq = r.take("iI")
                if not 1 <= n_seq <= 64:
                    raise layout_error(f"cell {i} of section {sections} has {n_seq} sequence ids")
                ids = r.take(f"{n_seq}i")
                first_seq = (ids if n_seq == 1 else ids[0]) if first_seq is None else first_seq
        if seq_id is None:  # every section's new cells: the sequence of the blob's first cell
            seq_id = first_seq
        pieces.append((meta, r.o))
        cell_meta = np.empty((n, 3), dtype="<i4")
        cell_meta[:, 0], cell_meta[:, 1], cell_meta[:, 2] = positions, 1, seq_id
        pieces.append(cell_meta.tobytes())
        v_trans, n_layer = r.take("II")
        if v_trans == 1:
            return serialise(with_cells(parse(b), keys, values, groups, pos=pos, seq_id=seq_id))
        if v_trans != 0 or n_layer != len(layers):
            raise layout_error(f"section {sections} has v_trans={v_trans}, n_layer={n_layer}; the model's "
                               f"layers map {len(layers)} to it")
        pieces.append((r.o - 8, r.o))
        for what, rows_of in (("key", keys), ("value", values)):
            for layer in layers:
                t, row = r.take("iQ")
                new = _cast(rows_of[:, layer], t, what, layer)
                if new.shape[1] != row:
                    raise layout_error(f"layer {layer}: deep {what} rows of {new.shape[1]} bytes, cache rows of "
                                       f"{row}")
                head = r.o - 12
                r.raw(row * n_cells)
                pieces.append((head, r.o))
                pieces.append(new.tobytes())
        rest = 4 * (n_stream - 1 - stream)  # the empty streams after the cells' own
        if rest:
            tail = r.raw(rest)
            if np.any(tail.view("<u4")):
                raise layout_error(f"section {sections} holds cells in more than one stream; parse the state of "
                                   "one sequence")
            pieces.append((r.o - rest, r.o))
        sections += 1
    if sections != len(groups):
        raise layout_error(f"it holds {sections} KV sections; the model's layers map to {len(groups)}")
    return pieces


def layer_sections(arch: str, n_layer: int) -> list[list[int]]:
    """Model layer indices held by each KV section, in blob order."""
    pattern = _SWA_PATTERN.get(arch)
    if pattern is None:
        return [list(range(n_layer))]
    full = [i for i in range(n_layer) if (i + 1) % pattern == 0]
    return [full, [i for i in range(n_layer) if (i + 1) % pattern != 0]]


def check_geometry(state: SeqState, arch: str, n_layer: int, n_embd_k: int, n_embd_v: int) -> list[list[int]]:
    """The layer map of ``state`` for deep cells of ``n_layer`` x (n_embd_k, n_embd_v); raises if they do not fit."""
    groups = layer_sections(arch, n_layer)
    got = [s.n_layer for s in state.sections]
    if got != [len(g) for g in groups]:
        raise layout_error(f"its KV sections hold {got} layers; for {arch} with {n_layer} layers edge-safe "
                           f"expects {[len(g) for g in groups]}")
    for si, s in enumerate(state.sections):
        for j in range(s.n_layer):
            for what, t, rows, width in (("K", s.k_types[j], s.k_rows[j], n_embd_k),
                                         ("V", s.v_types[j], s.v_rows[j], n_embd_v)):
                if t not in _FLOAT_TYPES:
                    name = _TYPE_NAMES.get(t, f"ggml type {t}")
                    raise KVCacheTypeError(
                        f"the {what} cache is {name}; deep control tokens are written as F16/F32 rows and cannot "
                        f"go into a quantized KV cache: run with the default KV cache type (f16) or f32, or use a "
                        f"bank of shallow tokens")
                if rows.shape[1] != width * _FLOAT_TYPES[t].itemsize:
                    raise layout_error(
                        f"layer {groups[si][j]} has {what} rows of {rows.shape[1]} bytes, expected {width} "
                        f"{_TYPE_NAMES[t]} values")
                if what == "V" and s.v_trans == 1 and s.v_elem[j] != _FLOAT_TYPES[t].itemsize:
                    raise layout_error(f"layer {groups[si][j]} has V elements of {s.v_elem[j]} bytes")
    return groups


def with_cells(state: SeqState, keys: np.ndarray, values: np.ndarray, groups: Sequence[Sequence[int]],
               pos: int | Sequence[int] = 0, seq_id: int = 0) -> SeqState:
    """A copy of ``state`` with cells appended to every section.

    ``keys`` (n, n_layer, n_embd_k) and ``values`` (n, n_layer, n_embd_v) are in model
    layer order; ``groups`` (from :func:`check_geometry`) maps them to the sections. Each
    new cell gets position ``pos`` (one for all, or one per cell) in sequence ``seq_id``.
    Rows are converted to each layer's cache type (F16 or F32).
    """
    keys, values = _as_cells(keys, values)
    n = keys.shape[0]
    positions = np.broadcast_to(np.asarray(pos, dtype=np.int32), (n,))
    sections = []
    for s, layers in zip(state.sections, groups):
        k_rows, v_rows = [], []
        for j, layer in enumerate(layers):
            k_new = _cast(keys[:, layer], s.k_types[j], "key", layer)
            v_new = _cast(values[:, layer], s.v_types[j], "value", layer)
            if k_new.shape[1] != s.k_rows[j].shape[1] or v_new.shape[1] != s.v_rows[j].shape[1]:
                raise layout_error(f"layer {layer}: deep rows of {k_new.shape[1]}/{v_new.shape[1]} bytes, "
                                   f"cache rows of {s.k_rows[j].shape[1]}/{s.v_rows[j].shape[1]}")
            k_rows.append(np.concatenate([s.k_rows[j], k_new]))
            v_rows.append(np.concatenate([s.v_rows[j], v_new]))
        sections.append(replace(s, pos=np.concatenate([s.pos, positions]), seq_ids=s.seq_ids + [(seq_id,)] * n,
                                k_rows=k_rows, v_rows=v_rows))
    return SeqState(state.header, sections)


def _as_cells(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deep cells' keys and values as float32 (n, n_layer, width); EdgeSafeError if their shapes do not pair."""
    keys = np.asarray(keys, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32)
    if keys.ndim != 3 or values.ndim != 3 or values.shape[0] != keys.shape[0]:
        raise EdgeSafeError(f"deep cells need keys (n, n_layer, width) and values of the same n; got "
                            f"{keys.shape} and {values.shape}")
    return keys, values


def _cast(rows: np.ndarray, ggml_type: int, what: str, layer: int) -> np.ndarray:
    """float32 rows (n, width) as the cache's raw bytes (n, width * itemsize)."""
    if ggml_type not in _FLOAT_TYPES:
        raise KVCacheTypeError(f"the KV cache of layer {layer} is {_TYPE_NAMES.get(ggml_type, ggml_type)}; deep "
                               "control tokens need an f16 or f32 KV cache")
    target = _FLOAT_TYPES[ggml_type]
    if np.abs(rows).max(initial=0.0) > np.finfo(target).max:
        raise EdgeSafeError(f"a deep {what} row of layer {layer} does not fit the {_TYPE_NAMES[ggml_type]} KV cache "
                            "(values beyond its range); run with an f32 KV cache (kv_type='f32')")
    out = np.ascontiguousarray(rows.astype(target))
    return out.view(np.uint8).reshape(len(rows), -1)


def cells(state: SeqState, groups: Sequence[Sequence[int]], index: slice | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of the cells ``index`` as float32 (n, n_layer, width), in model layer order."""
    n_layer = sum(len(g) for g in groups)
    ks, vs = [None] * n_layer, [None] * n_layer
    for s, layers in zip(state.sections, groups):
        for j, layer in enumerate(layers):
            ks[layer] = s.k_rows[j][index].view(_FLOAT_TYPES[s.k_types[j]]).astype(np.float32)
            vs[layer] = s.v_rows[j][index].view(_FLOAT_TYPES[s.v_types[j]]).astype(np.float32)
    return np.stack(ks, axis=1), np.stack(vs, axis=1)


def rope_neox(keys: np.ndarray, pos: int, bases: Sequence[float]) -> np.ndarray:
    """Keys (n, n_layer, n_head_kv * head_dim) stored at position 0 (no rotation, as a deep bank holds
    them), rotated to position ``pos`` the way llama.cpp's NEOX RoPE rotates a key decoded there (its
    K-shift by ``pos`` gives the same rows): per head, the two halves of the head dimension are rotated
    by ``pos * base ** (-2 i / head_dim)``, with each layer's ``base`` (Gemma 3: 10 000 in sliding-window
    layers, 1 000 000 in global ones). ``head_dim`` is 256 for Gemma 3 270M (one KV head)."""
    keys = np.asarray(keys, dtype=np.float32)
    n, n_layer, width = keys.shape
    if len(bases) != n_layer:
        raise EdgeSafeError(f"rope_neox: {len(bases)} bases for {n_layer} layers")
    if pos == 0:
        return keys.copy()
    head_dim = ROPE_HEAD_DIM
    half = head_dim // 2
    x = keys.reshape(n, n_layer, width // head_dim, head_dim).astype(np.float64)
    i = np.arange(half, dtype=np.float64)
    theta = pos * np.power(np.asarray(bases, dtype=np.float64)[:, None], -2.0 * i / head_dim)  # (n_layer, half)
    cos, sin = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]  # every layer at once
    x1, x2 = x[..., :half], x[..., half:]
    out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.reshape(n, n_layer, width).astype(np.float32)


ROPE_HEAD_DIM = 256  # Gemma 3's key_length


def gemma3_rope_bases(n_layer: int, freq_base: float = 1_000_000.0, swa_base: float = 10_000.0,
                      pattern: int = 6) -> list[float]:
    """Gemma 3's RoPE base per layer: every ``pattern``-th layer is global (``freq_base``), the others
    attend through the sliding window with their own base (llama.cpp: 10 000)."""
    return [freq_base if (layer + 1) % pattern == 0 else swa_base for layer in range(n_layer)]
