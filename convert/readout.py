"""The bank's decision readout: whether a reply refuses, read linearly off the first reply token's logits.

A bank may carry a readout (``edge_safe.readout``, docs/DESIGN.md "The decision readout"): token ids and
weights such that

    score = weights · logits[ids] + bias

is the log-odds that the request, under the active control tokens, should be refused (a version 2 readout
also reads the logits of rows before the first reply token's, ``offsets`` back from the prompt's last
token: ``score = Σ_k weights_k · logits_k[ids] + bias``, ``weights`` stored offset by offset). Gemma's logits are
the tied embedding matrix times the final hidden state, so ``ids`` is chosen to span that state (1 024 rows
of a 640-wide model recover it exactly) and the readout is a linear probe of the state the control tokens
left, fit on requests written by other people (``training/readout.py``). Where a bank has one, the runtime
decides by it instead of the refusal-opener margin: the reply refuses iff ``score + strictness > 0`` at its
first token (for each view the reply reads); the refusal itself is still the model's own opener finished
as the constraint's exact refusal. numpy only (the runtime never imports torch).

A version 3 readout is also calibrated per constraint (``calibration``: log-odds added to the bias where that
constraint is active, chosen so that each constraint alone refuses about as much ordinary traffic as the
default allows; ``edge-safe train calibrate``). A composition takes the smallest offset of its constraints
(adding constraints makes ordinary requests look no safer, so a composition has no more room than its
tightest member); a constraint the table does not name takes 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from .errors import BankFormatError, EdgeSafeError

VERSION = 3  # 1: the first reply token's logits alone; 2: also rows before it (``offsets``); 3: ``calibration``
WHERE = "first-reply-token"  # the position its logits are read at
MAX_OFFSET = 8  # rows further back than this are not read (the reply header is 5 tokens)
MAX_CALIBRATION = 5.0  # a constraint's offset is within 0..this many log-odds (stricter only, never laxer)


def offsets_problem(offsets) -> str | None:
    """What is wrong with a readout's rows (``offsets``), or None: they start with 0 (the first reply token's) and
    ascend, unique, to at most :data:`MAX_OFFSET`, as whole numbers."""
    offsets = list(offsets)
    if (not offsets or offsets[0] != 0 or any(not isinstance(k, int) or isinstance(k, bool) for k in offsets)
            or offsets != sorted(set(offsets)) or offsets[-1] > MAX_OFFSET):
        return f"the rows must start with 0 and ascend, unique, to at most {MAX_OFFSET}; got {offsets}"
    return None


@dataclass(frozen=True)
class Readout:
    """``score(logits, earlier) = Σ_k weights_k · logits_k[ids] + bias`` (log-odds of refusing), over ``offsets``:
    0 is the first reply token's logits (the prompt's last row), k > 0 the row k tokens before it."""

    ids: np.ndarray  # (K,) int64 token ids, ascending, unique
    weights: np.ndarray  # (len(offsets) * K,) float32, offset by offset
    bias: float
    fit: dict = field(default_factory=dict)  # how it was made: data, regularisation, validation figures
    offsets: tuple = (0,)  # rows read, back from the prompt's last one: 0 first, then ascending
    calibration: Mapping[str, float] = field(default_factory=dict)  # constraint -> log-odds added where active

    def __post_init__(self):
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int64))
        object.__setattr__(self, "weights", np.asarray(self.weights, dtype=np.float32))
        object.__setattr__(self, "offsets", tuple(self.offsets))
        object.__setattr__(self, "calibration", dict(self.calibration))
        self.validate()

    def offset(self, constraints) -> float:
        """The calibration's offset for a composition: the smallest of its constraints' (0 where one is not in
        the table, or without constraints)."""
        names = list(constraints)
        if not self.calibration or not names:
            return 0.0
        return min(float(self.calibration.get(c, 0.0)) for c in names)

    def composed(self, constraints) -> "Readout":
        """The readout a request under ``constraints`` decides by: the calibration's offset folded into the bias."""
        off = self.offset(constraints)
        return self if off == 0.0 else replace(self, bias=self.bias + off, calibration={})

    @property
    def earlier(self) -> tuple[int, ...]:
        """The rows before the prompt's last one that the score reads (offsets back; empty for version 1)."""
        return self.offsets[1:]

    def validate(self) -> None:
        """Raises BankFormatError naming what is wrong."""
        ids, w, offsets = self.ids, self.weights, self.offsets
        if (problem := offsets_problem(offsets)) is not None:
            raise BankFormatError(f"the readout's offsets are wrong: {problem}: re-fit it (edge-safe train readout)")
        if ids.ndim != 1 or w.ndim != 1 or len(ids) * len(offsets) != len(w) or not len(ids):
            raise BankFormatError(f"the readout needs as many weights as token ids (1 or more) for each of its "
                                  f"{len(offsets)} row(s); it has {ids.size} ids and {w.size} weights: re-fit it "
                                  "(edge-safe train readout)")
        if np.any(np.diff(ids) <= 0) or ids[0] < 0:
            raise BankFormatError("the readout's token ids must be ascending, unique and >= 0: re-fit it")
        if not np.all(np.isfinite(w)) or not math.isfinite(self.bias):
            raise BankFormatError("the readout holds non-finite weights: re-fit it")
        for name, off in self.calibration.items():
            if (not isinstance(name, str) or isinstance(off, bool) or not isinstance(off, (int, float))
                    or not 0.0 <= off <= MAX_CALIBRATION):
                raise BankFormatError(f"the readout's calibration must map constraint names to offsets within "
                                      f"0..{MAX_CALIBRATION:g} log-odds; got {name!r}: {off!r}: re-calibrate it "
                                      "(edge-safe train calibrate)")

    def score(self, logits: np.ndarray, earlier: "Mapping[int, np.ndarray] | None" = None) -> float:
        """Log-odds of refusing, from the first reply token's logits (n_vocab,) and, for each of
        :attr:`earlier`, ``earlier[k]``: the logits of the row k tokens before the prompt's last one."""
        k = len(self.ids)
        total = float(np.dot(np.asarray(logits[self.ids], dtype=np.float64), self.weights[:k]))
        for j, off in enumerate(self.earlier, start=1):
            row = None if earlier is None else earlier.get(off)
            if row is None:
                raise EdgeSafeError(f"the readout reads the row {off} tokens before the first reply token, and "
                                    "none was decoded for this request")
            total += float(np.dot(np.asarray(row[self.ids], dtype=np.float64), self.weights[j * k:(j + 1) * k]))
        return total + self.bias

    def to_json(self) -> str:
        version = 3 if self.calibration else 1 if self.offsets == (0,) else 2
        obj = {"version": version, "where": WHERE, "bias": float(self.bias), "ids": [int(i) for i in self.ids]}
        if self.offsets != (0,):
            obj["offsets"] = list(self.offsets)
        if self.calibration:
            obj["calibration"] = {k: float(v) for k, v in self.calibration.items()}
        obj |= {"weights": [float(f"{x:.7g}") for x in self.weights.tolist()], "fit": self.fit}
        return json.dumps(obj, separators=(",", ":"))

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
            offsets = (0,) if version == 1 else tuple(obj["offsets"]) if version == 2 else tuple(obj.get("offsets", [0]))
            calibration = obj["calibration"] if version >= 3 else {}
            if version >= 3 and (not isinstance(calibration, dict) or not calibration):
                raise TypeError("'calibration' must be a JSON object naming at least one constraint")
            return cls(np.asarray(obj["ids"], dtype=np.int64), np.asarray(obj["weights"], dtype=np.float32),
                       float(obj["bias"]), dict(obj.get("fit") or {}), offsets, calibration)
        except (KeyError, TypeError, ValueError) as e:
            raise BankFormatError(f"{what} lacks or mistypes a field ({e}); re-fit the readout") from None
