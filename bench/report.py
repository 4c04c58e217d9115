"""`edge-safe bench` output: the targets, results.json and RESULTS.md (plots: :mod:`.plots`).

Everything here reads the plain-JSON results of :class:`edge_safe.bench.benchmark.Benchmark`,
so a report can be rebuilt from a saved ``results.json`` without running anything.
"""
from __future__ import annotations

from pathlib import Path

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.bench.plots import prefill_fit
from edge_safe.eval import reporting
from edge_safe.eval.reporting import make_out_dir, write_json, write_text_atomic

FORMAT = "edge-safe-bench/v1"  # results.json layout version
FOCUS = "minors,eu"  # the composition the targets name
MB = 1_000_000


# --- targets ---------------------------------------------------------------------------------


def evaluate_targets(results: dict) -> list[dict]:
    """The benchmark's targets (bench/README.md), each {target, goal, measured, pass (None: not measured), detail}."""
    comps, base = results["compositions"], results["baselines"]
    focus, fb = comps.get(FOCUS), base.get(FOCUS, {})
    decode = {lb: c["decode_tokens_per_s"]["ratio"] for lb, c in comps.items()}
    restore = {lb: c["restore_s"]["median"] for lb, c in comps.items()}
    snap = {lb: c["snapshot_bytes"] for lb, c in comps.items()}
    worst_decode = min(decode, key=decode.get)
    worst_restore = max(restore, key=restore.get)
    worst_snap = max(snap, key=snap.get)
    rows = [
        _target(f"warm TTFT of {FOCUS} vs bare", "≤ 1.05×", focus and focus["ttft_warm_s"]["ratio"], 1.05, "x"),
        _target(f"cold TTFT of {FOCUS} vs the text rules (cold)", "≤ 0.35×", fb.get("edge_cold_vs_text_cold"),
                0.35, "x"),
        _target("decode tok/s of every composition vs bare", "≥ 0.97×", decode[worst_decode], 0.97, "x",
                higher=True, detail=f"lowest: {worst_decode}" + _vs_none(comps, worst_decode),
                composition=worst_decode),
        _target("composition switch when cached (snapshot restore)", "≤ 1 ms", restore[worst_restore], 1e-3, "s",
                detail=f"slowest: {worst_restore}", composition=worst_restore),
        _target("bank load (TokenBank.load)", "≤ 5 ms", results["bank_load_s"]["median"], 5e-3, "s"),
        _target("prefix-cache memory per composition", "≤ 2 MB", snap[worst_snap], 2 * MB, "B",
                detail=f"largest: {worst_snap}", composition=worst_snap),
    ]
    return rows


def _vs_none(comps: dict, label: str) -> str:
    r = comps[label]["decode_tokens_per_s"].get("ratio_none")
    return f", {r:.2f}× edge-safe `none`" if r is not None and label != "none" else ""


def _target(name, goal, value, limit, unit, higher=False, detail="", composition=FOCUS) -> dict:
    ok = None if value is None else (value >= limit if higher else value <= limit)
    if value is None:
        detail = detail or f"not measured in this run (add --composition {FOCUS})"
    return {"target": name, "goal": goal, "value": value, "unit": unit, "pass": ok, "detail": detail,
            "measured": _fmt(value, unit), "composition": composition}


def _fmt(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "x":
        return f"{value:.2f}×"
    if unit == "s":
        return f"{value * 1e3:.2f} ms" if value < 0.1 else f"{value * 1e3:.0f} ms"
    return f"{value / MB:.2f} MB"


# --- files -----------------------------------------------------------------------------------


def write_outputs(results: dict, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """results.json, RESULTS.md and plots/*.png in ``out_dir``."""
    out = make_out_dir(out_dir)
    written = [write_json(out / "results.json", results)]
    note = None
    if plots:
        from edge_safe.bench.plots import write_plots

        made, note = write_plots(results, out / "plots")
        written += made
    written.append(write_text_atomic(out / "RESULTS.md", "\n".join(markdown(results, plots=plots, plot_note=note)) + "\n"))
    return written


def load_results(path: str | Path) -> dict:
    """A saved bench results.json (``edge-safe bench --from-results``), its targets checked again."""
    results = reporting.load_results(path, "benchmark results")
    if results.get("format") != FORMAT:
        raise EdgeSafeError(f"{path} is not an edge-safe bench results.json (format {results.get('format')!r})")
    results["targets"] = evaluate_targets(results)  # derived: re-checked with this version's targets
    return results




# --- markdown --------------------------------------------------------------------------------


def markdown(results: dict, plots: bool = True, plot_note: str | None = None) -> list[str]:
    """RESULTS.md as lines: header, targets, per composition, baselines, switch, time split, method."""
    r, cfg = results, results["config"]
    m, bank = r["machine"], r["bank"]
    n = cfg["repeats"]
    lines = [
        "# edge-safe benchmark: latency and memory per composition", "",
        f"`{r['command']}` — {r['date']}, {r['seconds']:.0f} s.", "",
        f"- machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, {cfg['n_threads']} llama.cpp threads, "
        f"load average {_load(m.get('load_average'))} at start, {_load(m.get('load_average_end'))} at end; "
        f"{m['platform']}",
        f"- llama-cpp-python {m['llama_cpp_python']}, edge-safe {m['edge_safe']} ({m.get('git_commit') or 'no git'})",
        f"- model `{Path(r['model']['path']).name}` ({r['model']['name']}, token_embd sha256 "
        f"{r['model']['fingerprint'][:12]}…)",
        f"- bank `{Path(bank['path']).name}` ({bank['name']}, {bank['origin']}, sha256 {bank['sha256'][:12]}…, "
        f"{_vectors(bank)})",
        f"- n_ctx {cfg['n_ctx']}, n_batch {cfg['n_batch']}, {cfg['warmup']} warm-up round(s) discarded, "
        f"n = {n} rounds; {len(r['prompts']['ttft'])} prompts, one per round, the same for every variant; "
        f"decode over {r['prompts']['decode_tokens']} tokens",
        *[f"- **note:** {n}" for n in r.get("notes", [])],
        "",
        "## Targets", "",
        "| target | goal | this run | result |", "|---|---|---|---|",
    ]
    for t in r["targets"]:
        verdict = "n/a" if t["pass"] is None else ("**pass**" if t["pass"] else "**miss**")
        detail = f" ({t['detail']})" if t["detail"] else ""
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']}{detail} | {verdict} |")
    lines += ["", *_composition_table(r), "", *_baseline_table(r), "", *_switch_table(r), "", *_time_split(r)]
    misses = _miss_notes(r)
    if misses:
        lines += ["", *misses]
    if r.get("concurrency"):
        from edge_safe.bench.concurrency import markdown as concurrency_markdown

        lines += ["", *concurrency_markdown(r["concurrency"])]
    lines += ["", *_method(r)]
    if plots:
        lines += ["", "## Plots", ""]
        if plot_note:
            lines.append(f"_{plot_note}_")
        else:
            lines += ["![TTFT per composition](plots/ttft_per_composition.png)", "",
                      "![prefill positions vs TTFT](plots/prefill_vs_ttft.png)"]
            if r.get("concurrency"):
                lines += ["", "![concurrent clients](plots/concurrency.png)"]
    return lines


def _composition_table(r: dict) -> list[str]:
    bare = r["bare"]
    lines = [
        "## Per composition", "",
        f"Medians (p25–p75) over n = {r['config']['repeats']}; × = ratio to bare `Llama` in this run "
        f"(TTFT {_ms(bare['ttft_s'])} ms, decode {bare['decode_tokens_per_s']['median']:.1f} tok/s, "
        f"peak RSS {_rss(bare.get('peak_rss'))}).", "",
        "| composition | mode | prefix pos. | cold TTFT ms | × | warm TTFT ms | × | restore ms | "
        "decode tok/s | × | × none | snapshot KB | peak RSS MB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for lb, c in r["compositions"].items():
        d = c["decode_tokens_per_s"]
        lines.append(
            f"| `{lb}` | {c['mode'] or '—'} | {c['prefix_positions']} | {_spread_ms(c['ttft_cold_s'])} | "
            f"{c['ttft_cold_s']['ratio']:.2f} | {_spread_ms(c['ttft_warm_s'])} | {c['ttft_warm_s']['ratio']:.2f} | "
            f"{c['restore_s']['median'] * 1e3:.2f} | {d['median']:.1f} ({d['p25']:.1f}–{d['p75']:.1f}) | "
            f"{d['ratio']:.2f} | {_ratio(d.get('ratio_none'))} | {c['snapshot_bytes'] / 1000:.0f} | "
            f"{_rss(c.get('peak_rss'), unit=False)} |")
    return lines


def _baseline_table(r: dict) -> list[str]:
    bare = r["bare"]
    lines = [
        "## Baselines (same run, same prompts)", "",
        "Prefill positions = tokens decoded for the request (warm: after the reused prefix; guard: both calls).", "",
        "| system | composition | TTFT ms | × bare | prefill pos. | edge-safe cold ÷ this |",
        "|---|---|--:|--:|--:|--:|",
        f"| bare `Llama`, no rules | — | {_spread_ms(bare['ttft_s'])} | 1.00 | {bare['positions']} | |",
    ]
    names = {"text-cold": "rules as text, cold", "text-warm": "rules as text, warm (Llama prefix reuse)",
             "guard-cold": "guard: classify + answer, cold", "guard-warm": "guard: classify (rules warm) + answer"}
    for lb, b in r["baselines"].items():
        cold = r["compositions"].get(lb, {}).get("ttft_cold_s", {}).get("median")
        for v, name in names.items():
            s = b[v]
            vs = f"{cold / s['median']:.2f}" if cold else ""
            lines.append(f"| {name} | `{lb}` | {_spread_ms(s)} | {s['ratio']:.2f} | {s['positions']} | {vs} |")
    peaks = [f"`{lb}` {_rss(b.get('peak_rss_text'))}" for lb, b in r["baselines"].items() if b.get("peak_rss_text")]
    if peaks:
        lines += ["", f"Peak RSS of a process serving the rules as text: {', '.join(peaks)}."]
    return lines


def _switch_table(r: dict) -> list[str]:
    lines = [
        "## Composition switch", "",
        "Direct: the snapshot restore (`llama_state_seq_set_data`, with the KV clear before it) inside warm "
        "requests. As TTFT: a request right after another composition (warm) minus one whose composition "
        "was already held in KV (`stay`, same prompt, nothing restored).", "",
        "| composition | restore ms (p25–p75) | snapshot KB | warm TTFT ms | stay TTFT ms | difference ms |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for lb, c in r["compositions"].items():
        b = r["baselines"].get(lb)
        s = c["restore_s"]
        row = (f"| `{lb}` | {s['median'] * 1e3:.2f} ({s['p25'] * 1e3:.2f}–{s['p75'] * 1e3:.2f}) | "
               f"{c['snapshot_bytes'] / 1000:.0f} | {_ms(c['ttft_warm_s'])} |")
        if b:
            row += f" {_ms(b['stay'])} | {b['switch_cost_s'] * 1e3:+.1f} |"
        else:
            row += " | |"
        lines.append(row)
    bl = r["bank_load_s"]
    lines += ["", f"Bank load (`TokenBank.load`, {Path(r['bank']['path']).name}, {r['bank']['file_bytes']} bytes): "
              f"{bl['median'] * 1e3:.2f} ms (p25–p75 {bl['p25'] * 1e3:.2f}–{bl['p75'] * 1e3:.2f}, n = {bl['n']})."]
    return lines


def _time_split(r: dict) -> list[str]:
    lines = ["## Where the time goes", ""]
    fit = prefill_fit(r)
    if fit:
        lines.append(f"Cold TTFT over every cold point (edge-safe cold, text rules cold, bare) fits "
                     f"**{fit['intercept_s'] * 1e3:.1f} ms + {fit['per_position_s'] * 1e3:.2f} ms × prefill "
                     f"positions** (R² {fit['r2']:.2f}, {fit['n']} points): the fixed part is the first token's "
                     "output layer (262 k-word vocabulary) and per-request overhead, the rest is prefill.")
    c = r["compositions"].get(FOCUS) or next(iter(r["compositions"].values()))
    lb = FOCUS if FOCUS in r["compositions"] else next(iter(r["compositions"]))
    for kind in ("cold", "warm"):
        split = c[f"time_split_{kind}_s"]
        parts = ", ".join(f"{SPLIT_NAMES.get(k, k)} {v * 1e3:.2f}" for k, v in split.items())
        lines.append(f"\n`{lb}` {kind}, {_ms(c[f'ttft_{kind}_s'])} ms median, in ms: {parts}.")
    return lines


SPLIT_NAMES = {"bos_s": "BOS decode", "kv_write_s": "BOS + deep cells written to KV",
               "vectors_s": "vector prefill",
               "snapshot_s": "snapshot save", "restore_s": "snapshot restore",
               "prompt_prefill_s": "prompt prefill + first logits",
               "other_s": "render, tokenize, sampling, Python"}


def _miss_notes(r: dict) -> list[str]:
    """One sentence per missed target, with this run's figures for where the time or memory goes."""
    comps, fit = r["compositions"], prefill_fit(r)
    notes = []
    for i, t in enumerate(r["targets"]):
        if t["pass"] is not False:
            continue
        if i == 0:
            c = comps[FOCUS]
            w = c["time_split_warm_s"]
            notes.append(f"warm TTFT: `{FOCUS}` prefills {c['warm_positions']} prompt positions "
                         f"({w['prompt_prefill_s'] * 1e3:.1f} ms) after a {w['restore_s'] * 1e3:.2f} ms restore, "
                         f"bare prefills {r['bare']['positions']} (BOS + prompt) in {_ms(r['bare']['ttft_s'])} ms; "
                         "the restore is the only step bare does not have.")
        elif i == 1:
            c, text = comps[FOCUS], r["baselines"][FOCUS]["text-cold"]
            per = f" at {fit['per_position_s'] * 1e3:.2f} ms per position" if fit else ""
            if c.get("deep_cells"):
                notes.append(f"cold vs text: `{FOCUS}` writes BOS and {c['deep_cells']} deep cells into the KV cache "
                             f"(no decode), then prefills {c['cold_positions']} positions, the text rules "
                             f"{text['positions']} in one{per}; what is left is the cell write and the restore.")
            else:
                notes.append(f"cold vs text: `{FOCUS}` prefills {c['cold_positions']} positions in three decode calls "
                             f"(BOS, {c['prefix_positions']} vectors, prompt), the text rules {text['positions']} in one"
                             f"{per}; the ratio follows the position ratio, so it is met by banks with few vectors per "
                             "constraint (a from-text bank has one per rule token, as many as the text).")
        elif i == 2:
            lb, none = t["composition"], comps.get("none", {}).get("decode_tokens_per_s")
            d = comps[lb]["decode_tokens_per_s"]
            ref = f"; edge-safe `none` {none['median']:.1f} ({none['p25']:.1f}–{none['p75']:.1f})" if none else ""
            notes.append(f"decode: `{lb}` ran {d['median']:.1f} tok/s "
                         f"(p25–p75 {d['p25']:.1f}–{d['p75']:.1f}){ref}, "
                         f"bare {r['bare']['decode_tokens_per_s']['median']:.1f}; each of its tokens attends to "
                         f"{comps[lb]['prefix_positions'] + comps[lb].get('deep_cells', 0)} more positions, while the layers' weights and the "
                         "262 k-word output layer are the same per token.")
        elif i == 3:
            lb = t["composition"]
            w = comps[lb]["time_split_warm_s"]
            notes.append(f"switch: the restore of `{lb}` (`llama_memory_seq_rm` of the sequence, then "
                         f"`llama_state_seq_set_data`) took {w['restore_s'] * 1e3:.2f} ms.")
        elif i == 4:
            notes.append(f"bank load: {r['bank']['file_bytes']} bytes parsed and validated by `TokenBank.load`.")
        elif i == 5:
            lb = t["composition"]
            c = comps[lb]
            notes.append(f"memory: a snapshot holds {c['snapshot_bytes_per_position'] / 1000:.1f} KB of K and V per "
                         f"position; `{lb}` has 1 + {c['prefix_positions'] + c.get('deep_cells', 0)} positions.")
    return ["### Missed targets in this run", "", *[f"- {n}" for n in notes]] if notes else []


def _method(r: dict) -> list[str]:
    return [
        "## Method", "",
        "One process loads edge-safe and a bare `llama_cpp.Llama` on the same GGUF with the same n_ctx, "
        "n_batch and threads. Each round runs every (variant, composition) once, in an order shuffled with a "
        "seeded RNG, on the round's prompt, so machine noise hits every variant alike; warm-up rounds are "
        "discarded. TTFT is call → first token: edge-safe's request (`job.stats.ttft_s`, KV reset before "
        "each request), `Llama.create_completion(stream=True)` to its first chunk. Cold: the composition's "
        "snapshot is not cached and BOS + vectors + prompt are prefilled (the snapshot is saved, as in "
        "service); warm: the snapshot is restored and the prompt prefilled. Decode: a fixed greedy "
        "generation (bare `Llama.generate`'s first tokens for the decode prompt) — bare times its own "
        "`generate` (eval + greedy sampler), edge-safe replays the same tokens one per decode "
        "(`forced_logits`), both from the first token on. Peak RSS: `VmHWM` of a fresh process that loads "
        "the system and serves one request. Text rules: the composition's rule texts as a system line "
        "in the bank's template; warm = the `Llama` served the same rules just before, so its prefix match "
        "keeps their KV. Guard: a classify call (rules + request, "
        f"{r['baselines'] and next(iter(r['baselines'].values()))['guard-cold']['classify_tokens']} greedy tokens), "
        "then the answer call without rules; TTFT = both.",
    ]


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.1f}"


def _spread_ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.1f} ({s['p25'] * 1e3:.1f}–{s['p75'] * 1e3:.1f})"


def _rss(peak: dict | None, unit: bool = True) -> str:
    if not peak or peak.get("peak_rss_bytes") is None:
        return "—"
    return f"{peak['peak_rss_bytes'] / MB:.0f}" + (" MB" if unit else "")


def _load(avg) -> str:
    return "/".join(f"{x:.2f}" for x in avg) if avg else "?"


def _vectors(bank: dict) -> str:
    counts = bank["vectors"]
    modes = [n for n in counts if n in bank["modes"]]
    cons = [counts[n] for n in counts if n not in bank["modes"]]
    per = f"{min(cons)}–{max(cons)}" if cons and min(cons) != max(cons) else str(cons[0] if cons else 0)
    deep = set(bank.get("deep") or ())
    if not deep:
        kind = "vectors"
    elif deep >= set(counts):
        kind = "deep cells"
    else:
        kind = f"vectors (deep: {', '.join(sorted(deep))})"
    return f"{len(cons)} constraints × {per} {kind}, modes {', '.join(modes) or 'none'}"
