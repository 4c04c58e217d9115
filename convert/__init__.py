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
from .layout import LAYOUT_V1, QA_TEMPLATE, ChatTemplate

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
]
