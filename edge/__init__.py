"""edge-safe: composable safety control tokens for quantized on-device LLMs.

``from edge_safe import EdgeSafe`` is the Python API; nothing here imports torch.
"""
from __future__ import annotations

from edge_safe.convert.errors import (
    BankFormatError,
    BankMismatchError,
    EdgeSafeError,
    ModelNotFoundError,
    PromptTooLongError,
    UnknownTokenError,
)

__version__ = "0.1.0"

__all__ = [
    "EdgeSafe",
    "TokenBank",
    "EdgeSafeError",
    "BankFormatError",
    "BankMismatchError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "UnknownTokenError",
    "__version__",
]


def __getattr__(name: str):
    # Lazy, so `import edge_safe` (and `edge-safe --help`) does not load llama.cpp.
    if name == "EdgeSafe":
        from edge_safe.runtime import EdgeSafe

        return EdgeSafe
    if name == "TokenBank":
        from edge_safe.convert.bank import TokenBank

        return TokenBank
    raise AttributeError(f"module 'edge_safe' has no attribute {name!r}")
