"""TokenBank: GGUF round trips, validation errors, name resolution, editing, merging."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_safe.convert import bank_io
from edge_safe.convert.bank import BankToken, TokenBank, from_text_bank
from edge_safe.convert.errors import (
    BankFormatError,
    BankMismatchError,
    EdgeSafeError,
    FileExistsNoForceError,
    UnknownTokenError,
)
from edge_safe.convert.keys import FORMAT_VERSION, Keys
from edge_safe.convert.layout import ChatTemplate
from edge_safe.convert.model import ModelInfo

STR, ARR, U32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32


def write_raw(path: Path, bank: TokenBank, *, override=None, drop=(), tensors=None, dtype="F32") -> Path:
    """Write ``bank`` without validation, with keys overridden/dropped and extra tensors: crafted bad files."""
    w = bank_io._build_writer(bank, dtype)
    for key in drop:
        w.kv_data[0].pop(key)
    for key, (value, vtype, sub) in (override or {}).items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in (tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_same(a: TokenBank, b: TokenBank) -> None:
    for f in ("arch", "n_embd", "base_fingerprint", "base_name", "profiles", "layout", "template", "name",
              "description", "origin", "training_config", "eval_summary"):  # fmt: skip
        assert getattr(a, f) == getattr(b, f), f
    assert list(a.tokens) == list(b.tokens)
    for n, t in a.tokens.items():
        u = b.tokens[n]
        assert (t.name, t.kind, t.description, t.refusal, t.rule, t.origin) == (
            u.name, u.kind, u.description, u.refusal, u.rule, u.origin)  # fmt: skip
        assert u.vectors.dtype == np.float32
        np.testing.assert_array_equal(t.vectors, u.vectors)


# --- round trips ----------------------------------------------------------------


def test_f32_round_trip_is_bit_exact(tmp_path, random_bank):
    bank = random_bank(
        n_vectors=[1, 3, 2, 4],
        description="a tiny bank",
        training_config={"lr": 0.01, "orders": [1, 2, 3], "nested": {"lambda": 1.0}},
        eval_summary={"defense_rate": 0.998, "over_refusal": 0.03},
        template=ChatTemplate(name="custom/v1", user="Q: {content}\n", stop=("\nQ:",)),
    )
    bank.tokens["drugs"] = replace(bank.tokens["drugs"], description="", refusal="", rule="Ünïcode ✋ «rule»")
    bank.tokens["rejective"] = replace(bank.tokens["rejective"], origin="from-text")
    bank.save(tmp_path / "b.gguf")
    assert_same(bank, TokenBank.load(tmp_path / "b.gguf"))


names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.dictionaries(names, st.tuples(st.integers(1, 4), texts, texts, texts), min_size=1, max_size=5),
    description=texts,
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path, entries, description, seed):
    rng = np.random.default_rng(seed)
    tokens = {
        n: BankToken(n, "constraint", rng.standard_normal((k, 4)).astype(np.float32) * 1e3, d, r, u)
        for n, (k, d, r, u) in entries.items()
    }
    profiles = {"profile-of-all": list(tokens)}  # longer than any generated token name
    bank = TokenBank("gemma3", 4, "ab" * 32, "base", tokens, profiles, description=description)
    path = bank.save(tmp_path / "prop.gguf", force=True)
    assert_same(bank, TokenBank.load(path))


def test_f16_round_trip_within_tolerance_and_half_size(tmp_path, random_bank):
    bank = random_bank(n_embd=64, n_vectors=8)
    bank.save(tmp_path / "f32.gguf")
    bank.save(tmp_path / "f16.gguf", dtype="f16")
    back = TokenBank.load(tmp_path / "f16.gguf")
    for n, t in bank.tokens.items():
        assert back.tokens[n].vectors.dtype == np.float32
        np.testing.assert_allclose(back.tokens[n].vectors, t.vectors, rtol=1e-3, atol=1e-3)
    assert os.path.getsize(tmp_path / "f16.gguf") < os.path.getsize(tmp_path / "f32.gguf")
    assert bank_io.stored_dtype(tmp_path / "f16.gguf") == "F16"


def test_gguf_layout_as_seen_by_gguf_py(tmp_path, random_bank):
    bank = random_bank(n_embd=8, n_vectors=[1, 2, 3, 1])
    r = gguf.GGUFReader(bank.save(tmp_path / "b.gguf"))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field(Keys.General.ARCHITECTURE) == "gemma3"
    assert field(Keys.General.TYPE) == "adapter"
    assert field(Keys.Adapter.TYPE) == "token_bank"
    assert field(Keys.Bank.FORMAT_VERSION) == FORMAT_VERSION
    assert field(Keys.Tokens.NAMES) == ["alcohol", "gambling", "drugs", "rejective"]
    assert field(Keys.Tokens.N_VECTORS) == [1, 2, 3, 1]
    assert json.loads(field(Keys.Tokens.REFUSALS))[3] == "Sorry, I can't help with that."
    assert Keys.General.DESCRIPTION not in r.fields  # empty optional string: omitted, reads back as ""
    drugs = next(t for t in r.tensors if t.name == "bank.drugs")
    assert list(drugs.shape) == [8, 3]  # ggml order
    assert drugs.data.shape == (3, 8)  # numpy order
    np.testing.assert_array_equal(drugs.data, bank.tokens["drugs"].vectors)


def test_save_refuses_to_overwrite_without_force(tmp_path, random_bank):
    path = random_bank().save(tmp_path / "b.gguf")
    before = path.read_bytes()
    with pytest.raises(FileExistsNoForceError, match=r"b\.gguf already exists; pass --force"):
        random_bank(seed=1).save(path)
    assert path.read_bytes() == before
    random_bank(seed=1).save(path, force=True)
    assert path.read_bytes() != before


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, random_bank, monkeypatch):
    path = random_bank().save(tmp_path / "b.gguf")
    before = path.read_bytes()

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(EdgeSafeError, match="No space left on device; nothing was written"):
        random_bank(seed=1).save(path, force=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf"]


def test_invalid_bank_is_not_written(tmp_path, random_bank):
    bank = random_bank()
    bank.tokens["alcohol"].vectors[0, 0] = np.nan
    with pytest.raises(BankFormatError, match="NaN/Inf"):
        bank.save(tmp_path / "b.gguf")
    assert list(tmp_path.iterdir()) == []


def test_save_creates_parent_dirs_and_readable_file(tmp_path, random_bank):
    path = random_bank().save(tmp_path / "a" / "b" / "bank.gguf")
    assert path.is_file() and os.stat(path).st_mode & 0o044  # not mkstemp's 0600


def test_writer_refuses_values_gguf_would_drop():
    w = gguf.GGUFWriter(None, "gemma3")
    with pytest.raises(BankFormatError, match="refusing to write an empty value for k"):
        bank_io._put(w, "k", "", STR)
    with pytest.raises(BankFormatError, match="empty value"):
        bank_io._put(w, "k", [], ARR, STR)
    with pytest.raises(BankFormatError, match="empty value"):
        bank_io._put(w, "k", ["a", ""], ARR, STR)


def test_f16_overflow_is_refused(tmp_path, random_bank):
    bank = random_bank()
    bank.tokens["alcohol"].vectors[0, 0] = 1e6
    with pytest.raises(EdgeSafeError, match="beyond float16's range"):
        bank.save(tmp_path / "b.gguf", dtype="F16")


# --- errors when loading --------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(BankFormatError, match=r"^token bank not found: .*nope\.gguf \(check the path of the bank \.gguf\)$"):
        TokenBank.load(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"hello world", b"PK\x03\x04zip"])
def test_not_a_gguf(tmp_path, content):
    (tmp_path / "x.gguf").write_bytes(content)
    with pytest.raises(BankFormatError, match=r"is not a GGUF file \(it starts with .*expected b'GGUF'\)"):
        TokenBank.load(tmp_path / "x.gguf")


def test_truncated_gguf(tmp_path, random_bank):
    data = random_bank().save(tmp_path / "b.gguf").read_bytes()
    for cut in (10, 200, len(data) - 8):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        with pytest.raises(BankFormatError, match="is a damaged GGUF file"):
            TokenBank.load(tmp_path / "t.gguf")


def test_a_model_is_not_a_bank(tmp_path, make_model):
    path = make_model(tmp_path)
    with pytest.raises(
        BankFormatError,
        match=r"is a GGUF model \(gemma3, 2 tensors\), not an edge-safe token bank; pass it as --model "
        r"and a token bank written by `edge-safe train` or `edge-safe convert` as --bank$",
    ):
        TokenBank.load(path)


def test_a_lora_is_not_a_bank(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "lora.gguf", "llama")
    w.add_type("adapter")
    w.add_string(Keys.Adapter.TYPE, "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(
        BankFormatError,
        match=r"is a LoRA adapter \(llama\), not an edge-safe token bank; LoRAs go to llama.cpp's --lora; pass a token",
    ):
        TokenBank.load(tmp_path / "lora.gguf")


def test_newer_format_version(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Bank.FORMAT_VERSION: (3, U32, None)})
    with pytest.raises(
        BankFormatError,
        match="uses token-bank format version 3, but this edge-safe reads versions up to 2; upgrade",
    ):
        TokenBank.load(path)


def test_missing_key(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), drop=[Keys.Bank.BASE_FINGERPRINT])
    with pytest.raises(BankFormatError, match=f"required key {Keys.Bank.BASE_FINGERPRINT} is missing"):
        TokenBank.load(path)


def test_tensor_shape_disagrees_with_metadata(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Tokens.N_VECTORS: ([2, 3, 2, 2], ARR, U32)})
    with pytest.raises(
        BankFormatError,
        match=r"tensor 'bank.gambling' has shape \[2, 8\] but the metadata says \[n_vectors 3, n_embd 8\]",
    ):
        TokenBank.load(path)


def test_n_embd_disagrees_with_tensors(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Bank.N_EMBD: (16, U32, None)})
    with pytest.raises(BankFormatError, match=r"has shape \[2, 8\] but the metadata says \[n_vectors 2, n_embd 16\]"):
        TokenBank.load(path)


def test_nan_and_inf_in_file(tmp_path, random_bank):
    bank = random_bank()
    bank.tokens["gambling"].vectors[1, 5] = np.inf
    path = write_raw(tmp_path / "b.gguf", bank)
    with pytest.raises(BankFormatError, match=r"token 'gambling' has 1 NaN/Inf values \(first at vector 1, column 5\)"):
        TokenBank.load(path)


def test_duplicate_names_in_file(tmp_path, random_bank):
    names = ["alcohol", "alcohol", "drugs", "rejective"]
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Tokens.NAMES: (names, ARR, STR)})
    with pytest.raises(BankFormatError, match="duplicate token name 'alcohol'"):
        TokenBank.load(path)


def test_profile_naming_unknown_token_in_file(tmp_path, random_bank):
    profiles = json.dumps({"minors": ["alcohol", "alcohl"]})
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Bank.PROFILES: (profiles, STR, None)})
    with pytest.raises(BankFormatError, match=r"profile 'minors' names unknown token 'alcohl'; did you mean 'alcohol'\?"):
        TokenBank.load(path)


def test_unknown_layout_in_file(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Bank.LAYOUT: ("future/v9", STR, None)})
    with pytest.raises(BankFormatError, match="prompt layout 'future/v9', which this edge-safe does not know"):
        TokenBank.load(path)


def test_extra_tensor(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), tensors={"bank.stray": np.zeros((1, 8), np.float32)})
    with pytest.raises(BankFormatError, match=f"tensor 'bank.stray' has no entry in {Keys.Tokens.NAMES}"):
        TokenBank.load(path)


def test_tensor_of_another_type(tmp_path, random_bank, monkeypatch):
    encode = bank_io._encode
    monkeypatch.setattr(bank_io, "_encode", lambda n, v, d: v.astype(np.float64) if n == "drugs" else encode(n, v, d))
    path = write_raw(tmp_path / "b.gguf", random_bank())
    with pytest.raises(BankFormatError, match="tensor 'bank.drugs' is F64; a bank stores F32 or F16"):
        TokenBank.load(path)


def test_parallel_arrays_must_match(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Tokens.RULES: ('["a"]', STR, None)})
    with pytest.raises(BankFormatError, match=f"key {Keys.Tokens.RULES} has 1 entries but {Keys.Tokens.NAMES} has 4"):
        TokenBank.load(path)


def test_bad_json_metadata(tmp_path, random_bank):
    path = write_raw(tmp_path / "b.gguf", random_bank(), override={Keys.Bank.EVAL_SUMMARY: ("{oops", STR, None)})
    with pytest.raises(BankFormatError, match=f"key {Keys.Bank.EVAL_SUMMARY} is not valid JSON"):
        TokenBank.load(path)


# --- in-memory validation ------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: setattr(b, "n_embd", 0), "n_embd must be a positive integer; got 0"),
        (lambda b: setattr(b, "base_fingerprint", "abc"), "base_fingerprint must be 64 lowercase hex digits"),
        (lambda b: setattr(b, "arch", ""), "arch must be a non-empty string"),
        (lambda b: setattr(b, "origin", "magic"), "origin must be one of trained, from-text, imported; got 'magic'"),
        (lambda b: setattr(b, "tokens", {}), "the bank has no tokens"),
        (lambda b: b.tokens.update(Bad=replace(b.tokens["drugs"], name="Bad")), "token name 'Bad' is not a valid name"),
        (lambda b: b.tokens.update(x=b.tokens["drugs"]), "tokens\\['x'\\] holds a token named 'drugs'"),
        (lambda b: b.tokens.update(drugs=replace(b.tokens["drugs"], kind="rule")), "token 'drugs' has kind 'rule'"),
        (lambda b: b.tokens.update(drugs=replace(b.tokens["drugs"], vectors=np.zeros((2, 4)))),
         r"token 'drugs' has vectors of shape \[2, 4\], expected \[n_vectors >= 1, n_embd 8\]"),
        (lambda b: b.tokens.update(drugs=replace(b.tokens["drugs"], vectors=np.zeros((0, 8)))), "shape \\[0, 8\\]"),
        (lambda b: b.profiles.update(drugs=["alcohol"]), "profile 'drugs' has the same name as a token"),
        (lambda b: b.profiles.update(empty=[]), "profile 'empty' must list at least one token"),
        (lambda b: b.profiles.update(p=["drugs", "drugs"]), "profile 'p' names token 'drugs' twice"),
        (lambda b: b.profiles.update(p=["rejective"]), "profile 'p' names mode 'rejective'; profiles hold constraints only"),
        (lambda b: setattr(b, "eval_summary", {"x": float("nan")}), "eval_summary is not plain JSON"),
        (lambda b: setattr(b, "training_config", {"x": object()}), "training_config is not plain JSON"),
    ],
)
def test_validate_errors(random_bank, edit, message):
    bank = random_bank()
    edit(bank)
    with pytest.raises(BankFormatError, match=message):
        bank.validate()


# --- names -----------------------------------------------------------------------


def test_resolve(random_bank):
    bank = random_bank(profiles={"minors": ["gambling", "alcohol"], "strict": ["drugs"]})
    assert bank.constraints == ["alcohol", "gambling", "drugs"] and bank.modes == ["rejective"]
    assert bank.resolve(None) == bank.resolve("") == bank.resolve([]) == bank.resolve(" , ") == []
    assert bank.resolve("drugs, minors") == ["alcohol", "gambling", "drugs"]  # bank order
    assert bank.resolve(["minors", "alcohol,strict"]) == ["alcohol", "gambling", "drugs"]
    assert bank.resolve(("gambling",)) == ["gambling"]


def test_resolve_errors(random_bank):
    bank = random_bank()
    with pytest.raises(UnknownTokenError) as e:
        bank.resolve("minor")
    assert str(e.value) == "unknown token or profile 'minor'; did you mean 'minors'? Known: alcohol, gambling, drugs, minors"
    with pytest.raises(
        UnknownTokenError,
        match=r"^'rejective' is a mode, not a constraint; select it with mode='rejective' \(CLI: --mode rejective\)$",
    ):
        bank.resolve("alcohol,rejective")
    with pytest.raises(EdgeSafeError, match="tokens must be names or profiles"):
        bank.resolve([1, 2])


def test_check_mode(random_bank):
    bank = random_bank()
    assert bank.check_mode(None) is None and bank.check_mode("") is None
    assert bank.check_mode("rejective") == "rejective"
    with pytest.raises(UnknownTokenError, match="unknown mode 'rejectiv'; did you mean 'rejective'\\? Known: rejective"):
        bank.check_mode("rejectiv")
    with pytest.raises(UnknownTokenError, match="'alcohol' is a constraint, not a mode"):
        bank.check_mode("alcohol")


def test_prefix_vectors(random_bank):
    bank = random_bank(n_vectors=[1, 2, 3, 1])
    v = bank.prefix_vectors(["rejective", "alcohol", "drugs"])
    assert v.shape == (5, 8) and v.dtype == np.float32
    np.testing.assert_array_equal(v[0], bank.tokens["rejective"].vectors[0])
    np.testing.assert_array_equal(v[2:], bank.tokens["drugs"].vectors)
    assert bank.prefix_vectors([]).shape == (0, 8)
    with pytest.raises(UnknownTokenError, match="unknown token 'nope'"):
        bank.prefix_vectors(["nope"])


def test_refusals(random_bank):
    bank = random_bank()
    bank.tokens["drugs"] = replace(bank.tokens["drugs"], refusal="")
    assert bank.refusals() == {
        "alcohol": "Sorry, I can't help with alcohol.",
        "gambling": "Sorry, I can't help with gambling.",
        "rejective": "Sorry, I can't help with that.",
    }
    assert bank.is_refusal("Sorry, I can't help with alcohol.")
    assert bank.is_refusal("  Sorry,  I can't\nhelp with that. Ask me something else.")
    assert not bank.is_refusal("Sorry, I can't help with drugs.")
    assert not bank.is_refusal("Lima")
    assert not bank.is_refusal("")
    assert bank.refusal_of(" Sorry, I can't  help with gambling. Anything else?") == "gambling"
    assert bank.refusal_of("Sorry, I can't help with that.") == "rejective"
    assert bank.refusal_of("Sorry, I can't help you") is None and bank.refusal_of("") is None
    # the longest matching text wins: a refusal that extends another one is told apart
    bank.tokens["gambling"] = replace(bank.tokens["gambling"], refusal="Sorry, I can't help with that. Not betting.")
    assert bank.refusal_of("Sorry, I can't help with that. Not betting.") == "gambling"
    assert bank.refusal_of("Sorry, I can't help with that.") == "rejective"


# --- editing -------------------------------------------------------------------


def test_rename_token_follows_profiles_and_keeps_order(random_bank):
    bank = random_bank()
    out = bank.rename_token("alcohol", "booze")
    assert list(out.tokens) == ["booze", "gambling", "drugs", "rejective"]
    assert out.tokens["booze"].name == "booze" and out.profiles == {"minors": ["booze", "gambling"]}
    assert "alcohol" in bank.tokens  # the original is unchanged
    with pytest.raises(EdgeSafeError, match="'drugs' is already a token in this bank"):
        bank.rename_token("alcohol", "drugs")
    with pytest.raises(EdgeSafeError, match="'minors' is already a profile"):
        bank.rename_token("alcohol", "minors")
    with pytest.raises(BankFormatError, match="new name 'Booze!' is not a valid name"):
        bank.rename_token("alcohol", "Booze!")
    with pytest.raises(UnknownTokenError, match="unknown token 'alcool'; did you mean 'alcohol'"):
        bank.rename_token("alcool", "x")


def test_remove_token(random_bank):
    bank = random_bank(profiles={"minors": ["alcohol", "gambling"], "one": ["alcohol"]})
    assert list(bank.remove_token("drugs").tokens) == ["alcohol", "gambling", "rejective"]
    with pytest.raises(EdgeSafeError, match=r"token 'alcohol' is used by profile\(s\) minors, one; .*--drop-from-profiles"):
        bank.remove_token("alcohol")
    out = bank.remove_token("alcohol", drop_from_profiles=True)
    assert out.profiles == {"minors": ["gambling"]}  # "one" became empty and went away
    single = random_bank(constraints=("a",), modes=(), profiles={})
    with pytest.raises(EdgeSafeError, match="'a' is the bank's only token"):
        single.remove_token("a")


def test_profiles_editing(random_bank):
    bank = random_bank()
    assert bank.rename_profile("minors", "kids").profiles == {"kids": ["alcohol", "gambling"]}
    assert bank.remove_profile("minors").profiles == {}
    with pytest.raises(UnknownTokenError, match="unknown profile 'minor'; did you mean 'minors'"):
        bank.remove_profile("minor")


def test_with_token(random_bank):
    bank = random_bank()
    new = BankToken("weapons", "constraint", np.ones((1, 8)))
    assert list(bank.with_token(new).tokens)[-1] == "weapons"
    with pytest.raises(EdgeSafeError, match="already has a token 'alcohol'; choose another --name or pass --force"):
        bank.with_token(replace(new, name="alcohol"))
    replaced = bank.with_token(replace(new, name="alcohol"), replace_existing=True)
    assert list(replaced.tokens)[0] == "alcohol" and replaced.tokens["alcohol"].n_vectors == 1


# --- merging -------------------------------------------------------------------


def test_merge_disjoint_and_identical(random_bank):
    a = random_bank(constraints=("alcohol", "gambling"), modes=(), profiles={"minors": ["alcohol"]})
    b = random_bank(constraints=("privacy",), modes=("rejective",), profiles={"eu": ["privacy"]}, seed=1)
    m = a.merge(b)
    assert list(m.tokens) == ["alcohol", "gambling", "privacy", "rejective"]
    assert m.profiles == {"minors": ["alcohol"], "eu": ["privacy"]}
    assert list(a.merge(a).tokens) == list(a.tokens)  # identical entries are not a clash


def test_merge_clash_policies(random_bank):
    a = random_bank(profiles={"minors": ["alcohol"]})
    b = random_bank(seed=1, profiles={"minors": ["alcohol", "drugs"]})
    with pytest.raises(
        EdgeSafeError,
        match="both banks define token 'alcohol' differently; choose --on-clash ours\\|theirs\\|rename",
    ):
        a.merge(b)
    ours = a.merge(b, on_clash="ours")
    np.testing.assert_array_equal(ours.tokens["alcohol"].vectors, a.tokens["alcohol"].vectors)
    assert ours.profiles == {"minors": ["alcohol"]}
    theirs = a.merge(b, on_clash="theirs")
    np.testing.assert_array_equal(theirs.tokens["alcohol"].vectors, b.tokens["alcohol"].vectors)
    assert list(theirs.tokens) == list(a.tokens) and theirs.profiles == {"minors": ["alcohol", "drugs"]}
    renamed = a.merge(b, on_clash="rename")
    assert list(renamed.tokens) == ["alcohol", "gambling", "drugs", "rejective",
                                    "alcohol_2", "gambling_2", "drugs_2", "rejective_2"]  # fmt: skip
    assert renamed.profiles == {"minors": ["alcohol"], "minors_2": ["alcohol_2", "drugs_2"]}
    with pytest.raises(EdgeSafeError, match="on_clash must be one of"):
        a.merge(b, on_clash="both")


def test_merge_keeps_token_origins(random_bank):
    trained = random_bank(constraints=("alcohol",), modes=(), profiles={})
    text = random_bank(constraints=("gambling",), modes=(), profiles={}, origin="from-text", seed=1)
    m = trained.merge(text)
    assert m.origin == "trained"
    assert [m.token_origin(n) for n in m.tokens] == ["trained", "from-text"]
    assert m.tokens["alcohol"].origin == ""  # same as the bank's


def test_merge_refuses_other_base_model(random_bank):
    a, b = random_bank(), random_bank(base_fingerprint="cd" * 32)
    with pytest.raises(BankMismatchError, match="cannot merge banks with different base model fingerprint"):
        a.merge(b)
    with pytest.raises(BankMismatchError, match="different n_embd: 8 vs 16"):
        a.merge(random_bank(n_embd=16))
    with pytest.raises(BankMismatchError, match="different chat template: 'qa/v1' vs 'x'"):
        a.merge(random_bank(template=ChatTemplate(name="x")))


# --- against a model -----------------------------------------------------------


def test_check_model(tmp_path, random_bank, make_model):
    info = ModelInfo.read(make_model(tmp_path, n_embd=8))
    bank = random_bank(n_embd=8, base_fingerprint=info.fingerprint, base_name=info.name)
    bank.check_model(info)
    fix = "pass --model <the model it was trained on: Tiny test model>, or a --bank built for Tiny test model"
    with pytest.raises(BankMismatchError) as e:
        replace(bank, arch="llama").check_model(info)
    assert str(e.value) == (
        f"the bank does not fit the model {info.path}: architecture expected 'llama' "
        f"(bank base: Tiny test model), got 'gemma3'; {fix}"
    )
    other = ModelInfo.read(make_model(tmp_path, "wide.gguf", n_embd=16))
    with pytest.raises(BankMismatchError, match="n_embd expected 8 .*got 16; pass --model"):
        bank.check_model(other)
    same_shape = ModelInfo.read(make_model(tmp_path, "other.gguf", n_embd=8, seed=5))
    with pytest.raises(
        BankMismatchError,
        match=rf"base model fingerprint expected '{info.fingerprint[:12]}…' .*got '{same_shape.fingerprint[:12]}…'",
    ):
        bank.check_model(same_shape)


def test_from_text_bank_is_labelled(tmp_path, make_model):
    info = ModelInfo.read(make_model(tmp_path, n_embd=8))
    tok = BankToken("alcohol", "constraint", info.embedding_rows([1, 2, 3]), rule="Do not.")
    bank = from_text_bank(info, [tok], {"minors": ["alcohol"]})
    assert bank.origin == "from-text" and "not trained" in bank.description
    assert (bank.arch, bank.n_embd, bank.base_fingerprint) == ("gemma3", 8, info.fingerprint)


@pytest.mark.model
def test_default_bank_is_the_trained_bank_for_the_bundled_model(model_path):
    from edge_safe.models import default_bank_path
    from edge_safe.training.categories import CATEGORIES, MODES, PROFILES

    bank = TokenBank.load(default_bank_path())
    assert bank.origin == "trained"
    bank.check_model(ModelInfo.read(model_path))
    # the shipped bank has every category of categories.py, its profiles as categories.py has them
    shipped = list(CATEGORIES)
    assert bank.constraints == [c.name for c in shipped]
    assert sorted(bank.modes) == sorted(m.name for m in MODES)
    assert bank.profiles == {p: list(ms) for p, ms in PROFILES.items()}
    assert bank.profiles["minors"] == ["alcohol", "gambling", "drugs", "sexual", "horror", "weapons", "violence",
                                       "selfharm", "hate"]
    for c in [*shipped, *MODES]:
        t = bank.tokens[c.name]
        assert (t.description, t.refusal, t.rule) == (c.description, c.refusal, c.rule)
    assert bank.training_config["steps"] > 0 and "held_out" in bank.training_config


@pytest.mark.model
def test_text_bank_builder_is_labelled_and_reproducible(model_path):
    from edge_safe.training.categories import CATEGORIES, PROFILES
    from edge_safe.training.text_bank import build_text_bank

    bank = build_text_bank(model_path)
    assert bank.origin == "from-text" and bank.description.startswith("Built from text rules, not trained")
    assert bank.constraints == [c.name for c in CATEGORIES] and bank.modes == ["rejective"]
    assert bank.profiles == {p: list(ms) for p, ms in PROFILES.items()}
    for c in CATEGORIES:
        t = bank.tokens[c.name]
        assert (t.description, t.refusal, t.rule) == (c.description, c.refusal, c.rule)
    assert_same(bank, build_text_bank(model_path))  # deterministic


def test_mode_behaviours_follow_merges_and_renames(random_bank):
    from edge_safe.convert.keys import Behaviour

    ours = random_bank(modes=("lockdown",), mode_behaviours={"lockdown": Behaviour.REFUSE_ALL})
    theirs = random_bank(modes=("lockdown",), mode_behaviours={"lockdown": Behaviour.UNRESTRICTED}, seed=1)
    merged = ours.merge(theirs, on_clash="rename")
    assert merged.behaviour("lockdown") == Behaviour.REFUSE_ALL
    assert merged.behaviour("lockdown_2") == Behaviour.UNRESTRICTED
    renamed = random_bank(modes=("rejective",)).rename_token("rejective", "lockdown")
    assert renamed.behaviour("lockdown") == Behaviour.REFUSE_ALL  # made explicit: the new name implies nothing
    assert renamed.mode_behaviours == {"lockdown": Behaviour.REFUSE_ALL}
    assert merged.remove_token("lockdown_2").mode_behaviours == {"lockdown": Behaviour.REFUSE_ALL}
