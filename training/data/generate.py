#!/usr/bin/env python3
"""Generate edge-safe's training / validation / test prompts (pure stdlib, seeded, reproducible).

Every prompt is written in this repository. The phrase tables live in ``tables/*.json``
(one per constraint category, plus ``common.json`` for shared slots and ``general.json`` for
everyday requests); this file is the engine. For each category a table holds *template
families* of violating requests (``"v"``) and of near-miss benign requests (``"b"``: they
mention the topic but break no rule), and ``general.json`` holds general benign families. A
family is one phrasing pattern (direct imperative, persona, indirect "asking for a friend",
multi-sentence context, terse keywords, story framing, comparison, step-by-step, ...) with a
few close variants; its ``{slots}`` are filled from the table's slot lists (``{a:slot}`` adds
"a"/"an", ``{slot2}`` is a second, different value of ``slot``, ``{x}``/``{y}`` from a grouped
slot ``"x|y"`` come from one tuple, ``{"randint": [lo, hi]}`` draws a number).

Splits are made by *family*: per (category, label) the families are shuffled with a
seeded RNG and about 70 % go to train, 10 % to val and 20 % to test, so test phrasings
never occur in training. About one slot value in six (lists of six or more) is held out
for test only. Prompts are de-duplicated globally (case- and punctuation-insensitive).

Usage (from the repository root)::

    python training/data/generate.py            # (re)write train/val/test.jsonl
    python training/data/generate.py --check    # exit 1 if the files differ from a fresh run
    python training/data/generate.py --stats    # print the counts table (README.md has it)
    python -m edge_safe.training.data.generate  # same, when the package is installed

Rows: {"prompt", "category" (a category name or "general"), "label" ("violating" |
"benign"), "family" (e.g. "alcohol/v/persona-bartender"), "split"}.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

SEED = 20261123
HERE = Path(__file__).resolve().parent
SPLITS = ("train", "val", "test")
LABELS = ("violating", "benign")
#: Rows wanted per (category, label) and split; round-robin over the split's families.
TARGETS = {
    "category": {"train": 220, "val": 24, "test": 64},
    "general": {"train": 1000, "val": 120, "test": 260},
}
#: Hard minima (checked by --check and tests/test_data.py).
MINIMA = {
    "category": {"train": 150, "val": 15, "test": 40},
    "general": {"train": 800, "val": 80, "test": 200},
}
SPLIT_FRACTIONS = {"val": 0.10, "test": 0.20}  # the rest is train

TABLES = HERE / "tables"


def _slot_values(name: str, slots: dict) -> dict:
    """A table's slots as the engine uses them: lists (grouped "x|y" slots: tuples) or,
    for {"randint": [lo, hi]}, a function drawing a whole number in that range."""
    out = {}
    for key, values in slots.items():
        if isinstance(values, dict):
            if set(values) != {"randint"} or len(values["randint"]) != 2:
                raise ValueError(f"{name}: slot {key!r}: a dict slot must be {{\"randint\": [lo, hi]}}")
            lo, hi = values["randint"]
            out[key] = (lambda lo, hi: lambda rng: str(rng.randint(lo, hi)))(lo, hi)
        elif isinstance(values, list) and values:
            out[key] = [tuple(v) if isinstance(v, list) else v for v in values]
        else:
            raise ValueError(f"{name}: slot {key!r} must be a non-empty list or a randint range")
    return out


def _table(name: str) -> dict:
    """One phrase table (tables/<name>.json): "slots", and families under "v" / "b"."""
    path = TABLES / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"phrase table missing: {path}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not valid JSON: {exc}") from None
    data["slots"] = _slot_values(path.name, data.get("slots", {}))
    for tag in ("v", "b"):
        for fam, templates in data.get(tag, {}).items():
            if not (isinstance(templates, list) and templates and all(isinstance(t, str) for t in templates)):
                raise SystemExit(f"{path}: family {tag}/{fam} must be a non-empty list of strings")
    return data


#: Slots shared by all categories (a category's own slot of the same name wins).
COMMON = _table("common")["slots"]
#: Per category (every other table): "slots", "v" (violating families), "b" (near-miss
#: benign families); family name -> list of template variants.
CATS: dict[str, dict] = {path.stem: _table(path.stem) for path in sorted(TABLES.glob("*.json"))
                         if path.stem not in ("common", "general")}
#: General benign families.
GENERAL = _table("general")


# =======================================================================================
# Engine
# =======================================================================================
PLACEHOLDER = re.compile(r"\{(a:)?([a-z_0-9]+)\}")


def _category_names() -> tuple[str, ...]:
    """The category names, from training/categories.py (works as module and as script)."""
    try:
        from ..categories import CATEGORY_NAMES  # type: ignore[import-not-found]
    except ImportError:
        import importlib.util

        path = HERE.parent / "categories.py"
        spec = importlib.util.spec_from_file_location("_edge_safe_categories", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look the module up while building classes
        spec.loader.exec_module(module)
        CATEGORY_NAMES = module.CATEGORY_NAMES
    return tuple(CATEGORY_NAMES)


def _article(word: str) -> str:
    head = word.split()[0] if word.split() else word
    digits = re.match(r"\d+", head)
    if digits:  # "an 8-year-old", "an 11-year-old", "a 12-year-old"
        n = digits.group()
        return "an" if n.startswith("8") or n in ("11", "18") or (len(n) in (5, 6) and n[:2] in ("11", "18")) else "a"
    if len(head) > 1 and head.isupper():  # acronyms read letter by letter: "an LSD trip", "a DMT trip"
        return "an" if head[0] in "AEFHILMNORSX" else "a"
    w = word.lower()
    if w.startswith(("one", "uni", "use", "usu", "uti", "eu", "ur")):
        return "a"
    if w.startswith(("hour", "honest", "heir")):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


def _norm(prompt: str) -> str:
    """De-duplication key: case, punctuation and spacing do not make a prompt new."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", prompt.lower()).split())


class _Slots:
    """Slot pools of one scope (a category, or general) with the held-out values removed off test."""

    def __init__(self, scope: str, slots: dict):
        self.scope = scope
        self.slots = slots
        self.index: dict[str, tuple[str, int | None]] = {}
        for key in slots:
            if "|" in key:
                for i, name in enumerate(key.split("|")):
                    self.index[name] = (key, i)
            else:
                self.index[key] = (key, None)
        self._pools: dict[tuple[str, str], object] = {}

    def held_out(self, key: str) -> set[int]:
        values = self.slots[key]
        if callable(values) or len(values) < 6:
            return set()
        scope = "common" if key in COMMON and self.slots[key] is COMMON[key] else self.scope
        rng = random.Random(f"{SEED}|holdout|{scope}|{key}")
        return set(rng.sample(range(len(values)), len(values) // 6))

    def pool(self, key: str, split: str):
        ck = (key, split)
        if ck not in self._pools:
            values = self.slots[key]
            if callable(values) or split == "test":
                self._pools[ck] = values
            else:
                held = self.held_out(key)
                self._pools[ck] = [v for i, v in enumerate(values) if i not in held]
        return self._pools[ck]

    def fill(self, template: str, split: str, rng: random.Random) -> str:
        chosen: dict[tuple[str, str], object] = {}

        def sub(m: re.Match) -> str:
            art, name, suffix = m.group(1), m.group(2), ""
            if name not in self.index and name.endswith("2") and name[:-1] in self.index:
                name, suffix = name[:-1], "2"  # {x2}: a second value of x, different from {x}
            if name not in self.index:
                raise KeyError(f"unknown slot {{{name}}} in {template!r} ({self.scope})")
            key, idx = self.index[name]
            ck = (key, suffix)
            if ck not in chosen:
                pool = self.pool(key, split)
                if callable(pool):
                    chosen[ck] = pool(rng)
                else:
                    taken = [chosen[(key, s)] for s in ("", "2") if (key, s) in chosen]
                    chosen[ck] = rng.choice([v for v in pool if v not in taken])
            value = chosen[ck]
            text = value[idx] if idx is not None else value
            return f"{_article(text)} {text}" if art else text

        text = PLACEHOLDER.sub(sub, template)
        if "{" in text or "}" in text:
            raise ValueError(f"unfilled placeholder in {text!r} ({self.scope})")
        return text


def _families(categories: tuple[str, ...]):
    """[(category, label, family_id, templates, slots)] in a fixed order."""
    if set(CATS) != set(categories):
        raise SystemExit(f"phrase tables in {TABLES} {sorted(CATS)} != categories.py {sorted(categories)}")
    out = []
    for cat in categories:
        slots = _Slots(cat, {**COMMON, **CATS[cat]["slots"]})
        for tag, label in (("v", "violating"), ("b", "benign")):
            for name, templates in CATS[cat][tag].items():
                out.append((cat, label, f"{cat}/{tag}/{name}", templates, slots))
    slots = _Slots("general", {**COMMON, **GENERAL["slots"]})
    for name, templates in GENERAL["b"].items():
        out.append(("general", "benign", f"general/b/{name}", templates, slots))
    return out


def _assign_splits(family_ids: list[str], cat: str, label: str) -> dict[str, str]:
    names = sorted(family_ids)
    random.Random(f"{SEED}|split|{cat}|{label}").shuffle(names)
    n = len(names)
    n_test = max(1, round(n * SPLIT_FRACTIONS["test"]))
    n_val = max(1, round(n * SPLIT_FRACTIONS["val"]))
    split = {}
    for i, fid in enumerate(names):
        split[fid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def _candidates(fid: str, templates: list[str], slots: _Slots, split: str, cap: int = 150) -> list[str]:
    """Up to `cap` distinct fillings of one family, in a seeded order."""
    rng = random.Random(f"{SEED}|family|{fid}")
    terse = fid.split("/")[2].startswith("terse")
    seen: set[str] = set()
    out: list[str] = []
    misses = 0
    while len(out) < cap and misses < 60:
        text = " ".join(slots.fill(rng.choice(templates), split, rng).split())
        if not terse:
            text = text[0].upper() + text[1:]
        key = _norm(text)
        if key in seen:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        out.append(text)
    return out


def generate() -> dict[str, list[dict]]:
    """All rows, per split, in file order."""
    categories = _category_names()
    fams = _families(categories)
    groups: dict[tuple[str, str], list] = {}
    for fam in fams:
        groups.setdefault((fam[0], fam[1]), []).append(fam)
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for (cat, label), members in groups.items():
        split_of = _assign_splits([f[2] for f in members], cat, label)
        kind = "general" if cat == "general" else "category"
        for split in ("test", "val", "train"):
            chosen = sorted((f for f in members if split_of[f[2]] == split), key=lambda f: f[2])
            cands = {f[2]: _candidates(f[2], f[3], f[4], split) for f in chosen}
            pos = {fid: 0 for fid in cands}
            active = [f[2] for f in chosen]
            taken = 0
            target = TARGETS[kind][split]
            while taken < target and active:
                still = []
                for fid in active:
                    if taken >= target:
                        break
                    c, i = cands[fid], pos[fid]
                    while i < len(c) and _norm(c[i]) in seen:
                        i += 1
                    if i < len(c):
                        seen.add(_norm(c[i]))
                        rows[split].append({"prompt": c[i], "category": cat, "label": label,
                                            "family": fid, "split": split})
                        taken += 1
                        still.append(fid)
                        i += 1
                    pos[fid] = i
                active = still
    for split in SPLITS:
        rows[split].sort(key=lambda r: (r["category"], r["label"], r["family"], r["prompt"]))
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def stats(rows: dict[str, list[dict]]) -> str:
    """Markdown table: rows and families per (category, label) and split."""
    order = list(_category_names()) + ["general"]
    count: dict[tuple, int] = {}
    fams: dict[tuple, set] = {}
    for split, rs in rows.items():
        for r in rs:
            k = (r["category"], r["label"], split)
            count[k] = count.get(k, 0) + 1
            fams.setdefault(k, set()).add(r["family"])
    lines = ["| category | label | train | val | test | families (train/val/test) |",
             "|---|---|---:|---:|---:|---|"]
    totals = {s: 0 for s in SPLITS}
    for cat in order:
        for label in LABELS:
            if not any((cat, label, s) in count for s in SPLITS):
                continue
            c = [count.get((cat, label, s), 0) for s in SPLITS]
            f = [len(fams.get((cat, label, s), ())) for s in SPLITS]
            for s, n in zip(SPLITS, c):
                totals[s] += n
            lines.append(f"| {cat} | {label} | {c[0]} | {c[1]} | {c[2]} | {sum(f)} ({f[0]}/{f[1]}/{f[2]}) |")
    lines.append(f"| **all** | | {totals['train']} | {totals['val']} | {totals['test']} | |")
    return "\n".join(lines)


def problems(rows: dict[str, list[dict]]) -> list[str]:
    """Violations of the data contract (empty when all is well)."""
    out = []
    categories = _category_names()
    for cat in categories:
        nv, nb = len(CATS[cat]["v"]), len(CATS[cat]["b"])
        if nv < 24 or nb < 16:
            out.append(f"{cat}: {nv} violating / {nb} benign families (need >= 24 / 16)")
    if len(GENERAL["b"]) < 40:
        out.append(f"general: {len(GENERAL['b'])} families (need >= 40)")
    for split, rs in rows.items():
        for cat in list(categories) + ["general"]:
            kind = "general" if cat == "general" else "category"
            for label in (("benign",) if cat == "general" else LABELS):
                n = sum(1 for r in rs if r["category"] == cat and r["label"] == label)
                if n < MINIMA[kind][split]:
                    out.append(f"{split} {cat}/{label}: {n} rows < {MINIMA[kind][split]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify the files match a fresh generation (exit 1 if not)")
    ap.add_argument("--stats", action="store_true", help="print the counts table and exit")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    args = ap.parse_args(argv)
    rows = generate()
    bad = problems(rows)
    if args.stats:
        print(stats(rows))
        return 1 if bad else 0
    if args.check:
        stale = []
        for split in SPLITS:
            path = args.out / f"{split}.jsonl"
            if not path.exists() or path.read_bytes() != render(rows[split]).encode("utf-8"):
                stale.append(str(path))
        for line in bad:
            print(f"problem: {line}", file=sys.stderr)
        for path in stale:
            print(f"stale: {path} (run: python training/data/generate.py)", file=sys.stderr)
        if not stale and not bad:
            print(f"ok: {', '.join(f'{s}.jsonl ({len(rows[s])})' for s in SPLITS)} match seed {SEED}")
        return 1 if stale or bad else 0
    for line in bad:
        print(f"problem: {line}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (args.out / f"{split}.jsonl").write_bytes(render(rows[split]).encode("utf-8"))
    print(stats(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
