"""First-token validation of any bank file, the same check `edge-safe train` runs every `val_every` steps.

    python -m edge_safe.training.validate BANK.gguf [--size 400] [--seed 1]

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
    args = ap.parse_args(argv)
    try:
        print(json.dumps(validate_bank(args.bank, args.model, args.size, args.seed), indent=1))
    except EdgeSafeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def validate_bank(bank_path: str, model: str | None = None, size: int = 400, seed: int = 1) -> dict:
    import torch

    from edge_safe.convert.bank import TokenBank
    from edge_safe.convert.model import ModelInfo
    from edge_safe.models import resolve_model_path
    from edge_safe.training.base_model import load_gguf_model
    from edge_safe.training.config import TrainConfig
    from edge_safe.training.objective import Bank
    from edge_safe.training.sampler import load_prompts
    from edge_safe.training.trainer import make_val_cases, refusal_target_ids, validate

    bank = TokenBank.load(bank_path)
    model_path = resolve_model_path(model)
    bank.check_model(ModelInfo.read(model_path))  # before the slow transformers load
    base = load_gguf_model(model_path)
    known = {k: v for k, v in bank.training_config.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig.from_dict({**known, "val_size": size})
    missing = [n for n in (*cfg.constraints, *cfg.modes) if n not in bank.tokens]
    if missing:
        raise EdgeSafeError(f"{bank_path} has no token(s) {missing} that its training config names")
    params = Bank({n: torch.tensor(t.vectors, dtype=torch.float32) for n, t in bank.tokens.items()}).to(base.device)
    prompts = load_prompts(cfg.data_dir or None, "val")
    cases = make_val_cases(prompts, cfg, random.Random(seed))
    ids = [base.tokenize(bank.template.prompt(p.text)) for p in prompts]
    refuse_id = next(iter(refusal_target_ids(base, bank.template, list(cfg.constraints)).values()))[0]
    return validate(base, params, ids, cases, refuse_id)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
