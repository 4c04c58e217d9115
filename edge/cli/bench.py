"""`edge-safe bench`: TTFT, decode speed and memory per composition, against bare llama-cpp-python,
the rules as text and a two-call guard, in one interleaved run.

The targets and the per-composition table go to stdout; the progress bar and the
list of written files to stderr. Domain errors become click errors in cli.py.
"""
from __future__ import annotations

import shlex

import click

from edge_safe.bench.benchmark import BenchConfig as D  # one place for every default


@click.command("bench")
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
def bench(quick, out, model, bank, threads, repeats, warmup, max_tokens, compositions, baselines, n_ctx,
          n_gpu_layers, seed, rss, concurrency, no_plots, from_results):
    """Benchmark latency and memory per composition against baselines.

    Measures, per composition, time to first token cold (prefix built) and warm
    (prefix snapshot restored), the restore itself, decode tok/s, prefill
    positions, snapshot bytes and peak RSS; and, on the same prompts, bare
    llama-cpp-python, the rules as a text system line and a two-call guard.
    Ratios are to bare in the same run. Checked against targets: warm TTFT
    of minors,eu <= 1.05x bare, cold TTFT <= 0.35x the text rules, decode
    >= 0.97x bare, composition switch <= 1 ms, bank load <= 5 ms, prefix
    snapshot <= 2 MB.

    \b
    Examples:
      edge-safe bench --quick
      edge-safe bench --threads 2 --out bench/results
      edge-safe bench -c minors,eu -c none --repeats 20
      edge-safe bench --from-results bench/results/results.json --out bench/results
    """
    from edge_safe.bench.report import load_results, markdown, write_outputs

    if from_results:
        results = load_results(from_results)
    else:
        results = _run(quick, model, bank, threads, repeats, warmup, max_tokens, compositions, baselines, n_ctx,
                       n_gpu_layers, seed, rss, concurrency)
    written = write_outputs(results, out, plots=not no_plots)
    lines = markdown(results, plots=False)
    end = next(i for i, line in enumerate(lines) if line.startswith("## Baselines"))
    click.echo("\n".join(lines[:end]).rstrip())
    for path in written:
        click.echo(f"wrote {path}", err=True)


def _run(quick, model, bank, threads, repeats, warmup, max_tokens, compositions, baselines, n_ctx, n_gpu_layers,
         seed, rss, concurrency=None) -> dict:
    from dataclasses import replace

    from edge_safe.bench.benchmark import Benchmark, quick_config

    given = {k: v for k, v in (("repeats", repeats), ("warmup", warmup), ("max_tokens", max_tokens),
                               ("concurrency", _levels(concurrency))) if v is not None}
    cfg = D(model=model, bank=bank, compositions=tuple(compositions), baselines=tuple(baselines), n_ctx=n_ctx,
            n_threads=threads, n_gpu_layers=n_gpu_layers, seed=seed, rss=rss, command=_command())
    cfg = quick_config(cfg, **given) if quick else replace(cfg, **given)
    b = Benchmark(cfg)
    try:
        return b.run()
    finally:
        b.close()


def _levels(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1 or max(levels) > 64:
        raise click.BadParameter(f"expected client counts like 1,2,4,8 (each 1..64) or 'none', got {text!r}",
                                 param_hint="--concurrency")
    return levels


def _command() -> str:
    """The command line as typed (options given on the command line, in a canonical spelling)."""
    ctx = click.get_current_context()
    parts = ["edge-safe", "bench"]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value, flag = ctx.params[param.name], max(param.opts, key=len)
        if param.is_flag and param.secondary_opts:  # --rss/--no-rss
            parts.append(flag if value else max(param.secondary_opts, key=len))
        elif param.is_flag:
            parts.append(flag)
        else:
            parts += [x for v in (value if param.multiple else [value]) for x in (flag, shlex.quote(str(v)))]
    return " ".join(parts)
