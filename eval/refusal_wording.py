"""How often a bank's refusals come out word for word, through the llama.cpp runtime, on the val split.

    edge-safe train refusal-wording BANK.gguf [N]

The training validation (`edge-safe train validate`) only checks the first reply token. This runs N greedy
replies to violating val prompts, each under a seeded composition of order 1..4 that contains the
prompt's category, and counts replies that open like a refusal, that are one of the bank's refusal
texts, and that are the refusal *of the prompt's own category*; plus N near-miss val prompts under
the same kind of compositions, counting refusal-like replies (over-refusal). Replies are judged as
`edge-safe eval` judges them (:class:`~edge_safe.eval.metrics.Judge`, ``refusal_like``). About a minute for N = 160 on
2 CPU cores. Needs no torch. It lives in eval, not training: it measures replies through the runtime
and judges them as the eval does.
"""
from __future__ import annotations

import random

from edge_safe.convert.errors import EdgeSafeError


def wording(bank_path: str, n: int = 160, seed: int = 7) -> dict:
    from edge_safe.eval.data import CLASSIC, default_data_path, load_prompts
    from edge_safe.eval.metrics import REFUSAL, Judge, refusal_like
    from edge_safe.runtime import EdgeSafe

    prompts = [p for p in load_prompts(default_data_path("val")) if p.slice == CLASSIC]
    rng = random.Random(seed)
    with EdgeSafe(bank=bank_path, n_ctx=512) as es:
        cons = es.bank.constraints
        judge = Judge(es.bank.refusals().values())
        viol = [p for p in prompts if p.label == "violating" and p.category in cons]
        near = [p for p in prompts if p.label == "benign" and p.category in cons]
        if not viol or not near:
            raise EdgeSafeError(f"the val split has no violating or near-miss prompts for {cons}")
        out = {"n": n, "opens_like_refusal": 0, "exact_refusal": 0, "own_category": 0, "near_miss_refused": 0}
        for i in range(n):
            order = min(1 + i % 4, len(cons))
            p = rng.choice(viol)
            reply = _text(es, p.text, tokens=[p.category] + rng.sample([c for c in cons if c != p.category], order - 1),
                                max_tokens=16)
            verdict = judge.verdict(reply)
            who = es.bank.refusal_of(reply) if verdict == REFUSAL else None
            out["opens_like_refusal"] += refusal_like({"verdict": verdict, "reply": reply})
            out["exact_refusal"] += verdict == REFUSAL
            out["own_category"] += who == p.category
            q = rng.choice(near)
            reply = _text(es, q.text, tokens=[q.category] + rng.sample([c for c in cons if c != q.category], order - 1),
                                max_tokens=4)
            out["near_miss_refused"] += refusal_like({"verdict": judge.verdict(reply), "reply": reply})
    return out



def _text(es, prompt: str, **request) -> str:
    return es.create_completion(prompt, **request)["choices"][0]["text"]
