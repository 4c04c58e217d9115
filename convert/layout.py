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


#: Placements of the control tokens in a conversation: before every user message, or before the last only.
PLACEMENTS = ("every", "last")
LONG_MESSAGE = 256  # a last message longer than this (tokens) gets its control tokens before its last line...
LAST_LINE = 192  # ... when that line is at most this long (tokens)
CUT = "\x00"  # where a long last message is cut (rendered, then split on it; typed text cannot hold it)


def control_layout(template: ChatTemplate, messages: Sequence[Mapping[str, str]], tokenize,
                   placement: str = "last") -> tuple[list[int], tuple[int, ...]]:
    """The prompt's token ids and where the control tokens go among them: before the last user message
    (``placement="last"``) or before every one (``"every"``), and, in a last message longer than
    ``LONG_MESSAGE`` tokens, before its last line instead of its start (when that line is at most
    ``LAST_LINE`` tokens). Each message is tokenized on its own (``tokenize(text) -> ids``, no BOS); the
    runtime and the trainer both lay requests out with this one function, so training sees the geometry
    the runtime produces."""
    template.render_split(messages)  # checks the messages
    pieces = [getattr(template, m["role"]).format(content=str(m["content"]).strip()) for m in messages]
    pieces[-1] = template.render(messages[-1:])  # with the generation prompt
    prompt: list[int] = []
    splits: list[int] = []
    for m, piece in zip(messages, pieces):
        if m["role"] == "user" and (placement == "every" or m is messages[-1]):
            splits.append(len(prompt))
        prompt += tokenize(piece)
    content = str(messages[-1]["content"]).strip()
    cut = content.rfind("\n") + 1
    if len(prompt) - splits[-1] > LONG_MESSAGE and 0 < cut and CUT not in content \
            and 0 < len(tokenize(content[cut:])) <= LAST_LINE:
        before, after = template.render([{"role": "user", "content": content[:cut] + CUT + content[cut:]}]).split(CUT)
        prompt = prompt[:splits[-1]] + tokenize(before) + tokenize(after)
        splits[-1] += len(tokenize(before))
    return prompt, tuple(splits)
