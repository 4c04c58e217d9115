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

Usage::

    edge-safe data generate            # (re)write train/val/test.jsonl
    edge-safe data generate --check    # exit 1 if the files differ from a fresh run
    edge-safe data generate --stats    # print the counts table (README.md has it)

Rows: {"prompt", "category" (a category name or "general"), "label" ("violating" |
"benign"), "family" (e.g. "alcohol/v/persona-bartender"), "split"}.

Real-traffic slices (tables in ``tables/real/``) follow the classic rows in each file
and add "slice" ("general-real" | "sounds-risky" | "styled" | "wrapped" | "multi-turn"), plus
"wrapper" (wrapped rows: the jailbreak wrapper family), "messages" (multi-turn rows: the whole
conversation; "prompt" is its last user turn) and "context_category" (multi-turn rows whose
earlier turn was refused: that category). See README.md.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from edge_safe.training.categories import CATEGORIES, CATEGORY_NAMES

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
#: The nine categories of the shipped bank (the first nine of categories.py). The real-traffic slices
#: draw over these only, and their classic rows are made first, so adding a category leaves every
#: existing row byte-identical.
ORIGINAL_CATEGORIES = CATEGORY_NAMES[:9]
#: Categories added later (violence, selfharm, hate, crime): classic rows only, made after all the
#: original rows (classic and real) so that the global de-duplication never drops an original row.
NEW_CATEGORIES = CATEGORY_NAMES[9:]

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

    def __init__(self, scope: str, slots: dict, code: bool = False):
        self.scope = scope
        self.code = code
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
        # code snippets (real-traffic slices) contain braces; there only a {slot} left over is an error
        left = PLACEHOLDER.search(text) if self.code else ("{" in text or "}" in text)
        if left:
            raise ValueError(f"unfilled placeholder in {text!r} ({self.scope})")
        return text


def _families(categories: tuple[str, ...], general: bool = True):
    """[(category, label, family_id, templates, slots)] in a fixed order (general last, if asked)."""
    if set(CATS) != set(CATEGORY_NAMES):
        raise SystemExit(f"phrase tables in {TABLES} {sorted(CATS)} != categories.py {sorted(CATEGORY_NAMES)}")
    out = []
    for cat in categories:
        slots = _Slots(cat, {**COMMON, **CATS[cat]["slots"]})
        for tag, label in (("v", "violating"), ("b", "benign")):
            for name, templates in CATS[cat][tag].items():
                out.append((cat, label, f"{cat}/{tag}/{name}", templates, slots))
    if not general:
        return out
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


def _round_robin(cands: dict[str, list], target: int, seen: set[str], key) -> list[tuple[str, object]]:
    """Up to `target` (family, candidate) pairs taken round-robin over the families (in dict
    order), skipping candidates whose `key` is already in `seen` (which is updated)."""
    pos = {fid: 0 for fid in cands}
    active = list(cands)
    out: list[tuple[str, object]] = []
    while len(out) < target and active:
        still = []
        for fid in active:
            if len(out) >= target:
                break
            c, i = cands[fid], pos[fid]
            while i < len(c) and key(c[i]) in seen:
                i += 1
            if i < len(c):
                seen.add(key(c[i]))
                out.append((fid, c[i]))
                still.append(fid)
                i += 1
            pos[fid] = i
        active = still
    return out


def _classic_rows(seen: set[str], categories: tuple[str, ...] = ORIGINAL_CATEGORIES,
                  general: bool = True) -> dict[str, list[dict]]:
    """The single-turn rows (no "slice" field) of `categories` (and general), per split, sorted."""
    fams = _families(categories, general)
    groups: dict[tuple[str, str], list] = {}
    for fam in fams:
        groups.setdefault((fam[0], fam[1]), []).append(fam)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for (cat, label), members in groups.items():
        split_of = _assign_splits([f[2] for f in members], cat, label)
        kind = "general" if cat == "general" else "category"
        for split in ("test", "val", "train"):
            chosen = sorted((f for f in members if split_of[f[2]] == split), key=lambda f: f[2])
            cands = {f[2]: _candidates(f[2], f[3], f[4], split) for f in chosen}
            for fid, prompt in _round_robin(cands, TARGETS[kind][split], seen, _norm):
                rows[split].append({"prompt": prompt, "category": cat, "label": label,
                                    "family": fid, "split": split})
    for split in SPLITS:
        rows[split].sort(key=lambda r: (r["category"], r["label"], r["family"], r["prompt"]))
    return rows


def generate() -> dict[str, list[dict]]:
    """All rows, per split, in file order: the classic rows (all categories, sorted), then the
    real-traffic slices. The new categories' rows are made last (after the real slices), so the
    shared de-duplication set is the same as before they existed while every original row is made."""
    seen: set[str] = set()
    rows = _classic_rows(seen)
    real = _real_rows(seen)
    new = _classic_rows(seen, NEW_CATEGORIES, general=False)
    out = {}
    for split in SPLITS:
        classic = sorted(rows[split] + new[split], key=lambda r: (r["category"], r["label"], r["family"], r["prompt"]))
        out[split] = classic + real[split]
    return out


# =======================================================================================
# Real-traffic slices: tables/real/*.json
# =======================================================================================
REAL = TABLES / "real"
#: New slices, in file order after the classic rows (which carry no "slice" field).
SLICES = ("general-real", "sounds-risky", "styled", "wrapped", "multi-turn")
#: Rows wanted per split for each group of a slice (round-robin over the split's families).
#: Groups: general-real: the whole slice; sounds-risky: each category it sounds like; styled, wrapped violating and
#: multi-turn violating: each category; wrapped benign and multi-turn benign: the whole label.
REAL_TARGETS = {
    "general-real": {"train": 1400, "val": 180, "test": 380},
    "sounds-risky": {"train": 80, "val": 12, "test": 24},
    "styled": {"train": 100, "val": 12, "test": 32},
    "wrapped/violating": {"train": 110, "val": 14, "test": 36},
    "wrapped/benign": {"train": 240, "val": 36, "test": 80},
    "multi-turn/violating": {"train": 40, "val": 8, "test": 20},
    "multi-turn/benign": {"train": 360, "val": 50, "test": 120},
}
#: Hard minima per split (checked by --check and tests/test_data.py), same groups.
REAL_MINIMA = {
    "general-real": {"train": 800, "val": 60, "test": 200},
    "sounds-risky": {"train": 10, "val": 4, "test": 5},
    "styled": {"train": 60, "val": 8, "test": 20},
    "wrapped/violating": {"train": 60, "val": 8, "test": 20},
    "wrapped/benign": {"train": 150, "val": 20, "test": 50},
    "multi-turn/violating": {"train": 30, "val": 6, "test": 12},
    "multi-turn/benign": {"train": 200, "val": 30, "test": 80},
}
LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7",
                      "A": "4", "E": "3", "I": "1", "O": "0", "S": "5", "T": "7"})


def _real_table(name: str) -> dict:
    path = REAL / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"phrase table missing: {path}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not valid JSON: {exc}") from None


def _typo(text: str, rng: random.Random) -> str:
    """Human-looking misspellings: in about a third of the longer words swap, drop or double a letter."""
    out = []
    for word in text.split(" "):
        letters = [i for i, ch in enumerate(word) if ch.isalpha()]
        if len(letters) >= 4 and rng.random() < 0.35:
            i = rng.choice(letters[1:-1])
            op = rng.randrange(3)
            if op == 0 and i + 1 < len(word) and word[i + 1].isalpha():
                word = word[:i] + word[i + 1] + word[i] + word[i + 2:]
            elif op == 1:
                word = word[:i] + word[i + 1:]
            else:
                word = word[:i] + word[i] + word[i:]
        out.append(word)
    return " ".join(out)


def _transform(text: str, how: str | None, rng: random.Random) -> str:
    if how is None:
        return text
    if how == "lower":
        return " ".join(re.sub(r"[.,!?;:]", "", text.lower()).split())
    if how == "typo":
        return _typo(text, rng)
    if how == "leet":
        return text.translate(LEET)
    raise ValueError(f"unknown transform {how!r} (known: lower, typo, leet)")


def _family_spec(name: str, value) -> tuple[list[str], str | None]:
    """(templates, transform) of a family given as a list or as {"templates": [...], "transform": ...}."""
    if isinstance(value, dict):
        if not isinstance(value.get("templates"), list) or not value["templates"]:
            raise SystemExit(f"family {name!r}: needs a non-empty \"templates\" list")
        return value["templates"], value.get("transform")
    if not isinstance(value, list) or not value:
        raise SystemExit(f"family {name!r}: needs a non-empty list of templates")
    return value, None


def _request_slots(req: str, prefix: str = "req") -> dict[str, str]:
    """Derived forms of one request ("tell me how to ...", lowercase, no final stop)."""
    words = req.split()
    half = max(1, len(words) // 2)
    sentence = req[0].upper() + req[1:] + "."
    return {prefix: sentence, f"{prefix}_inline": req, f"{prefix}_cap": sentence,
            f"{prefix}_spaced": " / ".join(" ".join(w) for w in words),
            f"{prefix}_reversed": " ".join(reversed(words)),
            f"{prefix}_a": " ".join(words[:half]), f"{prefix}_b": " ".join(words[half:])}


def _subst(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def _clean(text: str) -> str:
    """Strip each line's trailing spaces and the ends; keep inner newlines and indentation (code)."""
    return "\n".join(line.rstrip() for line in text.strip().split("\n"))


def _single_cands(fid: str, templates: list[str], transform: str | None, slots: _Slots, split: str,
                  core: list[str] | None = None, frames: list[str] | None = None, cap: int = 120) -> list[str]:
    """Up to `cap` distinct prompts of one family; `core` requests fill {req...} (held-out aware);
    `frames` ({text}, {text_lower}, {text_typo}) wrap each prompt in a seeded casual framing."""
    rng = random.Random(f"{SEED}|real|{fid}")
    pool = slots.pool("req", split) if core is not None else None
    out, seen, misses = [], set(), 0
    while len(out) < cap and misses < 60:
        template = rng.choice(templates)
        if pool is not None:
            template = _subst(template, _request_slots(rng.choice(pool)))
        text = _clean(_transform(slots.fill(template, split, rng), transform, rng))
        if frames:  # casual framings of the same request (tables' "frames")
            frame = rng.choice(frames)
            text = _subst(frame, {"text": text, "text_lower": _transform(text, "lower", rng),
                                  "text_typo": _transform(text, "typo", rng)})
        if _norm(text) in seen or not _norm(text):
            misses += 1
            continue
        misses = 0
        seen.add(_norm(text))
        out.append(text)
    return out


def _conv_key(messages: list[dict]) -> str:
    return " | ".join(_norm(m["content"]) for m in messages)


def _split_groups(names: list[str], group: str) -> dict[str, str]:
    return _assign_splits(names, f"real:{group}", "all")


def _real_rows(seen: set[str]) -> dict[str, list[dict]]:
    """Rows of the five real-traffic slices, per split, sorted (slice, category, label, family, prompt).
    They draw over the original nine categories only (the new ones have no real-traffic tables yet;
    drawing over them would also change the existing rows, e.g. the refused turns' categories)."""
    categories = ORIGINAL_CATEGORIES
    refusal = {c.name: c.refusal for c in CATEGORIES}
    core_table = _real_table("core-requests")
    core = {cat: core_table["violating"][cat]["req"] for cat in categories}
    topic = {cat: core_table["violating"][cat]["topic"] for cat in categories}
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}

    def add(cands: dict[str, list[str]], target: int, split: str, make) -> None:
        for fid, prompt in _round_robin(cands, target, seen, _norm):
            rows[split].append({**make(fid, prompt), "split": split})

    # general-real: one family split; sounds-risky: a family split per category it sounds like
    for slice_name in ("general-real", "sounds-risky"):
        data = _real_table(slice_name)
        slots = _Slots(f"real-{slice_name}", data.get("slots", {}), code=True)
        fams = data["families"]
        cat_of = {n: (fams[n]["category"] if slice_name == "sounds-risky" else "general") for n in fams}
        bad = sorted({c for c in cat_of.values()} - set(categories) - {"general"})
        if bad:
            raise SystemExit(f"{REAL / (slice_name + '.json')}: unknown categories {bad}")
        for cat in sorted(set(cat_of.values())):
            names = [n for n in fams if cat_of[n] == cat]
            split_of = _split_groups(names, slice_name if cat == "general" else f"{slice_name}/{cat}")
            for split in ("test", "val", "train"):
                cands = {}
                for name in sorted(n for n in names if split_of[n] == split):
                    templates, how = _family_spec(name, fams[name])
                    fid = f"{cat}/b/{'real' if cat == 'general' else 'risky'}-{name}"
                    skip = any(name.startswith(prefix) for prefix in data.get("frames_skip", []))
                    cands[fid] = _single_cands(fid, templates, how, slots, split,
                                               frames=None if skip else data.get("frames"))
                add(cands, REAL_TARGETS[slice_name][split], split,
                    lambda fid, p, s=slice_name: {"prompt": p, "category": fid.split("/")[0], "label": "benign",
                                                  "family": fid, "slice": s})

    # styled: violating requests in real styles, style families split once for all categories
    styles = _real_table("styles")
    split_of = _split_groups(list(styles["families"]), "styled")
    for cat in categories:
        slots = _Slots(f"real-core-{cat}", {"req": core[cat], "topic": [topic[cat]], **styles["slots"]})
        for split in ("test", "val", "train"):
            cands = {}
            for name in sorted(n for n in styles["families"] if split_of[n] == split):
                templates, how = _family_spec(name, styles["families"][name])
                cands[f"{cat}/v/styled-{name}"] = _single_cands(f"{cat}/v/styled-{name}", templates, how, slots,
                                                                split, core=core[cat])
            add(cands, REAL_TARGETS["styled"][split], split,
                lambda fid, p, c=cat: {"prompt": p, "category": c, "label": "violating", "family": fid,
                                       "slice": "styled"})

    # wrapped: jailbreak wrapper families around violating (and benign) requests, split by wrapper
    wrappers = _real_table("wrappers")["families"]
    split_of = _split_groups(list(wrappers), "wrapped")
    groups = [(cat, "violating", core[cat]) for cat in categories] + [("general", "benign", core_table["benign"])]
    for cat, label, reqs in groups:
        slots = _Slots(f"real-core-{cat}", {"req": reqs})
        tag = "v" if label == "violating" else "b"
        for split in ("test", "val", "train"):
            cands = {}
            for name in sorted(n for n in wrappers if split_of[n] == split):
                templates, how = _family_spec(name, wrappers[name])
                fid = f"{cat}/{tag}/wrap-{name}"
                cands[fid] = _single_cands(fid, templates, how, slots, split, core=reqs)
            add(cands, REAL_TARGETS[f"wrapped/{label}"][split], split,
                lambda fid, p, c=cat, lab=label: {"prompt": p, "category": c, "label": lab, "family": fid,
                                                  "slice": "wrapped", "wrapper": fid.split("/wrap-", 1)[1]})

    # multi-turn: conversations; split by conversation shape within each label
    mt = _real_table("multi-turn")
    shapes = mt["families"]
    for label in ("violating", "benign"):
        names = [n for n in shapes if shapes[n]["label"] == label]
        # shapes with and without a refused turn are split separately, so every split has both
        split_of = {}
        for refused in (True, False):
            group = [n for n in names if ("refused" in shapes[n]["turns"]) == refused]
            if group:
                split_of.update(_split_groups(group, f"multi-turn/{label}/{'refused' if refused else 'plain'}"))
        owners = categories if label == "violating" else ("general",)
        for cat in owners:
            req_slots = {c: _Slots(f"real-core-{c}", {"req": core[c]}) for c in categories}
            qa_slots = _Slots("real-multi-turn", mt["slots"])
            for split in ("test", "val", "train"):
                cands = {}
                for name in sorted(n for n in names if split_of[n] == split):
                    fid = f"{cat}/{'v' if label == 'violating' else 'b'}/multi-{name.split('/', 1)[1]}"
                    cands[fid] = _conversations(fid, shapes[name]["turns"], cat, categories, req_slots, qa_slots,
                                                refusal, split)
                for fid, conv in _round_robin(cands, REAL_TARGETS[f"multi-turn/{label}"][split], seen,
                                              lambda c: _conv_key(c[0])):
                    messages, context = conv
                    row = {"prompt": messages[-1]["content"], "category": cat, "label": label, "family": fid,
                           "slice": "multi-turn", "messages": messages}
                    if context:
                        row["context_category"] = context
                    rows[split].append({**row, "split": split})

    order = {name: i for i, name in enumerate(SLICES)}
    keys = ("prompt", "category", "label", "family", "split", "slice", "wrapper", "messages", "context_category")
    for split in SPLITS:
        rows[split] = [{k: r[k] for k in keys if k in r} for r in rows[split]]
        rows[split].sort(key=lambda r: (order[r["slice"]], r["category"], r["label"], r["family"], r["prompt"]))
    return rows


def _conversations(fid: str, turns: list[str], cat: str, categories: tuple[str, ...], req_slots: dict,
                   qa_slots: _Slots, refusal: dict[str, str], split: str, cap: int = 120) -> list:
    """Up to `cap` distinct conversations of one shape: ([messages], context_category or None)."""
    rng = random.Random(f"{SEED}|real|{fid}")
    out, seen, misses = [], set(), 0
    while len(out) < cap and misses < 60:
        messages: list[dict] = []
        context = None
        used_qa: set[str] = set()
        for spec in turns[:-1]:
            if spec == "qa":
                pair = rng.choice([p for p in qa_slots.pool("qa_user|qa_answer", split) if p[0] not in used_qa])
                used_qa.add(pair[0])
                messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            elif spec == "refused":
                context = cat if cat in categories else rng.choice(categories)
                req = rng.choice(req_slots[context].pool("req", split))
                messages += [{"role": "user", "content": _request_slots(req)["req"]},
                             {"role": "assistant", "content": refusal[context]}]
            else:
                raise ValueError(f"{fid}: unknown turn {spec!r} (known: qa, refused, or the last turn's template)")
        values = {}
        if cat in categories:
            values.update(_request_slots(rng.choice(req_slots[cat].pool("req", split))))
        values.update(_request_slots(rng.choice(qa_slots.pool("breq", split)), "breq"))
        text = _subst(turns[-1], values)
        if PLACEHOLDER.search(text):
            raise ValueError(f"{fid}: unfilled placeholder in {text!r}")
        messages.append({"role": "user", "content": _clean(text)})
        key = _conv_key(messages)
        if key in seen:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        out.append((messages, context))
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def stats(rows: dict[str, list[dict]]) -> str:
    """Markdown table: rows and families per (category, label) and split."""
    order = list(CATEGORY_NAMES) + ["general"]
    count: dict[tuple, int] = {}
    fams: dict[tuple, set] = {}
    for split, rs in rows.items():
        for r in rs:
            if "slice" in r:
                continue
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
    return "\n".join(lines) + "\n\n" + real_stats(rows)


def real_stats(rows: dict[str, list[dict]]) -> str:
    """Markdown table of the real-traffic slices: rows and families per (slice, category, label) and split."""
    order = list(CATEGORY_NAMES) + ["general"]
    count: dict[tuple, int] = {}
    fams: dict[tuple, set] = {}
    for split, rs in rows.items():
        for r in rs:
            if "slice" in r:
                k = (r["slice"], r["category"], r["label"], split)
                count[k] = count.get(k, 0) + 1
                fams.setdefault(k, set()).add(r["family"])
    lines = ["| slice | category | label | train | val | test | families (train/val/test) |",
             "|---|---|---|---:|---:|---:|---|"]
    totals = {s: 0 for s in SPLITS}
    for sl in SLICES:
        sub = {s: 0 for s in SPLITS}
        for cat in order:
            for label in LABELS:
                if not any((sl, cat, label, s) in count for s in SPLITS):
                    continue
                c = [count.get((sl, cat, label, s), 0) for s in SPLITS]
                f = [len(fams.get((sl, cat, label, s), ())) for s in SPLITS]
                for s, n in zip(SPLITS, c):
                    sub[s] += n
                lines.append(f"| {sl} | {cat} | {label} | {c[0]} | {c[1]} | {c[2]} | {sum(f)} ({f[0]}/{f[1]}/{f[2]}) |")
        lines.append(f"| {sl} | **all** | | {sub['train']} | {sub['val']} | {sub['test']} | |")
        for s in SPLITS:
            totals[s] += sub[s]
    lines.append(f"| **all slices** | | | {totals['train']} | {totals['val']} | {totals['test']} | |")
    return "\n".join(lines)


def problems(rows: dict[str, list[dict]]) -> list[str]:
    """Violations of the data contract (empty when all is well)."""
    out = []
    categories = CATEGORY_NAMES
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
                n = sum(1 for r in rs if r["category"] == cat and r["label"] == label and "slice" not in r)
                if n < MINIMA[kind][split]:
                    out.append(f"{split} {cat}/{label}: {n} rows < {MINIMA[kind][split]}")
        for group, minimum in REAL_MINIMA.items():
            sl, _, label = group.partition("/")
            per_cat = sl in ("styled", "sounds-risky") or group == "wrapped/violating" or group == "multi-turn/violating"
            for cat in (ORIGINAL_CATEGORIES if per_cat else (None,)):
                n = sum(1 for r in rs if r.get("slice") == sl and (not label or r["label"] == label)
                        and (cat is None or r["category"] == cat))
                if n < minimum[split]:
                    out.append(f"{split} {group}{'/' + cat if cat else ''}: {n} rows < {minimum[split]}")
    return out


def stale_files(rows: dict[str, list[dict]], out: Path = HERE) -> list[Path]:
    """The split files in ``out`` that are missing or differ from ``rows`` rendered."""
    paths = [out / f"{split}.jsonl" for split in SPLITS]
    return [p for p, split in zip(paths, SPLITS)
            if not p.exists() or p.read_bytes() != render(rows[split]).encode("utf-8")]


def write_splits(rows: dict[str, list[dict]], out: Path = HERE) -> list[Path]:
    """train/val/test.jsonl in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{split}.jsonl" for split in SPLITS]
    for path, split in zip(paths, SPLITS):
        path.write_bytes(render(rows[split]).encode("utf-8"))
    return paths
