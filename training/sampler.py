"""Training prompts and MOSAIC's order-based task sampling (with mode co-training).

Each step trains one *order* r (cycling 1..R). Every positive-mode example in
the step gets its own random composition S of r constraints (never one of the
held-out compositions), laid out in a random order so that any order works at
run time. Positives (the prompt violates a constraint in S) are taught the
refusal of that constraint; negatives (nothing in S is violated: near-miss
benign prompts of S's topics, violating prompts of *inactive* categories,
general prompts) are taught the base model's own answer. With
`counterfactual_pairs`, each positive is followed in the same batch by its
counterfactual: the same prompt under the composition with the violated
constraint swapped for an inactive one, taught to answer. The pair differs only
in which token is present, so the gradient says "refuse *because of this
token*" instead of "refuse anything that looks harmful". A share of examples
is trained in the `rejective` mode (refuse everything) and the `negative` mode
(answer everything as the base model, constraints or not). With `profiles`, a
share of the examples takes a deployed composition (e.g. every constraint of
`minors,eu`) instead: run time composes more tokens than the orders drawn.
With an `anchor_bank`, a share of the examples are repo rows under a random
composition of that bank's constraints (any size), distilled from that bank's
first reply token instead of a label (trainer.train).
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.training.config import SLICES, TrainConfig, parse_slices  # noqa: F401 (re-exported)
from edge_safe.training.data.splits import split_path
from edge_safe.convert.keys import Mode

LABELS = ("violating", "benign")
#: Row slices of the data (training/data/README.md): the classic rows carry no "slice" field.
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    text: str  # the (last) user request
    category: str  # a constraint name, or "general"
    label: str  # "violating" | "benign"
    family: str = ""
    slice: str = "classic"
    messages: tuple[tuple[str, str], ...] = ()  # multi-turn rows: the whole conversation as (role, content)
    context: str = ""  # multi-turn rows: the category of an earlier refused turn ("" if none)
    also: tuple[str, ...] = ()  # other constraints a violating row breaks too (third-party rows)

    def chat(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages (a single user turn for single-turn rows)."""
        if self.messages:
            return [{"role": r, "content": c} for r, c in self.messages]
        return [{"role": "user", "content": self.text}]

    def source(self):
        """What the teacher renders: the text for single-turn rows, the messages for conversations."""
        return self.chat() if self.messages else self.text


def render_prompt(template, p: Prompt) -> str:
    """The prompt text after the prefix, exactly as the runtime renders the same request."""
    return template.render(p.chat()) if p.messages else template.prompt(p.text)


def _messages(value, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise EdgeSafeError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                and m["content"].strip()):
            raise EdgeSafeError(f"{where}: messages[{j}] must be {{'role': one of {ROLES}, 'content': non-empty text}}")
        out.append((m["role"], m["content"]))
    if out[-1][0] != "user":
        raise EdgeSafeError(f"{where}: the last message must be the user's request, got role {out[-1][0]!r}")
    return tuple(out)


@dataclass(frozen=True)
class Example:
    prompt: int  # index into the prompt list
    mode: str | None  # mode token laid out first, or None
    constraints: tuple[str, ...]  # constraint tokens in the order laid out
    refuse: str | None  # name whose refusal is the target; None = answer as the base model
    order: int  # |constraints|, for logging
    context: int = -1  # index of the context laid before the control tokens (-1: none; see trainer.Contexts)
    anchor: bool = False  # trained on the anchor bank's first-token distribution, not on a label (cfg.anchor_bank)


def default_data_dir() -> Path:
    """The checkout's data folder (an installed package regenerates missing splits: data/splits.py)."""
    return Path(__file__).resolve().parent / "data"


def load_prompts(data_dir: str | Path | None, split: str, slices=("classic",)) -> list[Prompt]:
    """The rows of `split` whose slice is in `slices` (default: the classic rows only)."""
    slices = parse_slices(slices)
    path = Path(data_dir) / f"{split}.jsonl" if data_dir else split_path(split)
    if not path.is_file():
        raise EdgeSafeError(f"training data not found: {path} (run `edge-safe data generate`)")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
                slice_ = row.get("slice", "classic")
                if slice_ not in SLICES:
                    raise EdgeSafeError(f"{where}: unknown slice {slice_!r}; known: {', '.join(SLICES)}")
                if slice_ not in slices:
                    continue
                messages = _messages(row["messages"], where) if "messages" in row else ()
                if messages and messages[-1][1] != row["prompt"]:
                    raise EdgeSafeError(f"{where}: prompt must repeat the last user message")
                p = Prompt(row["prompt"], row["category"], row["label"], row.get("family", ""), slice_, messages,
                           row.get("context_category", ""))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise EdgeSafeError(f"{where}: expected a JSON object with prompt/category/label ({e})") from None
            if p.label not in LABELS:
                raise EdgeSafeError(f"{where}: label must be one of {LABELS}, got {p.label!r}")
            prompts.append(p)
    return prompts


class TaskSampler:
    """Draws the examples of each step (see module docstring)."""

    def __init__(self, prompts: list[Prompt], cfg: TrainConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.violating = {c: [] for c in cfg.constraints}
        self.near_miss = {c: [] for c in cfg.constraints}
        self.general: list[int] = []
        # benign requests after a refused turn of category c (multi-turn rows): answered even with c active
        self.after_refusal: dict[str, list[int]] = {c: [] for c in cfg.constraints}
        for i, p in enumerate(prompts):
            if p.category in self.violating:
                (self.violating if p.label == "violating" else self.near_miss)[p.category].append(i)
            elif p.label == "benign":
                self.general.append(i)
                if p.context in self.after_refusal:
                    self.after_refusal[p.context].append(i)
        empty = [c for c in cfg.constraints if not self.violating[c]]
        if empty:
            raise EdgeSafeError(f"no violating training prompts for {empty}")
        self.all = list(range(len(prompts)))
        self.held_out = {frozenset(c) for c in cfg.held_out}
        self.prompts = prompts
        self.n_contexts = 0  # set by the trainer: pooled contexts a share of examples is laid out after
        self.profiles = [c for c in cfg.profile_compositions() if frozenset(c) not in self.held_out and c]
        self.anchor_names: tuple[str, ...] = ()  # set by the trainer: the anchor bank's constraints among ours
        self.own = [i for i, p in enumerate(prompts) if p.slice != "third-party"]  # the repo's own rows
        mine = lambda pool: {c: [i for i in ids if prompts[i].slice != "third-party"] for c, ids in pool.items()}  # noqa: E731
        self.own_violating, self.own_near_miss = mine(self.violating), mine(self.near_miss)

    def anchor_example(self) -> Example:
        """A repo row under a random composition of the anchor bank's constraints, `anchor_min_order` (at most all
        of them) up to all of them (a deployed profile composes more than `max_order`): violating a member in
        `positive_fraction` of draws, else a near-miss of a member or any other repo row. No counterfactual pair:
        the anchor bank decides."""
        rng, names = self.rng, self.anchor_names
        combo = tuple(rng.sample(names, rng.randint(min(self.cfg.anchor_min_order, len(names)), len(names))))
        pools = (self.own_violating[rng.choice(combo)] if rng.random() < self.cfg.positive_fraction
                 else self.own_near_miss[rng.choice(combo)] if rng.random() < 0.5 else self.own)
        mode = Mode.POSITIVE if Mode.POSITIVE in self.cfg.modes else None
        return Example(rng.choice(pools or self.own), mode, combo, None, len(combo), anchor=True)

    def focus_composition(self, order: int) -> tuple[tuple[str, ...], str] | None:
        """A composition of `order` holding a focus constraint (random place), and that constraint."""
        for _ in range(100):
            f = self.rng.choice(self.cfg.focus)
            combo = self.rng.sample([c for c in self.cfg.constraints if c != f], order - 1)
            combo.insert(self.rng.randrange(order), f)
            if frozenset(combo) not in self.held_out:
                return tuple(combo), f
        return None

    def composition(self, order: int) -> tuple[str, ...]:
        while True:
            combo = self.rng.sample(list(self.cfg.constraints), order)
            if frozenset(combo) not in self.held_out:
                return tuple(combo)  # random order within the composition

    def negative_prompt(self, combo: tuple[str, ...]) -> int:
        """A prompt that violates nothing in `combo`: most informative kinds first."""
        inactive = [c for c in self.cfg.constraints if c not in combo]
        u = self.rng.random()
        rest = (1 - self.cfg.general_fraction) / 0.75  # 1 at the default 0.25: the draws of earlier recipes
        if u < 0.35 * rest:
            pool = self.near_miss[self.rng.choice(combo)]
        elif u < 0.65 * rest and inactive:
            pool = [i for i in self.violating[self.rng.choice(inactive)] if not set(self.prompts[i].also) & set(combo)]
        elif u < 0.65 * rest + self.cfg.general_fraction:
            pool = self.general
            after = [c for c in combo if self.after_refusal[c]]
            if after and self.rng.random() < 0.3:  # no draw at all without such rows: classic runs unchanged
                pool = self.after_refusal[self.rng.choice(after)]
        else:
            pool = self.near_miss[self.rng.choice(list(self.cfg.constraints))]
        return self.rng.choice(pool or self.general or self.all)

    def example(self, order: int) -> Example:
        cfg, rng = self.cfg, self.rng
        u = rng.random()
        if Mode.REJECTIVE in cfg.modes and u < cfg.mode_rejective:
            combo = self.composition(rng.randint(1, order)) if rng.random() < 0.5 else ()
            return Example(rng.choice(self.all), Mode.REJECTIVE, combo, Mode.REJECTIVE, len(combo))
        focus = None  # no draw without a focus: older runs unchanged
        if cfg.focus_fraction and rng.random() < cfg.focus_fraction and (drawn := self.focus_composition(order)):
            combo, focus = drawn
        elif self.profiles and rng.random() < cfg.profile_fraction:  # no draw without profiles: older runs unchanged
            combo = tuple(rng.sample(p := rng.choice(self.profiles), len(p)))
        else:
            combo = self.composition(order)
        if Mode.NEGATIVE in cfg.modes and u < cfg.mode_rejective + cfg.mode_negative:
            pool = self.violating[rng.choice(combo)] if rng.random() < 0.5 else self.all
            return Example(rng.choice(pool), Mode.NEGATIVE, combo, None, len(combo))
        mode = Mode.POSITIVE if Mode.POSITIVE in cfg.modes else None
        if rng.random() < cfg.positive_fraction:
            cat = focus or rng.choice(combo)
            return self._placed(Example(rng.choice(self.violating[cat]), mode, combo, cat, len(combo)))
        if focus and self.near_miss[focus] and rng.random() < 0.5:
            return self._placed(Example(rng.choice(self.near_miss[focus]), mode, combo, None, len(combo)))
        return self._placed(Example(self.negative_prompt(combo), mode, combo, None, len(combo)))

    def _placed(self, ex: Example) -> Example:
        """A single-turn positive-mode example laid out after a pooled context in `context_fraction` of draws."""
        if not self.n_contexts or self.prompts[ex.prompt].messages or self.rng.random() >= self.cfg.context_fraction:
            return ex
        return dataclasses.replace(ex, context=self.rng.randrange(self.n_contexts))

    def counterfactual(self, ex: Example) -> Example | None:
        """`ex` (a positive) with its violated constraint swapped for one not in the composition."""
        also = set(self.prompts[ex.prompt].also)
        inactive = [c for c in self.cfg.constraints if c not in ex.constraints and c not in also]
        for c in self.rng.sample(inactive, len(inactive)):
            combo = tuple(c if x == ex.refuse else x for x in ex.constraints)
            if frozenset(combo) not in self.held_out:
                return Example(ex.prompt, ex.mode, combo, None, ex.order, ex.context)  # the same context
        return None

    def batch(self, step: int) -> list[Example]:
        order = 1 + step % self.cfg.max_order  # cycle through orders 1..R
        out: list[Example] = []
        while len(out) < self.cfg.batch_size:
            if self.anchor_names and self.rng.random() < self.cfg.anchor_fraction:  # no draw without an anchor bank
                out.append(self.anchor_example())
                continue
            ex = self.example(order)
            out.append(ex)
            wants_pair = self.cfg.counterfactual_pairs and ex.refuse and ex.mode != Mode.REJECTIVE
            if wants_pair and len(out) < self.cfg.batch_size and (pair := self.counterfactual(ex)):
                out.append(pair)
        return out
