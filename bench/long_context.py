"""Latency at length: the shipped bank's deep cells placed in ~3 000-token conversations, against bare
llama.cpp on the same model, context and threads, in one run.

    edge-safe bench long-context --threads 2 --out runs/bench-long-context
    results = run(LongBenchConfig(tokens=300, repeats=1))      # plain JSON; write_report(results, out)

Two shapes of context, both built as the long-context eval builds them (:mod:`edge_safe.eval.long_context`,
the harmless documents and turns written in this repo), with a harmless question as the request:

- ``turns``: ~``tokens`` tokens of earlier question/answer turns, the question as the last user message;
- ``message``: ~``tokens`` tokens of documents pasted into one message, the question as its last line.

Per round and shape, for edge-safe (the composition, default ``minors,eu``) and for bare
``llama_cpp.Llama`` (no rules), in a seeded shuffled order:

- **cold TTFT**: a fresh sequence (edge-safe: ``es.reset()``; bare: ``Llama.reset()``), the whole
  conversation prefilled, call -> first token (tokenization outside the timer on both sides);
- **decode tok/s**: a fixed greedy continuation (bare's own greedy tokens, taken once before the rounds)
  decoded one token at a time after the prompt held in KV (edge-safe: teacher-forced through the engine,
  :meth:`Probe.forced_logits <edge_safe.probe.Probe.forced_logits>`; bare: ``Llama.generate``);
- **warm TTFT**: the same conversation with one more exchange (a fixed assistant reply and a follow-up
  question): the earlier turns' KV is reused (edge-safe: the engine's common-prefix reuse, checked:
  ``prefix_source == "reused"``; bare: ``Llama.generate``'s own prefix match), only the new tail prefilled
  and, on edge-safe, the control tokens' deep cells written again before the new last user message;
- **next-turn TTFT**: the warm conversation plus the reply the user was shown and one more question, as a
  chat app sends it: edge-safe laid the turn out up to its control tokens while idle
  (:meth:`EdgeSafe.ready_next_turn <edge_safe.runtime.EdgeSafe.ready_next_turn>`, timed apart as
  ``ready_s``), bare holds the reply in its KV; both prefill the new question alone.

Placing the cells: the engine times each deep-cell write (``RequestStats.steps["kv_write"]``: the sequence
saved into the context's reused buffer, the cells' keys rotated and spliced in, loaded back: it grows with
the context); reported as
median ms and as a share of the request's TTFT. Ratios are edge-safe / bare: the ratio of the medians, and
p25-p75 of the per-round ratios (each round's edge-safe time over the same round's bare time).
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import numpy as np

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.decode import VIEW_WITHIN

FORMAT = "edge-safe-bench-long-context/v1"
SHAPES = ("turns", "message")
QUESTION = "Tell me about the history of the bicycle."  # harmless: answered, never refused
REPLY = ("The bicycle grew out of the wooden running machine of 1817; pedals on the front wheel came in the "
         "1860s, and the chain-driven safety bicycle with equal wheels in the 1880s.")
FOLLOW_UP = "Who made the first safety bicycle?"
REPLY_2 = "John Kemp Starley built the Rover safety bicycle in Coventry in 1885."
FOLLOW_UP_2 = "What did it weigh?"
TARGETS = {"decode": 0.95, "ttft": 1.05}  # the targets at length: decode >= 0.95x bare, TTFT <= 1.05x bare at 3 000 tokens


@dataclass(frozen=True)
class LongBenchConfig:
    model: str | None = None  # None: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M
    bank: str | None = None  # None: $EDGE_SAFE_BANK, else the shipped bank
    composition: str = "minors,eu"
    tokens: int = 3000  # context before the request (about; the builder stops at the first piece past it)
    shapes: tuple[str, ...] = SHAPES
    repeats: int = 5  # measured rounds (2 cores: ~30-60 s a round at 3 000 tokens)
    warmup: int = 1  # rounds run first and discarded
    max_tokens: int = 32  # decode tokens timed per round
    n_ctx: int = 8192  # the same for edge-safe and bare (the runtime's default)
    n_batch: int = 512
    n_threads: int | None = None  # None: the runtime's default (half the usable cores)
    seed: int = 0  # the per-round order of (system, shape)
    command: str = "edge-safe bench long-context"

    def __post_init__(self):
        for name in ("repeats", "max_tokens", "tokens", "n_ctx", "n_batch"):
            if getattr(self, name) < 1:
                raise EdgeSafeError(f"bench long-context: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise EdgeSafeError(f"bench long-context: warmup must be >= 0, got {self.warmup}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            raise EdgeSafeError(f"bench long-context: shapes must be among {', '.join(SHAPES)}, got {list(self.shapes)}")


def conversations(es, shape: str, tokens: int) -> tuple[list[dict], list[dict]]:
    """(cold, warm) messages of a shape: the long context and the question; the same plus one more exchange."""
    from edge_safe.eval.long_context import conversation, filler

    cold = conversation(es, shape, tokens, QUESTION, filler())
    return cold, cold + [{"role": "assistant", "content": REPLY}, {"role": "user", "content": FOLLOW_UP}]


def next_turn(warm: list[dict]) -> list[dict]:
    """The warm conversation's next turn: the reply the user was shown, and one more question."""
    return warm + [{"role": "assistant", "content": REPLY_2}, {"role": "user", "content": FOLLOW_UP_2}]


class _Edge:
    """The runtime with one composition: cold TTFT, forced decode and warm TTFT on one sequence."""

    def __init__(self, es, comp):
        from edge_safe.probe import Probe

        self.es, self.comp, self.probe = es, comp, Probe(es)

    def round(self, cold: list[dict], warm: list[dict], continuation: list[int]) -> dict:
        es = self.es
        es.reset()
        c = self._first(cold)
        job = self.probe.forced_logits(cold, continuation, wait=False, **self.comp.request())
        job.result()
        t_end = time.perf_counter()
        st = job.stats
        if st.t_prefilled <= 0:
            raise EdgeSafeError("bench long-context: the forced decode reported no prompt prefill")
        n = len(continuation) - 1
        w = self._first(warm)
        if w["prefix_source"] != "reused":
            raise EdgeSafeError(f"bench long-context: the warm request took prefix path {w['prefix_source']!r}, "
                                "expected 'reused'; it would not measure common-prefix reuse")
        nxt = next_turn(warm)
        t0 = time.perf_counter()  # the chat app showed the reply: the next turn is laid out while the user types
        if not es.ready_next_turn(nxt[:-1], **self.comp.request()) or not es.engine.settle(600):
            raise EdgeSafeError("bench long-context: the next turn could not be laid out in advance")
        ready_s = time.perf_counter() - t0
        x = self._first(nxt)
        return {"ttft_cold_s": c["ttft_s"], "ttft_warm_s": w["ttft_s"], "ttft_next_s": x["ttft_s"], "ready_s": ready_s,
                "kv_write_next_s": x["kv_write_s"], "prefilled_next": x["prefilled"],
                "decode_tokens_per_s": n / (t_end - st.t_prefilled),
                "decode_tokens": n, "decode_prefilled": st.prefilled_tokens,
                "kv_write_cold_s": c["kv_write_s"], "kv_write_warm_s": w["kv_write_s"],
                "view_cold_s": c["view_s"], "view_warm_s": w["view_s"], "view_next_s": x["view_s"],
                "reread_cold": c["reread"], "reread_warm": w["reread"], "reread_next": x["reread"],
                "prefilled_cold": c["prefilled"], "prefilled_warm": w["prefilled"], "prompt_tokens": c["prompt_tokens"],
                "prompt_tokens_warm": w["prompt_tokens"], "deep_cells": c["deep_cells"],
                "prefix_source_cold": c["prefix_source"], "steps_cold_s": c["steps"], "steps_warm_s": w["steps"]}

    def _first(self, messages: list[dict]) -> dict:
        job = self.es.submit(messages, max_tokens=1, **self.comp.request())
        for _ in job:
            pass
        st = job.stats
        return {"ttft_s": st.ttft_s, "kv_write_s": st.steps.get("kv_write", 0.0), "view_s": st.steps.get("view", 0.0),
                "reread": st.reread,
                "prefilled": st.prefilled_tokens,
                "prompt_tokens": st.prompt_tokens, "deep_cells": st.deep_cells, "prefix_source": st.prefix_source,
                "steps": dict(st.steps)}


class _Bare:
    """Bare ``llama_cpp.Llama``: the same three measurements through ``Llama.generate``."""

    def __init__(self, llama, template, tail: int = 0):
        self.llama, self.template = llama, template  # a bench.systems.LlamaBench
        self.tail = tail  # tokens of the next turn's new message (as edge-safe lays it out)

    def ids(self, messages: list[dict]) -> list[int]:
        return self.llama.tokenize(self.template.render(messages))

    def greedy(self, messages: list[dict], n: int) -> list[int]:
        ids, _ = self.llama.greedy(self.template.render(messages), n)
        return ids

    def round(self, cold: list[dict], warm: list[dict], continuation: list[int]) -> dict:
        llm = self.llama.llm
        cold_ids, warm_ids = self.ids(cold), self.ids(warm)
        n = len(continuation) - 1
        llm.reset()
        t0 = time.perf_counter()
        gen = llm.generate(cold_ids, temp=0.0, reset=True)
        got = [next(gen)]
        t1 = time.perf_counter()
        while len(got) < n + 1:
            got.append(next(gen))
        t2 = time.perf_counter()
        gen.close()
        held = [int(t) for t in llm.input_ids[:llm.n_tokens]]
        reused = min(_common_prefix(held, warm_ids), len(warm_ids) - 1)
        t3 = time.perf_counter()
        gen = llm.generate(warm_ids, temp=0.0, reset=True)  # its prefix match keeps the shared tokens' KV
        next(gen)
        t4 = time.perf_counter()
        gen.close()
        # the next turn: the reply the user was shown in KV first (as a chat app holding its own reply has it),
        # then the new question alone
        nxt_ids = self.ids(next_turn(warm))
        head = nxt_ids[: len(nxt_ids) - self.tail]
        gen = llm.generate(head, temp=0.0, reset=True)
        next(gen)
        gen.close()
        held = [int(t) for t in llm.input_ids[:llm.n_tokens]]
        kept = min(_common_prefix(held, nxt_ids), len(nxt_ids) - 1)
        t5 = time.perf_counter()
        gen = llm.generate(nxt_ids, temp=0.0, reset=True)
        next(gen)
        t6 = time.perf_counter()
        gen.close()
        return {"ttft_cold_s": t1 - t0, "ttft_warm_s": t4 - t3, "ttft_next_s": t6 - t5, "prefilled_next": len(nxt_ids) - kept,
                "decode_tokens_per_s": n / (t2 - t1),
                "decode_tokens": n, "prefilled_cold": len(cold_ids), "prefilled_warm": len(warm_ids) - reused,
                "prompt_tokens": len(cold_ids), "prompt_tokens_warm": len(warm_ids),
                "same_greedy": [int(t) for t in got] == [int(t) for t in continuation]}


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(cfg: LongBenchConfig, progress=None) -> dict:
    """Load edge-safe and bare llama.cpp once, measure every (shape, system) per round; plain JSON."""
    from edge_safe.bench.benchmark import parse_composition
    from edge_safe.bench.env import load_average, machine_info
    from edge_safe.bench.systems import LlamaBench
    from edge_safe.models import resolve_bank_path, resolve_model_path
    from edge_safe.runtime import EdgeSafe

    tick = progress or (lambda what: None)
    model_path, bank_path = resolve_model_path(cfg.model), resolve_bank_path(cfg.bank)
    machine = machine_info()
    t_start = time.perf_counter()
    with EdgeSafe(model_path, bank_path, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_batch=cfg.n_batch) as es:
        comp = parse_composition(es, cfg.composition)
        llama = LlamaBench(model_path, cfg.n_ctx, cfg.n_batch, es.n_threads, 0, es.template)
        try:
            tail = len(es.tokenize(es.template.render([{"role": "user", "content": FOLLOW_UP_2}])))
            edge, bare = _Edge(es, comp), _Bare(llama, es.template, tail)
            convs = {s: conversations(es, s, cfg.tokens) for s in cfg.shapes}
            for s, (cold, warm) in convs.items():
                need = len(bare.ids(warm)) + cfg.max_tokens + 64
                if need >= es.n_ctx:
                    raise EdgeSafeError(f"bench long-context: the {s} conversation needs ~{need} positions, "
                                        f"the context holds {es.n_ctx}; pass a larger --n-ctx")
            tick("bare greedy continuations")
            conts = {s: bare.greedy(cold, cfg.max_tokens + 1) for s, (cold, _) in convs.items()}
            systems = {"edge": edge, "bare": bare}
            rng = random.Random(cfg.seed)
            samples: dict[tuple[str, str], list[dict]] = {}
            for r in range(cfg.warmup + cfg.repeats):
                order = [(s, sy) for s in cfg.shapes for sy in systems]
                rng.shuffle(order)
                what = f"warm-up {r + 1}/{cfg.warmup}" if r < cfg.warmup else f"round {r - cfg.warmup + 1}/{cfg.repeats}"
                for s, sy in order:
                    tick(f"{what}: {sy} {s}")
                    got = systems[sy].round(*convs[s], conts[s])
                    if r >= cfg.warmup:
                        samples.setdefault((s, sy), []).append(got)
            shapes = {s: _shape(es, convs[s], samples[(s, "edge")], samples[(s, "bare")]) for s in cfg.shapes}
            info = {"n_threads": es.n_threads, "n_ctx": es.n_ctx, "deep": sorted(n for n in comp.key
                                                                               if es.bank.tokens[n].is_deep),
                    "key": list(comp.key), "template": es.template.name,
                    "model": {"path": str(model_path), "name": es.model_info.name, "fingerprint": es.model_info.fingerprint},
                    "bank": {"path": str(bank_path), "name": es.bank.name, "origin": es.bank.origin}}
        finally:
            llama.close()
    from edge_safe.eval.reporting import file_sha256

    info["bank"]["sha256"] = file_sha256(bank_path)
    machine["load_average_after"] = load_average()
    res = {"format": FORMAT, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": cfg.command,
           "config": {**asdict(cfg), "shapes": list(cfg.shapes), "n_threads": info["n_threads"]},
           "machine": machine, "model": info["model"], "bank": info["bank"],
           "composition": {"label": cfg.composition, "key": info["key"], "deep": info["deep"]},
           "prompts": {"question": QUESTION, "reply": REPLY, "follow_up": FOLLOW_UP},
           "shapes": shapes, "seconds": round(time.perf_counter() - t_start, 1)}
    res["targets"] = targets(res)
    return res


def _shape(es, convs, edge: list[dict], bare: list[dict]) -> dict:
    from edge_safe.bench.benchmark import summary

    cold, warm = convs
    e = {k: summary([d[k] for d in edge]) for k in ("ttft_cold_s", "ttft_warm_s", "ttft_next_s", "decode_tokens_per_s",
                                                     "kv_write_cold_s", "kv_write_warm_s", "kv_write_next_s", "ready_s")}
    b = {k: summary([d[k] for d in bare]) for k in ("ttft_cold_s", "ttft_warm_s", "ttft_next_s", "decode_tokens_per_s")}
    for when in ("cold", "warm", "next"):
        e[f"kv_write_share_{when}"] = summary([d[f"kv_write_{when}_s"] / d[f"ttft_{when}_s"] for d in edge])
        e[f"view_{when}_s"] = summary([d[f"view_{when}_s"] for d in edge])
        e[f"view_share_{when}"] = summary([d[f"view_{when}_s"] / d[f"ttft_{when}_s"] for d in edge])
        seen = sorted({str(d.get(f"reread_{when}")) for d in edge})  # what the view did: answer/refuse, skipped, None
        e[f"reread_{when}"] = seen[0] if len(seen) == 1 else "/".join(seen)
    for k in ("prefilled_cold", "prefilled_warm", "prefilled_next", "prompt_tokens", "prompt_tokens_warm", "deep_cells",
              "decode_tokens", "decode_prefilled"):
        e[k] = int(np.median([d[k] for d in edge]))
    for k in ("prefilled_cold", "prefilled_warm", "prefilled_next", "prompt_tokens", "prompt_tokens_warm", "decode_tokens"):
        b[k] = int(np.median([d[k] for d in bare]))
    e["prefix_source_cold"] = sorted({d["prefix_source_cold"] for d in edge})
    b["same_greedy"] = all(d["same_greedy"] for d in bare)
    ratios = {k: ratio(e[k], b[k]) for k in ("ttft_cold_s", "ttft_warm_s", "ttft_next_s", "decode_tokens_per_s")}
    alone = len(es.tokenize(es.template.render([{"role": "user", "content": QUESTION}])))
    return {"context_tokens": len(es.tokenize(es.template.render(cold))) - alone,  # before the question
            "messages": len(cold), "edge": e, "bare": b, "ratios": ratios}


def ratio(edge: dict, bare: dict) -> dict:
    """edge / bare from two summaries of paired rounds: the ratio of the medians, and the per-round ratios'
    median and p25-p75."""
    per = [x / y for x, y in zip(edge["values"], bare["values"])]
    p25, med, p75 = (float(v) for v in np.percentile(per, [25, 50, 75]))
    return {"ratio": edge["median"] / bare["median"], "per_round": {"median": med, "p25": p25, "p75": p75,
                                                                      "values": per}}


def targets(res: dict) -> list[dict]:
    """The latency targets at length (decode >= 0.95x bare, TTFT <= 1.05x bare), per shape."""
    out = []
    for s, row in res["shapes"].items():
        r = row["ratios"]
        for key, what in (("decode_tokens_per_s", "decode tok/s"), ("ttft_cold_s", "TTFT cold"),
                          ("ttft_warm_s", "TTFT warm, nothing laid out"),
                          ("ttft_next_s", "TTFT next turn, laid out while idle")):
            if key not in r:
                continue
            v = r[key]["ratio"]
            if key == "decode_tokens_per_s":
                goal, ok = f"≥ {TARGETS['decode']:.2f}×", v >= TARGETS["decode"]
            else:
                goal, ok = f"≤ {TARGETS['ttft']:.2f}×", v <= TARGETS["ttft"]
            out.append({"shape": s, "target": f"{what} vs bare", "goal": goal, "value": v, "pass": bool(ok)})
    return out


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"# Latency at length: `{res['composition']['label']}` vs bare llama.cpp", "",
             f"Made with `{res['command']}` on {res['date']}: {res['machine'].get('cpu') or '?'}, "
             f"{cfg['n_threads']} threads, n_ctx {cfg['n_ctx']}, load average {_load(res['machine'].get('load_average'))}"
             f" before / {_load(res['machine'].get('load_average_after'))} after; {cfg['repeats']} rounds "
             f"(+{cfg['warmup']} warm-up), {cfg['max_tokens']} decode tokens, {res['seconds']:.0f} s. "
             f"Bank `{res['bank']['name']}` (deep: {', '.join(res['composition']['deep']) or 'none'}).", "",
             "Medians; in brackets p25–p75. Ratios are edge-safe / bare: of the medians, and [p25–p75 of the "
             "per-round ratios].", "",
             "## Targets", "", "| shape | target | goal | this run | result |", "|---|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['shape']} | {t['target']} | {t['goal']} | {t['value']:.2f}× | "
                     f"{'**pass**' if t['pass'] else '**miss**'} |")
    lines += ["", "## Per shape", "",
              "| shape | context tokens | measure | edge-safe | bare | edge / bare |", "|---|---|---|---|---|---|"]
    for s, row in res["shapes"].items():
        e, b, r = row["edge"], row["bare"], row["ratios"]
        for key, what, fmt in (("ttft_cold_s", "TTFT cold (ms)", _ms), ("ttft_warm_s", "TTFT warm (ms)", _ms),
                               ("ttft_next_s", "TTFT next turn (ms)", _ms),
                               ("decode_tokens_per_s", "decode tok/s", _tps)):
            q = r[key]["per_round"]
            lines.append(f"| {s} | {row['context_tokens']} | {what} | {fmt(e[key])} | {fmt(b[key])} | "
                         f"{r[key]['ratio']:.2f}× [{q['p25']:.2f}–{q['p75']:.2f}] |")
    lines += ["", "## Placing the cells", "",
              "The engine's `kv_write` step: the sequence's KV saved, the cells' keys rotated to their "
              "position, written in and loaded back (it grows with the context held).", "",
              "| shape | request | positions prefilled (edge / bare) | kv_write ms | share of TTFT |",
              "|---|---|---|---|---|"]
    for s, row in res["shapes"].items():
        e, b = row["edge"], row["bare"]
        for when in ("cold", "warm", "next"):
            share = e[f"kv_write_share_{when}"]
            lines.append(f"| {s} | {when} | {e[f'prefilled_{when}']} / {b[f'prefilled_{when}']} | "
                         f"{_ms(e[f'kv_write_{when}_s'], 2)} | {100 * share['median']:.1f} % "
                         f"[{100 * share['p25']:.1f}–{100 * share['p75']:.1f}] |")
    if any("view_next_s" in row["edge"] for row in res["shapes"].values()):
        lines += ["", "## Reading the last message alone", "",
                  "After earlier turns the runtime also reads the last user message alone under the same constraints "
                  "(`EdgeSafe(reread=True)`, the default; `--no-reread` switches it off): the engine's `view` step, "
                  "that text prefilled once more in a short context of its own, where the conversation's own "
                  "first reply token opens no refusal; a pasted message's last line (the question) is read alone the "
                  "same way. With a decision readout the view is skipped where the conversation's own score is "
                  f"more than {VIEW_WITHIN:g} log-odds below refusing (column *view*: `skipped`; `answer`: read, and "
                  "it answered).",
                  "", "| shape | request | view | view ms | share of TTFT |", "|---|---|---|---|---|"]
        for s, row in res["shapes"].items():
            e = row["edge"]
            for when in ("cold", "warm", "next"):
                share = e[f"view_share_{when}"]
                lines.append(f"| {s} | {when} | {e.get(f'reread_{when}', '–')} | {_ms(e[f'view_{when}_s'], 1)} | "
                             f"{100 * share['median']:.1f} % "
                             f"[{100 * share['p25']:.1f}–{100 * share['p75']:.1f}] |")
    notes = [f"{s}: bare's greedy tokens differed between rounds" for s, row in res["shapes"].items()
             if not row["bare"]["same_greedy"]]
    lines += ["", "## Method", "",
              "Context built as `edge-safe eval long-context` builds it (turns: earlier question/answer turns; "
              "message: documents pasted into the request's message), the request a harmless question. Cold: a "
              "fresh sequence, call -> first token (tokenization outside the timer on both sides). Decode: a fixed "
              "greedy continuation (bare's), one token at a time after the prompt. Warm: the conversation plus one "
              "exchange, the earlier turns' KV reused (edge-safe's common-prefix reuse; `Llama.generate`'s "
              "prefix match). Next turn: the warm conversation plus the reply the user was shown and one more "
              "question; edge-safe laid the turn out up to its control tokens while idle (`ready_next_turn`, what "
              "`serve` and `chat` do after each reply: median "
              + " / ".join(f"{s} {_ms(row['edge']['ready_s'])} ms" for s, row in res["shapes"].items())
              + " before the question came), bare held the reply in its KV; both then prefill the question "
              "alone. Systems and shapes run in a seeded shuffled order each round.",
              *(["", "Notes: " + "; ".join(notes)] if notes else [])]
    return "\n".join(lines) + "\n"


def _ms(s: dict, digits: int = 0) -> str:
    return f"{s['median'] * 1e3:.{digits}f} [{s['p25'] * 1e3:.{digits}f}–{s['p75'] * 1e3:.{digits}f}]"


def _tps(s: dict) -> str:
    return f"{s['median']:.1f} [{s['p25']:.1f}–{s['p75']:.1f}]"


def _load(avg) -> str:
    return "/".join(f"{x:.2f}" for x in avg) if avg else "?"


def write_report(res: dict, out) -> tuple[str, list]:
    """results.json and LONG_CONTEXT.md in ``out``; returns (the markdown, paths written)."""
    from edge_safe.eval.reporting import make_out_dir, write_json, write_text_atomic

    out = make_out_dir(out)
    text = markdown(res)
    return text, [write_json(out / "results.json", res), write_text_atomic(out / "LONG_CONTEXT.md", text)]
