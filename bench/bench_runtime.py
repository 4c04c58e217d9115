"""What do control tokens cost at inference? TTFT and decode speed, with vs without tokens.

One process, one model, variants interleaved in every repeat (so drift in machine
load hits all of them alike), a warm-up round first, medians over repeats:

- ttft/none        no tokens (the bare base model): BOS + prompt prefill
- ttft/cold        TOKENS with the prefix cache cleared: BOS + vectors + prompt prefill
- ttft/warm        TOKENS with the prefix snapshot cached: restore + prompt prefill
- decode/none      greedy decode speed (tok/s) over a fixed-length generation, no tokens
- decode/tokens    the same with TOKENS active

TTFT is the time from the call to the first generated token (EdgeSafe.last_stats.ttft_s).
Each TTFT run starts from a KV cache that does not hold the request (EdgeSafe.reset()),
so "warm" measures a composition switch, not a repeated identical request.

    python bench/bench_runtime.py --quick
    python bench/bench_runtime.py --repeats 20 --tokens minors,eu --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPT = "How do I mix a mojito?"
DECODE_PROMPT = "Write a long story about a dragon."  # long greedy answers with and without tokens


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="base model GGUF [default: bundled]")
    p.add_argument("--bank", default=None, help="token bank GGUF [default: bundled]")
    p.add_argument("--tokens", default="minors,eu", help="composition to measure [default: minors,eu]")
    p.add_argument("--repeats", type=int, default=10, help="measured rounds per variant [default: 10]")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per decode run [default: 64]")
    p.add_argument("--quick", action="store_true", help="3 repeats, 32 decode tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads [default: half the cores]")
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory for the JSON result")
    a = p.parse_args()
    if a.quick:
        a.repeats, a.decode_tokens = 3, 32
    return a


def ttft(es, tokens, cold: bool) -> float:
    es.reset()
    if cold:
        es.prefix_cache.clear()
    es.generate(PROMPT, tokens=tokens, max_tokens=1)
    return es.last_stats.ttft_s


def decode_speed(es, tokens, n: int) -> float:
    es.reset()
    es.generate(DECODE_PROMPT, tokens=tokens, max_tokens=n)
    st = es.last_stats
    if st.completion_tokens < n:
        print(f"warning: {tokens or 'no tokens'} stopped after {st.completion_tokens} of {n} tokens",
              file=sys.stderr)
    return (st.completion_tokens - 1) / st.decode_s  # decode steps between first and last token


def summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": min(xs), "max": max(xs),
            "n": len(xs), "values": xs}


def main() -> None:
    a = parse_args()
    import llama_cpp

    from edge_safe import EdgeSafe

    es = EdgeSafe(a.model, a.bank, n_ctx=a.n_ctx, n_gpu_layers=a.n_gpu_layers, n_threads=a.threads)
    constraints, mode = es.compose(a.tokens)
    variants = {
        "ttft/none": lambda: ttft(es, None, cold=False),
        "ttft/cold": lambda: ttft(es, a.tokens, cold=True),
        "ttft/warm": lambda: ttft(es, a.tokens, cold=False),
        "decode/none": lambda: decode_speed(es, None, a.decode_tokens),
        "decode/tokens": lambda: decode_speed(es, a.tokens, a.decode_tokens),
    }
    for f in variants.values():  # warm-up: page in the model, fill the prefix cache
        f()
    expected_source = {"ttft/none": "cache", "ttft/cold": "built", "ttft/warm": "cache"}
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for k, f in variants.items():
            results[k].append(f())
            if k in expected_source:  # measured what the name says
                assert es.last_stats.prefix_source == expected_source[k], (k, es.last_stats.prefix_source)
    stats = {k: summary(v) for k, v in results.items()}

    prefix_positions = es.last_stats.prefix_positions
    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(), "threads": es.n_threads,
        "llama_cpp_python": llama_cpp.__version__, "model": str(es.model_path), "bank": es.bank.name,
        "bank_origin": es.bank.origin, "tokens": a.tokens, "constraints": constraints, "mode": mode,
        "prefix_positions": prefix_positions,
        "snapshot_bytes": len(es.prefix_cache.peek(tuple(([mode] if mode else []) + constraints)) or b""),
        "n_ctx": a.n_ctx, "n_gpu_layers": a.n_gpu_layers, "repeats": a.repeats, "decode_tokens": a.decode_tokens,
        "prompt_tokens": len(es.tokenize(es.template.prompt(PROMPT))) + 1,
    }
    print_table(env, stats)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_runtime-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"env": env, "results": stats}, indent=2))
    print(f"\nsaved {path}")
    es.close()


def print_table(env: dict, stats: dict) -> None:
    print(f"edge-safe runtime bench: llama-cpp-python {env['llama_cpp_python']}, {env['cpus']} CPUs, "
          f"{env['threads']} threads, {env['platform']}")
    print(f"model {Path(env['model']).name}; bank '{env['bank']}' ({env['bank_origin']}); "
          f"tokens {env['tokens']} = {len(env['constraints'])} constraints + mode {env['mode']}, "
          f"{env['prefix_positions']} prefix positions; prompt {env['prompt_tokens']} tokens; "
          f"n={env['repeats']} per variant")
    print(f"\n{'variant':<15} {'median':>10} {'p25–p75':>19} {'vs none':>8}")
    for k, s in stats.items():
        unit, scale = ("ms", 1e3) if k.startswith("ttft") else ("tok/s", 1)
        base = stats["ttft/none" if k.startswith("ttft") else "decode/none"]["median"]
        spread = f"{s['p25'] * scale:.1f}–{s['p75'] * scale:.1f}"
        print(f"{k:<15} {s['median'] * scale:>7.1f} {unit:<5} {spread:>13} {s['median'] / base:>7.2f}x")


if __name__ == "__main__":
    main()
