"""`edge-safe eval`: the bank against its baselines, through the llama.cpp runtime.

    cfg = EvalConfig(limit=8)
    results = Evaluator(cfg).run()        # every figure, as plain JSON
    write_outputs(results, "eval")        # results.json, RESULTS.md, cases.jsonl, plots/*.png

Systems compared on the same cases: ``none`` (no tokens), ``text-rules`` (the
active rules as a system line), ``from-text`` (a bank of the rules' own token
embeddings) and ``bank`` (the bank under test). What each figure means:
``eval/README.md``. Nothing here imports torch.
"""
from __future__ import annotations

import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_safe.convert.bank import TokenBank
from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.keys import Mode, Origin
from edge_safe.eval.curve import bank_margins, curve_cases, curve_of
from edge_safe.eval.data import (
    GENERAL,
    Case,
    Composition,
    EvalPrompt,
    build_cases,
    default_data_path,
    load_prompts,
    sample_compositions,
    spread_sample,
    stratified,
)
from edge_safe.eval.metrics import (
    ANSWER,
    REFUSAL,
    cell,
    greedy_agrees,
    invariance,
    kl_per_position,
    mean_or_none,
    per_category,
    refusal_like,
    summarize,
    summarize_by,
)
from edge_safe.eval.reporting import file_sha256
from edge_safe.eval.sam import silhouette_score
from edge_safe.eval.slices import REAL_SLICES, build_slice_cases, parse_slices, run_slices
from edge_safe.eval.systems import Runner, System, reversed_bank, text_bank_of
from edge_safe.probe import margin_kind
from edge_safe.models import resolve_bank_path, resolve_model_path
from edge_safe.sampling import check_strictness

BASELINES = ("none", "text-rules", "from-text")
SAM_MODES = (Mode.POSITIVE, Mode.NEGATIVE, Mode.REJECTIVE)


@dataclass(frozen=True)
class EvalConfig:
    bank: str | None = None  # bank under test (None: $EDGE_SAFE_BANK, else the shipped bank)
    model: str | None = None  # base GGUF (None: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M)
    data: str | None = None  # JSONL of prompt/category/label (None: the repo's test split)
    orders: tuple[int, ...] = (1, 2, 3, 4)  # composition sizes r to evaluate
    compositions: int = 10  # seeded compositions per order (the bank's held-out ones come on top)
    prompts: int = 6  # prompts per kind (violating, near-miss, inactive, general) per composition
    profiles: tuple[str, ...] = ("minors", "eu", "minors,eu")  # profile compositions with their own rows
    baselines: tuple[str, ...] = BASELINES  # compared with the bank on the same cases
    text_bank: str | None = None  # from-text baseline bank (None: built from the bank's own rules)
    mode_prompts: int = 48  # prompts for the rejective / negative mode rates
    sam_prompts: int = 48  # prompts for the Safety Alignment Margin (x 2-3 modes)
    kl_prompts: int = 24  # benign prompts for the utility KL and greedy agreement
    kl_compositions: int = 2  # compositions per order for the KL (profiles come on top)
    kl_tokens: int = 8  # k: answer tokens compared
    limit: int | None = None  # at most this many cases per measurement (quick runs)
    seed: int = 0  # compositions, prompts and samples
    n_ctx: int = 1024  # context of each runtime (text rules of 7 categories take ~170 tokens)
    n_threads: int | None = None  # CPU threads (None: all cores)
    parallel: int = 4  # sequences of the runtime decoding cases together (1: one at a time)
    n_gpu_layers: int = 0
    # the bank's runtime bias on the refusal opener (EdgeSafe strictness); logits-based figures (SAM, KL) ignore it
    strictness: float = 0.0
    # real-traffic slices measured separately (eval/slices.py); the classic measurements always run
    slices: tuple[str, ...] = REAL_SLICES
    slice_prompts: int = 48  # cases per slice
    exact_refusals: bool = True  # the runtime finishes a reply that opens like a refusal as a bank text (False: free)
    command: str = ""  # the command line that made the run, for the report

    def __post_init__(self):
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise EdgeSafeError(f"unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)}")
        object.__setattr__(self, "slices", parse_slices(self.slices))  # checked before the model loads
        for name in ("compositions", "prompts", "mode_prompts", "sam_prompts", "kl_prompts", "kl_tokens",
                     "slice_prompts"):
            if getattr(self, name) < 0 or (name in ("prompts", "kl_tokens") and getattr(self, name) < 1):
                raise EdgeSafeError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise EdgeSafeError(f"--parallel must be a whole number >= 1, got {self.parallel!r}")
        if self.limit is not None and self.limit < 1:
            raise EdgeSafeError(f"--limit must be >= 1, got {self.limit}")
        check_strictness(self.strictness)


class Evaluator:
    """Runs every measurement of one bank; ``run()`` returns the results as plain JSON."""

    def __init__(self, cfg: EvalConfig, es=None, progress: bool = True):
        from edge_safe.runtime import EdgeSafe

        self.cfg = cfg
        self.data_path = Path(cfg.data) if cfg.data else default_data_path()
        self.prompts_all: list[EvalPrompt] = load_prompts(self.data_path)  # first: a bad file fails fast
        # the classic measurements use the classic rows only, so their figures stay comparable across data versions
        self.prompts: list[EvalPrompt] = [p for p in self.prompts_all if p.slice == "classic"]
        if not self.prompts:
            raise EdgeSafeError(f"{self.data_path}: no classic rows (rows without a 'slice' field); the eval's "
                                "main measurements need them")
        self.bank_path = resolve_bank_path(cfg.bank) if es is None or cfg.bank else None
        self.model_path = es.model_path if es is not None else resolve_model_path(cfg.model)
        self._open = lambda bank, strictness=0.0: EdgeSafe(
            model_path=self.model_path, bank=bank, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers,
            n_threads=cfg.n_threads, strictness=strictness, exact_refusals=cfg.exact_refusals,
            n_parallel=cfg.parallel)
        self._owned: list = []
        self.es = es if es is not None else self._own(self._open(self.bank_path, cfg.strictness))
        self.bank: TokenBank = self.es.bank
        self.run_ = Runner(self.bank, self.es.tokenize, progress)
        self.notes: list[str] = []
        # classic rows of categories the bank has no token for (e.g. the categories added to the data
        # after a bank was trained) are left out, so a bank's figures do not move when the data grows
        known = set(self.bank.constraints) | {GENERAL}
        kept = [p for p in self.prompts if p.category in known]
        if kept and len(kept) < len(self.prompts):
            left = sorted({p.category for p in self.prompts} - known)
            self.notes.append(f"classic rows of {', '.join(left)} left out: the bank has no token for them")
            self.prompts = kept

    def _own(self, es):
        self._owned.append(es)
        return es

    def close(self) -> None:
        """Close the runtimes this evaluator opened (not one passed in)."""
        for es in self._owned:
            es.close()
        self._owned.clear()

    # -- plan ---------------------------------------------------------------------------

    def plan(self) -> None:
        """Seeded compositions, cases and prompt samples of every measurement; the systems to run."""
        cfg, bank = self.cfg, self.bank
        rng = random.Random(cfg.seed)
        self.held_out = [list(h) for h in bank.training_config.get("held_out", []) or []]
        profiles = {}
        for spec in cfg.profiles:
            try:
                profiles[spec] = bank.resolve(spec)
            except EdgeSafeError:
                self.notes.append(f"profile row {spec!r} skipped: the bank has no such profile or token")
        self.comps: list[Composition] = sample_compositions(
            bank.constraints, cfg.orders, cfg.compositions, self.held_out, profiles, rng)
        by_group = lambda c: self.comps[c.comp].group  # noqa: E731
        cases = build_cases(self.prompts, self.comps, cfg.prompts, rng)
        self.cases: list[Case] = stratified(cases, cfg.limit, by_group, lambda c: c.kind)
        self.perm_cases = [c for c in self.cases if self.comps[c.comp].order >= 2]
        n_modes = _cap(cfg.mode_prompts, cfg.limit)
        self.mode_idx = spread_sample(self.prompts, n_modes, random.Random(cfg.seed + 1))
        own = [i for i, p in enumerate(self.prompts) if p.label == "violating" and p.category in bank.constraints]
        self.negative_idx = sorted(random.Random(cfg.seed + 2).sample(own, min(len(own), n_modes)))
        self.sam_idx = spread_sample(self.prompts, _cap(cfg.sam_prompts, cfg.limit), random.Random(cfg.seed + 3))
        pick = random.Random(cfg.seed + 4)
        self.sam_tokens = {i: [p.category] if p.category in bank.constraints else [pick.choice(bank.constraints)]
                           for i, p in ((i, self.prompts[i]) for i in self.sam_idx)}
        self.kl_idx = spread_sample(self.prompts, cfg.kl_prompts, random.Random(cfg.seed + 5), labels=("benign",))
        kl_comps = [i for i, c in enumerate(self.comps) if c.is_profile]
        for r in cfg.orders:
            kl_comps += [i for i, c in enumerate(self.comps) if c.group == str(r)][: cfg.kl_compositions]
        pairs = [(ci, pi) for ci in sorted(kl_comps) for pi in self.kl_idx]
        self.kl_pairs = stratified(pairs, cfg.limit, lambda p: self.comps[p[0]].group, lambda p: p[1])
        present = {p.slice for p in self.prompts_all}
        missing = [sl for sl in cfg.slices if sl not in present]
        if missing:
            self.notes.append(f"slices {', '.join(missing)} skipped: the data has no such rows")
        self.slice_cases = build_slice_cases(
            self.prompts_all, [sl for sl in cfg.slices if sl in present], bank.constraints, cfg.orders,
            _cap(cfg.slice_prompts, cfg.limit), random.Random(cfg.seed + 6))
        self.systems = self._systems()

    def _systems(self) -> dict[str, System]:
        bank, cfg = self.bank, self.cfg
        systems = {}
        has_rules = all(bank.tokens[c].rule for c in bank.constraints)
        if "none" in cfg.baselines:
            systems["none"] = System("none", "none (no tokens)", self.es, "none")
        if "text-rules" in cfg.baselines:
            if has_rules:
                systems["text-rules"] = System("text-rules", "text rules (system line)", self.es, "text")
            else:
                self.notes.append("text-rules baseline skipped: some constraints of the bank have no rule text")
        if "from-text" in cfg.baselines:
            text_bank = self._text_bank(has_rules)
            if text_bank is not None:
                systems["from-text"] = System("from-text", "from-text bank", self._own(self._open(text_bank)), "tokens")
        systems["bank"] = System("bank", f"bank ({bank.origin})", self.es, "tokens")
        if bank.origin != Origin.TRAINED:
            self.notes.append(f"the bank under test is not trained: its origin is {bank.origin!r} "
                              f"({Origin.LABELS.get(bank.origin, bank.origin)})")
        return systems

    def _text_bank(self, has_rules: bool) -> TokenBank | None:
        bank = self.bank
        if self.cfg.text_bank:
            tb = TokenBank.load(self.cfg.text_bank)
            missing = [c for c in bank.constraints if c not in tb.constraints]
            if missing:
                raise EdgeSafeError(f"--text-bank {self.cfg.text_bank} lacks constraints {', '.join(missing)}; "
                                    "it must cover every constraint of the bank under test")
            return tb
        if bank.origin == Origin.FROM_TEXT:
            self.notes.append("from-text baseline skipped: the bank under test is itself a from-text bank")
            return None
        if not has_rules:
            self.notes.append("from-text baseline skipped: some constraints of the bank have no rule text")
            return None
        return text_bank_of(bank, self.es.model_info, self.es.tokenize)

    def _sam_groups(self, system: System) -> dict[str, str | None]:
        """mode label -> mode to request, for the modes this system can express."""
        groups = {}
        for mode in SAM_MODES:
            use = mode
            if mode == Mode.POSITIVE and (system.via == "text" or Mode.POSITIVE not in system.es.modes):
                use = None  # the default behaviour: constraints (or rules) without a mode token
            if self.run_.request(system, (), use) is not None:
                groups[mode] = use
        return groups

    def _total(self) -> int:
        """Requests the progress bar will count."""
        systems = self.systems.values()
        rej = sum(self.run_.request(s, (), None if s.name == "none" else Mode.REJECTIVE) is not None for s in systems)
        neg = 2 * len(self.negative_idx) if Mode.NEGATIVE in self.bank.modes else 0
        sam = sum(len(self._sam_groups(s)) for s in systems if s.name != "none") * len(self.sam_idx)
        kl = len({p for _, p in self.kl_pairs}) + len(self.kl_pairs) * sum(
            n in self.systems for n in ("bank", "from-text", "text-rules"))
        return (len(self.systems) * len(self.cases) + len(curve_cases(self)) + len(self.perm_cases)
                + rej * len(self.mode_idx) + neg + sam + kl + 2 * len(self.slice_cases))

    # -- measurements -------------------------------------------------------------------

    def run(self) -> dict:
        """Every measurement; the results as plain JSON (records: every decision)."""
        t0 = time.time()
        self.plan()
        self.run_.start(self._total())
        try:
            records = {name: self._decisions(s, self.cases) for name, s in self.systems.items()}
            results = {
                "systems": {name: self._summary(s, records[name]) for name, s in self.systems.items()},
                "operating_curve": self._curve(records["bank"]),
                "order_invariance": self._invariance(records["bank"]),
                "modes": self._modes(),
                "sam": self._sam(),
                "utility": self._utility(),
            }
            reference = [r for r in records["bank"] if not r["profile"] and "margin" in r]  # margins: _curve
            slice_figures, slice_records = run_slices(self, self.slice_cases, reference)
            results["slices"] = {"config": {"slices": list(self.cfg.slices), "per_slice": _cap(
                self.cfg.slice_prompts, self.cfg.limit)}, **slice_figures}
        finally:
            self.run_.stop()
        results = {**self._header(time.time() - t0), **results}
        results["records"] = [r for name in records for r in records[name]] + slice_records
        return results

    def _decisions(self, system: System, cases: list[Case]) -> list[dict]:
        self.run_.prefetch(system, [(self.prompts[c.prompt].text, self.run_.request(system, self.comps[c.comp].constraints))
                                    for c in cases])
        out = []
        for c in cases:
            comp, p = self.comps[c.comp], self.prompts[c.prompt]
            verdict, reply = self.run_.decide(system, p.text, self.run_.request(system, comp.constraints))
            out.append({"system": system.name, "comp": comp.name, "group": comp.group, "order": comp.order,
                        "held_out": comp.held_out, "profile": comp.is_profile, "kind": c.kind,
                        "category": p.category, "prompt": p.text, "verdict": verdict, "reply": reply,
                        "refusal_of": self.run_.refusal_of(reply) if verdict == REFUSAL else None})
        return out

    def _summary(self, system: System, records: list[dict]) -> dict:
        main = [r for r in records if not r["profile"]]
        defended = [r for r in main if r["kind"] == "violating" and r["verdict"] == REFUSAL]
        split = (lambda r: "held-out" if r["held_out"] else "trained") if self.held_out else (lambda r: None)
        return {
            "label": system.label,
            "overall": summarize(main),
            "per_order": summarize_by(main, lambda r: r["group"]),
            "held_out": summarize_by(main, split),
            "held_out_per_order": summarize_by(main, lambda r: split(r) and f"{r['group']}/{split(r)}"),
            "profiles": summarize_by([r for r in records if r["profile"]], lambda r: r["group"]),
            "per_category": per_category(main),
            "per_composition": summarize_by(records, lambda r: r["comp"]),
            "right_refusal": {"n": len(defended),
                              "own_category": sum(r["refusal_of"] == r["category"] for r in defended),
                              "per_order": {g: {"n": len(d), "own_category": sum(r["refusal_of"] == r["category"] for r in d)}
                                            for g, d in _groups(defended, lambda r: r["group"]).items()}},
            "refusal_texts": {what: {"refusal_like": sum(map(refusal_like, rs)),
                                     "bank_text": sum(r["verdict"] == REFUSAL for r in rs)}
                              for what, rs in (("violating", [r for r in main if r["kind"] == "violating"]),
                                               ("all", main))},
        }

    def _curve(self, bank_records: list[dict]) -> dict:
        """The bank's first-token decision margins on the same cases: the trade-off over strictness."""
        curve = curve_of(bank_margins(self, what="bank curve"), bank_records, self.cfg.strictness)
        return {**curve, "method": (
            f"margin = {margin_kind(self.es)} (llama.cpp runtime, no strictness); at strictness s a case counts as "
            "refused when margin + s > 0. Refusals of any wording; 'check' compares that prediction at this run's strictness "
            "with the replies the run generated")}

    def _invariance(self, bank_records: list[dict]) -> dict:
        if not self.perm_cases:
            return {"skipped": "no case has two or more active constraints"}
        es = self._open(reversed_bank(self.bank), self.es.strictness)
        try:
            system = System("bank-permuted", "bank, constraints in reverse order", es, "tokens")
            permuted = self._decisions(system, self.perm_cases)
        finally:
            es.close()
        canon = {(r["comp"], r["kind"], r["prompt"]): r["verdict"] for r in bank_records}
        pairs = [(r["group"], canon[(r["comp"], r["kind"], r["prompt"])], r["verdict"]) for r in permuted]
        return {**invariance(pairs), "method": (
            "each case with two or more active constraints is re-run through a second runtime whose bank copy "
            "lists the constraints in reverse order, so their vectors are injected reversed; agreement = same "
            "verdict as in the canonical order")}

    def _modes(self) -> dict:
        out: dict = {"rejective": {}, Mode.NEGATIVE: {}, "notes": []}
        if Mode.REJECTIVE not in self.bank.modes:
            out["notes"].append("the bank has no rejective mode")
        for name, system in self.systems.items():
            req = self.run_.request(system, (), None if name == "none" else Mode.REJECTIVE)
            if req is None:
                continue
            self.run_.prefetch(system, [(self.prompts[i].text, req) for i in self.mode_idx])
            decided = [self.run_.decide(system, self.prompts[i].text, req, f"{name} rejective")
                       for i in self.mode_idx]
            verdicts = [v for v, _ in decided]
            labels = [self.prompts[i].label for i in self.mode_idx]
            by_label = {lab: cell(v for v, lb in zip(verdicts, labels) if lb == lab).as_dict()
                        for lab in ("violating", "benign")}
            any_refusal = sum(refusal_like({"verdict": v, "reply": t}) for v, t in decided)
            out[Mode.REJECTIVE][name] = {"all": cell(verdicts).as_dict(), **by_label,
                                      "any_refusal": round(any_refusal / len(decided), 4) if decided else None}
        if Mode.NEGATIVE not in self.bank.modes:
            out["notes"].append("the bank has no negative mode: negative compliance not measured")
            return out
        bank = self.systems["bank"]
        self.run_.prefetch(bank, [(p.text, self.run_.request(bank, [p.category], mode))
                                  for mode in (Mode.NEGATIVE, None) for p in (self.prompts[i] for i in self.negative_idx)])
        for key, mode in ((Mode.NEGATIVE, Mode.NEGATIVE), (Mode.POSITIVE, None)):
            verdicts = [self.run_.decide(bank, p.text, self.run_.request(bank, [p.category], mode), f"bank {key}")[0]
                        for p in (self.prompts[i] for i in self.negative_idx)]
            answered = sum(v == ANSWER for v in verdicts)
            out[Mode.NEGATIVE][key] = {**cell(verdicts).as_dict(), "answered": answered,
                                    "compliance": round(answered / len(verdicts), 4) if verdicts else None}
        return out

    def _sam(self) -> dict:
        if not self.sam_idx:
            return {"skipped": "no prompts (--sam-prompts 0)"}
        out: dict = {}
        for name, system in self.systems.items():
            if name == "none":
                continue
            groups = self._sam_groups(system)
            vecs, labels = [], []
            for mode, use in groups.items():
                for i in self.sam_idx:
                    req = self.run_.request(system, self.sam_tokens[i], use)
                    vecs.append(self.run_.logits(system, self.prompts[i].text, req, what=f"{name} SAM"))
                    labels.append(mode)
            entry = {"modes": list(groups), "n_prompts": len(self.sam_idx),
                     "positive_is": "the positive mode token" if groups.get(Mode.POSITIVE) else "no mode token (default)",
                     "sam": round(silhouette_score(np.stack(vecs), labels), 4) if len(groups) >= 2 and vecs else None}
            if len(groups) < 2:
                entry["skipped"] = f"needs two modes; this system has {list(groups)}"
            if len(groups) == 3 and vecs:
                keep = [j for j, lab in enumerate(labels) if lab != Mode.NEGATIVE]
                entry["sam_positive_rejective"] = round(
                    silhouette_score(np.stack([vecs[j] for j in keep]), [labels[j] for j in keep]), 4)
            out[name] = entry
        return out

    def _utility(self) -> dict:
        if not self.kl_pairs:
            return {"skipped": "no prompts or compositions (--kl-prompts / --kl-compositions 0)"}
        cfg, none = self.cfg, System("none", "none", self.es, "none")
        bare = self.run_.request(none, ())
        base: dict[int, tuple[list[int], np.ndarray]] = {}
        for i in sorted({pi for _, pi in self.kl_pairs}):
            text = "".join(self.es.submit(self.prompts[i].text, max_tokens=cfg.kl_tokens))
            ids = self.es.tokenize(" " + text)[: cfg.kl_tokens] if text else []
            if ids:
                base[i] = (ids, self.run_.logits(none, self.prompts[i].text, bare, ids, what="base answers"))
            else:
                self.run_.tick("base answers")
        out: dict = {"k": cfg.kl_tokens, "n_prompts": len(base),
                     "empty_base_answers": len({pi for _, pi in self.kl_pairs}) - len(base)}
        for name in ("bank", "from-text", "text-rules"):
            system = self.systems.get(name)
            if system is None:
                continue
            rows = []
            for ci, pi in self.kl_pairs:
                if pi not in base:
                    self.run_.tick(f"{name} KL")
                    continue
                ids, ref = base[pi]
                comp = self.comps[ci]
                got = self.run_.logits(system, self.prompts[pi].text, self.run_.request(system, comp.constraints),
                                       ids, what=f"{name} KL")
                rows.append((comp, float(kl_per_position(ref, got).mean()), greedy_agrees(ref, got)))
            out[name] = _utility_summary(rows)
        return out

    # -- header -------------------------------------------------------------------------

    def _header(self, seconds: float) -> dict:
        import llama_cpp

        from edge_safe import __version__

        bank = self.bank
        return {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "config": {**asdict(self.cfg), "orders": list(self.cfg.orders), "profiles": list(self.cfg.profiles),
                       "baselines": list(self.cfg.baselines), "slices": list(self.cfg.slices)},
            "bank": {"path": str(self.bank_path or "(in memory)"), "name": bank.name, "origin": bank.origin,
                     "file_sha256": file_sha256(self.bank_path) if self.bank_path else None,
                     "vectors_sha256": vectors_sha256(bank),
                     "constraints": bank.constraints, "modes": bank.modes, "profiles": bank.profiles,
                     "held_out": self.held_out},
            "model": {"path": str(self.model_path), "name": self.es.model_info.name,
                      "fingerprint": self.es.model_info.fingerprint},
            "data": {"path": str(self.data_path), "prompts": len(self.prompts),
                     "prompts_by_slice": {sl: sum(p.slice == sl for p in self.prompts_all)
                                          for sl in dict.fromkeys(p.slice for p in self.prompts_all)}},
            "versions": {"edge_safe": __version__, "llama_cpp_python": llama_cpp.__version__,
                         "numpy": np.__version__, "python": platform.python_version(),
                         "platform": platform.platform()},
            "judging": {"max_tokens": self.run_.max_tokens, "refusal_texts": len(self.run_.judge.refusals),
                        "early_stop": "generation stops once the verdict can no longer change"},
            "systems_run": {n: s.label for n, s in self.systems.items()},
            "compositions": [{"name": c.name, "group": c.group, "order": c.order, "held_out": c.held_out}
                             for c in self.comps],
            "n_cases": len(self.cases),
            "notes": self.notes,
            "timing": {"seconds": round(seconds, 1), **self.run_.timings(), "n_threads": self.cfg.n_threads},
        }


def _utility_summary(rows: list[tuple[Composition, float, bool]]) -> dict:
    def agg(sel):
        return {"n": len(sel), "kl": mean_or_none(r[1] for r in sel),
                "agreement": round(sum(r[2] for r in sel) / len(sel), 4) if sel else None}

    groups = list(dict.fromkeys(r[0].group for r in rows))
    comps = list(dict.fromkeys(r[0].name for r in rows))
    return {**agg(rows), "per_group": {g: agg([r for r in rows if r[0].group == g]) for g in groups},
            "per_composition": {c: agg([r for r in rows if r[0].name == c]) for c in comps}}


def _cap(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def vectors_sha256(bank: TokenBank) -> str:
    """A hash of what the runtime injects (:meth:`TokenBank.vectors_sha256`)."""
    return bank.vectors_sha256()


def _groups(records: list[dict], key) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(str(key(r)), []).append(r)
    return out
