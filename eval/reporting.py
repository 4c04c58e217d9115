"""The report files `edge-safe eval` and `edge-safe bench` write: folders, atomic text and JSON, plots, hashes.

Both packages' reports (and their side commands: ``eval compare``, ``bench concurrency``,
``bench repack``) go through these helpers, so a report is written, read back and plotted
the same way everywhere. matplotlib is imported only when plots are written.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from edge_safe.convert.errors import EdgeSafeError

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install matplotlib)"

#: Draws one figure of a report into a folder: (results, folder, pyplot) -> the PNG written, or None.
Plotter = Callable[[dict, Path, object], "Path | None"]


def make_out_dir(out_dir: str | Path) -> Path:
    """The report folder, created if needed; a one-line error if it cannot be."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeSafeError(f"cannot create the output folder {out}: {e.strerror or e}; pass another --out") from None
    return out


def write_text_atomic(path: Path, text: str) -> Path:
    """Write via a temp file + rename, so a failure never leaves half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: dict) -> Path:
    """``data`` as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def load_results(path: str | Path, what: str = "results") -> dict:
    """A saved results.json; a one-line error naming ``what`` it should hold when it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgeSafeError(f"cannot read {what} {path}: {e}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- plots -------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(results: dict, folder: Path, plotters: Iterable[Plotter]) -> tuple[list[Path], str | None]:
    """Each plotter's PNG in ``folder``; none, and the note to print instead, without matplotlib."""
    plt = pyplot()
    if plt is None:
        return [], PLOTS_SKIPPED
    folder.mkdir(parents=True, exist_ok=True)
    made = [plotter(results, folder, plt) for plotter in plotters]
    return [p for p in made if p is not None], None


def save_figure(fig, path: Path, plt) -> Path:
    """Write ``fig`` as a PNG and free it."""
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
