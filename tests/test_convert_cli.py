"""`edge-safe convert ...` through click's CliRunner: exit codes and exact output lines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_safe.cli import convert as cli_convert
from edge_safe.cli import cli
from edge_safe.convert.bank import TokenBank
from edge_safe.convert.bank_io import stored_dtype
from edge_safe.convert.model import ModelInfo


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGE_SAFE_MODEL", raising=False)


@pytest.fixture
def run():
    def invoke(*args: str | Path):
        return CliRunner().invoke(cli, ["convert", *map(str, args)])

    return invoke


def ok(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def error(result) -> str:
    """The one-line user error: exit 1, no traceback, 'Error: ...' on stderr."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: ") and result.stdout == ""
    assert result.output.count("\n") == 1
    return result.output.strip()


@pytest.fixture
def tiny(tmp_path, make_model, monkeypatch):
    """A tiny model (n_embd 32) with a fake char-level tokenizer standing in for llama.cpp's."""
    model = make_model(tmp_path, n_vocab=128)
    monkeypatch.setattr(cli_convert, "llama_tokenizer", lambda path: lambda text: [ord(c) % 128 for c in text])
    return model


@pytest.fixture
def bank_for(random_bank):
    """Write a random bank made for ``model``."""

    def make(path: Path, model: Path, **kwargs) -> Path:
        info = ModelInfo.read(model)
        kwargs.setdefault("base_name", info.name)
        return random_bank(n_embd=info.n_embd, base_fingerprint=info.fingerprint, **kwargs).save(path)

    return make


# --- inspect / validate ------------------------------------------------------------


def test_inspect_table(tmp_path, make_bank, run):
    path = make_bank(tmp_path, n_vectors=[1, 2, 3, 1], eval_summary={"defense": {"order_1": 0.998}, "n": 40})
    lines = ok(run("inspect", path))
    assert lines == [
        f"token bank   {path}",
        "name         edge-safe token bank",
        "origin       trained (trained)",
        f"base model   Tiny test model (gemma3, n_embd 8, fingerprint {'ab' * 6})",
        "layout       bos+mode+constraints+template/v1",
        "template     qa/v1",
        "format       v1; 3 constraints, 1 mode, 1 profile, 7 vectors of 8",
        "",
        "NAME       KIND        VECTORS  ORIGIN   DESCRIPTION",
        "alcohol    constraint        1  trained  Blocks alcohol",
        "gambling   constraint        2  trained  Blocks gambling",
        "drugs      constraint        3  trained  Blocks drugs",
        "rejective  mode              1  trained  Blocks rejective",
        "",
        "PROFILE  TOKENS",
        "minors   alcohol, gambling",
        "",
        "eval summary",
        "  defense.order_1: 0.998",
        "  n: 40",
    ]


def test_inspect_labels_from_text_banks(tmp_path, make_bank, run):
    lines = ok(run("inspect", make_bank(tmp_path, origin="from-text")))
    assert "origin       from-text (built from text rules, not trained)" in lines


def test_inspect_json(tmp_path, make_bank, run):
    path = make_bank(tmp_path, n_vectors=[1, 2, 3, 1])
    data = json.loads(run("inspect", path, "--json").stdout)
    assert data["origin"] == "trained" and data["origin_label"] == "trained" and data["path"] == str(path)
    assert (data["arch"], data["n_embd"], data["base_fingerprint"]) == ("gemma3", 8, "ab" * 32)
    assert [(t["name"], t["kind"], t["n_vectors"]) for t in data["tokens"]] == [
        ("alcohol", "constraint", 1), ("gambling", "constraint", 2),
        ("drugs", "constraint", 3), ("rejective", "mode", 1)]  # fmt: skip
    assert data["tokens"][0]["refusal"] == "Sorry, I can't help with alcohol."
    assert data["profiles"] == {"minors": ["alcohol", "gambling"]} and data["template"]["name"] == "qa/v1"


def test_validate(tmp_path, make_bank, run, tiny, bank_for):
    path = make_bank(tmp_path)
    assert ok(run("validate", path)) == [
        f"OK: {path} is a valid token bank (3 constraints, 1 mode, 1 profile, 8 vectors of 8; base Tiny test model)"
    ]
    fits = bank_for(tmp_path / "fits.gguf", tiny)
    assert ok(run("validate", fits, "--model", tiny))[1] == (
        f"OK: it fits {tiny} (gemma3, n_embd 32, fingerprint matches)"
    )
    assert error(run("validate", path, "--model", tiny)) == (
        f"Error: the bank does not fit the model {tiny}: n_embd expected 8 (bank base: Tiny test model), got 32; "
        "pass --model <the model it was trained on: Tiny test model>, or a --bank built for Tiny test model"
    )


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: d / "missing.gguf", "Error: token bank not found: {p} (check the path of the bank .gguf)"),
        (lambda d: (d / "x.txt").write_text("hello") and d / "x.txt",
         "Error: {p} is not a GGUF file (it starts with b'hell', expected b'GGUF'); a token bank is a .gguf "
         "written by `edge-safe train` or `edge-safe convert`"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line(tmp_path, run, setup, expected):
    p = setup(tmp_path)
    for command in ("inspect", "validate", "export-npz"):
        args = (command, p) + (("-o", tmp_path / "o.npz") if command == "export-npz" else ())
        assert error(run(*args)) == expected.format(p=p)


def test_model_given_as_bank(tmp_path, run, tiny):
    assert error(run("inspect", tiny)) == (
        f"Error: {tiny} is a GGUF model (gemma3, 2 tensors), not an edge-safe token bank; pass it as --model "
        "and a token bank written by `edge-safe train` or `edge-safe convert` as --bank"
    )


# --- from-text ---------------------------------------------------------------------


def test_from_text_new_bank(tmp_path, run, tiny):
    out = tmp_path / "text.gguf"
    args = ["from-text", "--rule", "No booze. ", "--name", "alcohol", "--refusal", "Sorry.", "--model", tiny]
    assert ok(run(*args, "--profile", "minors", "-o", out)) == [
        f"wrote {out}: constraint 'alcohol' from 10 rule tokens "
        "(1 constraint, 0 modes, 1 profile, 10 vectors of 32)"
    ]
    bank, info = TokenBank.load(out), ModelInfo.read(tiny)
    assert bank.origin == "from-text" and bank.profiles == {"minors": ["alcohol"]}
    tok = bank.tokens["alcohol"]
    assert (tok.rule, tok.refusal, tok.kind) == ("No booze.", "Sorry.", "constraint")
    np.testing.assert_array_equal(tok.vectors, info.embedding_rows([ord(c) for c in "No booze.\n"]))
    assert error(run(*args, "-o", out)) == f"Error: {out} already exists; pass --force (force=True) to overwrite it"
    assert error(run(*args)) == "Error: pass -o NEW_BANK to create a bank, or --into BANK to add the token to one"


def test_from_text_into_existing_bank(tmp_path, run, tiny, bank_for):
    path = bank_for(tmp_path / "b.gguf", tiny)
    args = ["from-text", "--rule", "Refuse.", "--name", "strict", "--kind", "mode", "--model", tiny, "--into", path]
    assert ok(run(*args))[0].startswith(f"wrote {path}: mode 'strict' from 8 rule tokens")
    bank = TokenBank.load(path)
    assert bank.modes == ["rejective", "strict"] and bank.origin == "trained"
    assert bank.token_origin("strict") == "from-text"  # labelled per token inside a trained bank
    assert "strict     mode              8  from-text" in ok(run("inspect", path))
    assert error(run(*args)) == (
        "Error: the bank already has a token 'strict'; choose another --name or pass --force to replace it"
    )
    assert ok(run(*args, "--force"))


def test_from_text_into_bank_for_another_model(tmp_path, run, tiny, make_bank):
    path = make_bank(tmp_path, n_embd=32)
    result = run("from-text", "--rule", "x", "--name", "x", "--model", tiny, "--into", path)
    assert error(result).startswith(f"Error: the bank does not fit the model {tiny}: base model fingerprint expected")


def test_from_text_bad_name(tmp_path, run, tiny):
    result = run("from-text", "--rule", "x", "--name", "Bad Name", "--model", tiny, "-o", tmp_path / "o.gguf")
    assert error(result) == (
        "Error: token name 'Bad Name' is not a valid name: use lowercase letters, digits, '_' or '-', "
        "starting with a letter or digit, at most 48 characters"
    )


# --- merge / rename / remove ----------------------------------------------------------


def test_merge(tmp_path, make_bank, run):
    a = make_bank(tmp_path, "a.gguf", constraints=("alcohol",), modes=(), profiles={})
    b = make_bank(tmp_path, "b.gguf", constraints=("privacy", "alcohol"), modes=(), profiles={"eu": ["privacy"]}, seed=1)
    out = tmp_path / "c.gguf"
    assert error(run("merge", a, b, "-o", out)) == (
        "Error: both banks define token 'alcohol' differently; choose --on-clash ours|theirs|rename "
        "(or rename it in one bank first: edge-safe convert rename)"
    )
    assert not out.exists()
    result = run("merge", a, b, "-o", out, "--on-clash", "rename")
    assert ok(result) == [f"wrote {out}: 3 constraints, 0 modes, 1 profile, 6 vectors of 8"]
    assert result.stderr.endswith(f"note: name, description, training config and eval summary are kept from {a}\n")
    assert list(TokenBank.load(out).tokens) == ["alcohol", "privacy", "alcohol_2"]
    again = run("merge", a, b, "-o", out, "--on-clash", "rename")
    assert error(again) == f"Error: {out} already exists; pass --force (force=True) to overwrite it"
    ok(run("merge", a, b, "-o", out, "--on-clash", "ours", "--force"))
    assert list(TokenBank.load(out).tokens) == ["alcohol", "privacy"]


def test_rename_token_and_profile_in_place(tmp_path, make_bank, run):
    path = make_bank(tmp_path)
    assert ok(run("rename", path, "alcohol", "booze")) == [f"renamed token 'alcohol' to 'booze' in {path}"]
    assert ok(run("rename", path, "minors", "kids")) == [f"renamed profile 'minors' to 'kids' in {path}"]
    bank = TokenBank.load(path)
    assert list(bank.tokens)[0] == "booze" and bank.profiles == {"kids": ["booze", "gambling"]}
    assert error(run("rename", path, "boozy", "x")) == (
        "Error: unknown token 'boozy'; did you mean 'booze'? Known: booze, gambling, drugs, rejective"
    )
    out = tmp_path / "copy.gguf"
    assert ok(run("rename", path, "drugs", "meds", "-o", out)) == [f"renamed token 'drugs' to 'meds' in {out}"]
    assert "drugs" in TokenBank.load(path).tokens and "meds" in TokenBank.load(out).tokens


def test_rename_keeps_f16_storage(tmp_path, make_bank, run):
    path = make_bank(tmp_path, dtype="F16")
    ok(run("rename", path, "alcohol", "booze"))
    assert stored_dtype(path) == "F16"


def test_remove(tmp_path, make_bank, run):
    path = make_bank(tmp_path, profiles={"minors": ["alcohol", "gambling"]})
    assert error(run("remove", path, "alcohol")) == (
        "Error: token 'alcohol' is used by profile(s) minors; remove it from them too with --drop-from-profiles "
        "(drop_from_profiles=True), or remove those profiles first"
    )
    assert ok(run("remove", path, "alcohol", "drugs", "--drop-from-profiles")) == [
        f"removed token 'alcohol', token 'drugs' from {path}"
    ]
    assert ok(run("remove", path, "minors")) == [f"removed profile 'minors' from {path}"]
    bank = TokenBank.load(path)
    assert list(bank.tokens) == ["gambling", "rejective"] and bank.profiles == {}
    assert error(run("remove", path, "nope")).startswith("Error: unknown token 'nope'")


# --- interchange ------------------------------------------------------------------------


def test_npz_round_trip(tmp_path, make_bank, run):
    path = make_bank(tmp_path, n_vectors=[1, 2, 3, 1], origin="from-text")
    npz = tmp_path / "b.npz"
    assert ok(run("export-npz", path, "-o", npz)) == [f"wrote {npz}: 3 constraints, 1 mode, 1 profile, 7 vectors of 8"]
    with np.load(npz) as f:
        assert sorted(f.files) == ["__meta__", "alcohol", "drugs", "gambling", "rejective"]
        assert f["drugs"].shape == (3, 8)
    back = tmp_path / "back.gguf"
    ok(run("import-npz", npz, "-o", back))
    a, b = TokenBank.load(path), TokenBank.load(back)
    assert b.origin == "from-text" and list(a.tokens) == list(b.tokens) and a.profiles == b.profiles
    for n in a.tokens:
        np.testing.assert_array_equal(a.tokens[n].vectors, b.tokens[n].vectors)
        assert a.tokens[n].refusal == b.tokens[n].refusal


def test_import_bare_npz_needs_model(tmp_path, run, tiny):
    npz = tmp_path / "bare.npz"
    np.savez(npz, alcohol=np.ones((2, 32), np.float32), gambling=np.zeros(32, np.float32))
    assert error(run("import-npz", npz, "-o", tmp_path / "o.gguf")) == (
        f"Error: {npz} does not say which base model it belongs to; pass --model <the model it was trained on>"
    )
    ok(run("import-npz", npz, "-o", tmp_path / "o.gguf", "--model", tiny))
    bank = TokenBank.load(tmp_path / "o.gguf")
    assert bank.origin == "imported" and bank.constraints == ["alcohol", "gambling"]
    assert bank.tokens["gambling"].n_vectors == 1 and bank.base_fingerprint == ModelInfo.read(tiny).fingerprint


def test_import_npz_errors(tmp_path, run, tiny):
    (tmp_path / "bad.npz").write_text("nope")
    assert error(run("import-npz", tmp_path / "bad.npz", "-o", tmp_path / "o.gguf")).startswith(
        f"Error: {tmp_path / 'bad.npz'} is not a readable .npz file"
    )
    np.savez(tmp_path / "wide.npz", alcohol=np.ones((2, 16), np.float32))
    assert error(run("import-npz", tmp_path / "wide.npz", "-o", tmp_path / "o.gguf", "--model", tiny)) == (
        f"Error: {tmp_path / 'wide.npz'}: token 'alcohol' has vectors of shape [2, 16], "
        "expected [n_vectors >= 1, n_embd 32]"
    )


def test_torch_round_trip(tmp_path, make_bank, run, tiny):
    torch = pytest.importorskip("torch")
    path = make_bank(tmp_path, n_vectors=[1, 2, 3, 1])
    pt = tmp_path / "b.pt"
    assert ok(run("to-torch", path, "-o", pt)) == [f"wrote {pt}: 3 constraints, 1 mode, 1 profile, 7 vectors of 8"]
    obj = torch.load(pt, weights_only=True)
    assert obj["state_dict"]["drugs"].shape == (3, 8) and obj["metadata"]["arch"] == "gemma3"
    ok(run("from-torch", pt, "-o", tmp_path / "back.gguf"))
    back = TokenBank.load(tmp_path / "back.gguf")
    np.testing.assert_array_equal(back.tokens["drugs"].vectors, TokenBank.load(path).tokens["drugs"].vectors)
    assert back.origin == "trained" and back.profiles == {"minors": ["alcohol", "gambling"]}
    torch.save({"alcohol": torch.ones(3, 32, dtype=torch.bfloat16)}, tmp_path / "bare.pt")
    ok(run("from-torch", tmp_path / "bare.pt", "-o", tmp_path / "bare.gguf", "--model", tiny))
    assert TokenBank.load(tmp_path / "bare.gguf").tokens["alcohol"].vectors.sum() == 96
    (tmp_path / "junk.pt").write_text("junk")
    assert error(run("from-torch", tmp_path / "junk.pt", "-o", tmp_path / "j.gguf")).startswith(
        f"Error: {tmp_path / 'junk.pt'} is not a loadable PyTorch file"
    )


# --- the real model -----------------------------------------------------------------


@pytest.mark.model
def test_from_text_on_the_bundled_model(tmp_path, run, model_path):
    out = tmp_path / "t.gguf"
    ok(run("from-text", "--rule", "Do not help with alcoholic drinks.", "--name", "alcohol", "-o", out))
    info = ModelInfo.read(model_path)
    rows = TokenBank.load(out).tokens["alcohol"].vectors
    ids = [6294, 711, 1601, 607, 54821, 19060, 236761, 107]  # "Do not help with alcoholic drinks.\n"
    np.testing.assert_array_equal(rows, info.embedding_rows(ids))
    assert ok(run("validate", out, "--model", model_path))[1].endswith("fingerprint matches)")
