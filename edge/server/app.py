"""An OpenAI-compatible HTTP server over one :class:`~edge_safe.runtime.EdgeSafe`.

Any OpenAI client can switch control tokens per request with extra body
fields, ``tokens`` (names or profiles, list or comma string), ``mode`` and
``strictness`` (refuse more or less than the bank as trained); every reply says
which composition was applied in its ``edge_safe`` field.

- The EdgeSafe's ``n_parallel`` requests run at once on its engine (one decode step batches
  every running request, each in its own sequence with its own composition). More requests
  queue in the app state's gate (``max_queue`` may wait, more get 503); the blocking calls
  run in worker threads, so the event loop stays free for ``/health``.
- A stream holds its slot until it ends; when the client goes away the iterator is
  closed at once, which cancels the request and frees its slot (and its sequence).
- Errors leave through one boundary, mapped by exception *type* to OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``: client mistakes are 4xx,
  only server faults are 5xx.

``create_app(es, settings)`` builds everything; there is no module-level state.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_safe import __version__
from edge_safe.llama import DecodeError
from edge_safe.convert.errors import (
    BankFormatError,
    BankMismatchError,
    EdgeSafeError,
    ModelNotFoundError,
    PromptTooLongError,
    UnknownTokenError,
)
from edge_safe.convert.keys import Behaviour
from edge_safe.engine import EngineClosedError
from edge_safe.runtime import EdgeSafe
from edge_safe.server.schema import ChatCompletionRequest, CompletionRequest, ServerSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = {"chat": 256, "completion": 16}  # when a request names none (OpenAI's 16 for completions)
R = TypeVar("R", bound=BaseModel)

# EdgeSafeError subclasses -> (status, type, code); first isinstance match wins.
_ERRORS: list[tuple[type, int, str, str | None]] = [
    (UnknownTokenError, 400, "invalid_request_error", "unknown_token"),
    (PromptTooLongError, 400, "invalid_request_error", "context_length_exceeded"),
    (DecodeError, 500, "server_error", "decode_failed"),  # llama.cpp failed, not the client
    (EngineClosedError, 503, "server_error", "shutting_down"),  # the server stopped during the request
    (BankFormatError, 500, "server_error", None),  # set-up problems, raised only at start-up
    (BankMismatchError, 500, "server_error", None),
    (ModelNotFoundError, 500, "server_error", None),
    (EdgeSafeError, 400, "invalid_request_error", None),  # everything else the runtime refuses
]


class ApiError(Exception):
    """An HTTP error in OpenAI's shape; ``kind`` is its ``type`` field."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EdgeSafeError):
        status, kind, code = next((s, t, c) for cls, s, t, c in _ERRORS if isinstance(exc, cls))
        return ApiError(status, str(exc), kind=kind, param=getattr(exc, "param", None), code=code)
    return ApiError(500, "internal server error; see the server log", kind="server_error")


def _tag(exc: EdgeSafeError, param: str) -> EdgeSafeError:
    exc.param = param  # read by _as_api_error: which request field was wrong
    return exc


# --- request parsing ----------------------------------------------------------------


async def read_request(request: Request, model: type[R], limit: int) -> R:
    """The body as ``model``: 413 above ``limit`` bytes, 400 for bad JSON or a field that does not fit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        body.append(chunk)
    try:
        data = json.loads(b"".join(body), parse_constant=_no_constants)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") are not text
    except (ValueError, UnicodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send one JSON object",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {_JSON_TYPES[type(data)]}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from None


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size}+ bytes; this server accepts at most {limit}",
                    code="request_too_large")


def _invalid(e: ValidationError) -> ApiError:
    problems = [(_path(err["loc"]), _explain(err)) for err in e.errors()]
    message = "; ".join(f"{path}: {why}" if path else why for path, why in problems[:5])
    return ApiError(400, message, param=problems[0][0] or None, code="invalid_value")


def _path(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown or unsupported field (edge-safe adds only 'tokens', 'mode' and 'strictness' to OpenAI's fields)"
    if err["type"] == "missing":
        return "field required"
    return err["msg"].removeprefix("Value error, ")


# --- the model gate -----------------------------------------------------------------


class ModelGate:
    """The queue in front of the model: ``slots`` holders at once, at most ``max_queue`` waiting."""

    def __init__(self, max_queue: int, slots: int = 1):
        self.max_queue, self.slots, self.waiting, self.holders = max_queue, slots, 0, 0
        self._sem = asyncio.Semaphore(slots)  # binds to the running loop on first contention

    @property
    def busy(self) -> bool:
        """Some request holds the model."""
        return self.holders > 0

    async def acquire(self) -> None:
        if self.holders >= self.slots and self.waiting >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.waiting} requests waiting); retry later",
                           kind="server_error", code="server_busy")
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        self._sem.release()


class EventStream(StreamingResponse):
    """Server-sent events from an EdgeSafe chunk iterator.

    However the response ends (finished, client gone, cancelled), the iterator
    is closed, which releases the runtime, and then the gate is released.
    """

    def __init__(self, chunks: Iterator[dict], shape: Callable[[dict], dict | None],
                 on_close: Callable[[], None]):
        self._chunks, self._shape, self._on_close, self._closed = chunks, shape, on_close, False
        super().__init__(self._events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self):
        while True:
            try:
                chunk = await run_in_threadpool(next, self._chunks, None)
            except Exception as e:  # the 200 is already sent: report in-band, as OpenAI does
                err = _as_api_error(e)
                log.log(logging.ERROR if err.status >= 500 else logging.INFO, "stream failed: %s", e)
                yield _sse(err.body())
                return
            if chunk is None:
                break
            shaped = self._shape(chunk)
            if shaped is not None:
                yield _sse(shaped)
        yield b"data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await run_in_threadpool(self._chunks.close)
        finally:
            self._on_close()


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


# --- the app --------------------------------------------------------------------------


@dataclass
class ServerState:
    """Everything one app needs, built by create_app and kept on ``app.state.edge_safe``."""

    es: EdgeSafe
    settings: ServerSettings
    model_id: str
    default_tokens: list[str]
    gate: ModelGate
    started: int

    def generation_args(self, req, kind: str) -> dict[str, Any]:
        """Validated keyword arguments of EdgeSafe.create_(chat_)completion for a request (composition,
        budget, sampling; the server's defaults where the request names none)."""
        given = "tokens" in req.model_fields_set and req.tokens is not None
        tokens = req.tokens if given else self.default_tokens
        try:
            self.es.compose(tokens)
        except UnknownTokenError as e:
            raise _tag(e, "tokens") from None
        try:
            self.es.compose(None, req.mode)
        except UnknownTokenError as e:
            raise _tag(e, "mode") from None
        constraints, mode = self.es.compose(tokens, req.mode)
        if mode and self.es.bank.behaviour(mode) == Behaviour.UNRESTRICTED and not self.settings.allow_negative_mode:
            raise ApiError(403, f"mode {mode!r} (unrestricted, for red-teaming) is disabled on this server; "
                           "start it with --allow-negative-mode to allow it", kind="permission_error",
                           param="mode", code="mode_not_allowed")
        return {"tokens": constraints, "mode": mode, "max_tokens": self.max_tokens(req, kind),
                "temperature": req.temperature, "top_p": req.top_p, "stop": req.stop, "seed": req.seed,
                **{k: getattr(self.settings, k) if getattr(req, k) is None else getattr(req, k)
                   for k in ("top_k", "min_p", "repeat_penalty")},
                "strictness": self.settings.default_strictness if req.strictness is None else req.strictness}

    def max_tokens(self, req, kind: str) -> int:
        limit, wanted = self.settings.max_tokens_limit, req.wanted_max_tokens()
        if wanted is None:
            return min(DEFAULT_MAX_TOKENS[kind], limit or DEFAULT_MAX_TOKENS[kind])
        if limit is not None and wanted > limit:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{param} is {wanted}, above this server's limit of {limit}; ask for at most {limit}",
                           param=param, code="max_tokens_exceeded")
        return wanted

    async def run(self, req, kind: str, answer: Callable):
        """Queue for the model, then answer (a JSON reply, or an event stream that holds the model)."""
        args = self.generation_args(req, kind)
        await self.gate.acquire()
        release = True
        named = {"model": self.model_id}
        try:
            if not req.stream:
                reply = await run_in_threadpool(partial(answer, **args))
                return JSONResponse({**reply, **named})
            chunks = await run_in_threadpool(partial(answer, stream=True, **args))
            release = False  # the stream owns the gate now
            return EventStream(chunks, lambda chunk: {**chunk, **named}, self.gate.release)
        finally:
            if release:
                self.gate.release()


def create_app(es: EdgeSafe, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``es``; the caller owns ``es`` (and closes it after the server stops).
    ``es.n_parallel`` requests are decoded together (``EdgeSafe(n_parallel=...)``)."""
    settings = settings or ServerSettings()
    default_tokens = es.compose(settings.default_tokens)[0]  # unknown names fail at start-up
    state = ServerState(
        es=es, settings=settings, model_id=settings.model_id or es.model_name, default_tokens=default_tokens,
        gate=ModelGate(settings.max_queue, es.n_parallel), started=int(time.time()),
    )
    app = FastAPI(title="edge-safe", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.edge_safe = state
    _add_error_handlers(app)
    app.include_router(_routes(state))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    def reply(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    async def known(request: Request, exc: Exception) -> JSONResponse:
        err = _as_api_error(exc)
        log.log(logging.ERROR if err.status >= 500 else logging.DEBUG, "%s %s -> %d: %s",
                request.method, request.url.path, err.status, err.message)
        return reply(err)

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; the API is under /v1 (chat/completions, completions, models, tokens) and /health"
        return reply(ApiError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)))

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [(_path(tuple(err["loc"])), err["msg"]) for err in exc.errors()]
        message = "; ".join(f"{path}: {why}" for path, why in problems[:5])
        return reply(ApiError(400, message, param=problems[0][0] if problems else None, code="invalid_value"))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return reply(_as_api_error(exc))  # starlette re-raises it afterwards, so the server logs the traceback

    app.add_exception_handler(ApiError, known)
    app.add_exception_handler(EdgeSafeError, known)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, unexpected)


def _api_key_check(settings: ServerSettings) -> Callable:
    """A dependency that wants 'Authorization: Bearer KEY' when the server has a key."""
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None
    challenge = {"WWW-Authenticate": "Bearer"}

    async def require_key(request: Request) -> None:
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "missing API key; send the header 'Authorization: Bearer KEY'",
                           code="missing_api_key", headers=challenge)
        if not hmac.compare_digest(given.strip().encode(), key):
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers=challenge)

    return require_key


def _routes(state: ServerState) -> APIRouter:
    settings, es, model_id = state.settings, state.es, state.model_id
    router = APIRouter()
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(settings))])
    card = {"id": model_id, "object": "model", "created": state.started, "owned_by": "edge-safe"}

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "busy": state.gate.busy, "running": state.gate.holders,
                "queued": state.gate.waiting, "parallel": es.n_parallel}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict:
        if name != model_id:
            raise ApiError(404, f"model {name!r} not found; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return card

    @v1.get("/tokens")
    async def tokens() -> dict:
        return {
            "object": "list",
            "data": [{"id": n, "object": "control_token", "kind": t.kind, "description": t.description,
                      "n_vectors": t.n_vectors, **({"depth": "deep"} if t.is_deep else {})}
                     for n, t in es.bank.tokens.items()],
            "tokens": es.tokens,
            "modes": es.modes,
            "profiles": es.profiles,
            "default_tokens": state.default_tokens,
            "negative_mode_allowed": settings.allow_negative_mode and any(
                es.bank.behaviour(m) == Behaviour.UNRESTRICTED for m in es.modes),
            "default_strictness": settings.default_strictness,
        }

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = await read_request(request, ChatCompletionRequest, settings.max_body_bytes)
        return await state.run(req, "chat", partial(es.create_chat_completion, req.conversation()))

    @v1.post("/completions")
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest, settings.max_body_bytes)
        return await state.run(req, "completion", partial(es.create_completion, req.text()))

    router.include_router(v1)
    return router
