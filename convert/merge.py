"""Merging two token banks for the same base model (``TokenBank.merge``).

Clash policy, for a name used by both banks:

- identical entries (same kind and vectors, or profiles with the same members) are not a clash;
- ``error``: list the clashes and the options;
- ``ours``: keep the first bank's entry;
- ``theirs``: the second bank's entry replaces the first's in place (token for
  token, profile for profile; a token/profile clash needs ``rename``);
- ``rename``: the second bank's entry is renamed ``<name>_2`` (``_3``, ...).

Works on any objects with a bank's fields (dataclasses, copied with ``replace``) and imports
nothing from :mod:`.bank`, which calls it.

Tokens keep their effective origin, so a from-text token merged into a trained
bank is still labelled from-text.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from .errors import BankMismatchError, EdgeSafeError

from .keys import Behaviour

log = logging.getLogger(__name__)


def merge_banks(ours: Any, theirs: Any, on_clash: str) -> Any:
    """The merged bank (not yet validated)."""
    check_compatible(ours, theirs)
    tokens = {n: _with_origin(t, ours) for n, t in ours.tokens.items()}
    profiles = {p: list(ms) for p, ms in ours.profiles.items()}
    taken = set(tokens) | set(profiles) | set(theirs.tokens) | set(theirs.profiles)
    renamed: dict[str, str] = {}  # their token name -> its name in the result (absent: dropped)
    for name, tok in theirs.tokens.items():
        tok = _with_origin(tok, theirs)
        target = _place_token(name, tok, tokens, profiles, on_clash, taken)
        if target is not None:
            renamed[name] = target
    for pname, members in theirs.profiles.items():
        members = [renamed[m] for m in members if m in renamed]
        if members:
            _place_profile(pname, members, tokens, profiles, on_clash, taken)
    origin = ours.origin
    tokens = {n: replace(t, origin="" if t.origin == origin else t.origin) for n, t in tokens.items()}
    behaviours = {n: ours.behaviour(n) for n in ours.modes if n in tokens and tokens[n] is not None}
    behaviours |= {target: theirs.behaviour(name) for name, target in renamed.items() if name in theirs.modes}
    # a decision readout was fit on one bank's tokens: the merged bank decides by the opener margin until it gets
    # its own (edge-safe train readout)
    return replace(ours, tokens=tokens, profiles=profiles, mode_behaviours=explicit_behaviours(behaviours),
                   readout=None)


def explicit_behaviours(behaviours: dict[str, str]) -> dict[str, str]:
    """The behaviours a bank must store: those its modes' names do not imply (Behaviour.DEFAULTS)."""
    return {m: b for m, b in behaviours.items() if Behaviour.DEFAULTS.get(m) != b}


def check_compatible(a: Any, b: Any) -> None:
    """Both banks must describe vectors for the same model, layout and template."""
    for what, x, y in (
        ("architecture", a.arch, b.arch),
        ("n_embd", a.n_embd, b.n_embd),
        ("base model fingerprint", a.base_fingerprint, b.base_fingerprint),
        ("prompt layout", a.layout, b.layout),
        ("chat template", a.template, b.template),
        *_deep_checks(a, b),
    ):
        if x != y:
            shown = (x.name, y.name) if what == "chat template" else (x, y)
            raise BankMismatchError(
                f"cannot merge banks with different {what}: {shown[0]!r} vs {shown[1]!r} "
                f"(bases: {a.base_name} / {b.base_name}); merge only banks made for the same model and template"
            )


def _deep_checks(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """Deep tokens of both banks must share one KV geometry and placement."""
    ga, gb = a.deep_geometry, b.deep_geometry
    if ga is None or gb is None:
        return []
    return [("deep-token geometry (n_layer, n_embd_k_gqa, n_embd_v_gqa)", ga, gb),
            ("deep-cell positions", a.deep_positions, b.deep_positions),
            ("deep-cell copies past a long context", a.deep_copies, b.deep_copies)]


def _with_origin(tok: Any, bank: Any) -> Any:
    return replace(tok, origin=tok.origin or bank.origin)


def _same_token(a: Any, b: Any) -> bool:
    same = a.kind == b.kind and a.depth == b.depth and _same(a.vectors, b.vectors)
    return same and (not a.is_deep or (_same(a.keys, b.keys) and _same(a.values, b.values)))


def _same(x: np.ndarray, y: np.ndarray) -> bool:
    return x.shape == y.shape and np.array_equal(x, y)


def _free_name(name: str, taken: set[str]) -> str:
    i = 2
    while f"{name}_{i}" in taken:
        i += 1
    taken.add(f"{name}_{i}")
    return f"{name}_{i}"


def _clash_error(kind: str, name: str) -> EdgeSafeError:
    return EdgeSafeError(
        f"both banks define {kind} {name!r} differently; choose --on-clash ours|theirs|rename "
        "(or rename it in one bank first: edge-safe convert rename)"
    )


def _place_token(name, tok, tokens, profiles, on_clash, taken) -> str | None:
    """Put their token into ``tokens``; return its name in the result (None if dropped)."""
    if name in tokens and _same_token(tokens[name], tok):
        return name
    if name not in tokens and name not in profiles:
        tokens[name] = tok
        return name
    if on_clash == "error" or (on_clash == "theirs" and name in profiles):
        raise _clash_error("token" if name in tokens else "token/profile name", name)
    if on_clash == "ours":
        log.warning("merge: keeping our %r, dropping theirs", name)
        return name if name in tokens else None
    if on_clash == "theirs":
        log.warning("merge: their token %r replaces ours", name)
        tokens[name] = tok
        return name
    new = _free_name(name, taken)
    log.warning("merge: their token %r is renamed %r", name, new)
    tokens[new] = replace(tok, name=new)
    return new


def _place_profile(name, members, tokens, profiles, on_clash, taken) -> None:
    if name in profiles and set(profiles[name]) == set(members):
        return
    if name not in tokens and name not in profiles:
        profiles[name] = members
        return
    if on_clash == "error" or (on_clash == "theirs" and name in tokens):
        raise _clash_error("profile" if name in profiles else "token/profile name", name)
    if on_clash == "ours":
        log.warning("merge: keeping our profile %r, dropping theirs", name)
    elif on_clash == "theirs":
        log.warning("merge: their profile %r replaces ours", name)
        profiles[name] = members
    else:
        new = _free_name(name, taken)
        log.warning("merge: their profile %r is renamed %r", name, new)
        profiles[new] = members
