"""Where the train/val/test splits are read from, in a checkout and in an installed package.

A checkout of the repository has the three ``.jsonl`` files next to this module. An installed
package does not carry them (they are training data, 3 MB): the first call regenerates all three
with the seeded generator (``generate.py``, pure stdlib, a few seconds) into
``$EDGE_SAFE_CACHE/data/`` (or ``~/.cache/edge-safe/data/``) and checks each against the sha256
recorded in ``splits.json``, so an installed package reads exactly the committed rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.model import cache_dir

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "splits.json"
SPLITS = ("train", "val", "test")


def split_path(split: str) -> Path:
    """The ``split.jsonl`` file: the checkout's, else the verified copy in the user cache (made once)."""
    if split not in SPLITS:
        raise EdgeSafeError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    local = HERE / f"{split}.jsonl"
    if local.is_file():
        return local
    cached = cache_dir() / "data" / f"{split}.jsonl"
    want = manifest()[split]["sha256"]
    if not (cached.is_file() and sha256(cached.read_bytes()) == want):
        regenerate(cached.parent)
    return cached


def manifest() -> dict:
    """splits.json: per split its sha256 and row count, and the generator's seed."""
    try:
        return json.loads(MANIFEST.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError) as e:
        raise EdgeSafeError(f"cannot read {MANIFEST} ({e}); reinstall edge-safe") from None


def regenerate(out: Path) -> None:
    """Write all three splits into `out` with the seeded generator; each must match splits.json."""
    from edge_safe.training.data import generate

    rows = generate.generate()
    want = manifest()
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        data = generate.render(rows[split]).encode("utf-8")
        if sha256(data) != want[split]["sha256"]:
            raise EdgeSafeError(f"regenerated {split}.jsonl does not match the sha256 in {MANIFEST}; "
                                "pass the split file explicitly (--data) or reinstall edge-safe")
        tmp = out / f".{split}.jsonl.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / f"{split}.jsonl")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest() -> dict:
    """Record the checkout's splits in splits.json (after regenerating them with generate.py)."""
    rows = {s: (HERE / f"{s}.jsonl").read_bytes() for s in SPLITS}
    from edge_safe.training.data.generate import SEED

    doc = {"seed": SEED, "generator": "training/data/generate.py",
           "splits": {s: {"sha256": sha256(b), "rows": b.count(b"\n")} for s, b in rows.items()}}
    MANIFEST.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc
