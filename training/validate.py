"""First-token validation of any bank file, the same check `edge-safe train` runs every `val_every` steps.

    python -m edge_safe.training.validate BANK.gguf [--size 400] [--seed 1] [--split val]

Prints the validation summary (refusal, over-refusal per kind and order, AUC of the
refusal-opener margin, held-out compositions, modes) as JSON. Uses the val split, the
transformers copy of the bundled model (float32) and the bank's own training config for
its constraints, orders and held-out compositions. Seconds to a minute on CPU; the full
runtime evaluation is `edge-safe eval`.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

from edge_safe.convert.errors import EdgeSafeError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_safe.training.validate", description=__doc__.split("\n")[0])
    ap.add_argument("bank", help="bank file (.gguf)")
    ap.add_argument("--model", default=None, help="base model GGUF (default: the bundled Gemma 3 270M)")
    ap.add_argument("--size", type=int, default=400, help="validation decisions (default 400)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the validation cases (training uses config seed + 1)")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"),
                    help="prompt split (default val; train shows how well the tokens fit what they were trained on)")
    args = ap.parse_args(argv)
    try:
        print(json.dumps(validate_bank(args.bank, args.model, args.size, args.seed, args.split), indent=1))
    except EdgeSafeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def validate_bank(bank_path: str, model: str | None = None, size: int = 400, seed: int = 1, split: str = "val") -> dict:
    from edge_safe.convert.bank import TokenBank
    from edge_safe.convert.model import ModelInfo
    from edge_safe.models import resolve_model_path
    from edge_safe.training.base_model import load_gguf_model
    from edge_safe.training.config import TrainConfig
    from edge_safe.training.objective import Bank
    from edge_safe.training.trainer import decision_id, refusal_target_ids, validate, validation_set

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
    return validate(base, Bank.from_token_bank(bank).to(base.device), ids, cases, refuse_id)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
