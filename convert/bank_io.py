"""The token bank as a GGUF file: write atomically, read with full checks.

The layout is specified in ``FORMAT.md``; every key comes from :mod:`.keys`.
This module knows the file, not the data model: it reads a file into plain fields and
writes any object with a bank's attributes, and imports nothing from :mod:`.bank` (which
builds and validates :class:`~.bank.TokenBank` from these fields).
Reading never uses llama.cpp, and a file that is not a bank (a model, a LoRA,
a newer format, a damaged file) gets a one-line message saying what it is and
what to pass instead.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from .errors import BankFormatError, EdgeSafeError, FileExistsNoForceError
from .gguf_file import GGUFScanError, Header, parse_header, scan_file
from .keys import (
    ADAPTER_TYPE_TOKEN_BANK,
    FORMAT_VERSION,
    FORMAT_VERSION_DEEP,
    GENERAL_TYPE_ADAPTER,
    MAX_FORMAT_VERSION,
    TENSOR_PREFIX,
    Depth,
    Keys,
    Model,
    deep_tensor_names,
    tensor_name,
)
from .layout import ChatTemplate
from .readout import Readout

log = logging.getLogger(__name__)

_NP_DTYPES = {"F32": np.float32, "F16": np.float16}
_F16_MAX = float(np.finfo(np.float16).max)
_BIG_FILE = 64 * 2**20  # a bank is kilobytes; bigger files are checked header-first
_T = Keys.Tokens
_JSON_NAMES = {dict: "object", list: "array"}

# --- writing -------------------------------------------------------------------


def write_bank(bank: Any, path: Path, *, force: bool, dtype: str) -> Path:
    """Write ``bank`` (already validated) to ``path`` via a temp file in the same directory."""
    writer = _build_writer(bank, dtype)
    try:
        with atomic_path(path, force=force) as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    finally:
        writer.close()
    log.info("wrote %s (%d tokens, %s)", path, len(bank.tokens), dtype)
    return path


@contextmanager
def atomic_path(path: Path, *, force: bool) -> Iterator[Path]:
    """A temp path next to ``path``, renamed over it when the block succeeds; removed if it fails."""
    if path.is_dir():
        raise EdgeSafeError(f"{path} is a directory; pass a file name such as {path / 'bank.gguf'}")
    if path.exists() and not force:
        raise FileExistsNoForceError(f"{path} already exists; pass --force (force=True) to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; a bank is an ordinary shareable file
    except OSError as e:
        raise EdgeSafeError(f"cannot write {path}: {e.strerror or e}; check the directory is writable") from None
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise EdgeSafeError(f"cannot write {path}: {e.strerror or e}; nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)


def _build_writer(bank: Any, dtype: str) -> GGUFWriter:
    w = GGUFWriter(path=None, arch=bank.arch)
    toks = list(bank.tokens.values())
    strings = {
        Keys.General.TYPE: GENERAL_TYPE_ADAPTER,
        Keys.Adapter.TYPE: ADAPTER_TYPE_TOKEN_BANK,
        Keys.General.NAME: bank.name,
        Keys.Bank.BASE_FINGERPRINT: bank.base_fingerprint,
        Keys.Bank.BASE_NAME: bank.base_name,
        Keys.Bank.LAYOUT: bank.layout,
        Keys.Bank.CHAT_TEMPLATE: bank.template.to_json(),
        Keys.Bank.ORIGIN: bank.origin,
        Keys.Bank.PROFILES: json.dumps(bank.profiles),
        Keys.Bank.TRAINING_CONFIG: json.dumps(bank.training_config, allow_nan=False),
        Keys.Bank.EVAL_SUMMARY: json.dumps(bank.eval_summary, allow_nan=False),
        _T.DESCRIPTIONS: json.dumps([t.description for t in toks]),
        _T.REFUSALS: json.dumps([t.refusal for t in toks]),
        _T.RULES: json.dumps([t.rule for t in toks]),
        _T.ORIGINS: json.dumps([t.origin for t in toks]),
    }
    if bank.description:  # optional: an absent key reads as ""
        strings[Keys.General.DESCRIPTION] = bank.description
    if bank.readout is not None:  # optional: absent, the runtime decides by the refusal-opener margin
        strings[Keys.Bank.READOUT] = bank.readout.to_json()
    if bank.mode_behaviours:  # optional: absent, each mode does what its name says (Behaviour.DEFAULTS)
        strings[Keys.Bank.MODE_BEHAVIOURS] = json.dumps(bank.mode_behaviours)
    for key, value in strings.items():
        _put(w, key, value, GGUFValueType.STRING)
    geometry = bank.deep_geometry
    version = FORMAT_VERSION if geometry is None else FORMAT_VERSION_DEEP  # shallow banks stay readable by v1
    _put(w, Keys.Bank.FORMAT_VERSION, version, GGUFValueType.UINT32)
    _put(w, Keys.Bank.N_EMBD, int(bank.n_embd), GGUFValueType.UINT32)
    _put(w, _T.NAMES, [t.name for t in toks], GGUFValueType.ARRAY, GGUFValueType.STRING)
    _put(w, _T.KINDS, [t.kind for t in toks], GGUFValueType.ARRAY, GGUFValueType.STRING)
    _put(w, _T.N_VECTORS, [t.n_vectors for t in toks], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    if geometry is not None:
        _put(w, _T.DEPTHS, json.dumps([t.depth for t in toks]), GGUFValueType.STRING)
        for key, value in zip((Keys.Deep.N_LAYER, Keys.Deep.N_EMBD_K, Keys.Deep.N_EMBD_V), geometry):
            _put(w, key, int(value), GGUFValueType.UINT32)
        _put(w, Keys.Deep.POSITIONS, bank.deep_positions, GGUFValueType.STRING)
        if bank.deep_copies:  # optional: absent, cells are written once
            _put(w, Keys.Deep.COPIES, json.dumps([list(r) for r in bank.deep_copies]), GGUFValueType.STRING)
    for t in toks:
        if t.is_deep:
            for tname, rows in zip(deep_tensor_names(t.name), (t.keys, t.values)):
                w.add_tensor(tname, _encode(t.name, rows, dtype))
        else:
            w.add_tensor(tensor_name(t.name), _encode(t.name, t.vectors, dtype))
    return w


def _put(w: GGUFWriter, key: str, value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None) -> None:
    """add_key_value, refusing the empty values that gguf's add_string/add_array would silently drop."""
    empty = value == "" if vtype == GGUFValueType.STRING else (vtype == GGUFValueType.ARRAY and len(value) == 0)
    if empty or (sub == GGUFValueType.STRING and any(v == "" for v in value)):
        raise BankFormatError(f"refusing to write an empty value for {key}: GGUF readers would drop it")
    w.add_key_value(key, value, vtype, sub_type=sub)


def _encode(name: str, vectors: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F16":
        peak = float(np.abs(vectors).max())
        if peak > _F16_MAX:
            raise EdgeSafeError(
                f"token {name!r} has values up to {peak:.4g}, beyond float16's range ({_F16_MAX:.0f}); save as F32"
            )
    return np.ascontiguousarray(vectors, dtype=_NP_DTYPES[dtype])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- reading -------------------------------------------------------------------


def copies_rule(value):
    """A ``deep_copies`` rule as JSON holds it (``[[512, 2]]``) as tuples (``((512, 2),)``); anything else is
    returned as it is, for ``bank.check_deep_copies`` to refuse."""
    if isinstance(value, (list, tuple)):
        return tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in value)
    return value


def read_bank(path: Path) -> dict[str, Any]:
    """TokenBank fields from a file (``tokens`` as a list of BankToken kwargs); not yet validated."""
    header, data = _load(path)
    kv = _Fields(path, header)
    names = kv.strings(_T.NAMES)
    _check_unique(path, names)
    n = len(names)
    columns = {
        "kind": kv.strings(_T.KINDS, n),
        "description": kv.json_strings(_T.DESCRIPTIONS, n),
        "refusal": kv.json_strings(_T.REFUSALS, n),
        "rule": kv.json_strings(_T.RULES, n),
        "origin": kv.json_strings(_T.ORIGINS, n, optional=True),
    }
    n_embd = kv.integer(Keys.Bank.N_EMBD)
    depths = kv.json_strings(_T.DEPTHS, n, optional=True, empty=Depth.SHALLOW)
    bad = [d for d in depths if d not in Depth.ALL]
    if bad:
        raise BankFormatError(f"{path}: {_T.DEPTHS} holds {bad[0]!r}; expected one of {', '.join(Depth.ALL)}")
    geometry, positions = None, None
    if Depth.DEEP in depths:
        geometry = tuple(kv.integer(k) for k in (Keys.Deep.N_LAYER, Keys.Deep.N_EMBD_K, Keys.Deep.N_EMBD_V))
        positions = kv.string(Keys.Deep.POSITIONS)
    n_vectors = kv.integers(_T.N_VECTORS, n)
    arrays = _read_tensors(path, header, data, names, n_vectors, n_embd, depths, geometry)
    tokens = [
        {"name": name, **arrays[name], **{k: col[i] for k, col in columns.items()}}
        for i, name in enumerate(names)
    ]
    extra = {"deep_positions": positions} if positions is not None else {}
    if positions is not None and Keys.Deep.COPIES in kv.kv:
        extra["deep_copies"] = copies_rule(kv.json(Keys.Deep.COPIES, list))
    return {**extra,
        "arch": kv.string(Keys.General.ARCHITECTURE),
        "n_embd": n_embd,
        "base_fingerprint": kv.string(Keys.Bank.BASE_FINGERPRINT),
        "base_name": kv.string(Keys.Bank.BASE_NAME),
        "tokens": tokens,
        "profiles": kv.json(Keys.Bank.PROFILES, dict),
        "layout": kv.string(Keys.Bank.LAYOUT),
        "template": kv.template(Keys.Bank.CHAT_TEMPLATE),
        "name": kv.string(Keys.General.NAME),
        "description": kv.string(Keys.General.DESCRIPTION, optional=True),
        "origin": kv.string(Keys.Bank.ORIGIN),
        "training_config": kv.json(Keys.Bank.TRAINING_CONFIG, dict),
        "eval_summary": kv.json(Keys.Bank.EVAL_SUMMARY, dict),
        "mode_behaviours": kv.json(Keys.Bank.MODE_BEHAVIOURS, dict) if Keys.Bank.MODE_BEHAVIOURS in kv.kv else {},
        "readout": _readout(path, kv),
    }


def _readout(path: Path, kv: "_Fields"):
    """The bank's decision readout, or None when it has none."""
    if Keys.Bank.READOUT not in kv.kv:
        return None
    try:
        return Readout.from_json(kv.string(Keys.Bank.READOUT))
    except BankFormatError as e:
        raise BankFormatError(f"{path}: {e}") from None


def stored_dtype(path: Path) -> str:
    """"F16" when a bank file stores its vectors as F16, else "F32" (so an in-place edit keeps the size)."""
    header, _ = _load(path)
    f16 = any(t.qtype == GGMLQuantizationType.F16 for t in header.tensors.values())
    return "F16" if f16 else "F32"


def _load(path: Path) -> tuple[Header, bytes]:
    """The checked header and the file's bytes (a bank is kilobytes)."""
    _check_file(path)
    if path.stat().st_size > _BIG_FILE:  # e.g. a model passed as --bank: say so without reading it all
        _check_is_bank(path, _scan(path, lambda: scan_file(path, keep_arrays=False)))
    data = path.read_bytes()
    header = _scan(path, lambda: parse_header(data, keep_arrays=True))
    _check_is_bank(path, header)
    return header, data


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise BankFormatError(f"token bank not found: {path} (check the path of the bank .gguf)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except PermissionError:
        raise BankFormatError(f"token bank is not readable: {path} (check its permissions)") from None
    if head != b"GGUF":
        raise BankFormatError(
            f"{path} is not a GGUF file (it starts with {head!r}, expected b'GGUF'); a token bank is a "
            ".gguf written by `edge-safe train` or `edge-safe convert`"
        )


def _scan(path: Path, scan) -> Header:
    try:
        return scan()
    except GGUFScanError as e:
        raise BankFormatError(f"{path} is a damaged GGUF file ({e}); re-export the bank") from None


def _check_is_bank(path: Path, h: Header) -> None:
    """A model, a LoRA or another adapter is told apart from a bank, with what to pass instead."""
    gtype, atype = h.kv.get(Keys.General.TYPE), h.kv.get(Keys.Adapter.TYPE)
    if atype == ADAPTER_TYPE_TOKEN_BANK and gtype == GENERAL_TYPE_ADAPTER:
        return _check_version(path, h)
    arch = h.kv.get(Keys.General.ARCHITECTURE, "?")
    use_bank = "pass a token bank written by `edge-safe train` or `edge-safe convert` as --bank"
    if atype == "lora":
        what, fix = f"a LoRA adapter ({arch})", f"LoRAs go to llama.cpp's --lora; {use_bank}"
    elif gtype == GENERAL_TYPE_ADAPTER:
        what, fix = f"a GGUF adapter of type {atype!r}", use_bank
    elif Model.TOKEN_EMBD in h.tensors or gtype == "model":
        what, fix = f"a GGUF model ({arch}, {len(h.tensors)} tensors)", f"pass it as --model and {use_bank[5:]}"
    else:
        what, fix = f"a GGUF file without {Keys.Adapter.TYPE} = {ADAPTER_TYPE_TOKEN_BANK!r}", use_bank
    raise BankFormatError(f"{path} is {what}, not an edge-safe token bank; {fix}")


def _check_version(path: Path, h: Header) -> None:
    version = h.kv.get(Keys.Bank.FORMAT_VERSION)
    if not isinstance(version, int) or version < 1:
        raise BankFormatError(f"{path}: {Keys.Bank.FORMAT_VERSION} is missing or invalid ({version!r}); re-export the bank")
    if version > MAX_FORMAT_VERSION:
        raise BankFormatError(
            f"{path} uses token-bank format version {version}, but this edge-safe reads versions up to "
            f"{MAX_FORMAT_VERSION}; "
            "upgrade edge-safe (pip install -U edge-safe)"
        )


def _check_unique(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise BankFormatError(f"{path}: duplicate token name {n!r} in {_T.NAMES}; each token must appear once")
        seen.add(n)


def _read_tensors(path, h: Header, data: bytes, names, n_vectors, n_embd, depths, geometry) -> dict[str, dict]:
    """Per token ``{"vectors": ...}`` (shallow) or ``{"vectors": empty, "keys": ..., "values": ...}`` (deep)."""
    expected = set()
    for name, depth in zip(names, depths):
        expected.update(deep_tensor_names(name) if depth == Depth.DEEP else (tensor_name(name),))
    extra = [t for t in h.tensors if t not in expected]
    if extra:
        raise BankFormatError(f"{path}: tensor {extra[0]!r} has no entry in {_T.NAMES}; the file is inconsistent")
    out = {}
    for name, n, depth in zip(names, n_vectors, depths):
        if depth == Depth.DEEP:
            n_layer, k, v = geometry
            keys, values = (
                _tensor(path, h, data, tname, (n, n_layer, width), ("n_positions", "n_layer", "width"))
                for tname, width in zip(deep_tensor_names(name), (k, v))
            )
            out[name] = {"vectors": np.zeros((0, 0), np.float32), "keys": keys, "values": values}
        else:
            out[name] = {"vectors": _tensor(path, h, data, tensor_name(name), (n, n_embd), ("n_vectors", "n_embd"))}
    return out


def _tensor(path, h: Header, data: bytes, tname: str, shape: tuple[int, ...], labels: tuple[str, ...]) -> np.ndarray:
    info = h.tensors.get(tname)
    if info is None:
        raise BankFormatError(f"{path}: token tensor {tname!r} is missing; re-export the bank")
    if info.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        raise BankFormatError(f"{path}: tensor {info.name!r} is {info.qtype.name}; a bank stores F32 or F16")
    if info.shape != shape:
        raise BankFormatError(
            f"{path}: tensor {info.name!r} has shape {list(info.shape)} but the metadata says "
            f"[{', '.join(f'{k} {v}' for k, v in zip(labels, shape))}]; the file is inconsistent, re-export it"
        )
    dtype = np.float32 if info.qtype == GGMLQuantizationType.F32 else np.float16
    count = int(np.prod(shape))
    if info.offset + count * np.dtype(dtype).itemsize > len(data):
        raise BankFormatError(f"{path}: tensor {info.name!r} runs past the end of the file; it is truncated")
    return np.frombuffer(data, dtype=dtype, count=count, offset=info.offset).reshape(shape).astype(np.float32)


class _Fields:
    """Typed access to a bank's metadata; a missing or mistyped key is a BankFormatError naming it."""

    def __init__(self, path: Path, header: Header):
        self.path, self.kv, self.types = path, header.kv, header.types

    def _get(self, key: str, types: tuple, optional: bool = False, default=None):
        if key not in self.kv:
            if optional:
                return default
            raise BankFormatError(f"{self.path}: required key {key} is missing; re-export the bank")
        if self.types[key] not in types:
            raise BankFormatError(f"{self.path}: key {key} has the wrong type; re-export the bank")
        return self.kv[key]

    def string(self, key: str, optional: bool = False) -> str:
        return self._get(key, ((GGUFValueType.STRING,),), optional, "")

    def integer(self, key: str) -> int:
        return self._get(key, ((GGUFValueType.UINT32,), (GGUFValueType.UINT64,), (GGUFValueType.INT32,)))

    def strings(self, key: str, n: int | None = None) -> list[str]:
        return self._sized(key, self._get(key, ((GGUFValueType.ARRAY, GGUFValueType.STRING),)), n)

    def integers(self, key: str, n: int) -> list[int]:
        allowed = tuple((GGUFValueType.ARRAY, t) for t in (GGUFValueType.UINT32, GGUFValueType.INT32))
        return self._sized(key, self._get(key, allowed), n)

    def json(self, key: str, kind: type):
        try:
            value = json.loads(self.string(key))
        except ValueError as e:
            raise BankFormatError(f"{self.path}: key {key} is not valid JSON ({e}); re-export the bank") from None
        if not isinstance(value, kind):
            raise BankFormatError(f"{self.path}: key {key} must be a JSON {_JSON_NAMES[kind]}; re-export the bank")
        return value

    def template(self, key: str) -> ChatTemplate:
        try:
            return ChatTemplate.from_json(self.string(key))
        except BankFormatError as e:
            raise BankFormatError(f"{self.path}: {e}") from None

    def json_strings(self, key: str, n: int, optional: bool = False, empty: str = "") -> list[str]:
        if optional and key not in self.kv:
            return [empty] * n
        value = self.json(key, list)
        if not all(isinstance(v, str) for v in value):
            raise BankFormatError(f"{self.path}: key {key} must be a JSON list of strings; re-export the bank")
        return self._sized(key, value, n)

    def _sized(self, key: str, value: list, n: int | None) -> list:
        if n is not None and len(value) != n:
            raise BankFormatError(
                f"{self.path}: key {key} has {len(value)} entries but {_T.NAMES} has {n}; the file is inconsistent"
            )
        return value
