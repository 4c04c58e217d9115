"""The token bank: control-token vectors per constraint and mode, plus metadata.

A :class:`TokenBank` is data (numpy arrays + metadata). It is read and written
as a GGUF sidecar by :mod:`.bank_io`, validated here, and edited with small
methods that return a new bank (``merge``, ``rename_token``, ...). Nothing here
needs the base model or llama.cpp; :meth:`TokenBank.check_model` compares
against a :class:`~.model.ModelInfo` read from the model file's header.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .bank_io import copies_rule, read_bank, write_bank
from .errors import BankFormatError, BankMismatchError, EdgeSafeError, UnknownTokenError, unknown_name_message
from .keys import DEEP_POSITIONS, KNOWN_DEEP_POSITIONS, NAME_HINT, NAME_RE, TENSOR_DTYPES, Behaviour, Depth, Kind, Origin
from .layout import LAYOUT_V1, QA_TEMPLATE, ChatTemplate, check_layout
from .merge import explicit_behaviours, merge_banks
from .model import ModelInfo
from .readout import Readout

log = logging.getLogger(__name__)

FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
ON_CLASH = ("error", "ours", "theirs", "rename")


@dataclass(frozen=True, eq=False)
class BankToken:
    """One bank entry: a constraint or a mode, as prefix vectors (shallow) or per-layer K/V rows (deep)."""

    name: str  # slug used everywhere: CLI, GGUF (tensor bank.<name>), HTTP, logs
    kind: str  # Kind.CONSTRAINT (composable) | Kind.MODE (at most one per request)
    vectors: np.ndarray  # float32 (n_vectors, n_embd), HF inputs_embeds space == llama.cpp raw-embedding space
    description: str = ""  # what it blocks / does, shown by `edge-safe tokens`
    refusal: str = ""  # fixed reply this token trains towards ("" for modes that do not refuse)
    rule: str = ""  # the same constraint as a natural-language rule (text baseline)
    origin: str = ""  # how these vectors were made when it differs from the bank's origin ("" = same)
    # Deep tokens only (then ``vectors`` is empty): float32 (n_positions, n_layer, n_embd_k_gqa) keys,
    # post-norm and post-RoPE as the KV cache stores them, and (n_positions, n_layer, n_embd_v_gqa)
    # values, in model layer order.
    keys: np.ndarray | None = None
    values: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vectors", np.asarray(self.vectors, dtype=np.float32))
        for what in ("keys", "values"):
            if getattr(self, what) is not None:
                object.__setattr__(self, what, np.asarray(getattr(self, what), dtype=np.float32))

    @classmethod
    def deep(cls, name: str, kind: str, keys: np.ndarray, values: np.ndarray, **fields) -> "BankToken":
        """A deep token: key and value rows per position and layer, no input vectors."""
        return cls(name, kind, np.zeros((0, 0), np.float32), keys=keys, values=values, **fields)

    @property
    def depth(self) -> str:
        return Depth.DEEP if self.keys is not None or self.values is not None else Depth.SHALLOW

    @property
    def is_deep(self) -> bool:
        return self.depth == Depth.DEEP

    @property
    def n_vectors(self) -> int:
        """Prefix positions of the token: vectors (shallow) or KV cells (deep)."""
        if self.is_deep:
            return int(self.keys.shape[0]) if self.keys is not None and self.keys.ndim else 0
        return int(self.vectors.shape[0]) if self.vectors.ndim else 0


@dataclass(eq=False)
class TokenBank:
    """Control tokens for one base model, in bank (= canonical prefix) order."""

    arch: str  # base model architecture (general.architecture), e.g. "gemma3"
    n_embd: int  # width of every vector; must equal the base model's
    base_fingerprint: str  # sha256 hex of the base model's token_embd bytes
    base_name: str  # human name of the base model, for error messages
    tokens: dict[str, BankToken]  # insertion order = bank order = canonical order
    profiles: dict[str, list[str]] = field(default_factory=dict)  # name -> constraint names
    layout: str = LAYOUT_V1  # prompt layout the vectors were trained in
    template: ChatTemplate = QA_TEMPLATE  # chat template the vectors were trained with
    name: str = "edge-safe token bank"
    description: str = ""
    origin: str = Origin.TRAINED  # "trained" | "from-text" | "imported"
    training_config: dict = field(default_factory=dict)  # the resolved training config
    eval_summary: dict = field(default_factory=dict)  # headline evaluation numbers
    mode_behaviours: dict[str, str] = field(default_factory=dict)  # mode -> Behaviour; absent: Behaviour.DEFAULTS
    deep_positions: str = DEEP_POSITIONS  # where deep cells sit (keys.DEEP_POSITIONS); stored only with deep tokens
    # ((position, copies), ...) ascending: deep cells sitting at or past `position` are written `copies` times
    # (Keys.Deep.COPIES); () = once everywhere. Stored only with deep tokens.
    deep_copies: tuple[tuple[int, int], ...] = ()
    # the decision readout (convert/readout.py): refuse iff its score + strictness > 0; None = the opener margin
    readout: Readout | None = None

    # --- files ---------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenBank":
        """Read and fully validate a bank; every problem is a one-line BankFormatError naming the file."""
        path = Path(path).expanduser()
        fields = read_bank(path)
        tokens = {t["name"]: BankToken(**t) for t in fields.pop("tokens")}
        bank = cls(tokens=tokens, **fields)
        try:
            bank.validate()
        except BankFormatError as e:
            raise BankFormatError(f"{path}: {e}") from None
        return bank

    def save(self, path: str | os.PathLike, *, force: bool = False, dtype: str = "F32") -> Path:
        """Validate, then write atomically (temp file + rename); refuses to overwrite without ``force``."""
        self.validate()
        return write_bank(self, Path(path).expanduser(), force=force, dtype=_check_dtype(dtype))

    # --- validation ----------------------------------------------------------

    def validate(self) -> None:
        """Check internal consistency; raises BankFormatError saying what is wrong and how to fix it."""
        _validate_header(self)
        if not self.tokens:
            raise BankFormatError("the bank has no tokens; add one (edge-safe convert from-text ...) or train one")
        for key, tok in self.tokens.items():
            _validate_token(key, tok, self.n_embd)
        _validate_deep(self)
        _validate_profiles(self.profiles, self.tokens)
        for mode, behaviour in self.mode_behaviours.items():
            if mode not in self.modes or behaviour not in Behaviour.ALL:
                raise BankFormatError(f"mode behaviour {mode!r}: {behaviour!r} names no mode of the bank or no known "
                                      f"behaviour (modes: {', '.join(self.modes) or 'none'}; behaviours: "
                                      f"{', '.join(Behaviour.ALL)}); fix mode_behaviours")
        for what in ("training_config", "eval_summary"):
            _check_json_object(what, getattr(self, what))
        if self.readout is not None and (odd := [c for c in self.readout.calibration if c not in self.constraints]):
            raise BankFormatError(f"the readout's calibration names {', '.join(map(repr, odd))}, not a constraint of "
                                  f"the bank (constraints: {', '.join(self.constraints)}); re-calibrate it "
                                  "(edge-safe train calibrate)")

    def vectors_sha256(self) -> str:
        """A hash of what the runtime injects (names, kinds, refusals, float32 vectors and deep keys/values),
        unchanged by metadata edits and by the readout."""
        import hashlib

        h = hashlib.sha256()
        for name, tok in self.tokens.items():
            h.update(f"{name}\0{tok.kind}\0{tok.refusal}\0".encode())
            h.update(np.ascontiguousarray(tok.vectors, dtype=np.float32).tobytes())
            if tok.is_deep:  # deep tokens: their key/value rows are what the runtime writes
                h.update(np.ascontiguousarray(tok.keys, dtype=np.float32).tobytes())
                h.update(np.ascontiguousarray(tok.values, dtype=np.float32).tobytes())
        return h.hexdigest()

    def check_model(self, info: ModelInfo) -> None:
        """Raise BankMismatchError unless this bank was made for ``info``'s model."""
        fix = (
            f"pass --model <the model it was trained on: {self.base_name}>, "
            f"or a --bank built for {info.name}"
        )
        checks = [("architecture", self.arch, info.arch), ("n_embd", self.n_embd, info.n_embd)]
        geometry = self.deep_geometry
        if geometry is not None:  # deep rows must match the model's layers and K/V widths exactly
            checks += [
                ("layer count (deep tokens hold one key/value row per layer)", geometry[0], info.n_layer),
                ("key row width n_embd_k_gqa (head_count_kv x key_length)", geometry[1], info.n_embd_k_gqa),
                ("value row width n_embd_v_gqa (head_count_kv x value_length)", geometry[2], info.n_embd_v_gqa),
            ]
        checks.append(("base model fingerprint", self.base_fingerprint, info.fingerprint))
        for what, ours, theirs in checks:
            if ours != theirs:
                raise BankMismatchError(
                    f"the bank does not fit the model {info.path}: {what} expected {_short(ours)} "
                    f"(bank base: {self.base_name}), got {_short(theirs)}; {fix}"
                )
        if self.readout is not None and int(self.readout.ids[-1]) >= info.n_vocab:
            raise BankMismatchError(f"the bank's decision readout reads token id {int(self.readout.ids[-1])} but the "
                                    f"model {info.path} has {info.n_vocab} tokens; {fix}")

    # --- names ---------------------------------------------------------------

    @property
    def constraints(self) -> list[str]:
        return [n for n, t in self.tokens.items() if t.kind == Kind.CONSTRAINT]

    @property
    def modes(self) -> list[str]:
        return [n for n, t in self.tokens.items() if t.kind == Kind.MODE]

    def token_origin(self, name: str) -> str:
        """Effective origin of one token (its own, else the bank's)."""
        return self.tokens[name].origin or self.origin

    def resolve(self, tokens: str | Sequence[str] | None) -> list[str]:
        """Constraint names (bank order, no duplicates) for names/profiles given as a list or "a, b"."""
        wanted: set[str] = set()
        for name in split_names(tokens):
            if name in self.profiles:
                wanted.update(self.profiles[name])
            elif name in self.tokens and self.tokens[name].kind == Kind.MODE:
                raise UnknownTokenError(
                    f"{name!r} is a mode, not a constraint; select it with mode={name!r} (CLI: --mode {name})"
                )
            elif name in self.tokens:
                wanted.add(name)
            else:
                known = self.constraints + list(self.profiles)
                raise UnknownTokenError(unknown_name_message("token or profile", name, known))
        return [n for n in self.tokens if n in wanted]

    def behaviour(self, mode: str | None) -> str:
        """What the runtime does in ``mode`` (a :class:`Behaviour`); no mode: the constraints apply."""
        if mode is None:
            return Behaviour.CONSTRAINED
        return self.mode_behaviours.get(mode) or Behaviour.DEFAULTS.get(mode, Behaviour.UNGUIDED)

    @property
    def default_mode(self) -> str | None:
        """The mode a request with constraints and no mode gets: the first constrained one (None: no modes)."""
        return next((m for m in self.modes if self.behaviour(m) == Behaviour.CONSTRAINED), None)

    def check_mode(self, mode: str | None) -> str | None:
        """Validate a mode name; None or "" means no mode."""
        if not mode:
            return None
        tok = self.tokens.get(mode)
        if tok is not None and tok.kind == Kind.MODE:
            return mode
        if tok is not None:
            raise UnknownTokenError(f"{mode!r} is a constraint, not a mode; pass it in tokens instead")
        raise UnknownTokenError(unknown_name_message("mode", mode, self.modes))

    @property
    def deep_geometry(self) -> tuple[int, int, int] | None:
        """(n_layer, n_embd_k_gqa, n_embd_v_gqa) of the bank's deep tokens, or None when it has none."""
        for t in self.tokens.values():
            if t.is_deep and t.keys is not None and t.values is not None and t.keys.ndim == 3 and t.values.ndim == 3:
                return int(t.keys.shape[1]), int(t.keys.shape[2]), int(t.values.shape[2])
        return None

    def depths(self, names: Sequence[str]) -> list[str]:
        """Depth of each named entry."""
        self._known(names)
        return [self.tokens[n].depth for n in names]

    def prefix_vectors(self, names: Sequence[str]) -> np.ndarray:
        """The named *shallow* entries' vectors, concatenated in the given order: float32 (sum n_vectors, n_embd).

        Deep entries have no input vectors and are skipped (their cells: :meth:`deep_cells`)."""
        self._known(names)
        shallow = [self.tokens[n].vectors for n in names if not self.tokens[n].is_deep]
        if not shallow:
            return np.zeros((0, self.n_embd), dtype=np.float32)
        return np.concatenate(shallow, axis=0)

    def with_deep_copies(self, rule) -> "TokenBank":
        """This bank with another ``deep_copies`` rule (``[[position, copies], ...]``, checked)."""
        return replace(self, deep_copies=check_deep_copies(rule))

    def copies_at(self, position: int) -> int:
        """How many times deep cells sitting at ``position`` are written (``deep_copies``)."""
        return copies_at(self.deep_copies, position)

    @property
    def max_copies(self) -> int:
        return max([1] + [c for _, c in self.deep_copies])

    def deep_cells(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The named *deep* entries' keys and values, concatenated in the given order:
        float32 (sum n_positions, n_layer, n_embd_k_gqa) and (..., n_embd_v_gqa); empty when none is deep."""
        self._known(names)
        deep = [self.tokens[n] for n in names if self.tokens[n].is_deep]
        if not deep:
            n_layer, k, v = self.deep_geometry or (0, 0, 0)
            return np.zeros((0, n_layer, k), np.float32), np.zeros((0, n_layer, v), np.float32)
        return np.concatenate([t.keys for t in deep]), np.concatenate([t.values for t in deep])

    def _known(self, names: Sequence[str]) -> None:
        for n in names:
            if n not in self.tokens:
                raise UnknownTokenError(unknown_name_message("token", n, self.tokens))

    def refusals(self) -> dict[str, str]:
        """name -> refusal text, for entries that have one."""
        return {n: t.refusal for n, t in self.tokens.items() if t.refusal}

    def is_refusal(self, text: str) -> bool:
        """True when ``text`` (whitespace-normalised) starts with one of the bank's refusal texts."""
        return self.refusal_of(text) is not None

    def refusal_of(self, text: str) -> str | None:
        """The entry whose refusal text ``text`` (whitespace-normalised) starts with (the longest such text), or None."""
        got = _normalise(text)
        if not got:
            return None
        hits = [(len(_normalise(r)), n) for n, r in self.refusals().items() if got.startswith(_normalise(r))]
        return max(hits)[1] if hits else None

    # --- editing (each returns a new, validated bank) -------------------------

    def merge(self, other: "TokenBank", on_clash: str = "error") -> "TokenBank":
        """Union of two banks for the same base model; metadata comes from ``self``."""
        if on_clash not in ON_CLASH:
            raise EdgeSafeError(f"on_clash must be one of {', '.join(ON_CLASH)}; got {on_clash!r}")
        merged = merge_banks(self, other, on_clash)
        merged.validate()
        return merged

    def rename_token(self, old: str, new: str) -> "TokenBank":
        self._require(old, self.tokens, "token")
        self._check_free(new)
        tokens = {(new if n == old else n): (replace(t, name=new) if n == old else t) for n, t in self.tokens.items()}
        profiles = {p: [new if m == old else m for m in ms] for p, ms in self.profiles.items()}
        behaviours = explicit_behaviours({(new if m == old else m): self.behaviour(m) for m in self.modes})
        return self._edited(tokens=tokens, profiles=profiles, mode_behaviours=behaviours,
                            readout=self._calibrated_as(lambda c: new if c == old else c))

    def remove_token(self, name: str, *, drop_from_profiles: bool = False) -> "TokenBank":
        self._require(name, self.tokens, "token")
        users = [p for p, ms in self.profiles.items() if name in ms]
        if users and not drop_from_profiles:
            raise EdgeSafeError(
                f"token {name!r} is used by profile(s) {', '.join(users)}; remove it from them too "
                "with --drop-from-profiles (drop_from_profiles=True), or remove those profiles first"
            )
        if len(self.tokens) == 1:
            raise EdgeSafeError(f"{name!r} is the bank's only token; a bank needs at least one (delete the file instead)")
        profiles = {p: [m for m in ms if m != name] for p, ms in self.profiles.items()}
        for p in [p for p, ms in profiles.items() if not ms]:
            log.warning("profile %r is empty without %r; removing it", p, name)
            del profiles[p]
        tokens = {n: t for n, t in self.tokens.items() if n != name}
        behaviours = {m: b for m, b in self.mode_behaviours.items() if m != name}
        return self._edited(tokens=tokens, profiles=profiles, mode_behaviours=behaviours,
                            readout=self._calibrated_as(lambda c: None if c == name else c))

    def _calibrated_as(self, rename) -> "Readout | None":
        """The readout with its calibration's constraints renamed by ``rename`` (None: dropped)."""
        if self.readout is None or not self.readout.calibration:
            return self.readout
        table = {rename(c): s for c, s in self.readout.calibration.items()}
        return replace(self.readout, calibration={c: s for c, s in table.items() if c is not None})

    def rename_profile(self, old: str, new: str) -> "TokenBank":
        self._require(old, self.profiles, "profile")
        self._check_free(new)
        return self._edited(profiles={(new if p == old else p): ms for p, ms in self.profiles.items()})

    def remove_profile(self, name: str) -> "TokenBank":
        self._require(name, self.profiles, "profile")
        return self._edited(profiles={p: ms for p, ms in self.profiles.items() if p != name})

    def with_token(self, token: BankToken, *, replace_existing: bool = False) -> "TokenBank":
        """A copy with ``token`` added at the end (or replacing the entry of the same name in place)."""
        if token.name in self.profiles:
            raise EdgeSafeError(f"{token.name!r} is already a profile name; choose another token name")
        if token.name in self.tokens and not replace_existing:
            raise EdgeSafeError(
                f"the bank already has a token {token.name!r}; choose another --name or pass --force to replace it"
            )
        return self._edited(tokens={**self.tokens, token.name: token})

    def _edited(self, **changes) -> "TokenBank":
        bank = replace(self, **changes)
        bank.validate()
        return bank

    def _require(self, name: str, known: Iterable[str], kind: str) -> None:
        if name not in known:
            raise UnknownTokenError(unknown_name_message(kind, name, known))

    def _check_free(self, name: str) -> None:
        _check_name(name, "new name")
        if name in self.tokens or name in self.profiles:
            what = "token" if name in self.tokens else "profile"
            raise EdgeSafeError(f"{name!r} is already a {what} in this bank; choose another name")


# --- helpers -------------------------------------------------------------------


def split_names(tokens: str | Sequence[str] | None) -> list[str]:
    """["a", "b"] from "a, b", ["a", "b"], ["a,b"], None, "" or []."""
    if tokens is None:
        return []
    items = [tokens] if isinstance(tokens, str) else tokens
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise EdgeSafeError(
            f"tokens must be names or profiles as a list of strings or a comma-separated string; got {tokens!r}"
        )
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def _normalise(text: str) -> str:
    return " ".join(str(text).split())


def _short(value) -> str:
    return repr(value[:12] + "…") if isinstance(value, str) and FINGERPRINT_RE.match(value) else repr(value)


def _check_dtype(dtype: str) -> str:
    if str(dtype).upper() not in TENSOR_DTYPES:
        raise EdgeSafeError(f"dtype must be one of {', '.join(TENSOR_DTYPES)}; got {dtype!r}")
    return str(dtype).upper()


def _check_name(name, what: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BankFormatError(f"{what} {name!r} is not a valid name: use {NAME_HINT}")


def _check_text(what: str, value, *, empty_ok: bool = True) -> None:
    if not isinstance(value, str) or (not empty_ok and not value):
        expected = "a string" if empty_ok else "a non-empty string"
        raise BankFormatError(f"{what} must be {expected}; got {value!r}")


def _validate_header(bank: TokenBank) -> None:
    _check_text("arch", bank.arch, empty_ok=False)
    if isinstance(bank.n_embd, bool) or not isinstance(bank.n_embd, (int, np.integer)) or bank.n_embd <= 0:
        raise BankFormatError(f"n_embd must be a positive integer; got {bank.n_embd!r}")
    if not isinstance(bank.base_fingerprint, str) or not FINGERPRINT_RE.match(bank.base_fingerprint):
        raise BankFormatError(
            f"base_fingerprint must be 64 lowercase hex digits (sha256 of token_embd); got {bank.base_fingerprint!r}; "
            "take it from the base model: ModelInfo.read(model).fingerprint"
        )
    _check_text("base_name", bank.base_name, empty_ok=False)
    _check_text("name", bank.name, empty_ok=False)
    _check_text("description", bank.description)
    check_layout(bank.layout)
    if not isinstance(bank.template, ChatTemplate):
        raise BankFormatError(f"template must be a ChatTemplate; got {type(bank.template).__name__}")
    if bank.origin not in Origin.ALL:
        raise BankFormatError(f"origin must be one of {', '.join(Origin.ALL)}; got {bank.origin!r}")


def _validate_token(key: str, tok: BankToken, n_embd: int) -> None:
    if not isinstance(tok, BankToken):
        raise BankFormatError(f"tokens[{key!r}] must be a BankToken; got {type(tok).__name__}")
    _check_name(tok.name, "token name")
    if key != tok.name:
        raise BankFormatError(f"tokens[{key!r}] holds a token named {tok.name!r}; the key must equal the name")
    if tok.kind not in Kind.ALL:
        raise BankFormatError(f"token {key!r} has kind {tok.kind!r}; expected one of {', '.join(Kind.ALL)}")
    for what in ("description", "refusal", "rule"):
        _check_text(f"token {key!r} {what}", getattr(tok, what))
    if tok.origin not in ("",) + Origin.ALL:
        raise BankFormatError(f"token {key!r} has origin {tok.origin!r}; expected '' or one of {', '.join(Origin.ALL)}")
    if tok.is_deep:
        return _validate_deep_token(key, tok)
    v = tok.vectors
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] != n_embd:
        raise BankFormatError(
            f"token {key!r} has vectors of shape {list(v.shape)}, expected [n_vectors >= 1, n_embd {n_embd}]"
        )
    _check_finite(key, v, ("vector", "column"))


def _check_finite(key: str, v: np.ndarray, axes: tuple[str, ...]) -> None:
    bad = ~np.isfinite(v)
    if bad.any():
        first = ", ".join(f"{a} {int(i)}" for a, i in zip(axes, np.argwhere(bad)[0]))
        raise BankFormatError(
            f"token {key!r} has {int(bad.sum())} NaN/Inf values (first at {first}); "
            "the vectors are broken (diverged training?): retrain or re-export them"
        )


def _validate_deep_token(key: str, tok: BankToken) -> None:
    if tok.vectors.size:
        raise BankFormatError(f"token {key!r} has both input vectors and key/value rows; a token is shallow or deep")
    k, v = tok.keys, tok.values
    if k is None or v is None:
        raise BankFormatError(f"deep token {key!r} needs both keys and values; got only {'keys' if v is None else 'values'}")
    if k.ndim != 3 or v.ndim != 3 or k.shape[0] < 1 or k.shape[:2] != v.shape[:2] or min(k.shape + v.shape) < 1:
        raise BankFormatError(
            f"deep token {key!r} has keys of shape {list(k.shape)} and values of shape {list(v.shape)}; expected "
            "[n_positions >= 1, n_layer, n_embd_k_gqa] and [n_positions, n_layer, n_embd_v_gqa]"
        )
    _check_finite(key, k, ("key position", "layer", "column"))
    _check_finite(key, v, ("value position", "layer", "column"))


def _validate_deep(bank: TokenBank) -> None:
    """Every deep token has the same layers and widths (one model's KV geometry)."""
    geometry = bank.deep_geometry
    for name, tok in bank.tokens.items():
        if tok.is_deep:
            got = (int(tok.keys.shape[1]), int(tok.keys.shape[2]), int(tok.values.shape[2]))
            if got != geometry:
                raise BankFormatError(
                    f"deep token {name!r} has {got[0]} layers x (K {got[1]}, V {got[2]}) but other deep tokens have "
                    f"{geometry[0]} x (K {geometry[1]}, V {geometry[2]}); all deep tokens must fit one model"
                )
    _validate_copies(bank.deep_copies)
    if bank.deep_positions not in KNOWN_DEEP_POSITIONS:
        raise BankFormatError(
            f"the bank places deep cells by scheme {bank.deep_positions!r}, which this edge-safe does not know "
            f"(known: {', '.join(KNOWN_DEEP_POSITIONS)}); upgrade edge-safe"
        )


MAX_DEEP_COPIES = 8


def copies_at(rule: Sequence[Sequence[int]], position: int) -> int:
    """How many times deep cells sitting at ``position`` are written under a ``deep_copies`` rule (1 before its
    first position). The runtime and the trainer both ask this."""
    return max([1] + [c for start, c in rule if position >= start][-1:])


def check_deep_copies(rule) -> tuple[tuple[int, int], ...]:
    """A ``deep_copies`` rule checked (BankFormatError saying the form it must have) and as tuples."""
    rule = copies_rule(rule)
    _validate_copies(rule)
    return rule


def _validate_copies(rule) -> None:
    """``deep_copies``: ((position >= 1, 2 <= copies <= MAX_DEEP_COPIES), ...), positions strictly ascending."""
    ok = isinstance(rule, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        for r in rule)
    if ok:
        starts = [r[0] for r in rule]
        ok = all(s >= 1 for s in starts) and starts == sorted(set(starts)) and all(
            2 <= r[1] <= MAX_DEEP_COPIES for r in rule)
    if not ok:
        raise BankFormatError(f"deep copies must be [[position >= 1, copies 2..{MAX_DEEP_COPIES}], ...] with "
                              f"positions ascending, e.g. [[512, 2]]; got {rule!r}")


def _validate_profiles(profiles: dict, tokens: dict[str, BankToken]) -> None:
    if not isinstance(profiles, dict):
        raise BankFormatError(f"profiles must be a dict of name -> token names; got {type(profiles).__name__}")
    for name, members in profiles.items():
        _check_name(name, "profile name")
        if name in tokens:
            raise BankFormatError(f"profile {name!r} has the same name as a token; rename one of them")
        if not isinstance(members, (list, tuple)) or not members:
            raise BankFormatError(f"profile {name!r} must list at least one token; got {members!r}")
        seen: set = set()
        for m in members:
            if m in seen:
                raise BankFormatError(f"profile {name!r} names token {m!r} twice; list each token once")
            seen.add(m)
            if m not in tokens:
                raise BankFormatError(
                    f"profile {name!r} names {unknown_name_message('token', str(m), tokens)}; "
                    "fix the profile or add the token"
                )
            if tokens[m].kind != Kind.CONSTRAINT:
                raise BankFormatError(f"profile {name!r} names mode {m!r}; profiles hold constraints only")


def _check_json_object(what: str, value) -> None:
    if not isinstance(value, dict):
        raise BankFormatError(f"{what} must be a dict (stored as JSON); got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BankFormatError(f"{what} is not plain JSON ({e}); use str/int/float/bool/list/dict, no NaN") from None


# --- from-text tokens (the baseline every trained token is compared with) -------

FROM_TEXT_NAME = "edge-safe token bank (from text)"
FROM_TEXT_DESCRIPTION = (
    "Built from text rules, not trained: each token is its rule's own token embeddings, "
    "so it behaves exactly like the rule written as a line of the prompt."
)


def rule_line(rule: str) -> str:
    """The text a from-text token stands for: the rule as one line, so composed tokens equal the rules as lines."""
    return rule.strip() + "\n"


def from_text_token(
    info: ModelInfo,
    tokenize: Callable[[str], Sequence[int]],
    name: str,
    rule: str,
    *,
    kind: str = Kind.CONSTRAINT,
    description: str = "",
    refusal: str = "",
) -> BankToken:
    """A bank entry whose vectors are ``rule_line(rule)``'s token embeddings, scaled as llama.cpp scales tokens.

    ``tokenize`` must be the model's own tokenizer without BOS and without
    special-token parsing (see ``edge_safe.models.llama_tokenizer``).
    """
    if not rule.strip():
        raise EdgeSafeError("the rule is empty; pass the constraint as a sentence, e.g. --rule 'Do not ...'")
    ids = list(tokenize(rule_line(rule)))
    log.debug("from-text %r: %d tokens", name, len(ids))
    return BankToken(name, kind, info.embedding_rows(ids), description=description, refusal=refusal, rule=rule.strip())


def from_text_bank(info: ModelInfo, tokens: Sequence[BankToken], profiles: dict[str, list[str]] | None = None) -> TokenBank:
    """A validated from-text bank for ``info``'s model, labelled as such."""
    bank = TokenBank(
        arch=info.arch,
        n_embd=info.n_embd,
        base_fingerprint=info.fingerprint,
        base_name=info.name,
        tokens={t.name: t for t in tokens},
        profiles={p: list(ms) for p, ms in (profiles or {}).items()},
        name=FROM_TEXT_NAME,
        description=FROM_TEXT_DESCRIPTION,
        origin=Origin.FROM_TEXT,
    )
    bank.validate()
    return bank
