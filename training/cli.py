"""`edge-safe train`: train a token bank (needs the [train] extra: torch, transformers)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_safe.convert.errors import EdgeSafeError


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeSafeError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    return device


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Training config YAML (default: the shipped training/configs/default.yaml).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Bank file to write (.gguf).")
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
def train(config_path, output, model, out_dir, resume, steps, seed, device, dtype, force, no_progress):
    """Train control tokens (MOSAIC + mode co-training) and write a bank.

    \b
    Examples:
      edge-safe train -o bank.gguf
      edge-safe train --config training/configs/smoke.yaml -o smoke.gguf --force
      edge-safe train -o bank.gguf --resume --steps 800
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "training needs torch and transformers: pip install torch==2.13.0 && pip install 'edge-safe[train]'"
        ) from None
    from edge_safe.models import resolve_model_path
    from edge_safe.training.base_model import load_gguf_model
    from edge_safe.training.config import TrainConfig
    from edge_safe.training.trainer import export_bank, train as run_training

    output = Path(output)
    if output.exists() and not force:
        raise EdgeSafeError(f"{output} already exists; pass --force to overwrite it")
    cfg = TrainConfig.from_yaml(config_path or default_config_path())
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


def default_config_path() -> Path:
    return Path(__file__).resolve().parent / "configs" / "default.yaml"


if __name__ == "__main__":  # pragma: no cover
    train(sys.argv[1:])
