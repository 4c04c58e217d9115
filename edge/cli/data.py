"""`edge-safe data`: the shipped training / validation / test prompts."""
from __future__ import annotations

from pathlib import Path

import click


@click.group()
def data() -> None:
    """The prompt data training and eval use (training/data/*.jsonl).

    \b
    Examples:
      edge-safe data generate --check
    """


@data.command(short_help="(Re)write train/val/test.jsonl, or --check them.")
@click.option("--check", is_flag=True, help="Only verify that the files match a fresh generation (exit 1 if not).")
@click.option("--stats", is_flag=True, help="Only print the counts table (training/data/README.md has it).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of train/val/test.jsonl [default: the package's training/data].")
def generate(check, stats, out):
    """(Re)write train/val/test.jsonl from the phrase tables: seeded, bit-identical every time.

    Prints the counts table. Exit 1 when a split misses its minimum counts, or
    with --check when a file differs from a fresh generation.

    \b
    Examples:
      edge-safe data generate
      edge-safe data generate --check
      edge-safe data generate --stats
    """
    from edge_safe.training.data import generate as gen

    out = out or gen.HERE
    rows = gen.generate()
    bad = gen.problems(rows)
    if stats:
        click.echo(gen.stats(rows))
    elif check:
        stale = gen.stale_files(rows, out)
        if stale:
            hint = "edge-safe data generate" + ("" if out == gen.HERE else f" --out {out}")
            raise click.ClickException(f"stale: {', '.join(map(str, stale))} (run: {hint})" + _problems(bad))
        if not bad:
            click.echo(f"ok: {', '.join(f'{s}.jsonl ({len(rows[s])})' for s in gen.SPLITS)} match seed {gen.SEED}")
    else:
        gen.write_splits(rows, out)
        click.echo(gen.stats(rows))
    if bad:
        raise click.ClickException(_problems(bad).lstrip("; "))


def _problems(bad: list[str]) -> str:
    return f"; {len(bad)} below the minimum counts: {', '.join(bad)}" if bad else ""
