"""One exception hierarchy for edge-safe.

Every user-facing failure is an :class:`EdgeSafeError` whose message says what
failed (expected vs got where it applies) and what to do about it. The CLI and
the server convert these by *type* at their boundary (click exceptions, OpenAI
JSON errors); library code never prints.

It lives in the format package because that is the bottom layer: the runtime
(``edge_safe``) and the trainer (``edge_safe.training``) both import it, and it
imports nothing of theirs.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class EdgeSafeError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class BankFormatError(EdgeSafeError):
    """A file is not a readable, internally consistent token bank."""


class BankMismatchError(EdgeSafeError):
    """A valid bank that does not fit the chosen base model (arch, n_embd, fingerprint)."""


class UnknownTokenError(EdgeSafeError, KeyError):
    """A token, profile or mode name that the bank does not define."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(EdgeSafeError):
    """The base model file is missing or unreadable."""


class PromptTooLongError(EdgeSafeError):
    """The prompt (with its control-token prefix) does not fit in the context."""


class FileExistsNoForceError(EdgeSafeError):
    """Refusing to overwrite an existing file without ``force``."""


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """`unknown token 'minor'; did you mean 'minors'? known: a, b, c`"""
    known = list(known)
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    msg += f"{'' if close else '.'} Known: {', '.join(known) if known else '(none)'}"
    return msg
