"""Evaluation output: results.json, cases.jsonl, RESULTS.md, plots, and the bank's eval summary.

Everything here reads the plain-JSON results of :class:`edge_safe.eval.evaluate.Evaluator`,
so a report can be rebuilt from a saved ``results.json`` without running the model.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.eval.markdown import sections, system_order
from edge_safe.eval import reporting
from edge_safe.eval.reporting import make_out_dir, save_figure, write_json, write_text_atomic
from edge_safe.convert.keys import Mode

log = logging.getLogger(__name__)



# --- files ---------------------------------------------------------------------------------


def write_outputs(results: dict, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """results.json (every figure + config), cases.jsonl (every decision), RESULTS.md and plots/*.png."""
    out = make_out_dir(out_dir)
    figures = {k: v for k, v in results.items() if k != "records"}
    written = [write_json(out / "results.json", figures)]
    if "records" in results:  # absent when the report is rebuilt from a saved results.json
        written.append(write_text_atomic(out / "cases.jsonl", "".join(json.dumps(r) + "\n" for r in results["records"])))
    notes = []
    if plots:
        made, note = write_plots(figures, out / "plots")
        written += made
        if note:
            notes.append(note)
    written.append(write_text_atomic(out / "RESULTS.md", markdown(figures, plot_notes=notes, plots=plots)))
    return written


def load_results(path: str | Path) -> dict:
    """A saved evaluation results.json (``edge-safe eval --from-results``)."""
    return reporting.load_results(path, "evaluation results")


# --- the bank's eval summary ---------------------------------------------------------------------


def headline(results: dict) -> dict:
    """The figures stored in the bank's eval_summary (shown by `edge-safe convert inspect`)."""
    sysd = results["systems"]
    bank = sysd["bank"]
    rate = lambda c: c.get("rate") if c else None  # noqa: E731
    out = {
        "date": results.get("date", ""),
        "data": Path(results["data"]["path"]).name,
        "cases": results["n_cases"],
        "strictness": results["config"].get("strictness", 0.0),
        "defense": rate(bank["overall"]["defense"]),
        "over_refusal": rate(bank["overall"]["over_refusal"]),
        "unclear": bank["overall"]["unclear"],
        "defense_any_refusal": bank["overall"].get("defense_any"),
        "over_refusal_any_refusal": bank["overall"].get("over_refusal_any"),
        "per_order": {g: {"defense": rate(s["defense"]), "over_refusal": rate(s["over_refusal"])}
                      for g, s in bank["per_order"].items()},
    }
    texts, right = bank.get("refusal_texts", {}).get("violating"), bank.get("right_refusal", {})
    if texts and texts["refusal_like"]:
        out["refusals_that_are_bank_texts"] = round(texts["bank_text"] / texts["refusal_like"], 4)
    if right.get("n"):
        out["refusals_naming_the_violated_constraint"] = round(right["own_category"] / right["n"], 4)
    out["exact_refusals"] = results["config"].get("exact_refusals", False)
    if bank.get("held_out", {}).get("held-out"):
        h = bank["held_out"]["held-out"]
        out["held_out"] = {"defense": rate(h["defense"]), "over_refusal": rate(h["over_refusal"])}
    curve = results.get("operating_curve", {})
    if curve.get("auc") is not None:
        out["decision_auc"] = curve["auc"]
        for key in ("over_refusal_at_defense", "defense_at_over_refusal"):
            if curve.get(key):
                out[key] = {level: p and {k: p[k] for k in ("defense", "over_refusal", "strictness")}
                            for level, p in curve[key].items()}
    inv = results.get("order_invariance", {})
    if inv.get("agreement") is not None:
        out["order_invariance"] = inv["agreement"]
    rej = results.get("modes", {}).get(Mode.REJECTIVE, {}).get("bank")
    if rej:
        out["rejective_refusal"] = rate(rej["all"])
        out["rejective_any_refusal"] = rej.get("any_refusal")
    neg = results.get("modes", {}).get(Mode.NEGATIVE, {}).get(Mode.NEGATIVE)
    if neg:
        out["negative_compliance"] = neg["compliance"]
    sam = results.get("sam", {}).get("bank", {})
    if sam.get("sam") is not None:
        out["sam"] = sam["sam"]
    util = results.get("utility", {}).get("bank")
    if util:
        out["kl"], out["greedy_agreement"] = util["kl"], util["agreement"]
    for name in ("text-rules", "from-text"):
        if name in sysd:
            o = sysd[name]["overall"]
            out[name.replace("-", "_")] = {"defense": rate(o["defense"]), "over_refusal": rate(o["over_refusal"])}
    slices = {k: v for k, v in (results.get("slices") or {}).items() if k != "config"}
    if slices:
        out["slices"] = {k: {"n": v["n"], "defense": rate(v["defense"]), "over_refusal": rate(v["over_refusal"]),
                             "answered_after_refusal": v.get("answered_after_refusal"), "auc": v["curve"].get("auc")}
                         for k, v in slices.items()}
    out["command"] = results["config"].get("command", "")
    return out


def write_summary(bank_path: str | Path, results: dict) -> Path:
    """Store ``headline(results)`` as eval_summary["eval"] of the bank file, atomically.

    Refuses when the bank's vectors differ from the ones evaluated. The file is
    rewritten through ``TokenBank.save`` (temp file + rename, same tensor type),
    so a failure leaves the old bank in place.
    """
    from edge_safe.convert.bank import TokenBank
    from edge_safe.convert.bank_io import stored_dtype
    from edge_safe.eval.evaluate import vectors_sha256

    path = Path(bank_path)
    bank = TokenBank.load(path)
    if vectors_sha256(bank) != results["bank"]["vectors_sha256"]:
        raise EdgeSafeError(
            f"{path} is not the bank these results are for (its vectors differ from "
            f"{results['bank']['path']}); evaluate it again or pass the matching --bank"
        )
    summary = {**bank.eval_summary, "eval": headline(results)}
    return replace(bank, eval_summary=summary).save(path, force=True, dtype=stored_dtype(path))


# --- markdown --------------------------------------------------------------------------------


def markdown(r: dict, plot_notes: list[str] = (), plots: bool = True) -> str:
    """RESULTS.md: every table of the run."""
    return "\n".join(sections(r, plot_notes, plots)) + "\n"


# --- plots --------------------------------------------------------------------------------------


def write_plots(results: dict, folder: Path) -> tuple[list[Path], str | None]:
    """plots/per_order.png, plots/per_category.png and plots/operating_curve.png; skipped with a note without matplotlib."""
    return reporting.write_plots(results, folder, (_plot_per_order, _plot_per_category, _plot_curve))


def _plot_per_order(results: dict, folder: Path, plt) -> Path:
    names, sysd = system_order(results), results["systems"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    groups = list(sysd["bank"]["per_order"])
    for ax, metric, title in ((axes[0], "defense", "defense success (higher is better)"),
                              (axes[1], "over_refusal", "over-refusal (lower is better)")):
        for name in names:
            ys = [_rate(sysd[name]["per_order"].get(g, {}).get(metric)) for g in groups]
            ax.plot(groups, ys, marker="o", label=sysd[name]["label"])
        ax.set_title(title)
        ax.set_xlabel("order (active constraints)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, folder / "per_order.png", plt)


def _plot_per_category(results: dict, folder: Path, plt) -> Path:
    names, sysd = system_order(results), results["systems"]
    cats = [c for c, s in sysd["bank"]["per_category"].items()
            if c != "general" and (s["defense"]["n"] or s["near_miss"]["n"])]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(cats) + 2), 7))
    width = 0.8 / max(1, len(names))
    for ax, metric, title in ((axes[0], "defense", "defense success per category (higher is better)"),
                              (axes[1], "near_miss", "near-miss over-refusal per category (lower is better)")):
        for k, name in enumerate(names):
            ys = [_rate(sysd[name]["per_category"].get(c, {}).get(metric)) or 0.0 for c in cats]
            ax.bar([i + k * width for i in range(len(cats))], ys, width, label=sysd[name]["label"])
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(cats))], cats)
        ax.set_ylim(0, 1.03)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, folder / "per_category.png", plt)


def _plot_curve(results: dict, folder: Path, plt) -> Path | None:
    if results.get("operating_curve", {}).get("auc") is None:
        return None
    from edge_safe.eval.curve import plot

    return plot({"banks": {"bank": results["operating_curve"]}}, folder / "operating_curve.png",
                title="The bank's operating curve over strictness (this run's cases)")


def _rate(c: dict | None) -> float | None:
    return c["rate"] if c and c.get("n") else None
