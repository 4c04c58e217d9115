"""Operating curves of several banks on the eval's seeded test cases, through the runtime.

    python -m edge_safe.eval.compare runs/a.gguf=v4 runs/b.gguf=v5 --out training/curves

Writes curves.json, CURVES.md (a table per bank: AUC, the operating points at the targets)
and curves.png; the curve itself is :mod:`edge_safe.eval.curve`.
"""
from __future__ import annotations

import sys
from typing import Sequence

from edge_safe.eval.curve import at_strictness, bank_margins, curve_cases, curve_of, plot
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


def _positive(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    from edge_safe.convert.errors import EdgeSafeError
    from edge_safe.report_io import make_out_dir, write_text_atomic

    ap = argparse.ArgumentParser(prog="python -m edge_safe.eval.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("banks", nargs="+", metavar="BANK[=LABEL]", help="bank files to compare (label: the file name)")
    ap.add_argument("--out", required=True, metavar="DIR", help="folder for curves.json, CURVES.md, curves.png")
    ap.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--limit", type=_positive, default=None, help="at most N cases (quick runs)")
    ap.add_argument("--seed", type=int, default=0, help="the eval's seed (same cases as `edge-safe eval`)")
    ap.add_argument("--parallel", type=_positive, default=EvalConfig.parallel,
                    help=f"cases decided at once, batched in one decode (1: one at a time; default {EvalConfig.parallel})")
    args = ap.parse_args(argv)
    banks = []
    for spec in args.banks:
        path, _, label = spec.partition("=")
        banks.append((path, label or Path(path).stem))
    labels = [b[1] for b in banks]
    if len(set(labels)) != len(labels):
        print(f"error: two banks share a label ({', '.join(labels)}); name them BANK=LABEL", file=sys.stderr)
        return 2
    try:
        out = make_out_dir(args.out)
        results = compare(banks, args.threads, args.limit, args.seed, args.parallel)
    except EdgeSafeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["command"] = " ".join(["python -m edge_safe.eval.compare", *(argv if argv is not None else sys.argv[1:])])
    write_text_atomic(out / "curves.json", json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    write_text_atomic(out / "CURVES.md", f"Made with `{results['command']}`.\n\n{table}")
    png = plot(results, out / "curves.png")
    print(table, end="")
    for p in (out / "curves.json", out / "CURVES.md", png):
        if p:
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
