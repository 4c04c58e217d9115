"""The sequence-state blob parser/writer (edge_safe.kv_cells), on hand-built blobs: no model.

The blob grammar is docs/DESIGN.md's "Writing KV cells"; tests/test_deep_runtime.py checks it on
real llama.cpp blobs (both V layouts, f16 and f32 caches).
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from edge_safe import kv_cells as K

HEADER = struct.pack("<Q", 0xAF135A58)


def section(n_cells: int, n_layer: int, width: int, *, v_trans: int, ggml_type: int = 1, seed: int = 0,
            pos=None, k_type: int | None = None, n_stream: int = 1, stream: int = 0) -> bytes:
    """One section's bytes, written independently of kv_cells (from the grammar): ``n_stream`` streams,
    all empty but ``stream`` (as a context with a KV stream per sequence writes one sequence's state)."""
    rng = np.random.default_rng(seed)
    dtype = {0: np.float32, 1: np.float16}.get(ggml_type, np.uint8)
    el = np.dtype(dtype).itemsize
    out = [struct.pack("<I", n_stream), struct.pack("<I", 0) * stream, struct.pack("<I", n_cells)]
    for i, p in enumerate(range(n_cells) if pos is None else pos):
        out.append(struct.pack("<iIi", p, 1, 0))
    out.append(struct.pack("<II", v_trans, n_layer))
    for _ in range(n_layer):
        kt = ggml_type if k_type is None else k_type
        out.append(struct.pack("<iQ", kt, width * el))
        out.append(rng.standard_normal((n_cells, width)).astype(dtype).tobytes())
    for _ in range(n_layer):
        rows = rng.standard_normal((n_cells, width)).astype(dtype)
        if v_trans:
            out.append(struct.pack("<iII", ggml_type, el, width))
            out.append(np.ascontiguousarray(rows.T).tobytes())
        else:
            out.append(struct.pack("<iQ", ggml_type, width * el))
            out.append(rows.tobytes())
    out.append(struct.pack("<I", 0) * (n_stream - 1 - stream))
    return b"".join(out)


def blob(n_cells=3, v_trans=0, ggml_type=1, layers=(1, 2), width=8, **kw) -> bytes:
    return HEADER + b"".join(section(n_cells, n, width, v_trans=v_trans, ggml_type=ggml_type, seed=i, **kw)
                             for i, n in enumerate(layers))


GROUPS = [[2], [0, 1]]  # "gemma3-like": the first section holds layer 2, the second layers 0 and 1


@pytest.mark.parametrize("v_trans", [0, 1])
@pytest.mark.parametrize("ggml_type", [0, 1])
def test_parse_serialise_is_byte_exact(v_trans, ggml_type):
    b = blob(v_trans=v_trans, ggml_type=ggml_type)
    state = K.parse(b)
    assert K.serialise(state) == b
    assert [s.n_layer for s in state.sections] == [1, 2] and state.sections[1].v_trans == v_trans
    assert state.sections[0].pos.tolist() == [0, 1, 2] and state.sections[0].seq_ids == [(0,), (0,), (0,)]


@pytest.mark.parametrize("v_trans", [0, 1])
def test_a_blob_of_one_stream_among_several_round_trips_and_takes_cells_in_its_stream(v_trans):
    """A context with a KV stream per sequence writes every stream, all empty but the sequence's own."""
    b = HEADER + section(1, 1, 8, v_trans=v_trans, n_stream=4, stream=2) + section(1, 2, 8, v_trans=v_trans, seed=1,
                                                                                   n_stream=4, stream=2)
    state = K.parse(b)
    assert K.serialise(state) == b
    assert [(s.n_stream, s.stream, s.n_cells) for s in state.sections] == [(4, 2, 1)] * 2
    keys, values = np.random.default_rng(0).standard_normal((2, 3, 3, 8)).astype(np.float32)
    new = K.with_cells(state, keys, values, GROUPS, pos=0)
    again = K.parse(K.serialise(new))
    assert [(s.n_stream, s.stream, s.pos.tolist()) for s in again.sections] == [(4, 2, [0, 0, 0, 0])] * 2
    np.testing.assert_allclose(K.cells(again, GROUPS, slice(1, None))[0], keys, atol=2e-3, rtol=2e-3)
    first = K.parse(HEADER + section(1, 1, 8, v_trans=v_trans, n_stream=3, stream=0)
                    + section(1, 2, 8, v_trans=v_trans, n_stream=3, stream=0))
    assert [(s.n_stream, s.stream) for s in first.sections] == [(3, 0)] * 2


@pytest.mark.parametrize("v_trans", [0, 1])
def test_v_rows_are_read_cell_major_in_both_layouts(v_trans):
    """The transposed V layout (flash attention off) is de-transposed: row i is cell i's values."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 8)).astype(np.float16)
    body = struct.pack("<II", 1, 3) + b"".join(struct.pack("<iIi", p, 1, 0) for p in range(3))
    body += struct.pack("<II", v_trans, 1) + struct.pack("<iQ", 1, 16) + np.zeros((3, 8), np.float16).tobytes()
    if v_trans:
        body += struct.pack("<iII", 1, 2, 8) + np.ascontiguousarray(rows.T).tobytes()
    else:
        body += struct.pack("<iQ", 1, 16) + rows.tobytes()
    state = K.parse(HEADER + body)
    _, v = K.cells(state, [[0]], slice(None))
    np.testing.assert_array_equal(v[:, 0], rows.astype(np.float32))


@pytest.mark.parametrize("v_trans", [0, 1])
@pytest.mark.parametrize("ggml_type", [0, 1])
def test_appended_cells_read_back_and_land_at_their_positions(v_trans, ggml_type):
    state = K.parse(blob(n_cells=1, v_trans=v_trans, ggml_type=ggml_type))
    groups = GROUPS
    rng = np.random.default_rng(5)
    keys, values = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    new = K.parse(K.serialise(K.with_cells(state, keys, values, groups, pos=0)))
    assert [s.pos.tolist() for s in new.sections] == [[0, 0, 0, 0, 0]] * 2
    assert all(s.seq_ids == [(0,)] * 5 for s in new.sections)
    k, v = K.cells(new, groups, slice(1, None))
    tol = 0 if ggml_type == 0 else 2e-3
    np.testing.assert_allclose(k, keys, rtol=tol, atol=tol)
    np.testing.assert_allclose(v, values, rtol=tol, atol=tol)
    k0, _ = K.cells(new, groups, slice(0, 1))  # the cell that was there is untouched
    k_old, _ = K.cells(state, groups, slice(0, 1))
    np.testing.assert_array_equal(k0, k_old)
    at = K.with_cells(state, keys, values, groups, pos=[1, 2, 3, 4])
    assert at.sections[0].pos.tolist() == [0, 1, 2, 3, 4]


def test_layer_sections_of_gemma3_put_the_full_attention_layers_first():
    full, swa = K.layer_sections("gemma3", 18)
    assert full == [5, 11, 17] and len(swa) == 15 and 5 not in swa and swa[:5] == [0, 1, 2, 3, 4]
    assert K.layer_sections("llama", 4) == [[0, 1, 2, 3]]


def test_check_geometry_maps_layers_and_refuses_what_does_not_fit():
    state = K.parse(HEADER + section(1, 3, 256, v_trans=0) + section(1, 15, 256, v_trans=1))
    assert K.check_geometry(state, "gemma3", 18, 256, 256) == K.layer_sections("gemma3", 18)
    with pytest.raises(K.KVLayoutError, match=r"its KV sections hold \[3, 15\] layers; for gemma3 with 12 layers "
                                              r"edge-safe expects \[2, 10\]"):
        K.check_geometry(state, "gemma3", 12, 256, 256)
    with pytest.raises(K.KVLayoutError, match="layer 5 has K rows of 512 bytes, expected 128 f16 values"):
        K.check_geometry(state, "gemma3", 18, 128, 256)


@pytest.mark.parametrize("qtype, name", [(8, "q8_0"), (2, "q4_0"), (30, "bf16")])
def test_a_quantized_cache_type_is_refused(qtype, name):
    state = K.parse(HEADER + section(1, 1, 32, v_trans=0, ggml_type=qtype))
    with pytest.raises(K.KVCacheTypeError, match=f"the K cache is {name}; deep control tokens .* cannot go into a "
                                                  "quantized KV cache"):
        K.check_geometry(state, "llama", 1, 32, 32)
    with pytest.raises(K.KVCacheTypeError, match="need an f16 or f32 KV cache"):
        K.with_cells(state, np.zeros((1, 1, 32)), np.zeros((1, 1, 32)), [[0]])


def test_values_beyond_the_f16_range_are_refused_not_written_as_inf():
    state = K.parse(blob(n_cells=1))
    keys = np.zeros((1, 3, 8), np.float32)
    keys[0, 1, 2] = 1e6
    with pytest.raises(K.EdgeSafeError, match="deep key row of layer 1 does not fit the f16 KV cache"):
        K.with_cells(state, keys, np.zeros((1, 3, 8)), GROUPS)


def corruptions():
    good = blob()
    yield "truncated", good[:-5], "runs past its end"
    yield "cut in a field", good[:10], "ends inside a field"
    yield "trailing bytes", good + b"\x01\x00\x00\x00", "ends inside a field"
    one = section(1, 1, 8, v_trans=0)
    yield "cells in two streams", HEADER + struct.pack("<I", 2) + one[4:] + one[4:], "holds cells in streams 0 and 1"
    yield "no stream", HEADER + struct.pack("<I", 0) + one[4:], "has 0 streams"
    yield "every stream empty", HEADER + struct.pack("<III", 2, 0, 0), "is empty"
    yield "v_trans 7", HEADER + section(1, 1, 8, v_trans=7), "v_trans=7"
    yield "header only", HEADER, "holds no KV section"
    yield "huge cell count", HEADER + struct.pack("<II", 1, 10**6) + bytes(100), "claims 1000000 cells"
    yield "empty section", HEADER + struct.pack("<II", 1, 0), "is empty"
    yield "garbage", bytes(range(256)) * 4, "the KV state blob does not have the layout edge-safe expects"


@pytest.mark.parametrize("name, data, message", list(corruptions()), ids=[c[0] for c in corruptions()])
def test_a_corrupted_or_unknown_layout_fails_cleanly(name, data, message):
    with pytest.raises(K.KVLayoutError, match=message) as info:
        K.parse(data)
    assert "deep control tokens cannot be written" in str(info.value)
    assert isinstance(info.value, K.EdgeSafeError)


def test_random_bytes_never_parse_into_garbage():
    rng = np.random.default_rng(0)
    good = blob()
    for _ in range(200):
        data = bytearray(good)
        for i in rng.integers(8, len(data), size=3):
            data[i] = int(rng.integers(0, 256))
        try:
            state = K.parse(bytes(data))
        except K.KVLayoutError:
            continue
        assert K.serialise(state) == bytes(data)  # whatever parses re-serialises to exactly the input


def slow_append(b: bytes, keys, values, groups, pos, seq_id=None) -> bytes:
    state = K.parse(b)
    own = state.sections[0].seq_ids[0][0] if seq_id is None else seq_id
    return K.serialise(K.with_cells(state, keys, values, groups, pos=pos, seq_id=own))


def shared_cells_section(n_layer: int, width: int) -> bytes:
    """A section whose second cell is shared by sequences 3 and 4 (cells of 12 and 16 bytes)."""
    out = [struct.pack("<II", 1, 2), struct.pack("<iIi", 0, 1, 3), struct.pack("<iIii", 1, 2, 3, 4),
           struct.pack("<II", 0, n_layer)]
    for _ in range(2 * n_layer):
        out.append(struct.pack("<iQ", 1, width * 2) + np.ones((2, width), np.float16).tobytes())
    return b"".join(out)


@pytest.mark.parametrize("v_trans", [0, 1])
@pytest.mark.parametrize("ggml_type", [0, 1])
@pytest.mark.parametrize("streams", [(1, 0), (4, 2), (3, 0)], ids=["one-stream", "stream-2-of-4", "stream-0-of-3"])
def test_splicing_cells_in_gives_the_bytes_of_parse_append_serialise(v_trans, ggml_type, streams):
    """The engine writes cells with append_cells (one copy of the blob); it must equal the parsed path."""
    n_stream, stream = streams
    b = HEADER + section(5, 1, 8, v_trans=v_trans, ggml_type=ggml_type, n_stream=n_stream, stream=stream) + \
        section(5, 2, 8, v_trans=v_trans, ggml_type=ggml_type, seed=1, n_stream=n_stream, stream=stream)
    keys, values = np.random.default_rng(1).standard_normal((2, 3, 3, 8)).astype(np.float32)
    for pos in (7, [7, 8, 9]):
        assert K.append_cells(b, keys, values, GROUPS, pos=pos) == slow_append(b, keys, values, GROUPS, pos)
        assert K.append_cells(memoryview(b), keys, values, GROUPS, pos=pos, seq_id=6) == \
            slow_append(b, keys, values, GROUPS, pos, seq_id=6)
    got = K.parse(K.append_cells(b, keys, values, GROUPS, pos=7))
    assert [s.pos.tolist()[-3:] for s in got.sections] == [[7, 7, 7]] * 2


@pytest.mark.parametrize("v_trans", [0, 1])
@pytest.mark.parametrize("ggml_type", [0, 1])
def test_splicing_in_place_writes_the_same_bytes_over_the_buffer_or_refuses_a_short_one(v_trans, ggml_type):
    b = HEADER + section(6, 1, 8, v_trans=v_trans, ggml_type=ggml_type, n_stream=3, stream=1) + \
        section(6, 2, 8, v_trans=v_trans, ggml_type=ggml_type, seed=1, n_stream=3, stream=1)
    keys, values = np.random.default_rng(4).standard_normal((2, 4, 3, 8)).astype(np.float32)
    want = K.append_cells(b, keys, values, GROUPS, pos=9)
    spare = K.added_bytes(4, 2, 3, 8, 8)
    assert len(b) + spare >= len(want)
    buf = np.full(len(b) + spare, 0xEE, dtype=np.uint8)
    buf[:len(b)] = np.frombuffer(b, dtype=np.uint8)
    n = K.append_cells_in_place(buf, len(b), keys, values, GROUPS, pos=9)
    assert n == len(want) and bytes(buf[:n]) == want
    short = np.frombuffer(b + bytes(len(want) - len(b) - 1), dtype=np.uint8).copy()
    before = short.copy()
    with pytest.raises(K.EdgeSafeError, match="needs"):
        K.append_cells_in_place(short, len(b), keys, values, GROUPS, pos=9)
    np.testing.assert_array_equal(short, before)  # nothing written
    with pytest.raises(K.EdgeSafeError, match="writable"):
        K.append_cells_in_place(np.frombuffer(b, dtype=np.uint8), len(b), keys, values, GROUPS)


def test_splicing_walks_cells_shared_by_several_sequences_and_keeps_the_first_cells_sequence():
    b = HEADER + shared_cells_section(1, 8) + shared_cells_section(2, 8)
    keys, values = np.random.default_rng(2).standard_normal((2, 1, 3, 8)).astype(np.float32)
    out = K.append_cells(b, keys, values, GROUPS, pos=2)
    assert out == slow_append(b, keys, values, GROUPS, 2)
    assert K.parse(out).sections[0].seq_ids == [(3,), (3, 4), (3,)]


@pytest.mark.parametrize("name, data, message", list(corruptions()), ids=[c[0] for c in corruptions()])
def test_splicing_into_a_corrupted_blob_fails_cleanly(name, data, message):
    keys = np.zeros((1, 3, 8), np.float32)
    with pytest.raises(K.KVLayoutError, match="deep control tokens cannot be written"):
        K.append_cells(data, keys, keys, GROUPS, pos=0)


def test_splicing_refuses_what_with_cells_refuses():
    b = blob(n_cells=2)
    with pytest.raises(K.KVCacheTypeError, match="need an f16 or f32 KV cache"):
        K.append_cells(blob(n_cells=1, ggml_type=8, width=32), np.zeros((1, 3, 32)), np.zeros((1, 3, 32)), GROUPS)
    big = np.zeros((1, 3, 8), np.float32)
    big[0, 1, 2] = 1e6
    with pytest.raises(K.EdgeSafeError, match="deep key row of layer 1 does not fit the f16 KV cache"):
        K.append_cells(b, big, np.zeros((1, 3, 8)), GROUPS)
    with pytest.raises(K.KVLayoutError, match="deep key rows of 32 bytes, cache rows of 16"):
        K.append_cells(b, np.zeros((1, 3, 16)), np.zeros((1, 3, 16)), GROUPS)
    with pytest.raises(K.EdgeSafeError, match="deep cells of 2 layers for a cache of 3"):
        K.append_cells(b, np.zeros((1, 2, 8)), np.zeros((1, 2, 8)), GROUPS)


def test_splicing_random_bytes_either_fails_cleanly_or_matches_the_parsed_path():
    rng = np.random.default_rng(3)
    good = blob()
    keys, values = rng.standard_normal((2, 1, 3, 8)).astype(np.float32)
    for _ in range(300):
        data = bytearray(good)
        for i in rng.integers(8, len(data), size=3):
            data[i] = int(rng.integers(0, 256))
        data = bytes(data)
        try:
            out = K.append_cells(data, keys, values, GROUPS, pos=4)
        except K.EdgeSafeError:
            with pytest.raises(K.EdgeSafeError):
                slow_append(data, keys, values, GROUPS, 4)
            continue
        assert out == slow_append(data, keys, values, GROUPS, 4)
