"""The prompt layout and chat templates, shared by training and runtime.

A request is laid out as::

    [BOS] [mode vectors] [constraint vectors ...] <chat template with the conversation>

Training (``edge_safe.training``) and the runtime (``edge_safe``) both build
their inputs from this module, and the bank records the layout name and the
template it was trained with, so the two sides cannot drift apart.

The bundled Gemma 3 270M is a *pretrained* model without a chat template: in
Gemma's turn markup it echoes the question, while a plain ``Question:/Answer:``
frame gets short, sensible answers (" Lima"), after which it starts a new
``Question:`` line -- hence that line is a stop string.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from .errors import BankFormatError, EdgeSafeError

#: The only layout this version knows. A bank naming another is refused.
LAYOUT_V1 = "bos+mode+constraints+template/v1"
KNOWN_LAYOUTS = (LAYOUT_V1,)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """A plain-text chat template, stored in the bank as JSON.

    Every field is a literal format string with a ``{content}`` slot; no
    special tokens appear in it, so the whole rendered prompt is tokenized with
    special-token parsing off and typed text can never forge structure.
    """

    name: str = "qa/v1"
    system: str = "{content}\n"  # optional rules/instructions line(s) before the first turn
    user: str = "Question: {content}\n"
    assistant: str = "Answer: {content}\n"
    generation: str = "Answer:"  # what the prompt ends with; the reply starts with a space
    stop: tuple[str, ...] = ("\nQuestion:", "\nAnswer:")  # the base model starts a new turn here

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style messages into the prompt text that follows the prefix."""
        validate_messages(messages)
        parts = []
        for m in messages:
            content = str(m["content"]).strip()
            parts.append(getattr(self, m["role"]).format(content=content))
        if add_generation_prompt:
            parts.append(self.generation)
        return "".join(parts)

    def render_split(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
        """(what comes before the last user message, the last user message and the generation prompt):
        ``render(messages)`` cut where the control tokens go."""
        validate_messages(messages)
        head = "".join(getattr(self, m["role"]).format(content=str(m["content"]).strip()) for m in messages[:-1])
        return head, self.render(messages[-1:])

    def prompt(self, question: str, system: str | None = None) -> str:
        """Single-turn prompt text for ``question`` (the common training/eval case)."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        return self.render(msgs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ChatTemplate":
        try:
            data = json.loads(text)
            data["stop"] = tuple(data.get("stop", ()))
            return cls(**data)
        except (ValueError, TypeError, KeyError) as e:
            raise BankFormatError(
                f"the bank's chat template is not valid JSON for a ChatTemplate ({e}); "
                "re-export the bank with `edge-safe train` or `edge-safe convert`"
            ) from e


#: The template the shipped bank is trained with (best answers from the pretrained 270M).
QA_TEMPLATE = ChatTemplate()


def clean_reply(text: str, template: ChatTemplate = QA_TEMPLATE) -> str:
    """Cut a raw continuation at the first stop string and strip the leading space."""
    cut = len(text)
    for s in template.stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def validate_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise EdgeSafeError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise EdgeSafeError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise EdgeSafeError(
                f"messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise EdgeSafeError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    if messages[-1]["role"] != "user":
        raise EdgeSafeError("the last message must have role 'user' (the model answers it)")


def prefix_names(mode: str | None, constraints: Sequence[str]) -> list[str]:
    """Names of the bank entries injected after BOS, in layout order."""
    return ([mode] if mode else []) + list(constraints)


def check_layout(layout: str) -> None:
    if layout not in KNOWN_LAYOUTS:
        raise BankFormatError(
            f"the bank uses prompt layout {layout!r}, which this edge-safe does not know "
            f"(known: {', '.join(KNOWN_LAYOUTS)}); upgrade edge-safe or re-train the bank"
        )
