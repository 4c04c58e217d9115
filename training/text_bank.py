"""Build the from-text token bank: every category's rule as its own token embeddings.

Each constraint token is its rule's text embedded exactly as llama.cpp embeds
prompt tokens, so prepending it equals writing the rule as a prompt line. It is
the baseline every trained token is compared with, and the bundled default
bank until a trained one ships (``inspect`` labels it "built from text rules,
not trained"). Positive/negative modes have no rule, so only ``rejective`` is
included as a mode. No torch needed::

    edge-safe train text-bank -o edge/data/default.gguf --force
"""
from __future__ import annotations

import logging
from pathlib import Path

from edge_safe.convert.bank import TokenBank, from_text_bank, from_text_token
from edge_safe.convert.keys import Kind, Mode
from edge_safe.convert.model import ModelInfo
from edge_safe.models import llama_tokenizer, resolve_model_path
from edge_safe.training.categories import CATEGORIES, MODES, PROFILES

log = logging.getLogger(__name__)

#: The modes a text rule can express (positive/negative have no rule).
TEXT_MODES = (Mode.REJECTIVE,)


def build_text_bank(model: str | Path | None = None) -> TokenBank:
    """The from-text bank for ``model`` (default: the bundled model)."""
    path = resolve_model_path(model)
    info = ModelInfo.read(path)
    tokenize = llama_tokenizer(path)
    entries = [(c, Kind.CONSTRAINT) for c in CATEGORIES] + [(m, Kind.MODE) for m in MODES if m.name in TEXT_MODES]
    tokens = [
        from_text_token(info, tokenize, c.name, c.rule, kind=kind, description=c.description, refusal=c.refusal)
        for c, kind in entries
    ]
    return from_text_bank(info, tokens, {p: list(ms) for p, ms in PROFILES.items()})

