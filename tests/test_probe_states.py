"""`edge-safe train probe-states`: which model states a linear probe separates the readout's cases best by.

The states come from the tiny random-weight Gemma 3 (the final one is what the first reply logits are made
of), the table from synthetic features where the answer is known, the command from the real model on a
handful of third-party rows written here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import fit_rows, use_thirdparty_rows

torch = pytest.importorskip("torch")

from edge_safe.cli import cli  # noqa: E402
from edge_safe.training import probe_states as ps  # noqa: E402
from edge_safe.training.base_model import tiny_random_model  # noqa: E402
from edge_safe.training.objective import DeepBank, bos_cell, first_reply_logits  # noqa: E402
from edge_safe.training.trainer import split_messages  # noqa: E402
from edge_safe.convert.layout import QA_TEMPLATE  # noqa: E402

N_LAYER, WIDTH = 2, 32  # tiny_random_model: 2 layers, 1 KV head of 32


@pytest.fixture(scope="module")
def base():
    return tiny_random_model()


def deep_bank(base) -> DeepBank:
    g = torch.Generator().manual_seed(0)
    init = {name: (torch.randn(m, N_LAYER, WIDTH, generator=g), torch.randn(m, N_LAYER, WIDTH, generator=g))
            for name, m in (("alcohol", 1), ("gambling", 2))}
    return DeepBank(init, bos_cell(base))


CASES = [
    {"text": "Where can I buy beer?", "constraints": ["alcohol"]},
    {"text": "Tell me a joke about cats and dogs, please.", "constraints": ["alcohol", "gambling"]},
    {"text": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Which casino games have the best odds?"}], "constraints": ["gambling"]},
    {"text": "x" * 400, "constraints": ["gambling"]},  # longer than max_tokens below: left out
]


def test_the_final_state_is_what_the_first_reply_logits_are_made_of(base):
    bank = deep_bank(base)
    states, kept = ps.collect_states(base, bank, CASES, offsets=(1, 3), max_tokens=300, batch=2)
    assert kept == [0, 1, 2]
    assert list(states) == ["block 0", "final", "final @-1", "final @-3"] == ps.state_names(N_LAYER, (1, 3))
    assert all(v.shape == (3, base.n_embd) and np.isfinite(v).all() for v in states.values())
    rows = []
    for c in CASES[:3]:
        ctx, ids = split_messages(base, QA_TEMPLATE, c["text"] if isinstance(c["text"], list)
                                  else [{"role": "user", "content": c["text"]}])
        rows.append((None, tuple(c["constraints"]), ids, ctx))
    with torch.no_grad():
        logits = first_reply_logits(base, bank, rows)
        from_states = base.model.lm_head(torch.tensor(states["final"])).float()
    assert torch.allclose(from_states, logits, atol=1e-3)
    # a state before the reply is another position's, and a block's output is not the final state
    assert not np.allclose(states["final @-1"], states["final"], atol=1e-3)
    assert not np.allclose(states["block 0"], states["final"], atol=1e-3)


def test_the_table_finds_the_state_that_carries_the_label():
    rng = np.random.default_rng(1)
    n_train, n_val, d = 600, 400, 8

    def features(n):
        y = (rng.random(n) < 0.3).astype(float)
        weak = rng.normal(size=(n, d))
        weak[:, 0] += 0.8 * y  # the readout's state: some signal
        strong = rng.normal(size=(n, d))
        strong[:, 1] += 3.0 * y  # another state: much more
        return y, {"final": weak, "block 0": strong, "noise": rng.normal(size=(n, d))}

    y_train, train = features(n_train)
    y_val, val = features(n_val)
    thirdparty = np.arange(n_val) % 2 == 0
    rows = {r["state"]: r for r in ps.probe_table(train, y_train, val, y_val, thirdparty,
                                                  pairs=["block 0", "noise"], boot=100)}
    assert rows["block 0"]["auc"] > 0.95 > rows["final"]["auc"] > 0.6
    assert 0.4 < rows["noise"]["auc"] < 0.6
    both = rows["final + block 0"]
    assert both["gain"] > 0.1 and both["gain_interval"][0] > 0.05
    assert rows["final + noise"]["gain_interval"][0] < 0.01  # adds nothing but fitting noise
    assert rows["block 0"]["thirdparty_defense_at_5"] > 0.8 > rows["noise"]["thirdparty_defense_at_5"]
    assert rows["final"]["repo_auc"] is not None and rows["final"]["thirdparty_auc"] is not None
    table = ps.markdown(list(rows.values()))
    assert table.count("\n") == 2 + len(rows) and "| final + block 0 |" in table


def test_the_command_writes_the_table_on_the_real_model(monkeypatch, tmp_path):
    use_thirdparty_rows(monkeypatch, fit_rows())
    out = tmp_path / "probe"
    args = ["train", "probe-states", "--out", str(out), "--sharegpt", "3", "--repo", "30", "--offsets", "3",
            "--pairs", "block 9,final @-3", "--no-progress"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "probe_states.json").read_text())
    states = [row["state"] for row in report["rows"]]
    assert states == [f"block {i}" for i in range(17)] + ["final", "final @-3", "final + block 9", "final + final @-3"]
    assert report["train_cases"] > 30 and report["val_cases"] > 10 and report["val_violating"] > 0
    assert all(row["auc"] is not None and 0 <= row["auc"] <= 1 for row in report["rows"])
    md = (out / "PROBE_STATES.md").read_text()
    assert "edge-safe train probe-states --out" in md and "| final + block 9 |" in md
    again = CliRunner().invoke(cli, args)  # an earlier report is not overwritten
    assert again.exit_code == 1 and "already holds a probe-states report" in again.output


@pytest.mark.parametrize("option, value, words", [
    ("--pairs", "block 99", ["unknown state", "'block 99'", "block 0", "final @-3"]),
    ("--pairs", "final", ["unknown state", "'final'"]),
    ("--offsets", "two", ["--offsets", "whole numbers"]),
    ("--offsets", "0", ["--offsets", "from 1 to 16"]),
])
def test_bad_options_say_what_to_choose(tmp_path, option, value, words):
    r = CliRunner().invoke(cli, ["train", "probe-states", "--out", str(tmp_path / "p"), option, value])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert all(w in r.output for w in words), r.output
    assert not (tmp_path / "p").exists()
