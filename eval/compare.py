"""Operating curves of several banks on the eval's seeded test cases, through the runtime.

    edge-safe eval compare runs/a.gguf=v4 runs/b.gguf=v5 --out training/curves

Writes curves.json, CURVES.md (a table per bank: AUC, the operating points at the targets)
and curves.png; the curve itself is :mod:`edge_safe.eval.curve`.
"""
from __future__ import annotations

from typing import Sequence

from edge_safe.eval.curve import at_strictness, bank_margins, curve_cases, curve_of
from edge_safe.eval.evaluate import EvalConfig, Evaluator


def compare(banks: Sequence[tuple[str, str]], threads: int | None, limit: int | None, seed: int,
            parallel: int = EvalConfig.parallel) -> dict:
    """The operating curve of each (path, label) bank on the eval's seeded test cases (``parallel`` at once)."""
    out = {"banks": {}}
    for path, label in banks:
        ev = Evaluator(EvalConfig(bank=path, baselines=(), n_threads=threads, limit=limit, seed=seed,
                                  parallel=parallel))
        try:
            ev.plan()
            ev.run_.start(len(curve_cases(ev)))  # the progress bar
            rows = bank_margins(ev, what=f"{label} curve")
            out["banks"][label] = {"path": path, "n_vectors": ev.bank.tokens[ev.bank.constraints[0]].n_vectors,
                                   **curve_of(rows)}
        finally:
            ev.run_.stop()
            ev.close()
    return out


def markdown(results: dict) -> str:
    """A table per bank: AUC, the operating points at the targets, and the rates at strictness 0."""
    lines = ["| bank | vectors/token | AUC (near-miss / inactive / general) | defense at strictness 0 | "
             "over-refusal at 0 | over-refusal at 95 % defense | defense at 5 % over-refusal | "
             "defense at 10 % over-refusal |", "|---|---|---|---|---|---|---|---|"]
    for label, c in results["banks"].items():
        by = c["auc_by_kind"]
        zero = at_strictness(c, 0.0)
        o95 = c.get("over_refusal_at_defense", {}).get("0.95")
        d5 = c.get("defense_at_over_refusal", {}).get("0.05")
        d10 = c.get("defense_at_over_refusal", {}).get("0.1")
        lines.append(
            f"| {label} | {c.get('n_vectors', '–')} | {c['auc']:.3f} ({by.get('near-miss', 0):.3f} / "
            f"{by.get('inactive', 0):.3f} / {by.get('general', 0):.3f}) | {zero['defense']:.1%} | "
            f"{zero['over_refusal']:.1%} | {_pt(o95, 'over_refusal')} | {_pt(d5, 'defense')} | {_pt(d10, 'defense')} |")
    return "\n".join(lines) + "\n"


def _pt(p: dict | None, key: str) -> str:
    if not p:
        return "–"
    s = "none" if p["strictness"] is None else f"{p['strictness']:+.2f}"
    return f"{p[key]:.1%} (s {s})"

