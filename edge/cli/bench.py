"""`edge-safe bench`: TTFT, decode speed and memory per composition, against bare llama-cpp-python,
the rules as text and a two-call guard, in one interleaved run; `bench concurrency`,
`bench long-context` and `bench repack`: the concurrency section alone, latency in ~3 000-token
conversations, and llama.cpp's repacked CPU weights on vs off.

The targets and the per-composition table go to stdout; the progress bar and the
list of written files to stderr. Domain errors become click errors in cli.py.
"""
from __future__ import annotations

import click

from edge_safe.bench.benchmark import BenchConfig as D  # one place for every default
from edge_safe.cli.common import RunOrGroup, command_line, own_options_only


@click.group("bench", cls=RunOrGroup)
@click.option("--quick", is_flag=True,
              help="A smoke run (< 1 min): 4 compositions, 3 rounds, 16 decode tokens; options given win.")
@click.option("-o", "--out", default="runs/bench", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False), help="Folder for results.json, RESULTS.md and plots/.")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Token bank [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="llama.cpp threads for every system [default: half the usable cores].")
@click.option("--repeats", default=None, type=click.IntRange(min=1),
              help=f"Measured rounds; each variant runs once per round [default: {D.repeats}; --quick: 3].")
@click.option("--warmup", default=None, type=click.IntRange(min=0),
              help=f"Rounds run first and discarded [default: {D.warmup}].")
@click.option("--max-tokens", default=None, type=click.IntRange(min=1),
              help=f"Length of the greedy generation decode tok/s is timed over "
                   f"[default: {D.max_tokens}; --quick: 16].")
@click.option("-c", "--composition", "compositions", multiple=True, metavar="NAMES",
              help="A composition to measure, e.g. minors,eu or none or all or a mode name (repeatable) "
                   "[default: none, each constraint, pairs, each profile, minors,eu, all, each mode].")
@click.option("--baseline", "baselines", multiple=True, metavar="NAMES",
              help="A composition that also gets the text-rules and guard baselines (repeatable) "
                   "[default: the profiles, minors,eu and all].")
@click.option("--n-ctx", default=D.n_ctx, show_default=True, type=click.IntRange(min=256), help="Context length.")
@click.option("--n-gpu-layers", default=0, show_default=True, type=int, help="Layers to offload to the GPU.")
@click.option("--seed", default=D.seed, show_default=True, type=int, help="Seed of the per-round order.")
@click.option("--rss/--no-rss", default=True, show_default=True,
              help="Measure peak RSS per variant in fresh child processes (a few seconds each).")
@click.option("--concurrency", default=None, metavar="N,N,...",
              help="Client counts of the concurrency section (batching engine vs one at a time; 'none' skips it) "
                   "[default: 1,2,4,8; --quick: 1,2,4].")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--from-results", default=None, metavar="results.json", type=click.Path(dir_okay=False),
              help="Do not run: rebuild RESULTS.md and the plots from this file.")
@click.pass_context
def bench(ctx, quick, out, model, bank, threads, repeats, warmup, max_tokens, compositions, baselines, n_ctx,
          n_gpu_layers, seed, rss, concurrency, no_plots, from_results):
    """Benchmark latency and memory per composition against baselines.

    Measures, per composition, time to first token cold (prefix built) and warm
    (prefix snapshot restored), the restore itself, decode tok/s, prefill
    positions, snapshot bytes and peak RSS; and, on the same prompts, bare
    llama-cpp-python, the rules as a text system line and a two-call guard.
    Ratios are to bare in the same run. Checked against targets: warm TTFT
    of minors,eu <= 1.05x bare, cold TTFT <= 0.35x the text rules, decode
    >= 0.97x bare, composition switch <= 1 ms, bank load <= 5 ms, prefix
    snapshot <= 2 MB. With a COMMAND instead: a side benchmark (the options
    below are for this one only).

    \b
    Examples:
      edge-safe bench --quick
      edge-safe bench --threads 2 --out bench/results
      edge-safe bench -c minors,eu -c none --repeats 20
      edge-safe bench --from-results bench/results/results.json --out bench/results
      edge-safe bench concurrency --quick --threads 1
      edge-safe bench long-context --threads 2 --out runs/bench-long-context
    """
    if not own_options_only(ctx):
        return
    from edge_safe.bench.report import load_results, markdown, write_outputs

    if from_results:
        results = load_results(from_results)
    else:
        results = _run(quick, model, bank, threads, repeats, warmup, max_tokens, compositions, baselines, n_ctx,
                       n_gpu_layers, seed, rss, concurrency, command_line(ctx))
    written = write_outputs(results, out, plots=not no_plots)
    lines = markdown(results, plots=False)
    end = next(i for i, line in enumerate(lines) if line.startswith("## Baselines"))
    click.echo("\n".join(lines[:end]).rstrip())
    for path in written:
        click.echo(f"wrote {path}", err=True)


def _run(quick, model, bank, threads, repeats, warmup, max_tokens, compositions, baselines, n_ctx, n_gpu_layers,
         seed, rss, concurrency=None, command="edge-safe bench") -> dict:
    from dataclasses import replace

    from edge_safe.bench.benchmark import Benchmark, quick_config

    given = {k: v for k, v in (("repeats", repeats), ("warmup", warmup), ("max_tokens", max_tokens),
                               ("concurrency", _levels(concurrency))) if v is not None}
    cfg = D(model=model, bank=bank, compositions=tuple(compositions), baselines=tuple(baselines), n_ctx=n_ctx,
            n_threads=threads, n_gpu_layers=n_gpu_layers, seed=seed, rss=rss, command=command)
    cfg = quick_config(cfg, **given) if quick else replace(cfg, **given)
    b = Benchmark(cfg)
    try:
        return b.run()
    finally:
        b.close()


def _levels(text: str | None, option: str = "--concurrency", none: bool = True) -> tuple[int, ...] | None:
    if text is None:
        return None
    if none and text.strip().lower() == "none":
        return ()
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1 or max(levels) > 64:
        also = " or 'none'" if none else ""
        raise click.BadParameter(f"expected client counts like 1,2,4,8 (each 1..64){also}, got {text!r}",
                                 param_hint=option)
    return levels


# --- side benchmarks ---------------------------------------------------------------------------


@bench.command(short_help="Concurrent clients on the batching engine.")
@click.option("--quick", is_flag=True, help="A smoke run: 8 requests of 16 tokens, levels 1,2,4, one round; "
                                            "options given win.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: the runtime's].")
@click.option("--requests", default=None, type=click.IntRange(min=1),
              help="Requests per level and round [default: 16; --quick: 8].")
@click.option("--max-tokens", default=None, type=click.IntRange(min=1),
              help="Completion budget of every request [default: 32; --quick: 16].")
@click.option("--rounds", default=None, type=click.IntRange(min=1), help="Interleaved rounds [default: 2; --quick: 1].")
@click.option("--levels", default=None, metavar="N,N,...", help="Client counts [default: 1,2,4,8; --quick: 1,2,4].")
@click.option("-o", "--out", default="runs/concurrency", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False), help="Folder for concurrency.json, CONCURRENCY.md and the plot.")
@click.pass_context
def concurrency(ctx, quick, threads, requests, max_tokens, rounds, levels, out):
    """Concurrent clients on the batching engine against the same requests one at a time.

    Per number of closed-loop clients: aggregate decode tokens/s and TTFT
    percentiles, with mixed compositions; the same section `edge-safe bench`
    ends with, on its own.

    \b
    Examples:
      edge-safe bench concurrency --quick --threads 1
      edge-safe bench concurrency --threads 2 --out runs/concurrency
    """
    from dataclasses import replace

    from edge_safe.bench.concurrency import QUICK, ConcurrencyConfig, standalone, write_report
    from edge_safe.eval.reporting import make_out_dir

    over = {"requests": requests, "max_tokens": max_tokens, "rounds": rounds,
            "levels": _levels(levels, "--levels", none=False)}
    cfg = replace(QUICK if quick else ConcurrencyConfig(), **{k: v for k, v in over.items() if v is not None})
    make_out_dir(out)  # before the run: a bad --out fails at once
    res = standalone(cfg, threads, progress=lambda what: click.echo(f"measuring {what}", err=True))
    res["command"] = command_line(ctx)
    text, written = write_report(res, out)
    click.echo(text, nl=False)
    for path in written:
        click.echo(f"wrote {path}", err=True)


@bench.command("long-context", short_help="TTFT and decode in ~3 000-token conversations vs bare llama.cpp.")
@click.option("--tokens", default=3000, show_default=True, type=click.IntRange(min=1),
              help="Tokens of harmless context before the request.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Measured rounds (each: both shapes, edge-safe and bare; ~30-60 s at 3 000 tokens on 2 cores).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Rounds run first and discarded.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Greedy tokens decode tok/s is timed over.")
@click.option("-c", "--composition", default="minors,eu", show_default=True, metavar="NAMES",
              help="The composition edge-safe runs with.")
@click.option("--shape", "shapes", multiple=True, type=click.Choice(["turns", "message"]),
              help="Context shape (repeatable) [default: turns and message].")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Token bank [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="llama.cpp threads for both systems [default: half the usable cores].")
@click.option("--n-ctx", default=8192, show_default=True, type=click.IntRange(min=256),
              help="Context length of both systems.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the per-round order.")
@click.option("-o", "--out", default="runs/bench-long-context", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False),
              help="Folder for results.json and LONG_CONTEXT.md (not the main bench's folder: same file name).")
@click.pass_context
def long_context(ctx, tokens, repeats, warmup, max_tokens, composition, shapes, model, bank, threads, n_ctx, seed,
                 out):
    """Latency of the control tokens in ~3 000-token conversations against bare llama.cpp.

    With ~TOKENS of earlier turns, and of one long pasted message: TTFT cold
    (fresh sequence) and warm (one more turn, earlier turns' KV reused),
    decode tok/s, as ratios to bare llama-cpp-python on the same model,
    n_ctx and threads in the same run; and the deep cells' KV write
    (median ms, share of TTFT). Targets: decode >= 0.95x bare, TTFT <=
    1.05x bare.

    \b
    Examples:
      edge-safe bench long-context --threads 2 --out runs/bench-long-context
      edge-safe bench long-context --tokens 300 --repeats 1 --warmup 0 --threads 1 --out /tmp/lc
    """
    from edge_safe.bench.long_context import LongBenchConfig, run, write_report
    from edge_safe.eval.reporting import make_out_dir

    cfg = LongBenchConfig(model=model, bank=bank, composition=composition, tokens=tokens,
                          shapes=tuple(dict.fromkeys(shapes)) or ("turns", "message"), repeats=repeats, warmup=warmup,
                          max_tokens=max_tokens, n_ctx=n_ctx, n_threads=threads, seed=seed, command=command_line(ctx))
    make_out_dir(out)  # before the run: a bad --out fails at once
    res = run(cfg, progress=lambda what: click.echo(f"measuring {what}", err=True))
    text, written = write_report(res, out)
    click.echo(text, nl=False)
    for path in written:
        click.echo(f"wrote {path}", err=True)


@bench.command(short_help="Repacked CPU weights on vs off: prefill, decode.")
@click.option("-m", "--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Base model GGUF [default: the bundled Gemma 3 270M].")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1), help="llama.cpp threads.")
@click.option("--rounds", default=7, show_default=True, type=click.IntRange(min=1), help="Interleaved rounds.")
@click.option("--prompt-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="Prompt length.")
@click.option("--decode-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Greedy tokens decoded per round.")
@click.option("--force-on", is_flag=True, help="Also run 'on' where llama.cpp is built with AMX (it may crash).")
@click.option("-o", "--out", default="runs/bench", show_default=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Folder for repack.json and REPACK.md.")
@click.pass_context
def repack(ctx, model, threads, rounds, prompt_tokens, decode_tokens, force_on, out):
    """Prefill and decode speed with llama.cpp's repacked CPU weights on and off, in one process.

    `auto` (what every model edge-safe loads uses) turns them off only where
    llama.cpp is built with AMX, whose repacked Q4_K matmul crashes; there the
    `on` arm is skipped unless --force-on is given.

    \b
    Examples:
      edge-safe bench repack --threads 2 --out bench/results
    """
    from edge_safe.bench.repack import markdown, run
    from edge_safe.eval.reporting import make_out_dir, write_json, write_text_atomic

    folder = make_out_dir(out)
    r = run(model, threads, rounds, prompt_tokens, decode_tokens, force_on)
    r["command"] = command_line(ctx)
    write_json(folder / "repack.json", r)
    md = markdown(r)
    write_text_atomic(folder / "REPACK.md", md)
    click.echo(md, nl=False)
