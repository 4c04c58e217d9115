"""Where a decision could be read: linear probes of the backbone's states under a bank's control tokens.

``edge-safe train probe-states [BANK] --out DIR`` (torch; the transformers copy of the model):

The bank's decision readout (``training/readout.py``) reads one state: the final layer's, at the first
reply token. This measures how well the same kind of probe (L2-regularised logistic regression on the
standardised state, each label weighted to half) separates the same cases from other states of the same
forward pass:

- ``block i``: the residual stream after block ``i`` (0-based, as llama.cpp's ``l_out-i``) at the first
  reply position; ``final`` is the last block's output after the final norm (what the readout reads);
- ``final @-k``: the final state ``k`` positions before the first reply position (the prompt ends with the
  template's ``\\nAnswer:``: ``@-1`` is ``Answer``, ``@-2`` the newline, ``@-3`` the last token of the user's
  message);
- pairs ``final + X``: both states side by side, with a bootstrap interval of the validation AUC gained over
  ``final`` alone (the same cases resampled for both).

Cases are the readout fit's: the third-party train parts and the repo's train split to fit, the validation
parts to score (never the test parts or the unseen StrongREJECT categories); each is laid out as the runtime
lays it out (control cells before the last user message). Figures: validation AUC over every case, over the
third-party cases and over the repo's, and the share of the third-party violating cases above the score
that refuses 5 % of their harmless ones. Float transformers states, not the quantized runtime's: a
measurement for choosing what a readout reads, not a runtime figure.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edge_safe.margins import auc


def state_names(n_layer: int, offsets: Sequence[int]) -> list[str]:
    """The states :func:`collect_states` returns, in order."""
    return [f"block {i}" for i in range(n_layer - 1)] + ["final"] + [f"final @-{k}" for k in offsets if k > 0]


def case_layout(base, template, case: dict) -> tuple[tuple[int, ...], list[int]]:
    """(ids before the control cells, ids after them) of a case's text (a prompt or a list of messages)."""
    from edge_safe.training.trainer import split_messages

    text = case["text"]
    messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
    return split_messages(base, template, messages)


def collect_states(base, bank, cases: Sequence[dict], offsets: Sequence[int] = (1, 2, 3, 4, 5),
                   max_tokens: int = 1024, batch: int = 16,
                   progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, np.ndarray], list[int]]:
    """({state name: (N, d) float32}, indices of the cases kept) for ``cases`` (dicts with ``text`` and
    ``constraints``) under ``bank`` (a trainable :class:`Bank` or :class:`DeepBank`); cases longer than
    ``max_tokens`` or shorter than the largest offset are left out."""
    import torch

    from edge_safe.convert.layout import QA_TEMPLATE
    from edge_safe.training.objective import ContextKV, batch_inputs, forward_hidden

    rows, kept = [], []
    for i, c in enumerate(cases):
        ctx, ids = case_layout(base, QA_TEMPLATE, c)
        if len(ctx) + len(ids) > max_tokens or len(ids) <= max(offsets, default=0):
            continue
        rows.append((None, tuple(c["constraints"]), ids, ctx))
        kept.append(i)
    order = sorted(range(len(rows)), key=lambda j: len(rows[j][2]) + len(rows[j][3]))  # similar lengths together
    n_layer = base.model.config.num_hidden_layers
    names = state_names(n_layer, offsets)
    out = {name: np.zeros((len(rows), base.n_embd), dtype=np.float32) for name in names}
    context_kv = ContextKV(base)
    with torch.no_grad():
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            embeds, mask, prefix = batch_inputs(base, bank, [rows[j] for j in chunk], context_kv)
            states = forward_hidden(base, embeds, mask, prefix, every_layer=True)
            last = mask.sum(1) - 1
            at = torch.arange(len(chunk))
            picked = [states[i + 1][at, last] for i in range(n_layer)]  # blocks 0 .. n-2, then final (normed)
            picked += [states[-1][at, last - k] for k in offsets if k > 0]
            for name, value in zip(names, picked):
                out[name][chunk] = value.float().cpu().numpy()
            if progress is not None:
                progress(min(start + batch, len(order)), len(order))
    return out, kept


def _fit_scores(train: np.ndarray, y: np.ndarray, val: np.ndarray, lam: float) -> np.ndarray:
    from edge_safe.training.readout import standardised_logistic

    w, b, mu, sd = standardised_logistic(train, y, lam)
    return ((val - mu) / sd) @ w + b


def _figures(s: np.ndarray, y: np.ndarray, thirdparty: np.ndarray) -> dict:
    pos, neg = y > 0, y == 0
    tp_harmless = s[thirdparty & neg]
    line = float(np.quantile(tp_harmless, 0.95)) if len(tp_harmless) else float("inf")
    tp_violating = s[thirdparty & pos]
    return {"auc": auc(s[pos], s[neg]),
            "thirdparty_auc": auc(s[thirdparty & pos], s[thirdparty & neg]),
            "repo_auc": auc(s[~thirdparty & pos], s[~thirdparty & neg]),
            "thirdparty_defense_at_5": (round(float(np.mean(tp_violating > line)), 4) if len(tp_violating) else None)}


def probe_table(train: dict[str, np.ndarray], y_train: np.ndarray, val: dict[str, np.ndarray], y_val: np.ndarray,
                thirdparty_val: np.ndarray, pairs: Sequence[str] = (), base_state: str = "final",
                lam: float = 0.01, boot: int = 300, seed: int = 0) -> list[dict]:
    """One row per state (and per ``base_state + X`` pair): the validation figures of a probe fit on ``train``
    (see the module doc); pairs also carry ``gain`` (their AUC minus ``base_state``'s alone) and its 5-95 %
    bootstrap interval ``gain_interval``."""
    y_train, y_val = np.asarray(y_train, dtype=float), np.asarray(y_val, dtype=float)
    thirdparty_val = np.asarray(thirdparty_val, dtype=bool)
    rows, scores = [], {}
    for name in train:
        scores[name] = _fit_scores(train[name].astype(np.float64), y_train, val[name].astype(np.float64), lam)
        rows.append({"state": name, **_figures(scores[name], y_val, thirdparty_val)})
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(y_val), len(y_val)) for _ in range(boot)]
    alone = scores[base_state]
    for other in pairs:
        name = f"{base_state} + {other}"
        s = _fit_scores(np.concatenate([train[base_state], train[other]], 1).astype(np.float64), y_train,
                        np.concatenate([val[base_state], val[other]], 1).astype(np.float64), lam)
        gains = []
        for i in draws:
            yy = y_val[i] > 0
            a, b = auc(s[i][yy], s[i][~yy]), auc(alone[i][yy], alone[i][~yy])
            if a is not None and b is not None:
                gains.append(a - b)
        fig = _figures(s, y_val, thirdparty_val)
        interval = [round(float(q), 4) for q in np.quantile(gains, [0.05, 0.95])] if gains else None
        rows.append({"state": name, **fig, "gain": round(fig["auc"] - _figures(alone, y_val, thirdparty_val)["auc"], 4),
                     "gain_interval": interval})
    return rows


def markdown(rows: list[dict]) -> str:
    """The table as Markdown."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f} %"

    def num(x):
        return "–" if x is None else f"{x:.4f}"

    lines = ["| state | AUC | third-party AUC | repo AUC | third-party defense at 5 % | AUC gain over final (5-95 %) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        gain = "" if "gain" not in r else f"{r['gain']:+.4f}" + (
            f" ({r['gain_interval'][0]:+.4f} .. {r['gain_interval'][1]:+.4f})" if r.get("gain_interval") else "")
        lines.append(f"| {r['state']} | {num(r['auc'])} | {num(r['thirdparty_auc'])} | {num(r['repo_auc'])} | "
                     f"{pct(r['thirdparty_defense_at_5'])} | {gain} |")
    return "\n".join(lines) + "\n"
