"""Concurrent clients on the batching engine against the same requests one at a time, in one run.

    edge-safe bench concurrency --quick --threads 2 --out runs/concurrency
    results = run_concurrency(es, ConcurrencyConfig(levels=(1, 2, 4, 8)))   # inside `edge-safe bench`

The same request list (benign prompts that get long answers, compositions cycling through a mix)
is served (a) one request at a time (each waits for the previous one), then (b) by an
:class:`~edge_safe.engine.Engine` with ``max(levels)`` sequences to ``c`` closed-loop client
threads for each level ``c`` (each client sends its next request when the last one is done).
Per level: aggregate decode throughput (completion tokens of every request / wall time of the
level, so prefill and queueing count against it) and TTFT percentiles (request sent -> first
token sampled, from ``RequestStats.ttft_s``). A warm-up pass fills both prefix caches first, so
every measured request restores its composition's prefix (a composition switch).
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from edge_safe.convert.errors import EdgeSafeError

QUESTIONS = (  # benign, answered at length by the base model
    "Tell me about the history of the bicycle.",
    "Describe how a steam engine works.",
    "Tell me about the city of Lima.",
    "Explain how bread is made.",
)
MIX = ("none", "minors", "eu", "minors,eu")  # compositions the requests cycle through


@dataclass(frozen=True)
class ConcurrencyConfig:
    levels: tuple[int, ...] = (1, 2, 4, 8)  # concurrent clients per measured level
    requests: int = 16  # requests per level (and one at a time); a multiple of each level keeps clients equal
    max_tokens: int = 32  # completion budget of every request
    rounds: int = 2  # each round measures one at a time and every level once (interleaved: slow drifts of a
    # shared machine's load hit every variant alike); figures pool the rounds
    compositions: tuple[str, ...] = MIX  # cycled through by the requests (labels as in `edge-safe bench`)


#: `edge-safe bench concurrency --quick`: a smoke run.
QUICK = ConcurrencyConfig(levels=(1, 2, 4), requests=8, max_tokens=16, rounds=1)


def request_list(cfg: ConcurrencyConfig) -> list[tuple[str, str]]:
    """(question, composition label) of each request: questions and compositions interleaved."""
    return [(QUESTIONS[i % len(QUESTIONS)], cfg.compositions[(i // len(QUESTIONS) + i) % len(cfg.compositions)])
            for i in range(cfg.requests)]


def _tokens(label: str) -> str | None:
    return None if label == "none" else label


def run_concurrency(es, cfg: ConcurrencyConfig, progress=None) -> dict:
    """Measure one-at-a-time and every level on ``es`` (an EdgeSafe with ``n_parallel >= max(levels)``);
    plain JSON (see the module doc)."""
    if es.n_parallel < max(cfg.levels):
        raise EdgeSafeError(f"the concurrency bench needs EdgeSafe(n_parallel={max(cfg.levels)}), got {es.n_parallel}")
    reqs = request_list(cfg)
    tick = progress or (lambda what: None)
    for q, lb in dict.fromkeys(reqs):  # warm-up: every composition's prefix in the snapshot cache
        "".join(es.submit(q, tokens=_tokens(lb), max_tokens=2))
    samples: dict[str, list[dict]] = {}
    for r in range(cfg.rounds):
        tick(f"round {r + 1}/{cfg.rounds}: one at a time")
        samples.setdefault("alone", []).append(_alone(es, reqs, cfg.max_tokens))
        for c in cfg.levels:
            tick(f"round {r + 1}/{cfg.rounds}: {c} clients")
            samples.setdefault(str(c), []).append(_level(es, reqs, c, cfg.max_tokens))
    alone = _pool(samples.pop("alone"))
    levels = {c: _pool(rows) for c, rows in samples.items()}
    base_tps, base_ttft = levels[str(min(cfg.levels))]["tokens_per_s"], levels[str(min(cfg.levels))]["ttft_s"]["p50"]
    for row in levels.values():
        row["tokens_per_s_vs_one_client"] = row["tokens_per_s"] / base_tps
        row["tokens_per_s_vs_one_at_a_time"] = row["tokens_per_s"] / alone["tokens_per_s"]
        row["ttft_p50_vs_one_client"] = row["ttft_s"]["p50"] / base_ttft
    return {"config": {**asdict(cfg), "levels": list(cfg.levels), "compositions": list(cfg.compositions)},
            "parallel": max(cfg.levels), "requests": [list(r) for r in reqs], "one_at_a_time": alone,
            "levels": levels, "targets": targets(levels)}


def _alone(es, reqs, max_tokens) -> dict:
    ttft, tokens = [], 0
    t0 = time.perf_counter()
    for q, lb in reqs:
        job = es.submit(q, tokens=_tokens(lb), max_tokens=max_tokens)
        "".join(job)
        ttft.append(job.stats.ttft_s)
        tokens += job.stats.completion_tokens
    return _row(time.perf_counter() - t0, tokens, ttft, len(reqs))


def _level(es, reqs, clients: int, max_tokens: int) -> dict:
    todo = list(enumerate(reqs))
    lock = threading.Lock()
    stats = [None] * len(reqs)
    errors: list[BaseException] = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i, (q, lb) = todo.pop(0)
            try:
                job = es.submit(q, tokens=_tokens(lb), max_tokens=max_tokens)
                "".join(job)
                stats[i] = job.stats
            except BaseException as e:  # reported, not hidden: the bench fails
                errors.append(e)
                return

    steps0 = es.engine.steps
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    row = _row(wall, sum(s.completion_tokens for s in stats), [s.ttft_s for s in stats], len(reqs))
    row["decode_steps"] = es.engine.steps - steps0
    return row


def _pool(rows: list[dict]) -> dict:
    """One row from a level's rounds: tokens and seconds summed, TTFTs pooled."""
    out = _row(sum(r["seconds"] for r in rows), sum(r["completion_tokens"] for r in rows),
               [v for r in rows for v in r["ttft_s"]["values"]], sum(r["requests"] for r in rows))
    out["tokens_per_s_per_round"] = [r["tokens_per_s"] for r in rows]
    if "decode_steps" in rows[0]:
        out["decode_steps"] = sum(r["decode_steps"] for r in rows)
    return out


def _row(wall: float, tokens: int, ttft: list[float], n: int) -> dict:
    p50, p95 = (float(v) for v in np.percentile(ttft, [50, 95]))
    return {"requests": n, "seconds": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_s": {"p50": p50, "p95": p95, "values": [float(v) for v in ttft]}}


def targets(levels: dict) -> list[dict]:
    """The concurrency targets at 4 clients (mixed compositions) against one client, within this run."""
    four = levels.get("4")
    tps = four and four["tokens_per_s_vs_one_client"]
    ttft = four and four["ttft_p50_vs_one_client"]
    return [
        {"target": "aggregate decode throughput, 4 clients vs 1", "goal": "≥ 2.5×", "value": tps,
         "pass": None if tps is None else tps >= 2.5},
        {"target": "p50 TTFT, 4 clients vs 1", "goal": "≤ 1.5×", "value": ttft,
         "pass": None if ttft is None else ttft <= 1.5},
    ]


def markdown(res: dict) -> list[str]:
    """The concurrency section of RESULTS.md."""
    a = res["one_at_a_time"]
    lines = ["## Concurrent clients (batching engine)", "",
             f"{len(res['requests'])} requests per level and round ({res['config'].get('rounds', 1)} rounds, interleaved) ({', '.join(res['config']['compositions'])} interleaved, "
             f"≤ {res['config']['max_tokens']} tokens each), closed-loop clients, engine with {res['parallel']} "
             "sequences; throughput = completion tokens / wall time of the level (prefill and waiting included).", "",
             "| clients | tok/s (aggregate) | × 1 client | × one at a time | TTFT p50 | TTFT p95 | p50 × 1 client | "
             "decode steps |", "|---|---|---|---|---|---|---|---|",
             f"| one at a time (sequential requests) | {a['tokens_per_s']:.1f} | – | 1.00× | "
             f"{a['ttft_s']['p50'] * 1e3:.0f} ms | {a['ttft_s']['p95'] * 1e3:.0f} ms | – | – |"]
    for c, r in res["levels"].items():
        lines.append(f"| {c} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_vs_one_client']:.2f}× | "
                     f"{r['tokens_per_s_vs_one_at_a_time']:.2f}× | {r['ttft_s']['p50'] * 1e3:.0f} ms | "
                     f"{r['ttft_s']['p95'] * 1e3:.0f} ms | {r['ttft_p50_vs_one_client']:.2f}× | {r['decode_steps']} |")
    lines += ["", "| target | goal | this run | result |", "|---|---|---|---|"]
    for t in res["targets"]:
        v = "–" if t["value"] is None else f"{t['value']:.2f}×"
        verdict = "n/a" if t["pass"] is None else ("**pass**" if t["pass"] else "**miss**")
        lines.append(f"| {t['target']} | {t['goal']} | {v} | {verdict} |")
    return lines


def plot(res: dict, path, plt):
    """Aggregate tok/s and TTFT p50/p95 against the number of clients; one-at-a-time as dashed lines."""
    from edge_safe.eval.reporting import save_figure

    cs = [int(c) for c in res["levels"]]
    rows = list(res["levels"].values())
    a = res["one_at_a_time"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    ax1.plot(cs, [r["tokens_per_s"] for r in rows], marker="o", label="engine")
    ax1.axhline(a["tokens_per_s"], ls="--", color="grey", label="one at a time")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("aggregate decode tokens/s")
    ax2.plot(cs, [r["ttft_s"]["p50"] * 1e3 for r in rows], marker="o", label="p50")
    ax2.plot(cs, [r["ttft_s"]["p95"] * 1e3 for r in rows], marker="^", label="p95")
    ax2.axhline(a["ttft_s"]["p50"] * 1e3, ls="--", color="grey", label="one at a time p50")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("TTFT (ms)")
    for ax in (ax1, ax2):
        ax.set_xticks(cs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Mixed compositions, one batch per step", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, plt)


def standalone(cfg: ConcurrencyConfig, threads: int | None = None, progress=None) -> dict:
    """``edge-safe bench concurrency``: the measurement on its own runtime (the bundled model and bank)."""
    from edge_safe.runtime import EdgeSafe

    with EdgeSafe(n_threads=threads, n_ctx=512, n_parallel=max(cfg.levels)) as es:
        return run_concurrency(es, cfg, progress=progress)


def write_report(res: dict, out) -> tuple[str, list]:
    """concurrency.json, CONCURRENCY.md and concurrency.png in ``out``; returns (the markdown, paths written)."""
    from edge_safe.eval.reporting import make_out_dir, pyplot, write_json, write_text_atomic

    out = make_out_dir(out)
    text = "\n".join([f"Made with `{res['command']}`.", "", *markdown(res)]) + "\n"
    written = [write_json(out / "concurrency.json", res), write_text_atomic(out / "CONCURRENCY.md", text)]
    plt = pyplot()
    if plt is not None:
        written.append(plot(res, out / "concurrency.png", plt))
    return text, written
