"""What do llama.cpp's repacked CPU weights buy on this CPU? Prefill and decode speed with them
(``use_extra_bufts`` on) and without (off), in one process, interleaved rounds, medians.

    edge-safe bench repack --threads 2 --out bench/results

``auto`` (the default of every model edge-safe loads) turns them off only where llama.cpp is
built with AMX, whose repacked Q4_K matmul crashes (llama.cpp issue 20824); there the "on"
arm is skipped unless ``--force-on`` is given (it would kill this process). Writes
``repack.json`` and ``REPACK.md`` in ``--out``.
"""
from __future__ import annotations

import statistics
import time

from edge_safe.llama import Context, amx_in_build, resolve_cpu_repack
from edge_safe.models import resolve_model_path

TEXT = ("Question: Summarise the following notes for a colleague in three sentences. The committee met on "
        "Tuesday to review the budget for the community garden, the new tool shed and the summer reading "
        "programme at the library. Volunteers asked for longer opening hours on weekends, and the treasurer "
        "reported that the spring fair raised more than expected. ")


def measure(m: Context, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy request from an empty cache."""
    m.clear()
    t0 = time.perf_counter()
    m.decode_tokens(prompt, 0)
    t1 = time.perf_counter()
    pos = len(prompt)
    for _ in range(n_decode):
        m.decode_tokens([int(m.logits().argmax())], pos)
        pos += 1
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def run(model: str | None, threads: int, rounds: int, n_prompt: int, n_decode: int, force_on: bool) -> dict:
    path = resolve_model_path(model)
    arms = {"off": False} if amx_in_build() and not force_on else {"on": True, "off": False}
    models = {name: Context.load(path, n_ctx=n_prompt + n_decode + 16, n_threads=threads, cpu_repack=use)
              for name, use in arms.items()}
    try:
        any_model = next(iter(models.values()))
        words = any_model.tokenize(TEXT * (1 + n_prompt // 60))
        prompt = [any_model.bos, *words[: n_prompt - 1]]
        for m in models.values():  # warm-up
            measure(m, prompt[:32], 4)
        got: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
        for r in range(rounds):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):  # alternate who goes first
                p, d = measure(models[name], prompt, n_decode)
                got[name]["prefill"].append(p)
                got[name]["decode"].append(d)
    finally:
        for m in models.values():
            m.close()
    arms_out = {n: {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
                    for k, v in g.items()} for n, g in got.items()}
    out = {"model": str(path), "threads": threads, "prompt_tokens": n_prompt, "decode_tokens": n_decode,
           "amx_build": amx_in_build(), "auto_choice": "on" if resolve_cpu_repack("auto") else "off",
           "arms": arms_out}
    if "on" in arms_out:
        out["off_vs_on"] = {k: arms_out["off"][k]["median"] / arms_out["on"][k]["median"] for k in ("prefill", "decode")}
    return out


def markdown(r: dict) -> str:
    from edge_safe.bench.env import machine_info

    cpu = machine_info()["cpu"]
    lines = [f"# Repacked CPU weights: on vs off ({cpu}, {r['threads']} threads)", "",
             f"Made with `{r['command']}`. Prompt {r['prompt_tokens']} tokens, {r['decode_tokens']} decoded; "
             f"tokens/s, median of {next(iter(r['arms'].values()))['prefill']['n']} interleaved rounds (min–max).",
             f"llama.cpp built with AMX: {r['amx_build']}; edge-safe's `auto` chooses **{r['auto_choice']}** here.", "",
             "| use_extra_bufts | prefill tok/s | decode tok/s |", "|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {name} | {a['prefill']['median']:.0f} ({a['prefill']['min']:.0f}–{a['prefill']['max']:.0f}) "
                     f"| {a['decode']['median']:.1f} ({a['decode']['min']:.1f}–{a['decode']['max']:.1f}) |")
    if "off_vs_on" in r:
        lines += ["", f"Off / on: prefill {r['off_vs_on']['prefill']:.2f}×, decode {r['off_vs_on']['decode']:.2f}×."]
    else:
        lines += ["", "The `on` arm was not run: this build has AMX, where it crashes (pass --force-on to try)."]
    return "\n".join(lines) + "\n"

