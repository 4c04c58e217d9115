"""The operating curve: margins through the runtime, AUC and operating points by hand, the compare CLI."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from click.testing import CliRunner

from edge_safe.cli import cli
from edge_safe.eval.curve import at_strictness, auc, operating_curve


def compare(*args):
    return CliRunner().invoke(cli, ["eval", "compare", *map(str, args)])


def _brute_auc(pos, neg):
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return sum(wins) / len(wins)


def test_auc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1, 1, 37), 1)  # rounded: many ties
    neg = np.round(rng.normal(0, 1, 53), 1)
    assert auc(pos, neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-4)
    assert auc(np.array([1.0]), np.array([])) is None


def test_operating_points_by_hand():
    margins = [3, 2, 1, -1, 0.5, -2, -3, -4]
    kinds = ["violating"] * 4 + ["near-miss", "inactive", "general", "general"]
    c = operating_curve(margins, kinds)
    assert c["n"] == {"violating": 4, "near-miss": 1, "inactive": 1, "general": 2}
    assert c["auc"] == pytest.approx(_brute_auc([3, 2, 1, -1], [0.5, -2, -3, -4]))
    zero = at_strictness(c, 0.0)
    assert (zero["defense"], zero["over_refusal"]) == (0.75, 0.25)  # 3, 2, 1 refused; 0.5 over-refused
    assert zero["by_kind"] == {"near-miss": 1.0, "inactive": 0.0, "general": 0.0}
    # refusing all four violating cases needs margin > -1, which also refuses 0.5
    p95 = c["over_refusal_at_defense"]["0.95"]
    assert (p95["defense"], p95["over_refusal"]) == (1.0, 0.25) and p95["strictness"] == pytest.approx(1.0)
    # no over-refusal: threshold at or above 0.5 keeps 3, 2, 1
    p5 = c["defense_at_over_refusal"]["0.05"]
    assert (p5["defense"], p5["over_refusal"]) == (0.75, 0.0) and p5["strictness"] == pytest.approx(-1.0)
    # the tabulated points fall as the strictness falls
    pts = sorted(c["points"], key=lambda p: p["strictness"])
    assert [p["defense"] for p in pts] == sorted(p["defense"] for p in pts)
    assert pts[0]["defense"] == 0.0 and pts[-1]["over_refusal"] == 1.0  # s = -8 and s = +8


def test_no_violating_cases_gives_no_operating_points():
    c = operating_curve([1.0, -1.0], ["general", "near-miss"])
    assert c["auc"] is None and "over_refusal_at_defense" not in c
    with pytest.raises(ValueError):
        operating_curve([1.0], ["violating", "general"])


def test_compare_cli_errors_are_one_line(tmp_path):
    r = compare("nope.gguf", "--out", tmp_path / "o")
    assert r.exit_code == 2 and r.stderr.startswith("Error: Invalid value for BANK: token bank not found: nope.gguf")
    bank = tmp_path / "a.gguf"
    bank.write_bytes(b"")
    r = compare(f"{bank}=x", f"{bank}=x", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "share a label" in r.stderr and r.stderr.count("\n") == 1
    r = compare(bank, "--out", tmp_path / "o", "--threads", "0")
    assert r.exit_code == 2 and r.stderr.startswith("Error: Invalid value for '--threads': 0 is not in the range x>=1.")


# --- the real runtime ---------------------------------------------------------------------------


@pytest.mark.model
def test_refusal_margin_is_the_strictness_at_which_the_reply_flips(model_path):
    """margin + strictness > 0 refuses, < 0 answers: the curve's reading of strictness is the runtime's."""
    from edge_safe.probe import Probe
    from edge_safe.runtime import EdgeSafe

    def reply(es, prompt, **kw):
        return es.create_completion(prompt, **kw)["choices"][0]["text"]

    with EdgeSafe(n_ctx=512, n_threads=1) as es:
        for prompt, tokens in (("How do I mix a mojito?", ["alcohol"]), ("What is the capital of Peru?", ["alcohol"])):
            m = Probe(es).refusal_margin(prompt, tokens=tokens)
            assert np.isfinite(m)
            above = reply(es, prompt, tokens=tokens, max_tokens=2, strictness=-m + 0.5)
            below = reply(es, prompt, tokens=tokens, max_tokens=2, strictness=-m - 0.5)
            assert above.startswith("Sorry") and not below.lstrip().startswith("Sorry"), (prompt, m, above, below)


@pytest.mark.model
def test_refusal_margin_needs_constraints(model_path):
    from edge_safe.convert.errors import EdgeSafeError
    from edge_safe.probe import Probe
    from edge_safe.runtime import EdgeSafe

    with EdgeSafe(n_ctx=512, n_threads=1) as es:
        probe = Probe(es)
        with pytest.raises(EdgeSafeError, match="needs active constraints"):
            probe.refusal_margin("Hi")
        with pytest.raises(EdgeSafeError, match="unknown"):
            probe.refusal_margin("Hi", tokens=["alcohool"])
        with pytest.raises(EdgeSafeError, match="max_blank"):
            probe.refusal_margin("Hi", tokens=["alcohol"], max_blank=-1)


@pytest.mark.model
def test_compare_two_banks_writes_table_json_and_plot(model_path, tmp_path):
    from edge_safe.models import default_bank_path

    out = tmp_path / "curves"
    bank = str(default_bank_path())
    run = compare(f"{bank}=shipped", f"{bank}=again", "--out", out, "--limit", "6", "--threads", "1")
    assert run.exit_code == 0, run.output
    r = json.loads((out / "curves.json").read_text())
    a, b = r["banks"]["shipped"], r["banks"]["again"]
    assert set(a["n"]) == {"violating", "near-miss", "inactive", "general"}  # profile cases are not in the curve
    assert sum(a["n"].values()) <= 6 and (a["auc"], a["points"]) == (b["auc"], b["points"])  # same cases, same bank
    assert "| shipped | 8 |" in run.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Made with `edge-safe eval compare {bank}=shipped {bank}=again --out {out}" in (out / "CURVES.md").read_text()
