"""`edge-safe bench` plots: TTFT per composition, and prefill positions vs TTFT.

matplotlib is imported only here and only when plots are written; without it the
report says the plots were skipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_safe.eval import reporting
from edge_safe.eval.reporting import save_figure

PLOTS = ("ttft_per_composition.png", "prefill_vs_ttft.png")


def write_plots(results: dict, folder: Path) -> tuple[list[Path], str | None]:
    """plots/ttft_per_composition.png and plots/prefill_vs_ttft.png; skipped with a note without matplotlib."""
    return reporting.write_plots(results, folder, (_plot_ttft, _plot_prefill, _plot_concurrency))


def _plot_concurrency(r: dict, folder: Path, plt) -> Path | None:
    if not r.get("concurrency"):
        return None
    from edge_safe.bench.concurrency import plot

    return plot(r["concurrency"], folder / "concurrency.png", plt)


def _plot_ttft(r: dict, folder: Path, plt) -> Path:
    rows = []  # (label, summary, colour)
    for lb, c in r["compositions"].items():
        rows += [(f"{lb} cold", c["ttft_cold_s"], "tab:blue"), (f"{lb} warm", c["ttft_warm_s"], "tab:green")]
    for lb, b in r["baselines"].items():
        rows += [(f"text rules {lb} cold", b["text-cold"], "tab:red"),
                 (f"text rules {lb} warm", b["text-warm"], "tab:orange"),
                 (f"guard {lb} cold", b["guard-cold"], "tab:purple"),
                 (f"guard {lb} warm", b["guard-warm"], "tab:pink")]
    rows.append(("bare Llama", r["bare"]["ttft_s"], "black"))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.24 * len(rows)))
    ys = np.arange(len(rows))[::-1]
    med = np.array([s["median"] for _, s, _ in rows]) * 1e3
    err = np.array([[s["median"] - s["p25"], s["p75"] - s["median"]] for _, s, _ in rows]).T * 1e3
    ax.barh(ys, med, xerr=err, color=[c for _, _, c in rows], alpha=0.85, capsize=2)
    ax.axvline(r["bare"]["ttft_s"]["median"] * 1e3, color="black", ls="--", lw=0.8, label="bare")
    ax.set_yticks(ys, [lb for lb, _, _ in rows], fontsize=7)
    ax.set_xlabel("time to first token, ms (median, p25–p75)")
    ax.set_title(f"TTFT per composition — {r['machine']['cpu']}, {r['config']['n_threads']} thread(s), "
                 f"n = {r['config']['repeats']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, folder / PLOTS[0], plt)


def _plot_prefill(r: dict, folder: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    comps, bases = r["compositions"].values(), r["baselines"].values()
    groups = {  # name: (marker, colour, [(positions, TTFT summary)])
        "edge-safe cold": ("o", "tab:blue", [(c["cold_positions"], c["ttft_cold_s"]) for c in comps]),
        "edge-safe warm": ("^", "tab:green", [(c["warm_positions"], c["ttft_warm_s"]) for c in comps]),
        "text rules cold": ("s", "tab:red", [(b["text-cold"]["positions"], b["text-cold"]) for b in bases]),
        "text rules warm": ("D", "tab:orange", [(b["text-warm"]["positions"], b["text-warm"]) for b in bases]),
        "guard (both calls)": ("x", "tab:purple", [(b[v]["positions"], b[v]) for b in bases
                                                   for v in ("guard-cold", "guard-warm")]),
        "bare Llama": ("*", "black", [(r["bare"]["positions"], r["bare"]["ttft_s"])]),
    }
    for name, (marker, colour, pts) in groups.items():
        if pts:
            ax.scatter([p for p, _ in pts], [s["median"] * 1e3 for _, s in pts], marker=marker, color=colour,
                       label=name, s=36 if marker != "*" else 120, zorder=3)
    fit = prefill_fit(r)
    if fit:
        x = np.linspace(0, max(c["cold_positions"] for c in r["compositions"].values()) * 1.1 + 10, 50)
        ax.plot(x, (fit["intercept_s"] + fit["per_position_s"] * x) * 1e3, color="grey", lw=0.8, ls="--",
                label=f"cold fit: {fit['intercept_s'] * 1e3:.0f} ms + {fit['per_position_s'] * 1e3:.2f} ms/pos")
    ax.set_xlabel("prefill positions (decoded for the request)")
    ax.set_ylabel("TTFT, ms (median)")
    ax.set_title("prefill positions vs time to first token", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, folder / PLOTS[1], plt)


def prefill_fit(r: dict) -> dict | None:
    """Least-squares TTFT = a + b × positions over the cold points (edge-safe cold, text cold, bare)."""
    xs, ys = [r["bare"]["positions"]], [r["bare"]["ttft_s"]["median"]]
    for c in r["compositions"].values():
        xs.append(c["cold_positions"])
        ys.append(c["ttft_cold_s"]["median"])
    for b in r["baselines"].values():
        xs.append(b["text-cold"]["positions"])
        ys.append(b["text-cold"]["median"])
    if len(set(xs)) < 2:
        return None
    b, a = np.polyfit(xs, ys, 1)
    pred = a + b * np.asarray(xs)
    ss = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2))
    r2 = 1 - float(np.sum((np.asarray(ys) - pred) ** 2)) / ss if ss else 1.0
    return {"intercept_s": float(a), "per_position_s": float(b), "r2": r2, "n": len(xs)}
