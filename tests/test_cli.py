"""The `edge-safe` command tree and its one error convention, through click's CliRunner.

Usage errors (bad option values, missing files given as arguments) exit 2, failures exit 1;
either is one ``Error: ...`` line on stderr and nothing on stdout. Every case here fails
before any model is loaded, so the file runs in seconds (torch is imported where the
command needs it).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edge_safe.cli import cli
from edge_safe.cli.common import command_line

NOT_GGUF = "is not a GGUF file (it starts with b'hell', expected b'GGUF')"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_SAFE_MODEL", raising=False)
    monkeypatch.delenv("EDGE_SAFE_BANK", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def garbage(tmp_path) -> Path:
    """An existing file that is not a GGUF."""
    path = tmp_path / "garbage.gguf"
    path.write_text("hello")
    return path


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def error(*args, code: int) -> str:
    """Run ``edge-safe ARGS``; check the exit code and that stderr is one line; return that line."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.output
    return r.stderr.rstrip("\n")


# --- the tree -------------------------------------------------------------------------------------


def test_help_loads_neither_llama_cpp_nor_torch():
    script = textwrap.dedent("""
        import importlib.abc, sys

        HEAVY = ("llama_cpp", "torch", "transformers", "fastapi", "matplotlib")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HEAVY:
                    raise ImportError(f"{name} is blocked: --help must not need it")

        sys.meta_path.insert(0, Block())
        from click.testing import CliRunner
        from edge_safe.cli import cli

        for args in (["--help"], ["train", "-h"], ["data", "-h"], ["eval", "-h"], ["bench", "-h"], ["serve", "-h"],
                     ["train", "validate", "-h"], ["eval", "compare", "-h"], ["eval", "third-party", "-h"],
                     ["bench", "repack", "-h"]):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 0, (args, r.output)
        print("loaded:", sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout


def test_every_group_lists_its_commands():
    def commands(*group):
        out = CliRunner().invoke(cli, [*group, "--help"]).stdout
        return [line.split()[0] for line in out.split("Commands:\n")[1].splitlines() if line.strip()]

    assert commands() == ["bench", "chat", "convert", "data", "eval", "serve", "tokens", "train"]
    assert commands("train") == ["calibrate", "deep-bank", "probe-states", "readout", "refusal-wording", "text-bank",
                                 "validate"]
    assert commands("data") == ["fetch", "generate"]
    assert commands("eval") == ["compare", "compositions", "long-context", "third-party"]
    assert commands("bench") == ["concurrency", "long-context", "repack"]
    usage = CliRunner().invoke(cli, ["eval", "--help"]).stdout.splitlines()[0]
    assert usage == "Usage: edge-safe eval [OPTIONS] [COMMAND [ARGS]...]"


def test_unknown_options_and_commands_are_one_line_usage_errors():
    assert error("--bogus", code=2).startswith("Error: No such option '--bogus'.")
    assert error("nosuch", code=2) == "Error: No such command 'nosuch'. (see 'edge-safe --help')"
    assert error("eval", "nosuch", code=2) == "Error: No such command 'nosuch'. (see 'edge-safe eval --help')"


def test_a_groups_own_options_do_not_go_with_a_subcommand(garbage):
    assert error("eval", "--limit", 3, "compare", garbage, code=2) == (
        "Error: --limit belongs to `edge-safe eval` itself, not to its `compare` command; pass it after `compare` "
        "where that command has it (see 'edge-safe eval --help')")
    assert error("bench", "--quick", "--threads", 1, "repack", code=2).startswith(
        "Error: --quick, --threads belong to `edge-safe bench` itself, not to its `repack` command; pass them")


def test_the_command_line_is_rebuilt_canonically():
    @click.group()
    def top():
        pass

    @top.command()
    @click.argument("banks", nargs=-1)
    @click.option("-o", "--out")
    @click.option("--rss/--no-rss", default=True)
    @click.option("--quick", is_flag=True)
    @click.option("-c", "--composition", multiple=True)
    def sub(banks, out, rss, quick, composition):
        click.echo(command_line(click.get_current_context()))

    r = CliRunner().invoke(top, ["sub", "a b.gguf=x", "c.gguf", "-c", "none", "--no-rss", "-o", "d", "-c", "eu"])
    assert r.stdout == "edge-safe sub 'a b.gguf=x' c.gguf --out d --no-rss --composition none --composition eu\n"


# --- train ----------------------------------------------------------------------------------------


def test_train_needs_an_output_and_keeps_a_bank_without_force(garbage):
    assert error("train", code=2) == (
        "Error: Missing option '-o' / '--output' (the bank file to write). (see 'edge-safe train --help')")
    assert error("train", "-o", garbage, code=1) == f"Error: {garbage} already exists; pass --force to overwrite it"


def test_train_deep_bank_errors(garbage, torch):
    assert error("train", "deep-bank", "missing.gguf", "-o", "deep.gguf", code=2) == (
        "Error: Invalid value for 'BANK': File 'missing.gguf' does not exist. "
        "(see 'edge-safe train deep-bank --help')")
    assert error("train", "deep-bank", garbage, code=2).startswith("Error: Missing option '-o' / '--output'.")
    assert error("train", "deep-bank", garbage, "-o", "deep.gguf", code=1).startswith(f"Error: {garbage} {NOT_GGUF}")


def test_train_text_bank_errors(garbage):
    assert error("train", "text-bank", code=2).startswith("Error: Missing option '-o' / '--output'.")
    assert error("train", "text-bank", "-o", "t.gguf", "-m", "missing.gguf", code=2).startswith(
        "Error: Invalid value for '-m' / '--model': File 'missing.gguf' does not exist.")
    assert error("train", "text-bank", "-o", "t.gguf", "-m", garbage, code=1) == (
        f"Error: {garbage} {NOT_GGUF}; pass --model PATH to a llama.cpp .gguf model")


def test_train_validate_errors(garbage, torch):
    assert error("train", "validate", "missing.gguf", code=2).startswith(
        "Error: Invalid value for 'BANK': File 'missing.gguf' does not exist.")
    assert error("train", "validate", garbage, "--size", 0, code=2).startswith(
        "Error: Invalid value for '--size': 0 is not in the range x>=1.")
    assert error("train", "validate", garbage, "--split", "dev", code=2).startswith(
        "Error: Invalid value for '--split': 'dev' is not one of 'train', 'val', 'test'.")
    assert error("train", "validate", garbage, code=1).startswith(f"Error: {garbage} {NOT_GGUF}")


def test_train_refusal_wording_errors(garbage):
    assert error("train", "refusal-wording", "missing.gguf", code=2).startswith(
        "Error: Invalid value for 'BANK': File 'missing.gguf' does not exist.")
    assert error("train", "refusal-wording", garbage, "abc", code=2).startswith(
        "Error: Invalid value for '[N]': 'abc' is not a valid integer range.")
    assert error("train", "refusal-wording", garbage, 0, code=2).startswith(
        "Error: Invalid value for '[N]': 0 is not in the range x>=1.")
    assert error("train", "refusal-wording", garbage, 2, code=1).startswith(f"Error: {garbage} {NOT_GGUF}")


# --- data -----------------------------------------------------------------------------------------


def test_data_generate_errors(garbage, tmp_path):
    assert error("data", "generate", "--out", garbage, code=2) == (
        f"Error: Invalid value for '--out': Directory '{garbage}' is a file. (see 'edge-safe data generate --help')")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error("data", "generate", "--check", "--out", empty, code=1) == (
        f"Error: stale: {empty}/train.jsonl, {empty}/val.jsonl, {empty}/test.jsonl "
        f"(run: edge-safe data generate --out {empty})")


# --- eval -----------------------------------------------------------------------------------------


def test_eval_compare_errors(garbage, tmp_path):
    assert error("eval", "compare", "--out", "o", code=2) == (
        "Error: Missing argument 'BANK[=LABEL]...'. (see 'edge-safe eval compare --help')")
    assert error("eval", "compare", "nope.gguf", "--out", "o", code=2) == (
        "Error: Invalid value for BANK: token bank not found: nope.gguf (see 'edge-safe eval compare --help')")
    assert error("eval", "compare", f"{garbage}=x", f"{garbage}=x", "--out", "o", code=2).startswith(
        "Error: Invalid value for BANK: two banks share a label (x, x); name them BANK=LABEL")
    assert error("eval", "compare", garbage, "--out", "o", "--parallel", 0, code=2).startswith(
        "Error: Invalid value for '--parallel': 0 is not in the range 1<=x<=64.")
    assert error("eval", "compare", garbage, "--out", garbage / "o", code=1) == (
        f"Error: cannot create the output folder {garbage}/o: Not a directory; pass another --out")


# --- bench ----------------------------------------------------------------------------------------


def test_bench_concurrency_errors(garbage):
    assert error("bench", "concurrency", "--levels", "0,2", code=2) == (
        "Error: Invalid value for --levels: expected client counts like 1,2,4,8 (each 1..64), got '0,2' "
        "(see 'edge-safe bench concurrency --help')")
    assert error("bench", "concurrency", "--requests", 0, code=2).startswith(
        "Error: Invalid value for '--requests': 0 is not in the range x>=1.")
    assert error("bench", "concurrency", "--out", garbage / "o", code=1) == (
        f"Error: cannot create the output folder {garbage}/o: Not a directory; pass another --out")


def test_bench_repack_errors(garbage):
    assert error("bench", "repack", "--threads", 0, code=2).startswith(
        "Error: Invalid value for '--threads': 0 is not in the range x>=1.")
    assert error("bench", "repack", "-m", "missing.gguf", code=2).startswith(
        "Error: Invalid value for '-m' / '--model': File 'missing.gguf' does not exist.")
    assert error("bench", "repack", "--out", garbage / "o", code=1) == (
        f"Error: cannot create the output folder {garbage}/o: Not a directory; pass another --out")


def test_bench_and_eval_from_results_that_cannot_be_read(garbage):
    assert error("bench", "--from-results", garbage, "--out", "o", code=1).startswith(
        f"Error: cannot read benchmark results {garbage}: ")
    assert error("eval", "--from-results", garbage, "--out", "o", code=1).startswith(
        f"Error: cannot read evaluation results {garbage}: ")


def test_eval_long_context_errors(tmp_path):
    assert error("eval", "long-context", "--out", tmp_path, "--lengths", "0,lots", code=2).startswith(
        "Error: Invalid value for --lengths: must be comma-separated whole numbers, got '0,lots'")
    assert error("eval", "long-context", "--out", tmp_path, "--bank", tmp_path / "nope.gguf", code=1).startswith(
        "Error: token bank not found")
    assert error("eval", "long-context", "--out", tmp_path, "--kinds", "message,novel", code=2).startswith(
        "Error: Invalid value for --kinds: expected kinds among message, turns, sharegpt, wrapper, traffic, before, got 'message,novel'")
    assert error("eval", "long-context", "--out", tmp_path, "--traffic", "0", code=2).startswith(
        "Error: Invalid value for '--traffic'")
