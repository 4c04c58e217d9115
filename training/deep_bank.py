"""A shallow bank as deep tokens: each token's K/V rows are what the frozen model computes for its vectors.

    edge-safe train deep-bank edge/data/default.gguf -o runs/deep0.gguf [--model M] [--force]

The result is the step 0 of ``kind: deep`` training from that bank (``init_bank``): through the
runtime it costs no prefill, and it acts like the shallow bank up to positions (its prompt
starts right after BOS instead of after the vectors; the keys are rotated to sit right before it). Useful to benchmark deep tokens
(``edge-safe bench --bank``) and as a baseline for trained ones.
"""
from __future__ import annotations

from dataclasses import replace


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


def deep_bank_of(bank_path, model=None):
    """The deep copy of the bank file at ``bank_path`` for ``model`` (default: the bundled one)."""
    from edge_safe.convert.bank import TokenBank
    from edge_safe.convert.model import ModelInfo
    from edge_safe.models import resolve_model_path
    from edge_safe.training.base_model import load_gguf_model

    bank = TokenBank.load(bank_path)
    model = resolve_model_path(model)
    bank.check_model(ModelInfo.read(model))  # before the slow transformers load
    return deep_from_shallow(load_gguf_model(model), bank)
