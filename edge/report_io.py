"""Small helpers shared by the evaluation and benchmark reports."""
from __future__ import annotations

from pathlib import Path

from edge_safe.convert.errors import EdgeSafeError

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install matplotlib)"


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


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
