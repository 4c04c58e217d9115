"""The token-bank sidecar format: read, write, validate and convert (numpy + gguf only)."""
from .errors import (
    BankFormatError,
    BankMismatchError,
    EdgeSafeError,
    FileExistsNoForceError,
    ModelNotFoundError,
    PromptTooLongError,
    UnknownTokenError,
)
from .keys import FORMAT_VERSION
from .layout import LAYOUT_V1, QA_TEMPLATE, ChatTemplate

# name -> submodule; imported on first use so `import edge_safe` stays light (no numpy/gguf).
_LAZY = {
    "BankToken": "bank",
    "TokenBank": "bank",
    "ModelInfo": "model",
    "input_scale": "model",
    "export_npz": "interchange",
    "import_npz": "interchange",
    "export_torch": "interchange",
    "import_torch": "interchange",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BankFormatError",
    "BankMismatchError",
    "EdgeSafeError",
    "FileExistsNoForceError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "UnknownTokenError",
    "LAYOUT_V1",
    "QA_TEMPLATE",
    "ChatTemplate",
    "FORMAT_VERSION",
    *_LAZY,
]
