"""`edge-safe bench`: latency and memory per composition, against baselines, in one run.

    cfg = BenchConfig(quick=True)
    results = Benchmark(cfg).run()          # every figure, as plain JSON
    write_outputs(results, "bench/results")  # results.json, RESULTS.md, plots/*.png

Per composition: TTFT cold (prefix built) and warm (prefix restored from the
LRU), the restore itself, prefill positions, decode tokens/s over a fixed greedy
generation, the snapshot's bytes and a fresh process's peak RSS. Baselines on the
same model, settings and prompts: bare ``llama_cpp.Llama`` (no rules), the rules
as a text system line (cold, and warm via ``Llama``'s KV prefix reuse) and a
two-call guard. Method: a warm-up round, then rounds in which every
(variant, composition) runs once in a seeded shuffled order on the round's
prompt; medians, p25-p75 and n; ratios to bare from the same run.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from edge_safe.bench.env import load_average, machine_info, measure_peak_rss
from edge_safe.bench.report import FOCUS, FORMAT, evaluate_targets
from edge_safe.bench.systems import PRIME_QUESTION, Composition, EdgeBench, LlamaBench
from edge_safe.convert.bank import TokenBank, split_names
from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.keys import Kind, Mode
from edge_safe.eval.reporting import file_sha256
from edge_safe.models import resolve_bank_path, resolve_model_path

PROMPTS = (  # benign, 10-16 tokens each; round r uses PROMPTS[r % len] for every variant
    "What is the capital of Peru?",
    "How do plants make food from sunlight?",
    "Why is the sky blue on a clear day?",
    "How many legs does a spider have?",
    "What does a librarian do at work?",
)
DECODE_QUESTION = "Tell me about the history of the bicycle."  # only starts the fixed greedy continuation
EDGE_VARIANTS = ("cold", "warm", "decode")
BASELINE_VARIANTS = ("text-cold", "text-warm", "guard-cold", "guard-warm", "stay")


@dataclass(frozen=True)
class BenchConfig:
    model: str | None = None  # base GGUF (None: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M)
    bank: str | None = None  # bank (None: $EDGE_SAFE_BANK, else the shipped one)
    compositions: tuple[str, ...] = ()  # labels ("none", "minors,eu", a mode name, "all"); () = default set
    baselines: tuple[str, ...] = ()  # compositions that also get text / guard / stay; () = default set
    repeats: int = 10  # measured rounds: each variant runs once per round
    warmup: int = 1  # rounds run first and discarded (page-in, caches, allocator)
    max_tokens: int = 64  # length of the fixed greedy generation that decode tok/s is timed over
    bank_loads: int = 5  # TokenBank.load timings per round
    n_ctx: int = 1024  # same for edge-safe and every Llama baseline
    n_batch: int = 512  # edge-safe's default; the baselines get the same
    n_threads: int | None = None  # None: the runtime's default (half the usable cores)
    n_gpu_layers: int = 0
    seed: int = 0  # shuffles the order of variants within each round
    rss: bool = True  # measure peak RSS per variant in child processes (a few s each)
    quick: bool = False  # few compositions, short generation (set the counts with quick_config)
    concurrency: tuple[int, ...] = (1, 2, 4, 8)  # client counts of the concurrency section (() skips it)
    concurrency_requests: int = 16  # requests per concurrency level (and one at a time)
    command: str = "edge-safe bench"

    def __post_init__(self):
        for name in ("repeats", "max_tokens", "bank_loads", "n_ctx", "n_batch"):
            if getattr(self, name) < 1:
                raise EdgeSafeError(f"bench: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise EdgeSafeError(f"bench: warmup must be >= 0, got {self.warmup}")


def quick_config(cfg: BenchConfig, **explicit) -> BenchConfig:
    """``--quick``: 3 rounds, 16 decode tokens, 3 bank loads, concurrency 1, 2, 4 clients over 8 requests;
    explicitly given values win."""
    return replace(cfg, **{"quick": True, "repeats": 3, "max_tokens": 16, "bank_loads": 3, "concurrency": (1, 2, 4),
                           "concurrency_requests": 8, **explicit})


# --- compositions ----------------------------------------------------------------------------


def parse_composition(es, label: str) -> Composition:
    """A label -> canonical composition: comma-separated constraints, profiles, at most one mode,
    ``all`` (every constraint) or ``none``. The runtime's default mode applies."""
    names = split_names(label)
    if not names:
        raise EdgeSafeError(f"bench: empty composition {label!r}; use 'none' for no tokens")
    modes = [n for n in names if es.bank.tokens.get(n) and es.bank.tokens[n].kind == Kind.MODE]
    if len(modes) > 1:
        raise EdgeSafeError(f"bench: composition {label!r} names {len(modes)} modes; a request has at most one")
    rest = [n for n in names if n not in modes and n != "none"]
    if "all" in rest and "all" not in es.bank.profiles:
        rest = [n for n in rest if n != "all"] + es.tokens
    constraints, mode = es.compose(rest, modes[0] if modes else None)
    return Composition(label, tuple(constraints), mode)


def default_compositions(bank: TokenBank, quick: bool) -> list[str]:
    """none, each constraint, disjoint neighbour pairs, each profile, minors,eu, all, each mode."""
    c, profiles = bank.constraints, list(bank.profiles)
    focus = [FOCUS] if {"minors", "eu"} <= set(profiles) else []
    if quick:
        modes = [m for m in bank.modes if m != Mode.POSITIVE] or bank.modes
        return ["none", *profiles[1:2], *(focus or ["all"]), *modes[:1]]
    pairs = [f"{a},{b}" for a, b in zip(c[0::2], c[1::2])][:4]
    return list(dict.fromkeys(["none", *c, *pairs, *profiles, *focus, "all", *bank.modes]))


def default_baselines(bank: TokenBank, labels: list[str], quick: bool) -> list[str]:
    """Where the text and guard baselines run: the profiles, minors,eu and all (those in the run)."""
    wanted = [FOCUS] if quick else [*bank.profiles, FOCUS, "all"]
    picked = [w for w in wanted if w in labels]
    return picked or [next((lb for lb in labels if lb != "none"), labels[0])]


# --- the run ---------------------------------------------------------------------------------


class Benchmark:
    """Loads edge-safe and the bare Llama once; :meth:`run` measures every variant, interleaved."""

    def __init__(self, cfg: BenchConfig):
        from edge_safe.runtime import EdgeSafe

        self.cfg = cfg
        self.model_path = resolve_model_path(cfg.model)
        self.bank_path = resolve_bank_path(cfg.bank)
        t0 = time.perf_counter()
        self.es = EdgeSafe(self.model_path, self.bank_path, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers,
                           n_threads=cfg.n_threads, n_batch=cfg.n_batch)
        self.load_s = {"edge_safe": time.perf_counter() - t0}
        labels = list(cfg.compositions) or default_compositions(self.es.bank, cfg.quick)
        self.comps = {lb: parse_composition(self.es, lb) for lb in dict.fromkeys(labels)}
        base = list(cfg.baselines) or default_baselines(self.es.bank, list(self.comps), cfg.quick)
        self.baselines = {lb: self.comps.get(lb) or parse_composition(self.es, lb) for lb in dict.fromkeys(base)}
        self.rules = {lb: self._rules(c) for lb, c in self.baselines.items()}
        try:
            t0 = time.perf_counter()
            self.llama = LlamaBench(self.model_path, cfg.n_ctx, cfg.n_batch, self.es.n_threads,
                                    cfg.n_gpu_layers, self.es.template)
            self.load_s["llama"] = time.perf_counter() - t0
        except BaseException:
            self.es.close()
            raise
        self.decode_messages = [{"role": "user", "content": DECODE_QUESTION}]
        decode_text = self.es.template.render(self.decode_messages)
        self.continuation, _ = self.llama.greedy(decode_text, cfg.max_tokens + 1)  # the fixed generation
        self.edge = EdgeBench(self.es, self.decode_messages, self.continuation)
        self.samples: dict[tuple[str, str], list[dict]] = {}
        self.notes: list[str] = []

    def close(self) -> None:
        self.edge.close()
        self.llama.close()
        self.es.close()

    def _rules(self, comp: Composition) -> str:
        """The composition as text: the mode's rule (if it has one), then each constraint's rule."""
        names = ([comp.mode] if comp.mode else []) + list(comp.constraints)
        lines = [self.es.bank.tokens[n].rule.strip() for n in names]
        missing = [n for n, line in zip(names, lines) if not line and n in comp.constraints]
        if missing:
            raise EdgeSafeError(f"bench: the bank has no rule text for {', '.join(missing)}, so the text "
                                f"baseline of {comp.label!r} cannot be built; pass other --baseline compositions")
        if not any(lines):
            raise EdgeSafeError(f"bench: {comp.label!r} has no rule text to write as a system line; "
                                "pass --baseline compositions with constraints")
        return "\n".join(line for line in lines if line)

    # -- tasks ----------------------------------------------------------------------------

    def tasks(self) -> list[tuple[str, str, Callable[[str], dict]]]:
        """(variant, composition label, fn(prompt) -> figures): one round's work."""
        e, ll = self.edge, self.llama
        out = [("bare", "", lambda q: ll.ttft(ll.prompt(q))),
               ("bare-decode", "", lambda q: ll.decode(ll.prompt(DECODE_QUESTION), self.cfg.max_tokens)),
               ("bank-load", "", lambda q: self._bank_loads())]
        for lb, c in self.comps.items():
            out += [("cold", lb, lambda q, c=c: e.ttft(c, q, cold=True)),
                    ("warm", lb, lambda q, c=c: e.ttft(c, q, cold=False)),
                    ("decode", lb, lambda q, c=c: e.decode(c))]
        for lb, c in self.baselines.items():
            r = self.rules[lb]
            out += [("text-cold", lb, lambda q, r=r: ll.ttft(ll.prompt(q, r))),
                    ("text-warm", lb, lambda q, r=r: ll.ttft(ll.prompt(q, r), warm_from=ll.prompt(PRIME_QUESTION, r))),
                    ("guard-cold", lb, lambda q, r=r: ll.guard(q, r, warm=False)),
                    ("guard-warm", lb, lambda q, r=r: ll.guard(q, r, warm=True)),
                    ("stay", lb, lambda q, c=c: e.stay(c, q))]
        return out

    def _bank_loads(self) -> dict:
        times = []
        for _ in range(self.cfg.bank_loads):
            t0 = time.perf_counter()
            TokenBank.load(self.bank_path)
            times.append(time.perf_counter() - t0)
        return {"load_s": times}

    def run(self, progress: bool = True) -> dict:
        from tqdm.auto import tqdm

        cfg, t_start = self.cfg, time.perf_counter()
        machine = machine_info()
        tasks = self.tasks()
        rounds = cfg.warmup + cfg.repeats
        rss_specs = self._rss_specs() if cfg.rss else {}
        bar = tqdm(total=rounds * len(tasks) + len(rss_specs), desc="bench", unit="run", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True, mininterval=0.5)
        try:
            for r in range(rounds):
                order = list(tasks)
                random.Random(cfg.seed * 100003 + r).shuffle(order)
                prompt = PROMPTS[r % len(PROMPTS)]
                for variant, label, fn in order:
                    bar.set_description(f"round {r + 1}/{rounds} {variant} {label}".rstrip(), refresh=False)
                    figures = fn(prompt)
                    if r >= cfg.warmup:
                        self.samples.setdefault((variant, label), []).append(figures)
                    bar.update()
            snapshots = {lb: len(self.es.prefix_cache.peek(c.key) or b"") for lb, c in self.comps.items()}
            cache_stats = self.es.prefix_cache.stats().as_dict()
            concurrency = self._concurrency(bar)
            rss = {}
            for name, spec in rss_specs.items():
                bar.set_description(f"peak RSS {name}", refresh=False)
                rss[name] = measure_peak_rss(spec)
                bar.update()
        finally:
            bar.close()
        machine["load_average_end"] = load_average()
        busy = (machine["load_average"] or [0.0])[0]  # before the run, so none of it is ours
        if busy >= 0.5:
            self.notes.append(f"the machine was busy before the run (1-min load average {busy:.2f} on "
                              f"{machine['usable_cpus']} CPUs): ratios within the run hold, absolute times are "
                              "slower and noisier than on a quiet machine")
        results = self._results(machine, snapshots, cache_stats, rss, time.perf_counter() - t_start)
        if concurrency is not None:
            results["concurrency"] = concurrency
        return results

    def _concurrency(self, bar) -> dict | None:
        """The concurrency section (:mod:`edge_safe.bench.concurrency`) on this run's runtime."""
        from edge_safe.bench.concurrency import MIX, ConcurrencyConfig, run_concurrency

        cfg = self.cfg
        if not cfg.concurrency:
            return None
        # the standard mix names the minors and eu profiles; another bank gets this run's constraint sets
        mix = MIX if {"minors", "eu"} <= set(self.es.bank.profiles) else tuple(
            dict.fromkeys(",".join(c.constraints) or "none" for c in self.comps.values()))
        ccfg = ConcurrencyConfig(levels=tuple(cfg.concurrency), requests=cfg.concurrency_requests,
                                 max_tokens=max(cfg.max_tokens, 16), rounds=1 if cfg.quick else 2, compositions=mix)
        from edge_safe.runtime import EdgeSafe

        with EdgeSafe(self.model_path, self.bank_path, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers,
                      n_threads=cfg.n_threads, n_batch=cfg.n_batch, n_parallel=max(ccfg.levels)) as es:
            return run_concurrency(es, ccfg, progress=lambda what: bar.set_description(f"concurrency: {what}"))

    def _rss_specs(self) -> dict[str, dict]:
        common = {"model": str(self.model_path), "bank": str(self.bank_path), "n_ctx": self.cfg.n_ctx,
                  "n_batch": self.cfg.n_batch, "n_threads": self.es.n_threads, "n_gpu_layers": self.cfg.n_gpu_layers,
                  "question": PROMPTS[0], "max_tokens": 4}
        ll = self.llama
        specs = {"bare": {**common, "system": "llama", "calls": [[ll.prompt(PROMPTS[0]), 4]]}}
        for lb, c in self.comps.items():
            specs[lb] = {**common, "system": "edge-safe", **c.request()}
        for lb in self.baselines:
            specs[f"text:{lb}"] = {**common, "system": "llama",
                                   "calls": [[ll.prompt(PROMPTS[0], self.rules[lb]), 4]]}
        return specs

    # -- results --------------------------------------------------------------------------

    def _results(self, machine: dict, snapshots: dict, cache_stats: dict, rss: dict, seconds: float) -> dict:
        es, cfg = self.es, self.cfg
        bare_ttft = self._summary("bare", "", "ttft_s")
        bare_tps = self._summary("bare-decode", "", "tokens_per_s")
        comps = {}
        for lb, c in self.comps.items():
            cold, warm = self.samples[("cold", lb)], self.samples[("warm", lb)]
            row = {
                "constraints": list(c.constraints), "mode": c.mode, "key": list(c.key),
                "prefix_positions": sum(es.bank.tokens[n].n_vectors for n in c.key if not es.bank.tokens[n].is_deep),
                **({"deep_cells": deep} if (deep := sum(es.bank.tokens[n].n_vectors for n in c.key
                                                         if es.bank.tokens[n].is_deep)) else {}),
                "ttft_cold_s": self._summary("cold", lb, "ttft_s", bare_ttft),
                "ttft_warm_s": self._summary("warm", lb, "ttft_s", bare_ttft),
                "restore_s": self._summary("warm", lb, "restore_s"),
                "decode_tokens_per_s": self._summary("decode", lb, "tokens_per_s", bare_tps),
                "cold_positions": _median_int(cold, "positions"), "warm_positions": _median_int(warm, "positions"),
                "time_split_cold_s": _split(cold), "time_split_warm_s": _split(warm),
                "snapshot_bytes": snapshots[lb], "peak_rss": rss.get(lb),
            }
            row["snapshot_bytes_per_position"] = round(snapshots[lb] / (1 + row["prefix_positions"] + row.get("deep_cells", 0)))
            comps[lb] = row
        if "none" in comps:  # the same decode harness without tokens: isolates what the prefix costs
            none_tps = comps["none"]["decode_tokens_per_s"]["median"]
            for row in comps.values():
                row["decode_tokens_per_s"]["ratio_none"] = row["decode_tokens_per_s"]["median"] / none_tps
        baselines = {}
        for lb in self.baselines:
            row = {"rules_chars": len(self.rules[lb]), "peak_rss_text": rss.get(f"text:{lb}")}
            for v in ("text-cold", "text-warm", "guard-cold", "guard-warm", "stay"):
                row[v] = {**self._summary(v, lb, "ttft_s", bare_ttft),
                          "positions": _median_int(self.samples[(v, lb)], "positions")}
            row["guard-cold"]["classify_tokens"] = _median_int(self.samples[("guard-cold", lb)], "classify_tokens")
            if lb in comps:
                cold, text = comps[lb]["ttft_cold_s"]["median"], row["text-cold"]["median"]
                row["edge_cold_vs_text_cold"] = cold / text
                row["switch_cost_s"] = comps[lb]["ttft_warm_s"]["median"] - row["stay"]["median"]
            baselines[lb] = row
        loads = [t for s in self.samples[("bank-load", "")] for t in s["load_s"]]
        results = {
            "format": FORMAT,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "command": cfg.command,
            "config": {**asdict(cfg), "compositions": list(self.comps), "baselines": list(self.baselines),
                       "n_threads": es.n_threads},
            "machine": machine,
            "model": {"path": str(self.model_path), "name": es.model_info.name, "file_bytes": _size(self.model_path),
                      "fingerprint": es.model_info.fingerprint},
            "bank": {"path": str(self.bank_path), "name": es.bank.name, "origin": es.bank.origin,
                     "sha256": file_sha256(self.bank_path), "file_bytes": _size(self.bank_path),
                     "vectors": {n: t.n_vectors for n, t in es.bank.tokens.items()}, "modes": es.bank.modes,
                     "deep": sorted(n for n, t in es.bank.tokens.items() if t.is_deep),
                     "profiles": es.bank.profiles, "template": es.template.name},
            "prompts": {"ttft": list(PROMPTS), "decode": DECODE_QUESTION, "decode_tokens": cfg.max_tokens,
                        "bare_positions": _median_int(self.samples[("bare", "")], "positions")},
            "load_s": {k: round(v, 4) for k, v in self.load_s.items()},
            "bare": {"ttft_s": bare_ttft, "decode_tokens_per_s": bare_tps, "peak_rss": rss.get("bare"),
                     "positions": _median_int(self.samples[("bare", "")], "positions")},
            "compositions": comps,
            "baselines": baselines,
            "bank_load_s": summary(loads),
            "prefix_cache": cache_stats,
            "notes": self.notes,
            "seconds": round(seconds, 1),
        }
        results["targets"] = evaluate_targets(results)
        return results

    def _summary(self, variant: str, label: str, key: str, base: dict | None = None) -> dict:
        s = summary([d[key] for d in self.samples[(variant, label)]])
        if base is not None:
            s["ratio"] = s["median"] / base["median"]
        return s


def summary(values: list[float]) -> dict:
    """Median, p25, p75, min, max, n and the raw values."""
    xs = np.asarray(values, dtype=np.float64)
    p25, med, p75 = (float(v) for v in np.percentile(xs, [25, 50, 75]))
    return {"median": med, "p25": p25, "p75": p75, "min": float(xs.min()), "max": float(xs.max()), "n": len(xs),
            "values": [float(v) for v in xs]}


def _median_int(samples: list[dict], key: str) -> int:
    return int(round(float(np.median([s[key] for s in samples]))))


def _split(samples: list[dict]) -> dict:
    """Median seconds of each step of a TTFT (restore, prefix / prompt prefill, snapshot, other)."""
    keys = [k for k in samples[0] if k.endswith("_s") and k != "ttft_s"]
    return {k: float(np.median([s[k] for s in samples])) for k in keys}


def _size(path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
