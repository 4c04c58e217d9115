"""`edge-safe bench`: a tiny real run through the CLI (outputs, same-run ratios), and the pure parts."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from edge_safe.bench.report import evaluate_targets, markdown, write_outputs
from edge_safe.bench.benchmark import default_baselines, default_compositions, parse_composition, summary
from edge_safe.cli import cli
from edge_safe.convert.errors import EdgeSafeError

PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` run, cut to a single round of two compositions (about 10-20 s on 2 busy cores)."""
    out = tmp_path_factory.mktemp("bench")
    r = invoke("bench", "--quick", "--repeats", "1", "--warmup", "0", "--max-tokens", "4", "-c", "none",
               "-c", "minors,eu", "--threads", "1", "--concurrency", "1,2", "--out", str(out))
    assert r.exit_code == 0, r.output
    return r, out, json.loads((out / "results.json").read_text())


# --- the real run ---------------------------------------------------------------------------


@pytest.mark.model
def test_quick_run_writes_json_markdown_and_plots(quick_run):
    r, out, res = quick_run
    assert r.stdout.startswith("# edge-safe benchmark: latency and memory per composition\n")
    assert "## Targets" in r.stdout and "| `minors,eu` |" in r.stdout
    assert list(res["compositions"]) == ["none", "minors,eu"] and list(res["baselines"]) == ["minors,eu"]
    assert res["config"]["command"] == ("edge-safe bench --quick --out " + str(out) + " --threads 1 --repeats 1 "
                                        "--warmup 0 --max-tokens 4 --composition none --composition minors,eu "
                                        "--concurrency 1,2")
    m = res["machine"]
    assert m["cpu"] and m["llama_cpp_python"] and res["config"]["n_threads"] == 1
    assert len(res["bank"]["sha256"]) == 64 and len(res["model"]["fingerprint"]) == 64
    md = (out / "RESULTS.md").read_text()
    assert md.splitlines()[0] == "# edge-safe benchmark: latency and memory per composition"
    for section in ("## Targets", "## Per composition", "## Baselines", "## Composition switch",
                    "## Where the time goes", "## Method", "![TTFT per composition](plots/ttft_per_composition.png)"):
        assert section in md
    for name in ("ttft_per_composition.png", "prefill_vs_ttft.png", "concurrency.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG
    conc = res["concurrency"]
    assert list(conc["levels"]) == ["1", "2"] and conc["parallel"] == 2
    assert all(row["requests"] == 8 and row["completion_tokens"] > 0 for row in conc["levels"].values())
    assert conc["levels"]["1"]["tokens_per_s_vs_one_client"] == 1.0
    assert "## Concurrent clients (batching engine)" in md and "![concurrent clients](plots/concurrency.png)" in md
    goals = ["≤ 1.05×", "≤ 0.35×", "≥ 0.97×", "≤ 1 ms", "≤ 5 ms", "≤ 2 MB"]
    assert [t["goal"] for t in res["targets"]] == goals
    assert all(t["pass"] in (True, False) for t in res["targets"])


@pytest.mark.model
def test_ratios_are_to_the_same_runs_baselines(quick_run):
    _, _, res = quick_run
    bare_ttft = res["bare"]["ttft_s"]["median"]
    bare_tps = res["bare"]["decode_tokens_per_s"]["median"]
    for c in res["compositions"].values():
        for key in ("ttft_cold_s", "ttft_warm_s"):
            assert c[key]["ratio"] == pytest.approx(c[key]["median"] / bare_ttft)
            assert c[key]["n"] == 1 and c[key]["values"] == [c[key]["median"]]
        assert c["decode_tokens_per_s"]["ratio"] == pytest.approx(c["decode_tokens_per_s"]["median"] / bare_tps)
    focus, text = res["compositions"]["minors,eu"], res["baselines"]["minors,eu"]
    assert text["edge_cold_vs_text_cold"] == pytest.approx(focus["ttft_cold_s"]["median"] / text["text-cold"]["median"])
    assert res["targets"][0]["value"] == focus["ttft_warm_s"]["ratio"]
    assert res["targets"][1]["value"] == text["edge_cold_vs_text_cold"]
    # what each variant measured: cold prefills BOS + vectors + prompt (a bank with deep cells writes BOS with
    # its cells instead of decoding it), warm only the prompt
    bos = 0 if focus.get("deep_cells") else 1
    assert focus["cold_positions"] == bos + focus["prefix_positions"] + focus["warm_positions"]
    assert focus["snapshot_bytes"] > res["compositions"]["none"]["snapshot_bytes"] > 0
    assert focus["peak_rss"]["peak_rss_bytes"] > 100e6 and res["bare"]["peak_rss"]["peak_rss_bytes"] > 100e6


@pytest.mark.model
def test_from_results_rebuilds_the_same_report(quick_run, tmp_path):
    _, out, _ = quick_run
    r = invoke("bench", "--from-results", str(out / "results.json"), "--out", str(tmp_path), "--no-plots")
    assert r.exit_code == 0, r.output
    rebuilt = (tmp_path / "RESULTS.md").read_text()
    assert rebuilt == (out / "RESULTS.md").read_text().split("\n\n## Plots")[0] + "\n"


@pytest.mark.model
def test_unknown_composition_is_a_one_line_error(tmp_path):
    r = invoke("bench", "--quick", "-c", "minor", "--no-rss", "--out", str(tmp_path))
    assert r.exit_code == 1
    assert r.output.startswith("Error: unknown token or profile 'minor'; did you mean 'minors'?")


# --- pure parts ------------------------------------------------------------------------------


def test_from_results_refuses_other_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"format": "something-else"}')
    r = invoke("bench", "--from-results", str(path), "--out", str(tmp_path))
    assert r.exit_code == 1
    assert r.output == f"Error: {path} is not an edge-safe bench results.json (format 'something-else')\n"


def test_summary_gives_median_quartiles_and_n():
    s = summary([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["p25"], s["p75"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)


def test_default_compositions_cover_single_pairs_profiles_and_modes(random_bank):
    bank = random_bank(constraints=("alcohol", "gambling", "drugs", "privacy"), modes=("positive", "rejective"),
                       profiles={"minors": ["alcohol", "gambling", "drugs"], "eu": ["privacy"]})
    full = default_compositions(bank, quick=False)
    assert full == ["none", "alcohol", "gambling", "drugs", "privacy", "alcohol,gambling", "drugs,privacy",
                    "minors", "eu", "minors,eu", "all", "positive", "rejective"]
    assert default_compositions(bank, quick=True) == ["none", "eu", "minors,eu", "rejective"]
    assert default_baselines(bank, full, quick=False) == ["minors", "eu", "minors,eu", "all"]
    assert default_baselines(bank, ["none", "alcohol"], quick=True) == ["alcohol"]


def test_parse_composition_names_profiles_modes_all_and_none(random_bank):
    bank = random_bank(constraints=("alcohol", "gambling", "drugs"), modes=("positive", "rejective"))
    es = SimpleNamespace(bank=bank, tokens=bank.constraints,
                         compose=lambda t, m: (bank.resolve(t), bank.check_mode(m) or ("positive" if t else None)))
    assert parse_composition(es, "none").key == ()
    assert parse_composition(es, "minors").key == ("positive", "alcohol", "gambling")
    assert parse_composition(es, "drugs,rejective").key == ("rejective", "drugs")
    assert parse_composition(es, "rejective").key == ("rejective",)
    assert parse_composition(es, "all").constraints == ("alcohol", "gambling", "drugs")
    with pytest.raises(EdgeSafeError, match="names 2 modes"):
        parse_composition(es, "positive,rejective")


def test_targets_pass_and_miss_from_the_figures(quick_results_stub):
    res = quick_results_stub
    rows = {t["goal"]: t for t in evaluate_targets(res)}
    assert rows["≤ 1.05×"]["pass"] is True and rows["≤ 1.05×"]["measured"] == "1.02×"
    assert rows["≤ 0.35×"]["pass"] is False and rows["≤ 0.35×"]["measured"] == "0.40×"
    assert rows["≥ 0.97×"]["detail"] == "lowest: minors,eu, 0.98× edge-safe `none`"
    assert rows["≤ 1 ms"]["measured"] == "0.50 ms" and rows["≤ 1 ms"]["pass"] is True
    assert rows["≤ 2 MB"]["measured"] == "0.57 MB"
    del res["compositions"]["minors,eu"], res["baselines"]["minors,eu"]
    rows = {t["goal"]: t for t in evaluate_targets(res)}
    assert rows["≤ 1.05×"]["pass"] is None and "add --composition minors,eu" in rows["≤ 1.05×"]["detail"]


def test_markdown_marks_misses(quick_results_stub):
    res = quick_results_stub
    res["targets"] = evaluate_targets(res)
    md = "\n".join(markdown(res, plots=False))
    assert "| cold TTFT of minors,eu vs the text rules (cold) | ≤ 0.35× | 0.40× | **miss** |" in md
    assert "| warm TTFT of minors,eu vs bare | ≤ 1.05× | 1.02× | **pass** |" in md


@pytest.fixture
def quick_results_stub():
    """A results dict with the fields the targets and the markdown read, figures chosen by hand."""

    def s(median, **extra):
        return {"median": median, "p25": median, "p75": median, "min": median, "max": median, "n": 3,
                "values": [median] * 3, **extra}

    def comp(cold, warm, tps, snap, prefix):
        return {"constraints": [], "mode": None, "key": [], "prefix_positions": prefix,
                "ttft_cold_s": s(cold, ratio=cold / 0.05), "ttft_warm_s": s(warm, ratio=warm / 0.05),
                "restore_s": s(0.0005), "decode_tokens_per_s": s(tps, ratio=tps / 50, ratio_none=tps / 51),
                "cold_positions": 1 + prefix + 14, "warm_positions": 14,
                "time_split_cold_s": {"vectors_s": 0.01}, "time_split_warm_s": {"restore_s": 0.0005},
                "snapshot_bytes": snap, "peak_rss": {"peak_rss_bytes": 390e6}}

    base = {"text-cold": s(0.4, ratio=8.0, positions=168), "text-warm": s(0.05, ratio=1.0, positions=11),
            "guard-cold": s(0.6, ratio=12.0, positions=205, classify_tokens=2),
            "guard-warm": s(0.15, ratio=3.0, positions=25), "stay": s(0.05, ratio=1.0, positions=14),
            "edge_cold_vs_text_cold": 0.4, "switch_cost_s": 0.001, "rules_chars": 600}
    return {
        "command": "edge-safe bench", "date": "2026-01-01 00:00 UTC", "seconds": 60.0,
        "config": {"repeats": 3, "warmup": 1, "n_threads": 1, "n_ctx": 1024, "n_batch": 512},
        "machine": {"cpu": "Test CPU", "usable_cpus": 2, "platform": "Linux", "llama_cpp_python": "0.3",
                    "edge_safe": "0.1.0", "load_average": [1.0, 1.0, 1.0]},
        "model": {"path": "/m/model.gguf", "name": "Model", "fingerprint": "ab" * 32},
        "bank": {"path": "/b/bank.gguf", "name": "Bank", "origin": "trained", "sha256": "cd" * 32,
                 "file_bytes": 1000, "vectors": {"positive": 2, "alcohol": 4}, "modes": ["positive"]},
        "prompts": {"ttft": ["q"], "decode_tokens": 16},
        "bare": {"ttft_s": s(0.05), "decode_tokens_per_s": s(50.0), "positions": 15, "peak_rss": None},
        "compositions": {"none": comp(0.08, 0.05, 51.0, 19_000, 0),
                         "minors,eu": comp(0.16, 0.051, 50.0, 573_000, 30)},
        "baselines": {"minors,eu": base},
        "bank_load_s": s(0.0007),
    }


def test_plots_are_skipped_with_a_note_without_matplotlib(quick_results_stub, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    res = quick_results_stub
    res["targets"] = evaluate_targets(res)
    written = write_outputs(res, tmp_path)
    assert [p.name for p in written] == ["results.json", "RESULTS.md"]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Plots\n\n_plots skipped: matplotlib is not installed (pip install matplotlib)_" in md
