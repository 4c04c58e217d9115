"""Request bodies and settings of the OpenAI-compatible server (pydantic).

Requests are validated strictly: a wrong type is an error rather than a
coercion, and an unknown field is refused, so a misspelt ``tokens`` can never
silently run a request without its constraints. The OpenAI parameters that
edge-safe cannot honour (``logprobs``, ``tools``, ``n > 1``, ...) are refused
with a 400 naming the field, instead of being ignored.

Each setting's description lives here once; ``edge-safe serve`` uses it as the
option's help text.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError

from edge_safe.sampling import CHAT_MIN_P, CHAT_REPEAT_PENALTY, CHAT_TOP_K, MAX_STRICTNESS

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

Tokens = Union[list[str], str]
Stop = Union[str, list[str]]


def _str_or_strings(value, what: str):
    """A str or a list of str, checked up front so the error names the field once, not per union member."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise PydanticCustomError("str_or_strings", "{what} must be a string or a list of strings", {"what": what})


class ServerSettings(BaseModel):
    """How one `edge-safe serve` process answers requests (fixed at start-up)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: Optional[SecretStr] = Field(
        None, description="Require 'Authorization: Bearer KEY' on /v1/* [default: $EDGE_SAFE_API_KEY, else no key].")
    default_tokens: Optional[str] = Field(
        None, description="Constraints (names or profiles, comma-separated) for requests without a 'tokens' field.")
    max_tokens_limit: Optional[int] = Field(
        None, ge=1, description="Refuse (400) requests asking for more max_tokens than this [default: no limit].")
    allow_negative_mode: bool = Field(
        False, description="Allow mode 'negative' (unrestricted, for red-teaming); refused with 403 otherwise.")
    default_strictness: float = Field(
        0.0, ge=-MAX_STRICTNESS, le=MAX_STRICTNESS, allow_inf_nan=False,
        description="Strictness for requests without a 'strictness' field: > 0 refuses more, < 0 less [default: 0].")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body in bytes; larger ones get 413 [default: 1048576].")
    max_queue: int = Field(64, ge=1, description="Requests that may wait for the model; more get 503 [default: 64].")
    repeat_penalty: float = Field(
        CHAT_REPEAT_PENALTY, gt=0, allow_inf_nan=False,
        description=f"repeat_penalty for requests without one (1: off); the default stops the bundled model "
                    f"from repeating a sentence [default: {CHAT_REPEAT_PENALTY}].")
    top_k: int = Field(CHAT_TOP_K, ge=0, description=f"top_k for requests without one [default: {CHAT_TOP_K}].")
    min_p: float = Field(CHAT_MIN_P, ge=0, le=1, description=f"min_p for requests without one [default: {CHAT_MIN_P}].")
    model_id: Optional[str] = Field(None, description="Model id reported by /v1/models [default: the GGUF's name].")


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None  # accepted for compatibility, not used

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and len(p) == 2
            for p in content
        ):
            return content
        raise PydanticCustomError(
            "content_type", "content must be a string or a list of {'type': 'text', 'text': ...} parts (text only)")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = _STRICT

    model: Optional[str] = None  # any value is accepted; the server has one model and names it in the reply
    tokens: Optional[Tokens] = None  # constraint/profile names; absent or null: the server's --default-tokens
    mode: Optional[str] = None
    # added to the refusal opener's logit until the first visible reply token; absent: the server's --default-strictness
    strictness: Optional[float] = Field(None, ge=-MAX_STRICTNESS, le=MAX_STRICTNESS)  # _STRICT: no NaN/inf
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0: greedy (edge-safe's default, unlike OpenAI's 1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)  # llama-cpp-python's server fields; absent: the server's defaults
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, gt=0.0)
    stop: Optional[Stop] = None
    seed: Optional[int] = Field(None, ge=0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None  # accepted; the last chunk always carries usage
    n: int = 1
    user: Optional[str] = None  # accepted for compatibility, not used

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, tokens):
        return _str_or_strings(tokens, "tokens (names or profiles)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, stop):
        return _str_or_strings(stop, "stop")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stop)}")
        return stop

    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_tokens


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # newer name of max_tokens

    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Generation):
    prompt: Union[str, list[str]]  # one prompt (a one-element list is accepted)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if prompt is None:
            raise PydanticCustomError("missing", "Field required")
        _str_or_strings(prompt, "prompt")
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"exactly one prompt is supported, got a list of {len(prompt)}")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported")
        return echo

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
