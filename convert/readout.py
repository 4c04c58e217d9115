"""The bank's decision readout: whether a reply refuses, read linearly off the first reply token's logits.

A bank may carry a readout (``edge_safe.readout``, docs/DESIGN.md "The decision readout"): token ids and
weights such that

    score = weights · logits[ids] + bias

is the log-odds that the request, under the active control tokens, should be refused. Gemma's logits are
the tied embedding matrix times the final hidden state, so ``ids`` is chosen to span that state (1 024 rows
of a 640-wide model recover it exactly) and the readout is a linear probe of the state the control tokens
left, fit on requests written by other people (``training/readout.py``). Where a bank has one, the runtime
decides by it instead of the refusal-opener margin: the reply refuses iff ``score + strictness > 0`` at its
first token (for each view the reply reads); the refusal itself is still the model's own opener finished
as the constraint's exact refusal. numpy only (the runtime never imports torch).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BankFormatError

VERSION = 1
WHERE = "first-reply-token"  # the position its logits are read at


@dataclass(frozen=True)
class Readout:
    """``score(logits) = weights · logits[ids] + bias`` (log-odds of refusing)."""

    ids: np.ndarray  # (K,) int64 token ids, ascending, unique
    weights: np.ndarray  # (K,) float32
    bias: float
    fit: dict = field(default_factory=dict)  # how it was made: data, regularisation, validation figures

    def __post_init__(self):
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int64))
        object.__setattr__(self, "weights", np.asarray(self.weights, dtype=np.float32))
        self.validate()

    def validate(self) -> None:
        """Raises BankFormatError naming what is wrong."""
        ids, w = self.ids, self.weights
        if ids.ndim != 1 or w.ndim != 1 or len(ids) != len(w) or not len(ids):
            raise BankFormatError(f"the readout needs as many weights as token ids (1 or more); it has {ids.size} ids "
                                  f"and {w.size} weights: re-fit it (edge-safe train readout)")
        if np.any(np.diff(ids) <= 0) or ids[0] < 0:
            raise BankFormatError("the readout's token ids must be ascending, unique and >= 0: re-fit it")
        if not np.all(np.isfinite(w)) or not math.isfinite(self.bias):
            raise BankFormatError("the readout holds non-finite weights: re-fit it")

    def score(self, logits: np.ndarray) -> float:
        """Log-odds of refusing, from one position's logits (n_vocab,)."""
        return float(np.dot(np.asarray(logits[self.ids], dtype=np.float64), self.weights) + self.bias)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "where": WHERE, "bias": float(self.bias),
                           "ids": [int(i) for i in self.ids],
                           "weights": [float(f"{x:.7g}") for x in self.weights.tolist()], "fit": self.fit},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, what: str = "edge_safe.readout") -> "Readout":
        try:
            obj: Any = json.loads(text)
        except ValueError as e:
            raise BankFormatError(f"{what} is not valid JSON ({e}); re-fit the readout") from None
        if not isinstance(obj, dict):
            raise BankFormatError(f"{what} must be a JSON object")
        version = obj.get("version")
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise BankFormatError(f"{what} has version {version!r}; this edge-safe reads version {VERSION} "
                                  "(upgrade edge-safe for newer banks)")
        if obj.get("where") != WHERE:
            raise BankFormatError(f"{what} is read at {obj.get('where')!r}; this edge-safe reads it at {WHERE!r}")
        try:
            return cls(np.asarray(obj["ids"], dtype=np.int64), np.asarray(obj["weights"], dtype=np.float32),
                       float(obj["bias"]), dict(obj.get("fit") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise BankFormatError(f"{what} lacks or mistypes a field ({e}); re-fit the readout") from None
