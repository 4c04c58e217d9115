"""First-token validation of any bank file, the same check `edge-safe train` runs every `val_every` steps.

    edge-safe train validate BANK.gguf [--size 400] [--seed 1] [--split val] [--runtime]

Prints the validation summary (refusal, over-refusal per kind and order, AUC of the
refusal-opener margin, held-out compositions, modes) as JSON. Uses the val split, the
transformers copy of the bundled model (float32) and the bank's own training config for
its constraints, orders and held-out compositions. Seconds to a minute on CPU; the full
runtime evaluation is `edge-safe eval`.

``--runtime`` also runs the same decisions with constraints (positive mode) through the llama.cpp
runtime (`EdgeSafe.refusal_margin`: the quantized model the bank ships with) and reports them
beside the float32 ones, with how far the two models' margins differ: the training-time check is
float32, what users get is the runtime.
"""
from __future__ import annotations

import sys

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.keys import Mode


def validate_bank(bank_path: str, model: str | None = None, size: int = 400, seed: int = 1, split: str = "val",
                  runtime: bool = False) -> dict:
    from edge_safe.convert.bank import TokenBank
    from edge_safe.convert.model import ModelInfo
    from edge_safe.models import resolve_model_path
    from edge_safe.training.base_model import load_gguf_model
    from edge_safe.training.config import TrainConfig
    from edge_safe.training.objective import trainable_bank
    from edge_safe.training.trainer import decision_id, refusal_target_ids, summarize, val_margins, validation_set

    bank = TokenBank.load(bank_path)
    model_path = resolve_model_path(model)
    bank.check_model(ModelInfo.read(model_path))  # before the slow transformers load
    known = {k: v for k, v in bank.training_config.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig.from_dict({**known, "val_size": size})
    missing = [n for n in (*cfg.constraints, *cfg.modes) if n not in bank.tokens]
    if missing:
        raise EdgeSafeError(f"{bank_path} has no token(s) {missing} that its training config names")
    base = load_gguf_model(model_path)
    cases, ids = validation_set(base, cfg, bank.template, seed, split)
    refuse_id = decision_id(refusal_target_ids(base, bank.template, list(cfg.constraints)))
    margins = val_margins(base, trainable_bank(base, bank).to(base.device), ids, cases, refuse_id)
    out = summarize(cases, [m > 0 for m in margins], margins)
    if runtime:
        out["runtime"] = _runtime(bank_path, model_path, cfg, split, cases, margins)
    return out


def _runtime(bank_path, model_path, cfg, split: str, cases, fp32: list[float]) -> dict:
    """The positive-mode decisions again, through llama.cpp, and how the two models' margins differ."""
    import numpy as np
    from tqdm.auto import tqdm

    from edge_safe.probe import Probe
    from edge_safe.runtime import EdgeSafe
    from edge_safe.training.sampler import load_prompts
    from edge_safe.training.trainer import summarize

    prompts = load_prompts(cfg.data_dir or None, split, cfg.slices)
    keep = [i for i, c in enumerate(cases) if c.constraints and c.mode in (Mode.POSITIVE, None)]
    with EdgeSafe(model_path=model_path, bank=bank_path, n_ctx=1024) as es:
        probe = Probe(es)
        rt = [probe.refusal_margin(prompts[cases[i].prompt].chat(), tokens=list(cases[i].constraints))
              for i in tqdm(keep, desc="runtime", unit="case", file=sys.stderr)]
    sub = [cases[i] for i in keep]
    out = {k: v for k, v in summarize(sub, [m > 0 for m in rt], rt).items()
           if k not in ("rejective_refusal", "negative_compliance")}
    diff = np.asarray(rt) - np.asarray([fp32[i] for i in keep])
    out["vs_float32"] = {
        "n": len(keep),
        "same_decision": round(float(np.mean([(a > 0) == (fp32[i] > 0) for a, i in zip(rt, keep)])), 4),
        "margin_shift_mean": round(float(diff.mean()), 3),
        "margin_shift_sd": round(float(diff.std()), 3),
        "margin_correlation": round(float(np.corrcoef(rt, [fp32[i] for i in keep])[0, 1]), 4),
        "note": "runtime margin: best of ' Sorry'/'Sorry' after any leading whitespace tokens; float32: the "
                "refusal's first token at the first reply position",
    }
    return out

