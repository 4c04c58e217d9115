"""The training loop: MOSAIC control tokens + mode co-training on a frozen base model.

    base = load_gguf_model(path)                 # frozen fp32 transformers model
    bank, summary = train(cfg, base, out_dir=d)  # progress bar, validation, checkpoints
    export_bank(bank, base, cfg, summary).save("bank.gguf")
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.layout import LAYOUT_V1, QA_TEMPLATE, ChatTemplate
from edge_safe.margins import auc  # the eval's AUC too: training and runtime figures rank alike
from edge_safe.training.base_model import BaseModel
from edge_safe.training.categories import BY_NAME, PROFILES
from edge_safe.training.config import TrainConfig
from edge_safe.convert.layout import LONG_MESSAGE, control_layout
from edge_safe.training.objective import (
    Bank,
    ContextKV,
    DeepBank,
    ReadoutTerm,
    bos_cell,
    build_batch,
    first_reply_logits,
    kv_of_inputs,
    mosaic_loss,
    trainable_bank,
)
from edge_safe.training.sampler import Prompt, TaskSampler, load_prompts, render_prompt
from edge_safe.training.teacher import build_teacher
from edge_safe.convert.keys import Mode

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
RESUMABLE = {"steps", "val_every", "checkpoint_every", "torch_threads", "compute_dtype"}  # may change on --resume


def refusal_target_ids(base: BaseModel, template: ChatTemplate, names: list[str]) -> dict[str, list[int]]:
    """Token ids of ' <refusal>' + the template's next-turn stop, tokenized in context."""
    probe = template.prompt("x")
    n = len(base.tokenize(probe))
    stop = template.stop[0] if template.stop else ""
    out = {}
    for name in names:
        text = BY_NAME[name].refusal
        if text:
            ids = base.tokenize(probe + " " + text + stop)
            assert ids[:n] == base.tokenize(probe), "template tokenization is not prefix-stable"
            out[name] = ids[n:]
    return out


def distinctive_ids(base: BaseModel, names: list[str]) -> dict[str, list[int]]:
    """Each token's rule-text ids without the ids any *other* token's rule text uses.

    Every rule reads "Do not help with X: no ..., or ...": started from evenly spaced rule
    tokens, the constraints began as near-copies of one another (["Do", ":", ",", "."] for
    alcohol, ["Do", " or", " or", "."] for sexual) and training could not tell them apart.
    The distinctive ids ("alcoholic", "cocktail", "beer" ...) start each token on its topic.
    """
    ids = {n: base.tokenize(BY_NAME[n].rule or BY_NAME[n].description) for n in names}
    out = {}
    for n in names:
        shared = {t for other in names if other != n for t in ids[other]}
        mine = list(dict.fromkeys(t for t in ids[n] if t not in shared))
        out[n] = mine or ids[n]
    return out


def decision_id(refusal_ids: dict[str, list[int]]) -> int:
    """The token every refusal starts with: where the refuse/answer decision is made and validated."""
    first = {ids[0] for ids in refusal_ids.values()}
    if len(first) != 1:
        raise EdgeSafeError("all refusal texts must start with the same token (the decision token)")
    return first.pop()


def init_vectors(base: BaseModel, cfg: TrainConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Start each token from its rule text's first m distinctive token embeddings plus a little noise."""
    table = base.model.get_input_embeddings()
    typical = base.embed(torch.linspace(0, table.num_embeddings - 1, 256).long()).norm(dim=-1).mean()
    names = list(cfg.modes) + list(cfg.constraints)
    topical = distinctive_ids(base, names) if cfg.init == "rule" else {}
    vectors = {}
    for name in names:
        m = cfg.n_mode_vectors if name in cfg.modes else cfg.n_vectors
        ids = topical.get(name, [])
        if ids:  # the first m distinctive ids (the topic words come first in every rule), cycled if fewer
            v = base.embed(torch.tensor([ids[j % len(ids)] for j in range(m)])).detach()
        else:
            v = torch.randn(m, table.embedding_dim, generator=gen).to(base.device)
            v = v / v.norm(dim=-1, keepdim=True) * typical
        noise = torch.randn(v.shape, generator=gen).to(base.device) * cfg.init_noise * typical / v.shape[1] ** 0.5
        vectors[name] = (v + noise).detach()
    return vectors


def init_from_bank(base: BaseModel, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The vectors of `cfg.init_bank` (a fine-tune starts where that bank ended); names and shapes must match."""
    from edge_safe.convert.bank import TokenBank

    bank = TokenBank.load(cfg.init_bank)
    if base.info is not None:  # tiny random test models have no GGUF to compare with
        bank.check_model(base.info)
    d = base.model.get_input_embeddings().embedding_dim
    vectors = {}
    for name in list(cfg.modes) + list(cfg.constraints):
        want = (cfg.n_mode_vectors if name in cfg.modes else cfg.n_vectors, d)
        tok = bank.tokens.get(name)
        if tok is None or tok.vectors.shape != want:
            got = "no such token" if tok is None else f"shape {tuple(tok.vectors.shape)}"
            raise EdgeSafeError(f"init_bank {cfg.init_bank}: {name!r} has {got}, the config needs {want}; "
                                f"use a bank trained with the same n_vectors/n_mode_vectors, or drop init_bank")
        vectors[name] = torch.tensor(tok.vectors, dtype=torch.float32, device=base.device)
    return vectors


def init_deep(base: BaseModel, cfg: TrainConfig, gen: torch.Generator) -> DeepBank:
    """Deep tokens at step 0: the keys/values the frozen model computes for input vectors laid out after BOS.

    Without ``init_bank`` the vectors are :func:`init_vectors`' (the rule's topic words, or random). With a
    *shallow* ``init_bank`` they are that bank's trained vectors, so step 0 acts like that bank (keys rotated
    to sit right before the prompt, see :func:`kv_of_inputs`); a *deep* ``init_bank`` is resumed as is.
    Names and positions per token must match the config."""
    if not cfg.init_bank:
        vectors = init_vectors(base, cfg, gen)
        return DeepBank({n: kv_of_inputs(base, v) for n, v in vectors.items()}, bos_cell(base))
    from edge_safe.convert.bank import TokenBank

    bank = TokenBank.load(cfg.init_bank)
    if base.info is not None:
        bank.check_model(base.info)
    init = {}
    fresh = [n for n in cfg.constraints if n not in bank.tokens]  # new constraints: from their rule's topic words
    if fresh:
        log.info("init_bank %s lacks %s: they start from their rules' topic words", cfg.init_bank, ", ".join(fresh))
        topical = init_vectors(base, cfg, gen)
    for name in list(cfg.modes) + list(cfg.constraints):
        n = cfg.n_mode_vectors if name in cfg.modes else cfg.n_vectors
        tok = bank.tokens.get(name)
        if name in fresh:
            init[name] = kv_of_inputs(base, topical[name])
            continue
        if tok is None or tok.n_vectors != n:
            got = "no such token" if tok is None else f"{tok.n_vectors} positions"
            raise EdgeSafeError(f"init_bank {cfg.init_bank}: {name!r} has {got}, the config needs {n}; use a bank "
                                "trained with the same n_vectors/n_mode_vectors, or drop init_bank")
        if tok.is_deep:
            init[name] = (torch.tensor(tok.keys), torch.tensor(tok.values))
        else:
            init[name] = kv_of_inputs(base, torch.tensor(tok.vectors))
    return DeepBank(init, bos_cell(base), fresh)


def load_anchor(base: BaseModel, cfg: TrainConfig) -> "Bank | DeepBank | None":
    """``cfg.anchor_bank`` as a frozen bank (None without one): made for this base model, holding at least one
    of the trained constraints, and the positive mode when the config trains it (anchor examples use it)."""
    if not cfg.anchor_fraction:
        return None
    from edge_safe.convert.bank import TokenBank

    bank = TokenBank.load(cfg.anchor_bank)
    if base.info is not None:
        bank.check_model(base.info)
    shared = [n for n in cfg.constraints if n in bank.tokens]
    if not shared:
        raise EdgeSafeError(f"anchor_bank {cfg.anchor_bank} holds none of the trained constraints "
                            f"({', '.join(cfg.constraints)}); it has {', '.join(bank.tokens)}")
    if Mode.POSITIVE in cfg.modes and Mode.POSITIVE not in bank.tokens:
        raise EdgeSafeError(f"anchor_bank {cfg.anchor_bank} has no {Mode.POSITIVE!r} mode token, which anchor examples "
                            "are laid out with; use a bank trained with the modes")
    anchor = trainable_bank(base, bank).to(base.device)
    for p in anchor.parameters():
        p.requires_grad_(False)
    return anchor


def load_readout(base: BaseModel, cfg: TrainConfig) -> ReadoutTerm | None:
    """``init_bank``'s decision readout as a frozen loss term (None unless ``readout_weight``)."""
    if not cfg.readout_weight:
        return None
    bank = _init_readout_bank(cfg)
    if base.info is not None:
        bank.check_model(base.info)
    return ReadoutTerm.of(bank.readout, base.device)


def _init_readout_bank(cfg: TrainConfig):
    from edge_safe.convert.bank import TokenBank

    if not cfg.init_bank:
        raise EdgeSafeError("config: readout_weight trains the tokens for init_bank's decision readout; set init_bank "
                            "to a bank that has one (edge-safe train readout makes it), or set readout_weight: 0")
    bank = TokenBank.load(cfg.init_bank)
    if bank.readout is None:
        raise EdgeSafeError(f"config: readout_weight needs a decision readout in init_bank {cfg.init_bank}, which has "
                            "none; fit one first (edge-safe train readout BANK -o OUT) or set readout_weight: 0")
    if bank.readout.earlier:
        raise EdgeSafeError(f"config: readout_weight trains for a readout of the first reply token alone; init_bank "
                            f"{cfg.init_bank}'s also reads rows {list(bank.readout.earlier)} tokens before it. Fit one "
                            "with --offsets 0 (edge-safe train readout BANK -o OUT) or set readout_weight: 0")
    return bank


def param_groups(bank: "Bank | DeepBank", cfg: TrainConfig) -> list[dict]:
    """Adam parameter groups, each with an lr ``scale`` (the lr of a step is learning_rate() x scale).

    Shallow: one group, scale 1. Deep: one group per tensor, scale = that tensor's initial standard deviation,
    because keys and values differ in magnitude by layer and kind (docs/DESIGN.md, "Training probes": lr per tensor = c x its std)."""
    frozen = set(cfg.frozen)
    if not isinstance(bank, DeepBank):
        for name, p in bank.vectors.items():
            p.requires_grad_(name not in frozen)
        return [{"params": [p for n, p in bank.vectors.items() if n not in frozen], "scale": 1.0}]
    fresh = set(bank.fresh)
    boost = cfg.new_token_lr / cfg.lr if cfg.new_token_lr else 1.0
    for t in (bank.keys, bank.values):
        for n in bank.names:
            t[n].requires_grad_(n not in frozen)
    return [{"params": [t[n]], "scale": (float(t[n].detach().std()) or 1.0) * (boost if n in fresh else 1.0)}
            for t in (bank.keys, bank.values) for n in bank.names if n not in frozen]


def stratified_sample(prompts: list[Prompt], n: int, rng: random.Random) -> list[Prompt]:
    """At most n prompts, drawn round-robin over (slice, category, label) so every group stays represented."""
    groups: dict[tuple[str, str, str], list[Prompt]] = {}
    for p in prompts:
        groups.setdefault((p.slice, p.category, p.label), []).append(p)
    pools = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    out: list[Prompt] = []
    while len(out) < min(n, len(prompts)):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out


# ---------------------------------------------------------------- third-party data and contexts


def thirdparty_prompts(cfg: TrainConfig) -> list[Prompt]:
    """The train parts of ``cfg.thirdparty`` as training prompts (see TrainConfig.thirdparty)."""
    from edge_safe.training.data import thirdparty as tp

    out: list[Prompt] = []
    for source in cfg.thirdparty:
        recs = tp.rows(source, "train")
        pair_of = {r["pair"]: r["constraints"] for r in recs if r.get("pair") and r["label"] == "violating"}
        if source == "sharegpt":
            recs = [r for r in recs if r["label"] == "harmless" and len(r["text"].split()) <= cfg.thirdparty_max_words]
            recs = random.Random(cfg.seed).sample(recs, min(cfg.thirdparty_general, len(recs)))
        for r in recs:
            mine = [c for c in r["constraints"] if c in cfg.constraints]
            if r["label"] == "violating" and mine:
                out.append(Prompt(r["text"], mine[0], "violating", f"{source}/{r['subset']}", "third-party",
                                  also=tuple(mine[1:])))
            elif r["label"] == "harmless":
                near = [c for c in pair_of.get(r.get("pair"), []) if c in cfg.constraints]
                out.append(Prompt(r["text"], near[0] if near else "general", "benign", f"{source}/{r['subset']}",
                                  "third-party"))
    return out


def micro_batches(examples: list, context_len, budget: int = 4096) -> list[list]:
    """A step's examples in parts decoded one after another: those without a context together, those with one
    sorted by its length and cut so that a part's rows x its longest context stays within ``budget`` positions
    (every row of a batch is padded to its longest context: one 2 000-token context would pad fifteen short
    rows). Order within a part follows the step's order."""
    lengths = [context_len(ex) for ex in examples]
    plain = [i for i, n in enumerate(lengths) if n == 0]
    parts, part = ([plain] if plain else []), []
    for i in sorted((i for i, n in enumerate(lengths) if n), key=lambda i: lengths[i]):
        if part and (len(part) + 1) * lengths[i] > budget:
            parts.append(part)
            part = []
        part.append(i)
    if part:
        parts.append(part)
    return [[examples[i] for i in sorted(p)] for p in parts]


def _bands(lo: int, hi: int) -> list[int]:
    """Lengths from ``lo`` to ``hi`` in steps of x2 (the pool covers short and long contexts alike)."""
    out = [lo]
    while out[-1] * 2 <= hi:
        out.append(out[-1] * 2)
    return out


class Contexts:
    """A pool of contexts laid before the control tokens of some training examples, as the runtime lays out
    requests that follow earlier turns or a long pasted text (``convert.layout.control_layout``): half earlier
    turns, half the head of a long last message (the request is then its last line). Made from ShareGPT's train
    conversations when fetched, else from the repo's own multi-turn and pasted rows."""

    def __init__(self, base: BaseModel, cfg: TrainConfig, template: ChatTemplate, prompts: list[Prompt]):
        self.base, self.template = base, template
        lo, hi = cfg.context_tokens
        rng = random.Random(cfg.seed + 7)
        turns, texts = self._sharegpt(lo, hi) if "sharegpt" in cfg.thirdparty else ([], [])
        if not turns:
            turns, texts = self._own(prompts, rng)
        n = lambda text: len(base.tokenize(text))  # noqa: E731
        self.entries: list[tuple[str, object]] = []
        rng.shuffle(turns)
        text = lambda msgs: "".join(getattr(template, m["role"]).format(content=m["content"].strip()) for m in msgs)  # noqa: E731
        for msgs in turns:
            while msgs and n(text(msgs)) > hi:
                msgs = msgs[2:]  # drop the oldest exchange
            if msgs and n(text(msgs)) >= min(lo, hi // 2):
                self.entries.append(("turns", msgs))
            if len(self.entries) >= cfg.context_pool // 2:
                break
        pasted_min = max(lo, LONG_MESSAGE + 14)  # the runtime cuts a last message only past LONG_MESSAGE tokens
        rng.shuffle(texts)
        bands = _bands(pasted_min, hi)
        while texts and len(self.entries) < cfg.context_pool:
            want = bands[len(self.entries) % len(bands)]  # pasted documents of every length band, in turn
            words: list[str] = []
            while texts and len(words) * 1.3 < want:
                words += texts.pop().split()  # answers joined into one pasted document
            while words and n(" ".join(words)) > min(hi, int(want * 1.6)):
                words = words[: int(len(words) * 0.85)]
            body = " ".join(words)
            if n(body) >= pasted_min:
                self.entries.append(("pasted", body))
        self._memo: dict[tuple[int, str], tuple[tuple[int, ...], list[int]]] = {}

    def _sharegpt(self, lo: int, hi: int) -> tuple[list[list[dict]], list[str]]:
        from edge_safe.training.data import thirdparty as tp

        turns, texts, seen = [], [], set()
        bands = _bands(lo, hi)
        for band in bands:  # conversations of every length band up to ``hi``, not only the shortest
            got = 0
            for rec in tp.long_context(band, "train", max_tokens=max(int(band * 2.5), hi)):
                if rec["label"] != "harmless" or rec["source_id"] in seen:
                    continue
                seen.add(rec["source_id"])
                msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"][:-1]]
                turns.append(msgs)
                texts += [m["content"] for m in msgs if m["role"] == "assistant" and len(m["content"].split()) > 150]
                got += 1
                if got >= 200 // len(bands) + 1:
                    break
        return turns, texts

    @staticmethod
    def _own(prompts: list[Prompt], rng: random.Random) -> tuple[list[list[dict]], list[str]]:
        convs = [[m for m in p.chat()[:-1] if m["role"] != "system"]
                 for p in prompts if p.messages and p.label == "benign" and len(p.messages) > 1]
        general = [p.text for p in prompts if p.category == "general" and not p.messages]
        if not convs and general:  # no conversations in the data: exchanges of its general requests
            convs = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                     for a, b in zip(general, general[1:] + general[:1])]
        turns = []
        for _ in range(64 if convs else 0):
            msgs = [m for conv in rng.choices(convs, k=6) for m in conv]
            if msgs and msgs[0]["role"] == "user":
                turns.append(msgs)
        texts = [" ".join(rng.choices(general, k=80)) for _ in range(64)] if general else []
        return turns, texts

    def __len__(self) -> int:
        return len(self.entries)

    def messages(self, index: int, request: str) -> list[dict]:
        kind, value = self.entries[index]
        if kind == "turns":
            return list(value) + [{"role": "user", "content": request}]
        return [{"role": "user", "content": value + "\n" + " ".join(request.split())}]

    def layout(self, index: int, request: str) -> tuple[tuple[int, ...], list[int]]:
        """(context ids, request ids) of ``request`` after context ``index``, cut where the runtime cuts."""
        key = (index, request)
        if key not in self._memo:
            self._memo[key] = split_messages(self.base, self.template, self.messages(index, request))
        return self._memo[key]


def split_messages(base: BaseModel, template: ChatTemplate, messages: list[dict]) -> tuple[tuple[int, ...], list[int]]:
    """A conversation's (ids before its control tokens, ids after them), laid out as the runtime lays it out."""
    ids, splits = control_layout(template, messages, base.tokenize)
    return tuple(ids[: splits[-1]]), ids[splits[-1]:]


def split_conversation(base: BaseModel, template: ChatTemplate, p: Prompt) -> tuple[tuple[int, ...], list[int]]:
    """A prompt's (ids before its control tokens, ids after them)."""
    return split_messages(base, template, p.chat())


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class ValCase:
    prompt: int
    mode: str | None
    constraints: tuple[str, ...]
    expect_refuse: bool
    kind: str  # violating | near-miss | inactive | general | rejective | negative
    held_out: bool


def make_val_cases(prompts: list[Prompt], cfg: TrainConfig, rng: random.Random) -> list[ValCase]:
    """A fixed, seeded set of decisions to check: every order, trained and held-out compositions."""
    by = {}
    for i, p in enumerate(prompts):
        by.setdefault((p.category, p.label), []).append(i)
    general = by.get(("general", "benign"), [])
    held = [tuple(c) for c in cfg.held_out]
    cases: list[ValCase] = []
    per_order = max(1, cfg.val_size // (cfg.max_order + 1))
    for order in range(1, cfg.max_order + 1):
        for j in range(per_order):
            options = [c for c in held if len(c) == order]
            is_held = bool(options) and j % 4 == 3
            combo = rng.choice(options) if is_held else tuple(rng.sample(list(cfg.constraints), order))
            mode = Mode.POSITIVE if Mode.POSITIVE in cfg.modes else None
            kind = ("violating", "near-miss", "inactive", "general")[j % 4 if not is_held else rng.randrange(4)]
            inactive = [c for c in cfg.constraints if c not in combo]
            if kind == "violating":
                pool = by.get((rng.choice(combo), "violating"), [])
            elif kind == "near-miss":
                pool = by.get((rng.choice(combo), "benign"), [])
            elif kind == "inactive" and inactive:
                pool = by.get((rng.choice(inactive), "violating"), [])
            else:
                kind, pool = "general", general
            if pool:
                cases.append(ValCase(rng.choice(pool), mode, combo, kind == "violating", kind, is_held))
    extra = max(1, per_order // 2)
    for mode, refuse in ((Mode.REJECTIVE, True), (Mode.NEGATIVE, False)):
        if mode in cfg.modes:
            for _ in range(extra):
                cat = rng.choice(list(cfg.constraints))
                pool = by.get((cat, "violating"), []) + general
                combo = (cat,) if mode == Mode.NEGATIVE else ()
                cases.append(ValCase(rng.choice(pool), mode, combo, refuse, mode, False))
    return cases


def validation_set(
    base: BaseModel, cfg: TrainConfig, template: ChatTemplate, seed: int, split: str = "val"
) -> tuple[list[ValCase], list[list[int]]]:
    """The seeded validation decisions of `cfg` on a split (val by default), and the template token ids of its prompts."""
    prompts = load_prompts(cfg.data_dir or None, split, cfg.slices)
    return make_val_cases(prompts, cfg, random.Random(seed)), [
        split_conversation(base, template, p) if p.messages else base.tokenize(render_prompt(template, p))
        for p in prompts]


def validate(base: BaseModel, bank: "Bank | DeepBank", prompt_ids: list, cases: list[ValCase], refuse_id: int,
             readout: ReadoutTerm | None = None) -> dict:
    """First-token decisions (refusal opener or not; with ``readout``, its score > 0) under each case's
    composition."""
    margins = val_margins(base, bank, prompt_ids, cases, refuse_id, readout)
    return summarize(cases, [m > 0 for m in margins], margins)


@torch.no_grad()
def val_margins(base: BaseModel, bank: "Bank | DeepBank", prompt_ids: list, cases: list[ValCase],
                refuse_id: int, readout: ReadoutTerm | None = None) -> list[float]:
    """Refusal-opener logit minus the best other logit at the first reply token, per case (> 0: refuses);
    with ``readout``, the readout's score there (the runtime's decision with it). ``prompt_ids[i]``: a
    prompt's ids, or (ids before the control tokens, ids after them)."""
    margins: list[float] = []
    context_kv = ContextKV(base)
    row = lambda c, p: (c.mode, c.constraints, p[1], p[0]) if isinstance(p, tuple) else (c.mode, c.constraints, p)  # noqa: E731
    for start in range(0, len(cases), 32):
        chunk = cases[start:start + 32]
        logits = first_reply_logits(base, bank, [row(c, prompt_ids[c.prompt]) for c in chunk], context_kv)
        if readout is not None:
            margins += readout.score(logits).tolist()
            continue
        refuse = logits[:, refuse_id].clone()
        logits[:, refuse_id] = float("-inf")
        margins += (refuse - logits.max(-1).values).tolist()  # > 0: the refusal opener is the argmax
    return margins


def summarize(cases: list[ValCase], refused: list[bool], margins: list[float] | None = None) -> dict:
    def rate(sel):
        sel = list(sel)
        return round(sum(refused[i] for i in sel) / len(sel), 4) if sel else None

    idx = range(len(cases))
    out = {"n": len(cases), "per_order": {}}
    pos = [i for i in idx if cases[i].mode == Mode.POSITIVE or cases[i].mode is None]
    for order in sorted({len(cases[i].constraints) for i in pos}):
        o = [i for i in pos if len(cases[i].constraints) == order]
        out["per_order"][str(order)] = {
            "refusal": rate(i for i in o if cases[i].expect_refuse),
            "over_refusal": rate(i for i in o if not cases[i].expect_refuse),
        }
    out["refusal"] = rate(i for i in pos if cases[i].expect_refuse)
    out["over_refusal"] = rate(i for i in pos if not cases[i].expect_refuse)
    out["over_refusal_by_kind"] = {
        kind: rate(i for i in pos if cases[i].kind == kind) for kind in ("near-miss", "inactive", "general")
    }
    if margins is not None:  # refusal-opener margin of violating vs each kind of should-answer case
        viol = [margins[i] for i in pos if cases[i].expect_refuse]
        out["auc_by_kind"] = {
            kind: auc(viol, [margins[i] for i in pos if cases[i].kind == kind])
            for kind in ("near-miss", "inactive", "general")
        }
        out["auc"] = auc(viol, [margins[i] for i in pos if not cases[i].expect_refuse])
    out["held_out_refusal"] = rate(i for i in pos if cases[i].held_out and cases[i].expect_refuse)
    out["held_out_over_refusal"] = rate(i for i in pos if cases[i].held_out and not cases[i].expect_refuse)
    out["rejective_refusal"] = rate(i for i in idx if cases[i].mode == Mode.REJECTIVE)
    out["negative_compliance"] = (
        None if (r := rate(i for i in idx if cases[i].mode == Mode.NEGATIVE)) is None else round(1 - r, 4)
    )
    return out


# ---------------------------------------------------------------- training


def train(
    cfg: TrainConfig,
    base: BaseModel,
    out_dir: str | Path,
    template: ChatTemplate = QA_TEMPLATE,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Bank, dict]:
    """Train the bank; writes checkpoints and a JSONL log into `out_dir`. Returns (bank, summary)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    t_start = time.time()
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    prompts = load_prompts(cfg.data_dir or None, "train", cfg.slices)
    prompts = [p for p in prompts if p.category == "general" or p.category in cfg.constraints]
    if cfg.limit_prompts:
        prompts = stratified_sample(prompts, cfg.limit_prompts, random.Random(cfg.seed))
    prompts += thirdparty_prompts(cfg)  # never cut by limit_prompts: the scarce real rows all stay
    val_cases, val_ids = validation_set(base, cfg, template, cfg.seed + 1)  # before the teacher: fail fast
    # also before the teacher, so a wrong init_bank fails in seconds, not after the teacher cache is built
    if cfg.kind == "deep":
        bank = init_deep(base, cfg, gen).to(base.device)
        bank.copies = cfg.deep_copies
    else:
        bank = Bank(init_from_bank(base, cfg) if cfg.init_bank else init_vectors(base, cfg, gen)).to(base.device)
    teacher = build_teacher(base, [p.source() for p in prompts], template, cfg.ref_tokens, cfg.teacher_topk, progress=progress)
    keep = [i for i, ids in enumerate(teacher.prompt_ids) if len(ids) <= cfg.max_prompt_tokens]
    if len(keep) < len(prompts):
        log.info("dropping %d prompts longer than %d tokens", len(prompts) - len(keep), cfg.max_prompt_tokens)
    teacher_time = time.time() - t_start

    refusal_ids = refusal_target_ids(base, template, list(cfg.constraints) + list(cfg.modes))
    refuse_id = decision_id(refusal_ids)
    sampler = TaskSampler([prompts[i] for i in keep], cfg, rng)
    sampler_index = keep  # sampler indices -> prompt indices
    contexts = Contexts(base, cfg, template, prompts) if cfg.context_fraction else None
    if contexts is not None:
        sampler.n_contexts = len(contexts)
        log.info("%d contexts (%s)", len(contexts), dict(collections.Counter(k for k, _ in contexts.entries)))
    anchor = load_anchor(base, cfg)
    readout = load_readout(base, cfg)
    if anchor is not None:
        sampler.anchor_names = tuple(n for n in cfg.constraints if n in anchor.names)
        log.info("anchor bank %s: compositions of %s distilled from it", cfg.anchor_bank, ", ".join(sampler.anchor_names))
    context_kv = ContextKV(base)
    conversations: dict[int, tuple[tuple[int, ...], list[int]]] = {}

    def context_of(ex):
        p = prompts[ex.prompt]
        if ex.context >= 0 and contexts is not None:
            ctx, ids = contexts.layout(ex.context, p.text)
            return ctx, ids, False
        if p.messages:
            if ex.prompt not in conversations:
                conversations[ex.prompt] = split_conversation(base, template, p)
            ctx, ids = conversations[ex.prompt]
            return ctx, ids, True
        return (), teacher.prompt_ids[ex.prompt], True

    opt = torch.optim.Adam(param_groups(bank, cfg), lr=cfg.lr)
    step0, history = 0, []
    ckpt = out_dir / CHECKPOINT
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        defaults = TrainConfig().to_dict()  # keys added after the checkpoint was written had their default then
        changed = sorted(
            k for k, v in cfg.to_dict().items() if k not in RESUMABLE and state["config"].get(k, defaults[k]) != v
        )
        if changed:
            raise EdgeSafeError(
                f"{ckpt} was written with a different config ({', '.join(changed)} differ); "
                "use the same config, a fresh --out-dir, or drop --resume"
            )
        bank.load_state_dict(state["bank"])
        opt.load_state_dict(state["optim"])
        rng.setstate(state["rng"])
        step0, history = state["step"], state["history"]
        log.info("resumed from step %d", step0)

    log_file = (out_dir / "train_log.jsonl").open("w")  # rewritten from the checkpoint: steps after it are redone
    for rec in history:
        log_file.write(json.dumps(rec) + "\n")
    bar = tqdm(range(step0, cfg.steps), initial=step0, total=cfg.steps, desc="train", disable=not progress)
    for step in bar:
        examples = [dataclasses.replace(ex, prompt=sampler_index[ex.prompt]) for ex in sampler.batch(step)]
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step) * group.get("scale", 1.0)
        opt.zero_grad()
        loss, stats, trained = torch.zeros(()), collections.Counter(), False
        for part in micro_batches(examples, lambda ex: len(context_of(ex)[0])):
            batch = build_batch(base, bank, teacher, refusal_ids, part, cfg.first_token_weight, cfg.refusal_weight,
                                context_of, context_kv, anchor)
            with _autocast(cfg, base):
                part_loss, part_stats = mosaic_loss(base, batch, cfg.kl_weight, cfg.decision_weight, refuse_id,
                                                    cfg.anchor_weight, readout, cfg.readout_weight)
            share = len(part) / len(examples)  # the loss is a mean over examples: the parts' weighted sum is the batch's
            if part_loss.requires_grad:  # with `frozen` tokens a part may hold none that trains: nothing to step
                (part_loss * share).backward()
                trained = True
            loss = loss + part_loss.detach() * share
            stats.update({k: v * share for k, v in part_stats.items()})
        if trained:
            opt.step()
        rec = {"step": step + 1, "order": 1 + step % cfg.max_order, "loss": round(float(loss.detach()), 4),
               **{k: round(v, 4) for k, v in stats.items()}, "lr": round(learning_rate(cfg, step), 6),
               "sec": round(time.time() - t0, 3)}
        bar.set_postfix(loss=f"{rec['loss']:.3f}", nll=f"{rec['nll']:.3f}", kl=f"{rec['kl']:.3f}", r=rec["order"])
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            rec["val"] = validate(base, bank, val_ids, val_cases, refuse_id, readout)
            bar.write(f"step {step + 1}: val {json.dumps(rec['val'])}")
        history.append(rec)
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(ckpt, step + 1, bank, opt, rng, cfg, history)
    log_file.close()
    last_val = next((h["val"] for h in reversed(history) if "val" in h), None)
    if last_val is None:
        last_val = validate(base, bank, val_ids, val_cases, refuse_id, readout)
    summary = {
        "val": last_val,
        "steps": cfg.steps,
        "train_prompts": len(keep),
        "train_prompts_by_slice": dict(sorted(collections.Counter(prompts[i].slice for i in keep).items())),
        "contexts": dict(collections.Counter(k for k, _ in contexts.entries)) if contexts is not None else {},
        "compute_dtype": compute_dtype(cfg, base),
        "teacher_seconds": round(teacher_time, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "final_loss": history[-1]["loss"] if history else None,
    }
    return bank, summary


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The lr of (0-based) `step`: constant, or linear warmup then cosine decay to lr * lr_min_ratio."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * cfg.lr_min_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * t))


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively here: a GPU, or a CPU with AVX512-BF16 or AMX (elsewhere torch
    emulates them, ≈ 50x slower than float32 in the backward pass on an AVX2-only CPU)."""
    if device.type != "cpu":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(cfg: TrainConfig, base: BaseModel) -> str:
    """The dtype the loss runs in: the config's, with "auto" resolved for this machine."""
    if cfg.compute_dtype == "auto":
        return "bfloat16" if native_bfloat16(base.device) else "float32"
    return cfg.compute_dtype


def _autocast(cfg: TrainConfig, base: BaseModel):
    """bfloat16 autocast for the loss forward/backward when asked; the vectors stay float32."""
    if compute_dtype(cfg, base) == "bfloat16":
        return torch.autocast(base.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save_checkpoint(path: Path, step: int, bank: Bank, opt, rng, cfg: TrainConfig, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "bank": bank.state_dict(), "optim": opt.state_dict(), "rng": rng.getstate(),
                "config": cfg.to_dict(), "history": history}, tmp)
    tmp.replace(path)


def export_bank(bank: Bank, base: BaseModel, cfg: TrainConfig, summary: dict, template: ChatTemplate = QA_TEMPLATE):
    """The trained vectors as a TokenBank (numpy), with config and validation summary in its metadata."""
    from edge_safe.convert.bank import BankToken, TokenBank

    tokens = {}
    for name in bank.names:  # modes first, then constraints, as laid out
        spec = BY_NAME[name]
        kind = "mode" if name in cfg.modes else "constraint"
        if isinstance(bank, DeepBank):
            keys, values = (t[name].detach().float().cpu().numpy() for t in (bank.keys, bank.values))
            tokens[name] = BankToken.deep(name, kind, keys, values, description=spec.description,
                                          refusal=spec.refusal, rule=spec.rule)
            continue
        vec = bank.vectors[name].detach().float().cpu().numpy()
        tokens[name] = BankToken(name, kind, vec, spec.description, spec.refusal, spec.rule)
    # a profile keeps the members this bank has (a run on a subset of the constraints still has `minors`)
    profiles = {p: [x for x in c if x in cfg.constraints] for p, c in PROFILES.items()}
    profiles = {p: members for p, members in profiles.items() if members}
    info = base.info
    # tokens trained for init_bank's readout are decided by it: it goes with them, unchanged
    readout = _init_readout_bank(cfg).readout if cfg.readout_weight else None
    return TokenBank(
        readout=readout,
        arch=info.arch if info else "gemma3",
        n_embd=base.n_embd,
        base_fingerprint=info.fingerprint if info else "0" * 64,
        base_name=info.name if info else "tiny-random-gemma3",
        tokens=tokens,
        profiles=profiles,
        layout=LAYOUT_V1,
        template=template,
        name="edge-safe default bank" if info else "edge-safe test bank",
        description="MOSAIC control tokens + mode co-training (edge-safe train)",
        origin="trained",
        training_config={**cfg.to_dict(), "summary": summary},
        eval_summary={"validation_first_token": summary.get("val", {})},
        deep_copies=cfg.deep_copies if isinstance(bank, DeepBank) else (),
    )
