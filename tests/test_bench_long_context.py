"""`edge-safe bench long-context`: one tiny real run (300 tokens, one round), its report's structure and
ratios computed from the recorded times; the pure parts without the model."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_safe.bench.benchmark import summary
from edge_safe.bench.long_context import FORMAT, TARGETS, ratio, targets
from edge_safe.cli import cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-long")
    r = CliRunner().invoke(cli, ["bench", "long-context", "--tokens", "300", "--repeats", "1", "--warmup", "0",
                                 "--max-tokens", "4", "--threads", "1", "--n-ctx", "1024", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return r, out, json.loads((out / "results.json").read_text())


@pytest.mark.model
def test_tiny_run_writes_the_report(tiny_run):
    r, out, res = tiny_run
    assert res["format"] == FORMAT and res["composition"]["label"] == "minors,eu" and res["composition"]["deep"]
    assert res["command"] == (f"edge-safe bench long-context --tokens 300 --repeats 1 --warmup 0 --max-tokens 4 "
                              f"--threads 1 --n-ctx 1024 --out {out}")
    assert res["machine"]["cpu"] and res["machine"]["llama_cpp_python"] and res["config"]["n_threads"] == 1
    assert len(res["bank"]["sha256"]) == 64 and len(res["model"]["fingerprint"]) == 64
    assert list(res["shapes"]) == ["turns", "message"]
    md = (out / "LONG_CONTEXT.md").read_text()
    assert r.stdout == md
    for section in ("## Targets", "## Per shape", "## Placing the cells", "## Reading the last message alone",
                    "## Method"):
        assert section in md
    for shape, row in res["shapes"].items():
        assert row["context_tokens"] >= 300, shape
        e, b = row["edge"], row["bare"]
        assert e["deep_cells"] > 0 and e["kv_write_cold_s"]["median"] > 0 and e["kv_write_warm_s"]["median"] > 0
        # warm: the earlier turns' KV reused on both sides, only the tail prefilled
        assert e["prefilled_warm"] < e["prefilled_cold"] / 2 and b["prefilled_warm"] < b["prefilled_cold"] / 2
        assert e["decode_prefilled"] <= 2 and e["decode_tokens"] == b["decode_tokens"] == 4
        assert e["kv_write_share_cold"]["values"] == [e["kv_write_cold_s"]["median"] / e["ttft_cold_s"]["median"]]
        # next turn: laid out while idle, so edge-safe writes no cells and prefills the new question only, as bare
        assert e["kv_write_next_s"]["median"] == 0 and e["ready_s"]["median"] > 0
        assert e["prefilled_next"] == b["prefilled_next"] < e["prefilled_warm"]
        # the (harmless) question is also read alone, in the engine's view context (after earlier turns, and as
        # the last line of the pasted message), unless the readout put it too far from refusing: then no view time
        for when in ("cold", "warm", "next"):
            assert e[f"reread_{when}"] in ("answer", "skipped"), (shape, when, e[f"reread_{when}"])
            assert (e[f"view_{when}_s"]["median"] > 0) is (e[f"reread_{when}"] == "answer"), (shape, when)
    assert [(t["shape"], t["target"]) for t in res["targets"]] == [
        (s, t) for s in ("turns", "message") for t in ("decode tok/s vs bare", "TTFT cold vs bare",
                                                       "TTFT warm, nothing laid out vs bare",
                                                       "TTFT next turn, laid out while idle vs bare")]


@pytest.mark.model
def test_ratios_are_computed_from_the_recorded_times(tiny_run):
    _, _, res = tiny_run
    for row in res["shapes"].values():
        for key in ("ttft_cold_s", "ttft_warm_s", "ttft_next_s", "decode_tokens_per_s"):
            e, b = row["edge"][key], row["bare"][key]
            assert e["n"] == b["n"] == 1
            assert row["ratios"][key]["ratio"] == pytest.approx(e["values"][0] / b["values"][0])
            assert row["ratios"][key]["per_round"]["values"] == [pytest.approx(e["values"][0] / b["values"][0])]
    for t in res["targets"]:
        key = {"decode tok/s vs bare": "decode_tokens_per_s", "TTFT cold vs bare": "ttft_cold_s",
               "TTFT warm, nothing laid out vs bare": "ttft_warm_s",
               "TTFT next turn, laid out while idle vs bare": "ttft_next_s"}[t["target"]]
        v = res["shapes"][t["shape"]]["ratios"][key]["ratio"]
        assert t["value"] == v
        assert t["pass"] == (v >= TARGETS["decode"] if key == "decode_tokens_per_s" else v <= TARGETS["ttft"])


def test_ratio_pairs_rounds_and_targets_read_the_ratios():
    edge, bare = summary([2.0, 4.0, 6.0]), summary([1.0, 4.0, 2.0])
    r = ratio(edge, bare)
    assert r["ratio"] == 2.0 and r["per_round"]["values"] == [2.0, 1.0, 3.0] and r["per_round"]["median"] == 2.0
    assert (r["per_round"]["p25"], r["per_round"]["p75"]) == (1.5, 2.5)
    one = {"ratio": 1.0, "per_round": {}}
    res = {"shapes": {"turns": {"ratios": {"decode_tokens_per_s": {"ratio": 0.96}, "ttft_cold_s": {"ratio": 1.06},
                                           "ttft_warm_s": one}}}}
    assert [(t["goal"], t["pass"]) for t in targets(res)] == [("≥ 0.95×", True), ("≤ 1.05×", False), ("≤ 1.05×", True)]
