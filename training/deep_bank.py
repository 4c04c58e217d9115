"""A shallow bank as deep tokens: each token's K/V rows are what the frozen model computes for its vectors.

    python -m edge_safe.training.deep_bank edge/data/default.gguf -o runs/deep0.gguf [--model M] [--force]

The result is the step 0 of ``kind: deep`` training from that bank (``init_bank``): through the
runtime it costs no prefill, and it acts like the shallow bank up to positions (its prompt
starts right after BOS instead of after the vectors; the keys are rotated to sit right before it). Useful to benchmark deep tokens
(``edge-safe bench --bank``) and as a baseline for trained ones.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from edge_safe.convert.errors import EdgeSafeError


def deep_from_shallow(base, bank):
    """A copy of ``bank`` whose shallow tokens are deep tokens (torch; ``base`` is a loaded BaseModel)."""
    import torch

    from edge_safe.convert.bank import BankToken
    from edge_safe.training.objective import kv_of_inputs

    tokens = {}
    for name, tok in bank.tokens.items():
        if tok.is_deep:
            tokens[name] = tok
            continue
        keys, values = (t.numpy() for t in kv_of_inputs(base, torch.tensor(tok.vectors)))
        tokens[name] = BankToken.deep(name, tok.kind, keys, values, description=tok.description,
                                      refusal=tok.refusal, rule=tok.rule, origin=tok.origin)
    out = replace(bank, tokens=tokens, name=f"{bank.name} (deep: K/V of its vectors)",
                  training_config={**bank.training_config, "deep_from_shallow": True})
    out.validate()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_safe.training.deep_bank", description=__doc__.split("\n")[0])
    ap.add_argument("bank")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--model", default=None, help="the base GGUF (default: the bundled one)")
    ap.add_argument("--dtype", default="F16", choices=("F16", "F32"))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        from edge_safe.convert.bank import TokenBank
        from edge_safe.convert.model import ModelInfo
        from edge_safe.models import resolve_model_path
        from edge_safe.training.base_model import load_gguf_model

        bank = TokenBank.load(args.bank)
        model = resolve_model_path(args.model)
        bank.check_model(ModelInfo.read(model))  # before the slow transformers load
        deep = deep_from_shallow(load_gguf_model(model), bank)
        path = deep.save(args.output, force=args.force, dtype=args.dtype)
    except EdgeSafeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cells = sum(t.n_vectors for t in deep.tokens.values())
    print(f"wrote {path}: {len(deep.tokens)} deep tokens, {cells} cells of {deep.deep_geometry[0]} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
