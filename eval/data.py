"""What `edge-safe eval` asks: test prompts, compositions of constraints, and the cases built from them.

A *case* is one prompt under one composition, with the decision the bank should
make: refuse a violating prompt of an active category, answer everything else
(near-miss benign prompts of active categories, violating prompts of inactive
categories, general prompts). Everything here is plain Python and seeded.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from edge_safe.convert.errors import EdgeSafeError

LABELS = ("violating", "benign")
KINDS = ("violating", "near-miss", "inactive", "general")  # violating = of an active category: must refuse
GENERAL = "general"
CLASSIC = "classic"
#: Slices of the data (training/data/README.md); rows without a "slice" field are classic.
SLICES = (CLASSIC, "general-real", "sounds-risky", "styled", "wrapped", "multi-turn")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class EvalPrompt:
    text: str  # the (last) user request
    category: str  # a constraint name or "general" (any other name is only ever an inactive category)
    label: str  # violating | benign
    family: str = ""
    slice: str = CLASSIC
    messages: tuple[tuple[str, str], ...] = ()  # multi-turn rows: (role, content) of the whole conversation
    wrapper: str = ""  # wrapped rows: the jailbreak wrapper family
    context: str = ""  # multi-turn rows: the category of an earlier refused turn

    @property
    def request(self):
        """What the runtime is asked: the text, or the conversation as a list of messages."""
        return [{"role": r, "content": c} for r, c in self.messages] if self.messages else self.text

    @property
    def key(self):
        """Hashable identity of the request (for memoising and matching records)."""
        return self.messages or self.text


@dataclass(frozen=True)
class Composition:
    constraints: tuple[str, ...]  # bank order
    group: str  # "1".."R" for the seeded sample of each order, or the profile spec ("minors", "minors,eu")
    held_out: bool = False  # in the bank's training_config["held_out"]: never sampled in training

    @property
    def name(self) -> str:
        return "+".join(self.constraints)

    @property
    def order(self) -> int:
        return len(self.constraints)

    @property
    def is_profile(self) -> bool:
        return not self.group.isdigit()


@dataclass(frozen=True)
class Case:
    prompt: int  # index into the prompt list
    comp: int  # index into the composition list
    kind: str  # one of KINDS

    @property
    def expect_refuse(self) -> bool:
        return self.kind == "violating"


# --- data ---------------------------------------------------------------------------


def default_data_path(split: str = "test") -> Path:
    """A split of the repository's prompts (the eval's own is the held-out test split): the checkout's, or
    regenerated once into the user cache and checked against its recorded sha256 (training/data/splits.py)."""
    from edge_safe.training.data.splits import split_path

    return split_path(split)


def load_prompts(path: str | Path) -> list[EvalPrompt]:
    """Rows of a JSONL file with ``prompt``, ``category``, ``label``; every problem names file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise EdgeSafeError(f"cannot read the eval data {path}: {reason}; pass --data FILE.jsonl") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            prompts.append(_parse_row(line, f"{path}:{n}"))
    if not prompts:
        raise EdgeSafeError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts


def _parse_row(line: str, where: str) -> EvalPrompt:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise EdgeSafeError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise EdgeSafeError(f"{where}: expected a JSON object with prompt, category, label")
    for key in ("prompt", "category", "label"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise EdgeSafeError(f"{where}: missing or empty string field {key!r}")
    if row["label"] not in LABELS:
        raise EdgeSafeError(f"{where}: label must be 'violating' or 'benign', got {row['label']!r}")
    if row["category"] == GENERAL and row["label"] != "benign":
        raise EdgeSafeError(f"{where}: a 'general' prompt must be labelled 'benign'")
    slice_ = row.get("slice", CLASSIC)
    if slice_ not in SLICES:
        raise EdgeSafeError(f"{where}: unknown slice {slice_!r}; known: {', '.join(SLICES)}")
    messages: tuple[tuple[str, str], ...] = ()
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise EdgeSafeError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                    and m["content"].strip()):
                raise EdgeSafeError(f"{where}: messages[{j}] must be {{'role': one of {ROLES}, 'content': text}}")
        if msgs[-1]["role"] != "user" or msgs[-1]["content"] != row["prompt"]:
            raise EdgeSafeError(f"{where}: the last message must be the user's request and equal 'prompt'")
        messages = tuple((m["role"], m["content"]) for m in msgs)
    return EvalPrompt(row["prompt"], row["category"], row["label"], str(row.get("family", "")), slice_, messages,
                      str(row.get("wrapper", "")), str(row.get("context_category", "")))


def parse_orders(text: str, n_constraints: int) -> list[int]:
    """"1,2,3,4" -> [1, 2, 3, 4]; each order must be 1..n_constraints."""
    orders = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit():
            raise EdgeSafeError(f"--orders takes comma-separated integers such as 1,2,3,4; got {text!r}")
        r = int(part)
        if not 1 <= r <= n_constraints:
            raise EdgeSafeError(
                f"--orders: {r} is not a possible order; the bank has {n_constraints} constraints, "
                f"so orders run from 1 to {n_constraints}"
            )
        if r not in orders:
            orders.append(r)
    return sorted(orders)


# --- compositions and cases -----------------------------------------------------------


def sample_compositions(
    constraints: Sequence[str],
    orders: Sequence[int],
    per_order: int,
    held_out: Iterable[Sequence[str]],
    profiles: dict[str, list[str]],
    rng: random.Random,
) -> list[Composition]:
    """Per order: ``per_order`` seeded compositions not held out, plus every held-out one; then profiles."""
    rank = {c: i for i, c in enumerate(constraints)}
    canon = lambda names: tuple(sorted(set(names), key=rank.__getitem__))  # noqa: E731
    held = {canon(h) for h in held_out if all(c in rank for c in h)}
    comps = []
    for r in orders:
        pool = [c for c in itertools.combinations(constraints, r) if c not in held]
        comps += [Composition(c, str(r)) for c in sorted(rng.sample(pool, min(per_order, len(pool))), key=_ranks(rank))]
        comps += [Composition(c, str(r), held_out=True) for c in sorted(held, key=_ranks(rank)) if len(c) == r]
    for spec, members in profiles.items():
        comps.append(Composition(canon(members), spec, held_out=canon(members) in held))
    return comps


def _ranks(rank: dict[str, int]):
    return lambda combo: [rank[c] for c in combo]


def build_cases(
    prompts: Sequence[EvalPrompt], comps: Sequence[Composition], per_kind: int, rng: random.Random
) -> list[Case]:
    """For each composition, ``per_kind`` prompts of each kind (fewer when the data has none of a kind)."""
    pools: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(prompts):
        pools.setdefault((p.category, p.label), []).append(i)
    cases = []
    for ci, comp in enumerate(comps):
        active = list(comp.constraints)
        inactive = sorted({c for c, lab in pools if lab == "violating" and c not in active})
        sources = {
            "violating": [pools.get((c, "violating"), []) for c in active],
            "near-miss": [pools.get((c, "benign"), []) for c in active],
            "inactive": [pools.get((c, "violating"), []) for c in inactive],
            "general": [pools.get((GENERAL, "benign"), [])],
        }
        for kind in KINDS:
            for idx in _draw(sources[kind], per_kind, rng):
                cases.append(Case(idx, ci, kind))
    return cases


def _draw(groups: list[list[int]], n: int, rng: random.Random) -> list[int]:
    """n distinct indices, round-robin over the non-empty groups in a seeded order."""
    groups = [rng.sample(g, len(g)) for g in groups if g]
    rng.shuffle(groups)
    out: list[int] = []
    while groups and len(out) < n:
        for g in list(groups):
            if len(out) == n:
                break
            if g:
                out.append(g.pop())
            if not g:
                groups.remove(g)
    return out


def stratified(items: Sequence, n: int | None, key_a, key_b) -> list:
    """At most n items, spread over the values of two keys (e.g. composition group x kind), in input order.

    Pick j comes from bucket (a[j % |a|], b[(j + j // |a|) % |b|]) so a small n still covers
    every value of both keys; empty buckets are skipped.
    """
    if n is None or n >= len(items):
        return list(items)
    a_vals = list(dict.fromkeys(key_a(x) for x in items))
    b_vals = list(dict.fromkeys(key_b(x) for x in items))
    buckets: dict[tuple, list[int]] = {}
    for i, x in enumerate(items):
        buckets.setdefault((key_a(x), key_b(x)), []).append(i)
    for b in buckets.values():
        b.reverse()  # pop() takes them in input order
    picked: list[int] = []
    j = 0
    while len(picked) < n and any(buckets.values()):
        key = (a_vals[j % len(a_vals)], b_vals[(j + j // len(a_vals)) % len(b_vals)])
        if buckets.get(key):
            picked.append(buckets[key].pop())
        j += 1
    return [items[i] for i in sorted(picked)]


def spread_sample(prompts: Sequence[EvalPrompt], n: int, rng: random.Random, labels=LABELS) -> list[int]:
    """n prompt indices spread round-robin over (category, label), seeded (for modes, SAM and KL)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(prompts):
        if p.label in labels:
            groups.setdefault((p.category, p.label), []).append(i)
    return sorted(_draw([groups[k] for k in sorted(groups)], n, rng))
