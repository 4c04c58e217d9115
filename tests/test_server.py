"""The OpenAI-compatible server, live on 127.0.0.1, called with the real `openai` client.

One EdgeSafe (bundled Gemma 3 270M, a small from-text bank with all three modes,
n_ctx 512, one thread, 4 sequences) is shared by the module's servers; replies are greedy and
short so the module runs in seconds on 2 shared cores.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from click.testing import CliRunner

from edge_safe.cli import serve as cli_serve
from edge_safe.cli import cli
from edge_safe.convert.bank import TokenBank, from_text_bank, from_text_token
from edge_safe.convert.errors import UnknownTokenError
from edge_safe.convert.model import ModelInfo
from edge_safe.llama import Context
from edge_safe.probe import Probe
from edge_safe.runtime import EdgeSafe
from edge_safe.sampling import Sampling
from edge_safe.server import create_app
from edge_safe.server.schema import ServerSettings

from conftest import same_reply, sure_part

pytestmark = pytest.mark.model
KEY = "test-key"
Q = "What is the capital of Peru?"
LONG = "Write the numbers from 1 to 500."  # the base model keeps counting: a long stream
RULES = {  # name -> (kind, rule); short rules keep the prefixes (and the tests) small
    "alcohol": ("constraint", "Do not help with alcohol."),
    "gambling": ("constraint", "Do not help with gambling."),
    "privacy": ("constraint", "Do not help find private people."),
    "positive": ("mode", "Answer helpfully."),
    "rejective": ("mode", "Refuse every request."),
    "negative": ("mode", "Answer anything."),
}
PROFILES = {"minors": ["alcohol", "gambling"], "eu": ["privacy"]}


def small_bank(model_path) -> TokenBank:
    info = ModelInfo.read(model_path)
    with Context.load(info.path, n_ctx=64) as llm:
        toks = [from_text_token(info, llm.tokenize, n, rule, kind=kind, description=f"{n}: {rule}",
                                refusal="Sorry, I can't help with that." if n != "positive" and n != "negative" else "")
                for n, (kind, rule) in RULES.items()]
    return from_text_bank(info, toks, PROFILES)


@contextlib.contextmanager
def live_server(app):
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL; always stops it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def bank(model_path) -> TokenBank:
    return small_bank(model_path)


@pytest.fixture(scope="module")
def es(bank):
    with EdgeSafe(bank=bank, n_ctx=512, n_batch=128, n_threads=1, seed=0, n_parallel=4) as es:
        yield es


@pytest.fixture(scope="module")
def app(es):
    settings = ServerSettings(api_key=KEY, default_tokens="minors", max_tokens_limit=64, max_body_bytes=32 * 1024)
    return create_app(es, settings)  # es.n_parallel 4: requests are batched on its engine


@pytest.fixture(scope="module")
def url(app):
    with live_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def ask(client, content=Q, max_tokens=6, **extra):
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, extra_body=extra or None)


#: what the server samples with when a request names nothing (greedy, so only the repeat penalty matters)
SERVER_SAMPLING = {k: getattr(ServerSettings(), k) for k in ("repeat_penalty", "top_k", "min_p")}


def alone(es, content=Q, max_tokens=6, tokens=None, mode=None) -> str:
    """The same request run directly on the runtime (greedy, the server's default sampling), its prefix
    restored fresh: what the server must answer."""
    messages = [{"role": "user", "content": content}]
    es.reset()
    out = es.create_chat_completion(messages, tokens=tokens, mode=mode, max_tokens=max_tokens, **SERVER_SAMPLING)
    return out["choices"][0]["message"]["content"]


def alone_with_ties(es, content, max_tokens, tokens=None, mode=None, min_gap: float = 0.25) -> tuple[str, str]:
    """(the request run alone, the part of it before its first near-tie: ``conftest.sure_part``).

    llama.cpp's CPU logits move by ~0.01-0.1 with batch boundaries (a reused conversation under load
    re-decodes only its last prompt token), so where the greedy reply's token wins by less than
    ``min_gap`` logits the same request may continue differently under load without any leak between
    requests. What comes before that point must be the same; read right after the reply, on its prompt's
    cells, as a conversation's next request reuses them."""
    messages = [{"role": "user", "content": content}]
    es.reset()
    job = es.submit(messages, tokens=tokens, mode=mode, max_tokens=max_tokens, sampling=Sampling(**SERVER_SAMPLING))
    text = "".join(job)
    return text, sure_part(es, messages, list(job.policy.history), text, tokens, mode, min_gap=min_gap, fresh=False)


def same_as_alone(reply: str, want: tuple[str, str]) -> bool:
    """The reply equals the request run alone, or differs only from the alone run's first near-tie on."""
    return same_reply(reply, *want)


def positions(es, *names) -> int:
    return sum(es.bank.tokens[n].n_vectors for n in names)


def api_error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- the happy paths, with the openai client ----------------------------------------------


def test_models_health_and_tokens(client, url, es, http):
    assert [m.id for m in client.models.list().data] == [es.model_name]
    assert client.models.retrieve(es.model_name).id == es.model_name
    health = httpx.get(url + "/health").json()  # no API key needed: for liveness probes
    assert health == {"status": "ok", "model": es.model_name, "busy": False, "running": 0, "queued": 0, "parallel": 4}
    listing = http.get("/v1/tokens").json()
    assert listing["tokens"] == ["alcohol", "gambling", "privacy"]
    assert listing["modes"] == ["positive", "rejective", "negative"]
    assert listing["profiles"] == PROFILES
    assert listing["default_tokens"] == ["alcohol", "gambling"] and listing["negative_mode_allowed"] is False
    assert listing["default_strictness"] == 0.0
    entry = next(d for d in listing["data"] if d["id"] == "privacy")
    assert entry == {"id": "privacy", "object": "control_token", "kind": "constraint",
                     "description": "privacy: Do not help find private people.",
                     "n_vectors": es.bank.tokens["privacy"].n_vectors}


def test_chat_with_tokens_in_extra_body_says_what_was_applied(client, es):
    reply = ask(client, tokens=["eu"], mode="rejective")
    assert reply.object == "chat.completion" and reply.model == es.model_name
    assert reply.edge_safe == {"tokens": ["privacy"], "mode": "rejective",
                               "prefix_positions": positions(es, "rejective", "privacy"), "strictness": 0.0,
                               "refusal": es.is_refusal(reply.choices[0].message.content),
                               "refused_by": es.bank.refusal_of(reply.choices[0].message.content)}
    assert reply.choices[0].message.content == alone(es, tokens="eu", mode="rejective")
    assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tokens, applied", [
    ("eu,minors", ["alcohol", "gambling", "privacy"]),  # comma string, canonical order
    ("", []),
    ([], []),  # an explicit empty list: no constraints, not the default
    (None, ["alcohol", "gambling"]),  # null: the server's --default-tokens
    ("absent", ["alcohol", "gambling"]),
])
def test_tokens_forms_and_default_tokens(client, es, tokens, applied):
    reply = ask(client, max_tokens=3) if tokens == "absent" else ask(client, max_tokens=3, tokens=tokens)
    assert reply.edge_safe["tokens"] == applied
    assert reply.edge_safe["mode"] == ("positive" if applied else None)
    assert reply.choices[0].message.content == alone(es, max_tokens=3, tokens=applied)


def test_streaming_chat_matches_non_streaming(client, es):
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": Q}], max_tokens=8,
                                            stream=True, extra_body={"tokens": "minors"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.edge_safe["tokens"] == ["alcohol", "gambling"] and last.edge_safe["mode"] == "positive"
    assert last.usage.completion_tokens >= 1
    assert text == ask(client, max_tokens=8, tokens="minors").choices[0].message.content


def test_completions_endpoint_streaming_and_not(client, es):
    reply = client.completions.create(model="any", prompt=Q, max_tokens=5, extra_body={"tokens": []})
    assert reply.object == "text_completion" and reply.edge_safe["tokens"] == []
    assert reply.choices[0].text == alone(es, max_tokens=5, tokens=[])
    pieces = list(client.completions.create(model="any", prompt=Q, max_tokens=5, stream=True,
                                            extra_body={"tokens": []}))
    assert "".join(p.choices[0].text for p in pieces) == reply.choices[0].text
    assert pieces[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert pieces[-1].edge_safe == reply.edge_safe


def test_strictness_per_request_and_as_the_server_default(client, es):
    opener = Probe(es).refusal_openers(["privacy"])
    es.reset()
    logits = Probe(es).first_token_logits(Q, tokens="eu")
    gap = float(np.delete(logits, opener).max() - logits[opener].max())  # what the refusal openers lack to win
    assert 1.5 < gap < 18.5
    plain = ask(client, tokens="eu")
    assert not plain.choices[0].message.content.startswith("Sorry") and plain.edge_safe["strictness"] == 0.0
    strict = ask(client, tokens="eu", strictness=gap + 1)
    assert strict.choices[0].message.content.startswith("Sorry") and strict.edge_safe["strictness"] == gap + 1
    assert ask(client, tokens="eu", strictness=gap - 1).choices[0].message.content == plain.choices[0].message.content
    with live_server(create_app(es, ServerSettings(default_strictness=gap + 1))) as base:
        strict_server = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert ask(strict_server, tokens="eu").choices[0].message.content.startswith("Sorry")
        assert httpx.get(base + "/v1/tokens").json()["default_strictness"] == gap + 1
        relaxed = ask(strict_server, tokens="eu", strictness=0)  # the request's own value wins
        assert relaxed.choices[0].message.content == plain.choices[0].message.content


def test_a_request_s_repeat_penalty_is_honoured_and_the_server_s_default_applies_otherwise(es):
    """Without a repeat penalty the bundled model repeats itself to the end of its budget on this question;
    the server's default (1.1) ends it far earlier (256 vs 30 tokens measured); a request's own value wins."""
    gift = [{"role": "user", "content": "My grandmother's birthday is next week. Any gift ideas?"}]
    with live_server(create_app(es, ServerSettings())) as base:
        server = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)

        def ask_gift(**extra):
            return server.chat.completions.create(model="any", messages=gift, max_tokens=256,
                                                  extra_body={"tokens": [], **extra})

        default, plain = ask_gift(), ask_gift(repeat_penalty=1.0)
        assert plain.usage.completion_tokens == 256 and plain.choices[0].finish_reason == "length"
        assert default.usage.completion_tokens < 128 and default.choices[0].finish_reason == "stop"
        explicit = ask_gift(repeat_penalty=ServerSettings().repeat_penalty)
        assert explicit.choices[0].message.content == default.choices[0].message.content
        assert default.choices[0].message.content == alone(es, gift[0]["content"], 256, tokens=[])


@pytest.mark.parametrize("extra, says", [
    ({"top_k": -1}, "greater than or equal to 0"),
    ({"min_p": 1.5}, "less than or equal to 1"),
    ({"repeat_penalty": 0}, "greater than 0"),
])
def test_bad_sampling_fields_are_400_naming_the_field(client, extra, says):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, max_tokens=2, **extra)
    err = api_error(e.value)
    (param,) = extra
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, "invalid_value")
    assert says in err["message"]


def test_negative_mode_needs_the_server_flag(client, es):
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask(client, mode="negative")
    err = api_error(e.value)
    assert e.value.status_code == 403 and err["param"] == "mode" and err["code"] == "mode_not_allowed"
    assert "--allow-negative-mode" in err["message"]
    with live_server(create_app(es, ServerSettings(allow_negative_mode=True))) as base:
        open_client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = ask(open_client, max_tokens=3, tokens="eu", mode="negative")
        assert reply.edge_safe["mode"] == "negative" and reply.edge_safe["tokens"] == ["privacy"]
        assert httpx.get(base + "/v1/tokens").json()["negative_mode_allowed"] is True


# --- every error, in OpenAI's shape -------------------------------------------------------


@pytest.mark.parametrize("extra, param, code, says", [
    ({"tokens": "minor"}, "tokens", "unknown_token", "did you mean 'minors'? Known: alcohol, gambling, privacy, "
                                                      "minors, eu"),
    ({"tokens": ["eu", "nope"]}, "tokens", "unknown_token", "Known: alcohol, gambling, privacy, minors, eu"),
    ({"tokens": "rejective"}, "tokens", "unknown_token", "is a mode, not a constraint"),
    ({"mode": "sneaky"}, "mode", "unknown_token", "Known: positive, rejective, negative"),
    ({"tokens": 5}, "tokens", "invalid_value", "tokens (names or profiles) must be a string or a list of strings"),
    ({"tokens": ["eu", 3]}, "tokens", "invalid_value", "must be a string or a list of strings"),
    ({"mode": ["rejective"]}, "mode", "invalid_value", "valid string"),
    ({"temperature": "hot"}, "temperature", "invalid_value", "valid number"),
    ({"stream": "yes"}, "stream", "invalid_value", "valid boolean"),
    ({"top_p": 0}, "top_p", "invalid_value", "greater than 0"),
    ({"n": 2}, "n", "invalid_value", "only n=1 is supported"),
    ({"logprobs": True}, "logprobs", "invalid_value", "unknown or unsupported field"),
    ({"token": "minors"}, "token", "invalid_value", "unknown or unsupported field"),  # a typo never runs unconstrained
    ({"strictness": 25}, "strictness", "invalid_value", "less than or equal to 20"),
    ({"strictness": "high"}, "strictness", "invalid_value", "valid number"),
])
def test_bad_fields_are_400_naming_the_field(client, extra, param, code, says):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, max_tokens=2, **extra)
    err = api_error(e.value)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert says in err["message"]


def test_wrong_types_in_messages_and_max_tokens(client, http):
    for body, param, says in [
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "content must be a string"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'system', 'user' or 'assistant'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "field required"),
        ({"messages": "hi"}, "messages", "valid list"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "3"}, "max_tokens", "valid integer"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", "greater than or equal"),
        ({}, "messages", "field required"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="any", **body) if "messages" in body else \
                client.post("/chat/completions", body=body, cast_to=object)
        err = api_error(e.value)
        assert err["param"] == param and err["code"] == "invalid_value", body
        assert says in err["message"], (body, err["message"])
    # the runtime's own checks come back as 400 too
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert r.status_code == 400 and "last message must have role 'user'" in r.json()["error"]["message"]


def test_max_tokens_limit_is_a_400(client):
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": Q}], **{field: 65})
        err = api_error(e.value)
        assert err["param"] == field and err["code"] == "max_tokens_exceeded"
        assert err["message"] == f"{field} is 65, above this server's limit of 64; ask for at most 64"


def test_prompt_longer_than_the_context_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, content="tell me more " * 300, max_tokens=2)
    err = api_error(e.value)
    assert err["code"] == "context_length_exceeded" and "the context holds 512" in err["message"]
    assert ask(client, max_tokens=2).choices  # and the server keeps working


def test_api_key_missing_or_wrong_is_a_401(url):
    with pytest.raises(openai.AuthenticationError) as e:
        ask(openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0))
    assert api_error(e.value)["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Basic " + KEY}).status_code == 401


def test_too_large_a_body_is_a_413(client, http):
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, content="x" * 40_000)
    assert e.value.status_code == 413 and api_error(e.value)["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b" " * 1024
    r = http.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_malformed_json_unknown_routes_and_methods(http):
    for body, says in [(b'{"messages": [', "not valid JSON"), (b"[1, 2]", "must be a JSON object, got a JSON array"),
                       (b"null", "got a JSON null"), (b'{"messages": "\\ud800"}', "not valid JSON"),
                       (b"\xff\xfe", "not valid JSON"), (b'{"top_p": NaN}', "NaN is not JSON"),
                       (b"[" * 3000 + b"]" * 3000, "nests JSON too deeply")]:
        r = http.post("/v1/chat/completions", content=body)
        assert r.status_code == 400 and says in r.json()["error"]["message"], body
        assert r.json()["error"]["code"] == "invalid_json"
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = http.get("/v1/models/other-model")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# --- concurrency -----------------------------------------------------------------------------

COMPOSITIONS = (("minors", None), ([], None), ("eu", "rejective"), ("eu,minors", None))


def test_interleaved_compositions_equal_each_request_run_alone(url, es):
    """16 concurrent requests, compositions interleaved, half streamed: each reply equals the request run alone."""
    requests = [(q, t, m) for q in (Q, "How do I mix a mojito?") for t, m in COMPOSITIONS]
    expected = {(q, json.dumps(t), m): alone_with_ties(es, q, 6, t, m) for q, t, m in requests}
    assert sum(bool(sure) for _, sure in expected.values()) >= len(expected) // 2  # the check has teeth

    def one(i):
        q, t, m = requests[i % len(requests)]
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        body = dict(model="any", messages=[{"role": "user", "content": q}], max_tokens=6,
                    extra_body={"tokens": t, "mode": m})
        key = (q, json.dumps(t), m)
        if i % 2:
            chunks = list(c.chat.completions.create(stream=True, **body))
            return key, "".join(x.choices[0].delta.content or "" for x in chunks), chunks[-1].edge_safe
        reply = c.chat.completions.create(**body)
        return key, reply.choices[0].message.content, reply.edge_safe

    order = [3, 0, 5, 6, 1, 4, 7, 2] * 2
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, order))
    for key, text, extra in results:
        assert same_as_alone(text, expected[key]), (key, text, expected[key])
        assert extra["tokens"] == es.compose(json.loads(key[1]), key[2])[0]
        assert extra["mode"] == es.compose(json.loads(key[1]), key[2])[1]


def test_a_deep_bank_is_served_batched(model_path, deep_bank):
    """With --parallel > 1 a bank of deep tokens is batched on the engine like a shallow one (the server used to
    fall back to one request at a time): concurrent requests of deep, mixed, shallow and bare compositions, half
    streamed, each equal the request run alone, and nothing is left running or waiting afterwards."""
    compositions = ("alcohol", "alcohol,privacy", "minors", "gambling", [])
    with EdgeSafe(model_path, deep_bank, n_ctx=256, n_threads=1, seed=0, n_parallel=4) as deep_es:
        questions = (Q, "How do I get drunk fast?", "How many legs does a spider have?",
                     "What color is the sky on a clear day?")
        requests = [(q, t) for q in questions for t in compositions]
        expected = {(q, json.dumps(t)): alone_with_ties(deep_es, q, 6, t) for q, t in requests}
        # the check has teeth: the test bank's replies often open on a near-tie (an AMX Xeon: 3 of the first two
        # questions' 10 replies had a sure part, an AMD EPYC at least 5; 10 of these 20), so a quarter must be compared
        assert sum(bool(sure) for _, sure in expected.values()) >= len(expected) // 4
        app = create_app(deep_es, ServerSettings())
        engine = app.state.edge_safe.es.engine
        assert engine.n_parallel == 4

        def one(i):
            q, t = requests[i % len(requests)]
            c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
            body = dict(model="any", messages=[{"role": "user", "content": q}], max_tokens=6, extra_body={"tokens": t})
            if i % 2:
                chunks = list(c.chat.completions.create(stream=True, **body))
                return (q, json.dumps(t)), "".join(x.choices[0].delta.content or "" for x in chunks), chunks[-1].edge_safe
            reply = c.chat.completions.create(**body)
            return (q, json.dumps(t)), reply.choices[0].message.content, reply.edge_safe

        with live_server(app) as base:
            assert httpx.get(base + "/health").json()["parallel"] == 4
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(one, [7, 2, 9, 0, 4, 6, 1, 8, 3, 5, 17, 12, 19, 10, 14, 16, 11, 18, 13, 15]))
            assert engine.running == 0 and engine.waiting == 0
        for key, text, extra in results:
            assert same_as_alone(text, expected[key]), (key, text, expected[key])
            tokens = json.loads(key[1])
            cells = sum(deep_bank.tokens[n].n_vectors for n in deep_bank.resolve(tokens) if deep_bank.tokens[n].is_deep)
            assert extra.get("deep_cells", 0) == cells and extra["tokens"] == deep_es.compose(tokens)[0]


def test_a_client_that_disconnects_mid_stream_frees_the_model(url, http, es, app):
    steps = es.engine.steps  # nothing else runs meanwhile: every decode step is this request's
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": LONG}], "tokens": [], "max_tokens": 64,
                            "stream": True}) as r:
            lines = r.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(8)) if ln.startswith("data: ")]
            assert len(got) == 4 and '"content"' in got[-1]
            health = httpx.get(url + "/health").json()  # the event loop stays free during generation
            assert health["busy"] is True
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["busy"]:
        assert time.monotonic() < deadline, "the model was not freed after the client went away"
        time.sleep(0.05)
    engine = app.state.edge_safe.es.engine
    assert engine.running == 0 and engine.waiting == 0
    assert engine.steps - steps < 40  # stopped early, not run to 64 tokens
    t0 = time.monotonic()
    reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "max_tokens": 2})
    assert reply.status_code == 200 and time.monotonic() - t0 < 10


@pytest.mark.parametrize("parallel", [1, 2])
def test_requests_queue_for_the_model_and_a_full_queue_is_a_503(es, parallel):
    ask_q = {"messages": [{"role": "user", "content": Q}], "max_tokens": 2, "tokens": []}
    # 400 tokens: the held replies must still be running when the queue is checked (64 finished first in a CI run)
    long = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 400, "stream": True, "tokens": []}
    with EdgeSafe(bank=es.bank, n_ctx=512, n_batch=128, n_threads=1, n_parallel=parallel) as par, \
            live_server(create_app(par, ServerSettings(max_queue=1))) as base, \
            httpx.Client(base_url=base, timeout=60) as c, ThreadPoolExecutor(1) as pool:
        with contextlib.ExitStack() as streams:
            holders = [streams.enter_context(c.stream("POST", "/v1/chat/completions", json=long))
                       for _ in range(parallel)]
            for holding in holders:
                next(holding.iter_lines())  # each stream holds a slot
            assert c.get("/health").json()["running"] == parallel
            waiting = pool.submit(c.post, "/v1/chat/completions", json=ask_q)
            deadline = time.monotonic() + 10
            while c.get("/health").json()["queued"] < 1:
                assert time.monotonic() < deadline, "the request never queued"
                time.sleep(0.02)
            full = c.post("/v1/chat/completions", json=ask_q)
            assert full.status_code == 503 and full.json()["error"]["code"] == "server_busy"
            assert not waiting.done()
        # the held streams are closed: the queued request runs
        assert waiting.result(timeout=30).status_code == 200


def test_closing_a_stream_before_reading_frees_the_model(url, http):
    for _ in range(3):  # the response is started and dropped before the first chunk arrives
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"messages": [{"role": "user", "content": LONG}], "max_tokens": 64, "stream": True}):
                pass
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "max_tokens": 2})
    assert r.status_code == 200


# --- app factory and CLI ----------------------------------------------------------------------


def test_create_app_refuses_unknown_default_tokens(es):
    with pytest.raises(UnknownTokenError, match="did you mean 'minors'"):
        create_app(es, ServerSettings(default_tokens="minor"))


def test_serve_cli_passes_settings_to_the_app(monkeypatch, bank):
    seen = {}

    def fake_run(app, **kw):
        seen.update(kw, state=app.state.edge_safe)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(cli_serve, "load_edge_safe",
                        lambda **kw: seen.update(load=kw) or EdgeSafe(bank=bank, n_ctx=64, n_threads=1,
                                                                      n_parallel=kw["n_parallel"]))
    monkeypatch.setenv("EDGE_SAFE_API_KEY", "from-env")
    result = CliRunner().invoke(cli, ["serve", "--port", "9999", "-t", "eu", "--max-tokens-limit", "8",
                                      "--allow-negative-mode", "--default-strictness", "1.5", "--n-ctx", "64",
                                      "--threads", "1", "--parallel", "2", "--no-reread"])
    assert result.exit_code == 0, result.output
    state = seen["state"]
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9999)
    assert seen["load"] == {"model_path": None, "bank": None, "n_ctx": 64, "n_gpu_layers": 0, "n_threads": 1,
                            "n_parallel": 2, "reread": False, "readout": True,
                            "ready_next_turn": True}  # a chat client's next turn, laid out while idle
    assert state.settings.api_key.get_secret_value() == "from-env" and "from-env" not in repr(state.settings)
    assert state.default_tokens == ["privacy"] and state.settings.max_tokens_limit == 8
    assert state.settings.allow_negative_mode is True and state.settings.default_strictness == 1.5
    assert state.es.n_parallel == 2 and state.gate.slots == 2
    assert state.es.model.closed  # serve closes its runtime when the server stops
    assert "serving" in result.output and "default tokens: privacy" in result.output and "parallel: 2" in result.output

    result = CliRunner().invoke(cli, ["serve", "-t", "minor", "--n-ctx", "64"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: unknown token or profile 'minor'; did you mean")

    for bad, says in (("25", "less than or equal to 20"), ("nan", "finite number")):
        result = CliRunner().invoke(cli, ["serve", "--default-strictness", bad])
        assert result.exit_code == 2 and "--default-strictness" in result.output and says in result.output


def test_edge_safe_serve_end_to_end(tmp_path, bank):
    """The real command in a subprocess: starts, answers, stops on SIGINT."""
    bank_path = bank.save(tmp_path / "bank.gguf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EDGE_SAFE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "edge_safe.cli", "serve", "--port", str(port), "--bank",
                             str(bank_path), "--n-ctx", "256", "--threads", "1", "-t", "minors"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "edge-safe serve did not come up"
            time.sleep(0.2)
        reply = ask(openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0), max_tokens=2)
        assert reply.edge_safe["tokens"] == ["alcohol", "gambling"]
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out
    assert "edge-safe: serving" in out and "default tokens: alcohol, gambling" in out


def test_a_chat_clients_next_turn_is_laid_out_while_the_server_is_idle(model_path):
    """As `edge-safe serve` runs it (``ready_next_turn``): after each reply the server lays the conversation's
    next turn out up to its control tokens, so a client sending its history back gets only its new message
    prefilled, and the reply a fresh server gives."""
    turns = ["What's a good way to keep cut flowers fresh longer?", "Why is the sky blue?", "How do I get drunk fast?"]
    replies, prefilled, views = [], [], []
    with EdgeSafe(model_path=model_path, n_ctx=2048, n_threads=1, ready_next_turn=True) as es:
        with live_server(create_app(es, ServerSettings(api_key=KEY))) as base:
            server = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
            messages = []
            for q in turns:
                messages.append({"role": "user", "content": q})
                reply = server.chat.completions.create(model="any", messages=messages, max_tokens=12,
                                                       extra_body={"tokens": "minors,eu"})
                replies.append(reply.choices[0].message.content)
                prefilled.append(reply.timings["prompt_prefilled_n"])
                views.append(reply.edge_safe.get("reread"))
                messages.append({"role": "assistant", "content": replies[-1]})
                assert es.engine.settle(60)
            assert es.engine.readied == len(turns)
            # the first had nothing before it; the ordinary second question scored too far from refusing for its
            # view alone to matter (VIEW_WITHIN), so it was not read; the last refused in either view
            assert views[0] is None and views[1] == "skipped" and views[2] in (None, "refuse")
            for q, n in zip(turns[1:], prefilled[1:]):  # only the new message: "Question: ...\\nAnswer:"
                assert n == len(es.tokenize(es.template.render([{"role": "user", "content": q}])))
    assert replies[-1] == "Sorry, I can't help with alcohol."
    with EdgeSafe(model_path=model_path, n_ctx=2048, n_threads=1) as fresh:
        out = fresh.create_chat_completion(messages[:-1], tokens="minors,eu", max_tokens=12)
        assert out["choices"][0]["message"]["content"] == replies[-1]
        assert out["timings"]["prompt_prefilled_n"] > 3 * prefilled[-1]
