"""Plain-numpy (.npz) and PyTorch (.pt) interchange for token banks.

Both carry the same JSON metadata object (:func:`bank_meta`) next to one array
per token, so a bank survives a round trip through either format unchanged.
Files without metadata (a bare ``{name: array}``) are accepted too: the base
model (``--model``) then supplies arch, n_embd and fingerprint, every token is
a constraint and the bank is labelled ``imported``.

torch is imported only inside the two torch functions.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .bank import BankToken, TokenBank
from .bank_io import atomic_path, copies_rule
from .errors import BankFormatError, EdgeSafeError
from .keys import DEEP_POSITIONS, DEEP_SUFFIXES, FORMAT_VERSION, FORMAT_VERSION_DEEP, MAX_FORMAT_VERSION, Depth, Interchange, Kind, Origin
from .layout import LAYOUT_V1, ChatTemplate
from .model import ModelInfo

log = logging.getLogger(__name__)

_TOKEN_FIELDS = ("kind", "description", "refusal", "rule", "origin")


def bank_meta(bank: TokenBank) -> dict[str, Any]:
    """Everything but the vectors, as one JSON-ready object."""
    deep = bank.deep_geometry is not None
    extra = {"deep_positions": bank.deep_positions} if deep else {}
    if deep and bank.deep_copies:
        extra["deep_copies"] = [list(r) for r in bank.deep_copies]
    return {
        "format": Interchange.FORMAT,
        "format_version": FORMAT_VERSION_DEEP if deep else FORMAT_VERSION,
        "name": bank.name,
        "description": bank.description,
        "origin": bank.origin,
        "arch": bank.arch,
        "n_embd": bank.n_embd,
        "base_fingerprint": bank.base_fingerprint,
        "base_name": bank.base_name,
        "layout": bank.layout,
        "template": json.loads(bank.template.to_json()),
        "tokens": [{"name": t.name, **{f: getattr(t, f) for f in _TOKEN_FIELDS},
                    **({"depth": Depth.DEEP} if t.is_deep else {})} for t in bank.tokens.values()],
        "profiles": bank.profiles,
        "training_config": bank.training_config,
        "eval_summary": bank.eval_summary,
        **extra,
    }


def token_arrays(bank: TokenBank) -> dict[str, np.ndarray]:
    """One array per shallow token (``name``: (n_vectors, n_embd)) and two per deep token
    (``name.k`` / ``name.v``: (n_positions, n_layer, width)); token names never contain a dot."""
    out = {}
    for n, t in bank.tokens.items():
        if t.is_deep:
            out[n + DEEP_SUFFIXES[0]], out[n + DEEP_SUFFIXES[1]] = t.keys, t.values
        else:
            out[n] = t.vectors
    return out


def _group_arrays(arrays: Mapping[str, np.ndarray], source: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{token: {"vectors": a}}`` or ``{token: {"keys": k, "values": v}}`` from interchange array names."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, a in arrays.items():
        for suffix, field_name in zip(DEEP_SUFFIXES, ("keys", "values")):
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[field_name] = a
                break
        else:
            out.setdefault(key, {})["vectors"] = a
    for name, parts in out.items():
        if "vectors" in parts and len(parts) > 1:
            raise BankFormatError(f"{source}: {name!r} has both vectors and {name}.k/{name}.v arrays; keep one kind")
        if "vectors" not in parts and len(parts) != 2:
            have, miss = next(iter(parts)), ({"keys", "values"} - set(parts)).pop()
            raise BankFormatError(f"{source}: deep token {name!r} has {have} but no {miss} "
                                  f"({name}{DEEP_SUFFIXES[0]} and {name}{DEEP_SUFFIXES[1]} go together)")
    return out


def bank_from_parts(
    meta: Mapping[str, Any] | None, vectors: Mapping[str, np.ndarray], *, source: Path, info: ModelInfo | None = None
) -> TokenBank:
    """A validated bank from interchange metadata (may be None) and ``{name: (n_vectors, n_embd)}``."""
    meta = dict(meta or {})
    _check_meta_version(meta, source)
    base = _base_fields(meta, source, info)
    vectors = _group_arrays(vectors, source)
    entries = meta.get("tokens") or [{"name": n} for n in vectors]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise BankFormatError(f"{source}: metadata 'tokens' must be a list of objects with a 'name'")
    names = [e["name"] for e in entries]
    if sorted(map(str, names)) != sorted(vectors):
        raise BankFormatError(
            f"{source}: the metadata lists tokens {', '.join(map(str, names))} but the arrays are "
            f"{', '.join(vectors)}; they must match"
        )
    tokens = {}
    for e in entries:
        fields = {f: e.get(f, "") for f in _TOKEN_FIELDS}
        fields["kind"] = fields["kind"] or Kind.CONSTRAINT
        parts = vectors[e["name"]]
        if "vectors" not in parts:
            tokens[e["name"]] = BankToken.deep(e["name"], keys=parts["keys"], values=parts["values"], **fields)
            continue
        if e.get("depth", Depth.SHALLOW) != Depth.SHALLOW:
            raise BankFormatError(f"{source}: token {e['name']!r} is listed as {e['depth']} but has one array of "
                                  f"vectors; a deep token has {e['name']}.k and {e['name']}.v")
        v = np.asarray(parts["vectors"], dtype=np.float32)
        tokens[e["name"]] = BankToken(name=e["name"], vectors=v.reshape(1, -1) if v.ndim == 1 else v, **fields)
    bank = TokenBank(
        deep_positions=meta.get("deep_positions", DEEP_POSITIONS),
        deep_copies=copies_rule(meta.get("deep_copies") or ()),
        tokens=tokens,
        profiles={p: list(ms) for p, ms in dict(meta.get("profiles") or {}).items()},
        layout=meta.get("layout", LAYOUT_V1),
        template=ChatTemplate.from_json(json.dumps(meta["template"])) if "template" in meta else ChatTemplate(),
        name=meta.get("name") or "edge-safe token bank",
        description=meta.get("description", ""),
        origin=meta.get("origin") or Origin.IMPORTED,
        training_config=dict(meta.get("training_config") or {}),
        eval_summary=dict(meta.get("eval_summary") or {}),
        **base,
    )
    try:
        bank.validate()
    except BankFormatError as e:
        raise BankFormatError(f"{source}: {e}") from None
    return bank


def export_npz(bank: TokenBank, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``{name: float32 (n_vectors, n_embd)}`` plus ``__meta__`` (a JSON string) to a .npz."""
    path = Path(path).expanduser()
    arrays = token_arrays(bank)
    arrays[Interchange.NPZ_META] = np.array(json.dumps(bank_meta(bank)))
    with atomic_path(path, force=force) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def import_npz(path: str | os.PathLike, *, info: ModelInfo | None = None) -> TokenBank:
    """Read a .npz written by :func:`export_npz`, or a bare ``{name: array}`` one with ``info``."""
    path = Path(path).expanduser()
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.array(npz[k]) for k in npz.files}
    except (OSError, ValueError) as e:
        raise BankFormatError(f"{path} is not a readable .npz file ({e}); pass a file written by export-npz") from None
    meta = arrays.pop(Interchange.NPZ_META, None)
    return bank_from_parts(_parse_meta(meta, path), arrays, source=path, info=info)


def export_torch(bank: TokenBank, path: str | os.PathLike, *, force: bool = False) -> Path:
    """torch.save ``{"state_dict": {name: tensor}, "metadata": {...}}``."""
    torch = _import_torch()
    path = Path(path).expanduser()
    obj = {
        Interchange.TORCH_TOKENS: {n: torch.from_numpy(a.copy()) for n, a in token_arrays(bank).items()},
        Interchange.TORCH_META: bank_meta(bank),
    }
    with atomic_path(path, force=force) as tmp:
        torch.save(obj, tmp)
    return path


def import_torch(path: str | os.PathLike, *, info: ModelInfo | None = None) -> TokenBank:
    """Read a .pt from :func:`export_torch`, or a bare ``{name: tensor}`` state dict with ``info``."""
    torch = _import_torch()
    path = Path(path).expanduser()
    _require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, weights_only refusal)
        raise BankFormatError(f"{path} is not a loadable PyTorch file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise BankFormatError(f"{path} holds a {type(obj).__name__}; expected a dict of name -> tensor")
    meta = obj.get(Interchange.TORCH_META)
    state = obj.get(Interchange.TORCH_TOKENS, obj if meta is None else None)
    if not isinstance(state, dict):
        raise BankFormatError(f"{path}: {Interchange.TORCH_TOKENS!r} must be a dict of name -> tensor")
    vectors = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise BankFormatError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        vectors[str(name)] = t.detach().to("cpu", torch.float32).numpy()
    return bank_from_parts(_parse_meta(meta, path), vectors, source=path, info=info)


# --- helpers -------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError:
        raise EdgeSafeError("PyTorch is not installed; install it (pip install 'edge-safe[train]') for .pt files") from None
    return torch


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise BankFormatError(f"file not found: {path}")


def _parse_meta(meta: Any, source: Path) -> dict | None:
    if meta is None:
        return None
    if isinstance(meta, np.ndarray):
        meta = str(meta)
    if isinstance(meta, (str, bytes)):
        try:
            meta = json.loads(meta)
        except ValueError as e:
            raise BankFormatError(f"{source}: the metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BankFormatError(f"{source}: the metadata must be a JSON object; got {type(meta).__name__}")
    return meta


def _check_meta_version(meta: dict, source: Path) -> None:
    if meta.get("format", Interchange.FORMAT) != Interchange.FORMAT:
        raise BankFormatError(f"{source}: metadata format is {meta.get('format')!r}, expected {Interchange.FORMAT!r}")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > MAX_FORMAT_VERSION:
        raise BankFormatError(
            f"{source} uses token-bank format version {version!r}, but this edge-safe reads versions up to "
            f"{MAX_FORMAT_VERSION}; upgrade edge-safe (pip install -U edge-safe)"
        )


def _base_fields(meta: dict, source: Path, info: ModelInfo | None) -> dict[str, Any]:
    """arch, n_embd, fingerprint and base name: from the metadata, else from the base model."""
    keys = ("arch", "n_embd", "base_fingerprint", "base_name")
    if all(k in meta for k in keys):
        return {k: meta[k] for k in keys}
    if info is None:
        raise BankFormatError(
            f"{source} does not say which base model it belongs to; pass --model <the model it was trained on>"
        )
    from_model = {"arch": info.arch, "n_embd": info.n_embd, "base_fingerprint": info.fingerprint, "base_name": info.name}
    return {k: meta.get(k, from_model[k]) for k in keys}


__all__ = ["bank_meta", "token_arrays", "bank_from_parts", "export_npz", "import_npz", "export_torch", "import_torch"]
