"""Deep tokens in the bank format: per-layer key/value rows next to shallow vectors (hermetic, no model)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType

from edge_safe.cli import cli
from edge_safe.convert import bank_io, interchange
from edge_safe.convert.bank import BankToken, TokenBank
from edge_safe.convert.errors import BankFormatError, BankMismatchError, EdgeSafeError
from edge_safe.convert.keys import FORMAT_VERSION, FORMAT_VERSION_DEEP, Keys
from edge_safe.convert.model import ModelInfo

N_LAYER, K, V = 3, 4, 6  # tiny geometry; K and V widths differ so a swap is caught


def deep_token(name: str, n: int = 2, seed: int = 0, kind: str = "constraint", geometry=(N_LAYER, K, V)) -> BankToken:
    rng = np.random.default_rng(seed)
    n_layer, k, v = geometry
    return BankToken.deep(name, kind, rng.standard_normal((n, n_layer, k)), rng.standard_normal((n, n_layer, v)),
                          description=f"deep {name}", refusal=f"Sorry, I can't help with {name}.")


@pytest.fixture
def mixed(random_bank) -> TokenBank:
    """alcohol, gambling (shallow), rejective (shallow mode), deep1 and deep2 (deep constraints)."""
    bank = random_bank(constraints=("alcohol", "gambling"), profiles={"minors": ["alcohol", "gambling"]})
    bank = bank.with_token(deep_token("deep1", 2, seed=1)).with_token(deep_token("deep2", 3, seed=2))
    return replace(bank, profiles={"minors": ["alcohol", "gambling"], "deepset": ["deep1", "deep2"]})


def raw_field(path: Path, key: str):
    return bank_io._load(path)[0].kv.get(key)


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_mixed_bank_round_trips(tmp_path, mixed, dtype):
    path = mixed.save(tmp_path / "b.gguf", dtype=dtype)
    back = TokenBank.load(path)
    assert list(back.tokens) == list(mixed.tokens)
    assert [t.depth for t in back.tokens.values()] == ["shallow", "shallow", "shallow", "deep", "deep"]
    assert back.deep_geometry == (N_LAYER, K, V) and back.profiles == mixed.profiles
    tol = {"F32": 0, "F16": 2e-3}[dtype]
    for n, t in mixed.tokens.items():
        u = back.tokens[n]
        assert u.n_vectors == t.n_vectors
        if t.is_deep:
            np.testing.assert_allclose(u.keys, t.keys, rtol=tol, atol=tol)
            np.testing.assert_allclose(u.values, t.values, rtol=tol, atol=tol)
            assert u.vectors.size == 0
        else:
            np.testing.assert_allclose(u.vectors, t.vectors, rtol=tol, atol=tol)
            assert u.keys is None
    assert raw_field(path, Keys.Bank.FORMAT_VERSION) == FORMAT_VERSION_DEEP
    assert raw_field(path, Keys.Deep.N_LAYER) == N_LAYER and raw_field(path, Keys.Deep.N_EMBD_V) == V
    tensors = set(bank_io._load(path)[0].tensors)
    assert {"bank.deep1.k", "bank.deep1.v", "bank.alcohol"} <= tensors and "bank.deep1" not in tensors


def test_a_shallow_bank_is_still_written_as_version_1_without_deep_keys(tmp_path, random_bank):
    path = random_bank().save(tmp_path / "b.gguf")
    assert raw_field(path, Keys.Bank.FORMAT_VERSION) == FORMAT_VERSION == 1
    assert raw_field(path, Keys.Tokens.DEPTHS) is None and raw_field(path, Keys.Deep.N_LAYER) is None


def test_prefix_vectors_and_deep_cells_split_a_composition(mixed):
    names = ["rejective", "alcohol", "deep1", "deep2"]
    assert mixed.depths(names) == ["shallow", "shallow", "deep", "deep"]
    assert mixed.prefix_vectors(names).shape == (4, 8)  # 2 + 2 shallow vectors, deep entries skipped
    keys, values = mixed.deep_cells(names)
    assert keys.shape == (5, N_LAYER, K) and values.shape == (5, N_LAYER, V)
    np.testing.assert_array_equal(keys[2:], mixed.tokens["deep2"].keys)
    k0, v0 = mixed.deep_cells(["alcohol"])
    assert k0.shape == (0, N_LAYER, K) and v0.shape == (0, N_LAYER, V)


def test_deep_tokens_of_different_geometry_are_refused(random_bank):
    bank = random_bank().with_token(deep_token("deep1"))
    with pytest.raises(BankFormatError, match=r"deep token 'deep2' has 2 layers x \(K 4, V 6\) but other deep tokens "
                                              r"have 3 x \(K 4, V 6\)"):
        bank.with_token(deep_token("deep2", geometry=(2, K, V)))


@pytest.mark.parametrize("bad, message", [
    (lambda t: replace(t, values=None), "needs both keys and values; got only keys"),
    (lambda t: replace(t, values=t.values[:1]), r"keys of shape \[2, 3, 4\] and values of shape \[1, 3, 6\]"),
    (lambda t: replace(t, keys=t.keys[0]), r"keys of shape \[3, 4\]"),
    (lambda t: replace(t, vectors=np.ones((1, 8))), "both input vectors and key/value rows"),
])
def test_malformed_deep_tokens_are_refused(random_bank, bad, message):
    with pytest.raises(BankFormatError, match=message):
        random_bank().with_token(bad(deep_token("deep1")))


def test_nan_in_deep_rows_is_refused(random_bank):
    tok = deep_token("deep1")
    tok.values[1, 2, 3] = np.nan
    with pytest.raises(BankFormatError, match=r"'deep1' has 1 NaN/Inf values \(first at value position 1, layer 2, "
                                              r"column 3\)"):
        random_bank().with_token(tok)


def test_unknown_depth_and_missing_tensor_and_unknown_placement_in_a_file(tmp_path, mixed):
    from tests.test_bank import write_raw

    depths = json.dumps(["shallow", "shallow", "shallow", "deep", "sideways"])
    path = write_raw(tmp_path / "a.gguf", mixed, override={Keys.Tokens.DEPTHS: (depths, GGUFValueType.STRING, None)})
    with pytest.raises(BankFormatError, match="edge_safe.tokens.depths holds 'sideways'"):
        TokenBank.load(path)
    depths = json.dumps(["shallow", "shallow", "deep", "deep", "deep"])  # rejective claims to be deep
    path = write_raw(tmp_path / "b.gguf", mixed, override={Keys.Tokens.DEPTHS: (depths, GGUFValueType.STRING, None)})
    with pytest.raises(BankFormatError, match="tensor 'bank.rejective' has no entry"):
        TokenBank.load(path)
    path = write_raw(tmp_path / "c.gguf", mixed, override={Keys.Deep.POSITIONS: ("end/v9", GGUFValueType.STRING, None)})
    with pytest.raises(BankFormatError, match="places deep cells by scheme 'end/v9', which this edge-safe does not know"):
        TokenBank.load(path)
    path = write_raw(tmp_path / "d.gguf", mixed, override={Keys.Deep.N_EMBD_K: (5, GGUFValueType.UINT32, None)})
    with pytest.raises(BankFormatError, match=r"tensor 'bank.deep1.k' has shape \[2, 3, 4\] but the metadata says "
                                              r"\[n_positions 2, n_layer 3, width 5\]"):
        TokenBank.load(path)


def model_info(tmp_path, make_model, **geometry) -> ModelInfo:
    info = ModelInfo.read(make_model(tmp_path, n_embd=8))
    return replace(info, **{"n_layer": N_LAYER, "n_embd_k_gqa": K, "n_embd_v_gqa": V, **geometry})


@pytest.mark.parametrize("geometry, what", [
    ({"n_layer": 18}, r"layer count \(deep tokens hold one key/value row per layer\) expected 3 .*got 18"),
    ({"n_embd_k_gqa": 256}, r"key row width n_embd_k_gqa \(head_count_kv x key_length\) expected 4 .*got 256"),
    ({"n_embd_v_gqa": 128}, r"value row width n_embd_v_gqa .* expected 6 .*got 128"),
])
def test_a_deep_bank_refuses_a_model_of_other_layers_or_head_sizes(tmp_path, make_model, mixed, geometry, what):
    info = model_info(tmp_path, make_model, **geometry)
    bank = replace(mixed, base_fingerprint=info.fingerprint)
    with pytest.raises(BankMismatchError, match="the bank does not fit the model .*: " + what):
        bank.check_model(info)


def test_a_deep_bank_fits_its_model_and_a_shallow_bank_ignores_the_geometry(tmp_path, make_model, mixed, random_bank):
    info = model_info(tmp_path, make_model)
    replace(mixed, base_fingerprint=info.fingerprint).check_model(info)
    random_bank(base_fingerprint=info.fingerprint).check_model(replace(info, n_layer=99))


def test_model_info_reads_the_kv_geometry_of_the_real_model(model_path):
    info = ModelInfo.read(model_path)
    assert (info.n_layer, info.n_embd_k_gqa, info.n_embd_v_gqa) == (18, 256, 256)


def test_merge_rename_remove_keep_deep_tokens(mixed, random_bank):
    other = random_bank(constraints=("drugs",), modes=(), profiles={}).with_token(deep_token("deep3", seed=3))
    merged = mixed.merge(other)
    assert list(merged.tokens) == ["alcohol", "gambling", "rejective", "deep1", "deep2", "drugs", "deep3"]
    np.testing.assert_array_equal(merged.tokens["deep3"].values, other.tokens["deep3"].values)
    assert mixed.merge(mixed).tokens.keys() == mixed.tokens.keys()  # identical deep entries are no clash
    clash = random_bank(modes=(), profiles={}).with_token(deep_token("deep1", seed=9))
    with pytest.raises(EdgeSafeError, match="both banks define token 'deep1' differently"):
        mixed.merge(clash)
    renamed = mixed.rename_token("deep1", "deep-one")
    assert renamed.tokens["deep-one"].is_deep and renamed.profiles["deepset"] == ["deep-one", "deep2"]
    removed = mixed.remove_token("deep2", drop_from_profiles=True)
    assert "deep2" not in removed.tokens and removed.deep_geometry == (N_LAYER, K, V)
    assert removed.remove_token("deep1", drop_from_profiles=True).deep_geometry is None


def test_merge_refuses_deep_tokens_of_another_geometry(mixed, random_bank):
    other = random_bank(constraints=("drugs",), modes=(), profiles={}).with_token(
        deep_token("deep3", geometry=(N_LAYER, 5, V)))
    with pytest.raises(BankMismatchError, match=r"different deep-token geometry .*\(3, 4, 6\).*\(3, 5, 6\)"):
        mixed.merge(other)


def test_npz_and_torch_round_trips_keep_deep_tokens(tmp_path, mixed):
    back = interchange.import_npz(interchange.export_npz(mixed, tmp_path / "b.npz"))
    with np.load(tmp_path / "b.npz") as npz:
        assert npz["deep2.k"].shape == (3, N_LAYER, K) and npz["deep2.v"].shape == (3, N_LAYER, V)
        assert "deep2" not in npz.files and npz["alcohol"].shape == (2, 8)
    for b in (back, interchange.import_torch(interchange.export_torch(mixed, tmp_path / "b.pt"))):
        assert [t.depth for t in b.tokens.values()] == [t.depth for t in mixed.tokens.values()]
        np.testing.assert_array_equal(b.tokens["deep1"].keys, mixed.tokens["deep1"].keys)
        np.testing.assert_array_equal(b.tokens["alcohol"].vectors, mixed.tokens["alcohol"].vectors)


def test_a_bare_npz_with_a_half_deep_token_is_refused(tmp_path, make_model):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bare.npz", **{"deep1.k": rng.standard_normal((2, 3, 4))})
    info = ModelInfo.read(make_model(tmp_path, n_embd=8))
    with pytest.raises(BankFormatError, match=r"deep token 'deep1' has keys but no values \(deep1.k and deep1.v go together\)"):
        interchange.import_npz(tmp_path / "bare.npz", info=info)
    np.savez(tmp_path / "bare2.npz", **{"deep1.k": rng.standard_normal((2, 3, 4)), "deep1.v": rng.standard_normal((2, 3, 4))})
    bank = interchange.import_npz(tmp_path / "bare2.npz", info=info)
    assert bank.tokens["deep1"].is_deep and bank.origin == "imported"


def test_cli_inspect_validate_and_edit_a_deep_bank(tmp_path, mixed):
    path = mixed.save(tmp_path / "b.gguf")
    run = lambda *a: CliRunner().invoke(cli, ["convert", *map(str, a)])  # noqa: E731
    res = run("inspect", path)
    assert res.exit_code == 0, res.output
    assert "format       v2;" in res.stdout and "5 deep cells of 3 layers x (K 4, V 6)" in res.stdout
    row = next(line for line in res.stdout.splitlines() if line.startswith("deep2"))
    assert row.split()[:4] == ["deep2", "constraint", "deep", "3"]
    js = json.loads(run("inspect", path, "--json").stdout)
    assert js["deep"] == {"n_layer": 3, "n_embd_k_gqa": 4, "n_embd_v_gqa": 6}
    assert [t["depth"] for t in js["tokens"]][-2:] == ["deep", "deep"]
    assert run("validate", path).exit_code == 0
    assert run("rename", path, "deep1", "deep-one").exit_code == 0
    assert TokenBank.load(path).tokens["deep-one"].is_deep
    assert run("remove", path, "deep2", "--drop-from-profiles").exit_code == 0
    assert run("export-npz", path, "-o", tmp_path / "b.npz").exit_code == 0
    assert run("import-npz", tmp_path / "b.npz", "-o", tmp_path / "c.gguf", "--dtype", "F16").exit_code == 0
    c = TokenBank.load(tmp_path / "c.gguf")
    assert list(c.tokens) == ["alcohol", "gambling", "rejective", "deep-one"] and c.tokens["deep-one"].is_deep
    assert run("merge", path, tmp_path / "c.gguf", "-o", tmp_path / "m.gguf").exit_code == 1  # F16 copy differs
    assert run("merge", path, tmp_path / "c.gguf", "-o", tmp_path / "m.gguf", "--on-clash", "ours").exit_code == 0
    assert TokenBank.load(tmp_path / "m.gguf").deep_geometry == (N_LAYER, K, V)


def test_the_eval_hash_of_what_the_runtime_injects_covers_deep_rows(mixed):
    from edge_safe.eval.evaluate import vectors_sha256

    tok = mixed.tokens["deep1"]
    changed = replace(mixed, tokens={**mixed.tokens, "deep1": replace(tok, values=tok.values + 1)})
    assert vectors_sha256(changed) != vectors_sha256(mixed)


def test_the_copies_rule_round_trips_and_is_checked(tmp_path, mixed):
    """deep_copies (cells written more than once past a long context) survives GGUF, npz and merge; absent it
    reads as once everywhere, and a malformed rule is refused with the form it must have."""
    assert mixed.deep_copies == () and mixed.copies_at(5000) == 1 and mixed.max_copies == 1
    bank = mixed.with_deep_copies([[512, 2], [2048, 3]])
    assert [bank.copies_at(p) for p in (0, 511, 512, 2047, 2048, 9000)] == [1, 1, 2, 2, 3, 3]
    assert bank.max_copies == 3
    path = bank.save(tmp_path / "b.gguf")
    assert json.loads(raw_field(path, Keys.Deep.COPIES)) == [[512, 2], [2048, 3]]
    assert TokenBank.load(path).deep_copies == ((512, 2), (2048, 3))
    assert raw_field(mixed.save(tmp_path / "plain.gguf"), Keys.Deep.COPIES) is None  # optional key
    back = interchange.import_npz(interchange.export_npz(bank, tmp_path / "b.npz"))
    assert back.deep_copies == ((512, 2), (2048, 3))
    with pytest.raises(BankMismatchError, match="deep-cell copies"):
        bank.merge(mixed.remove_token("alcohol", drop_from_profiles=True))
    for rule in ([[0, 2]], [[512, 1]], [[512, 2], [256, 3]], [[512, 99]], [512, 2], [["512", 2]]):
        with pytest.raises(BankFormatError, match=r"deep copies must be \[\[position >= 1, copies 2\.\.8\]"):
            mixed.with_deep_copies(rule)
