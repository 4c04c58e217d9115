"""A bounded load test: 500 requests, 16 at a time, 30 % of them malformed and 10 % streams whose client
disconnects after the first piece, against a live server on 127.0.0.1 whose EdgeSafe batches 8 at once (n_parallel=8).

Checks: no crash, no 5xx, every valid reply equal to the same request run alone up to that
run's first near-tie (compositions interleave in one batch without leaking; see
``test_server.alone_with_ties``), every invalid one a 4xx
in OpenAI's error shape, the queue drained afterwards, and bounded memory.
"""
from __future__ import annotations

import json
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edge_safe.runtime import EdgeSafe
from edge_safe.server import create_app
from edge_safe.server.schema import ServerSettings
from test_server import alone_with_ties, live_server, same_as_alone, small_bank

pytestmark = pytest.mark.model
KEY = "load-key"
N_REQUESTS, CONCURRENCY, PARALLEL, MAX_TOKENS = 500, 16, 8, 3
COMPOSITIONS = (("minors", None), ([], None), ("eu", "rejective"), ("eu,minors", None))
BAD = [  # (body or raw bytes, headers override, expected status)
    (b'{"messages": [{"role": "user", "content": "hi"}', None, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "tokens": "nope"}, None, 400),
    ({"messages": [], "max_tokens": 2}, None, 400),
    ({"messages": [{"role": "user", "content": 7}]}, None, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99}, None, 400),
    ({"messages": [{"role": "user", "content": "x" * 20_000}]}, None, 413),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"Authorization": "Bearer wrong"}, 401),
    ({"messages": [{"role": "user", "content": "hi"}], "mode": "negative"}, None, 403),
    ({"messages": [{"role": "user", "content": "tell me more " * 300}], "max_tokens": 2}, None, 400),
]


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


@pytest.fixture(scope="module")
def es(model_path):
    with EdgeSafe(bank=small_bank(model_path), n_ctx=512, n_batch=128, n_threads=1, seed=0,
                  n_parallel=PARALLEL) as es:
        yield es


def test_bounded_load_with_malformed_requests(es):
    settings = ServerSettings(api_key=KEY, max_tokens_limit=4, max_body_bytes=16 * 1024)
    app = create_app(es, settings)
    prompts = ("What is the capital of Peru?", "How do I mix a mojito?")
    expected = {
        (p, json.dumps(t), m): alone_with_ties(es, p, MAX_TOKENS, t, m) for p in prompts for t, m in COMPOSITIONS
    }
    assert sum(bool(sure) for _, sure in expected.values()) >= len(expected) // 2  # the check has teeth

    mismatches = []

    def check(text: str, want: tuple[str, str], key) -> bool:
        if same_as_alone(text, want):
            return True
        mismatches.append((key, text, want))
        return False

    def request(client: httpx.Client, i: int) -> tuple[bool, int, object]:
        """Request ``i``: (valid?, status, reply text equals the request run alone | the status wanted)."""
        if i % 10 >= 7:  # 30 % malformed, of every kind
            body, headers, want = BAD[(i // 10 * 3 + i % 10 - 7) % len(BAD)]
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post("/v1/chat/completions", content=raw, headers=headers)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
            return False, r.status_code, want
        prompt, (tokens, mode) = prompts[i % 2], COMPOSITIONS[(i // 2) % len(COMPOSITIONS)]
        want = expected[(prompt, json.dumps(tokens), mode)]
        body = {"tokens": tokens, "mode": mode, "max_tokens": MAX_TOKENS}
        if i % 10 == 6:  # a client that goes away after the first piece
            chat = {**body, "messages": [{"role": "user", "content": prompt}], "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=chat) as r:
                for line in r.iter_lines():
                    if '"content"' in line:
                        break
            return None, r.status_code, None
        if i % 3 == 0:  # completions
            r = client.post("/v1/completions", json={"prompt": prompt, **body})
            return True, r.status_code, r.status_code == 200 and check(r.json()["choices"][0]["text"], want, (prompt, tokens, mode))
        body["messages"] = [{"role": "user", "content": prompt}]
        if i % 3 == 1:  # streamed
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
            if r.status_code != 200 or events[-1] != "[DONE]":
                return True, r.status_code, False
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
            return True, 200, check(text, want, (prompt, tokens, mode))
        r = client.post("/v1/chat/completions", json=body)
        return True, r.status_code, r.status_code == 200 and check(r.json()["choices"][0]["message"]["content"], want,
                                                                   (prompt, tokens, mode))

    with live_server(app) as url, httpx.Client(base_url=url, timeout=120,
                                               headers={"Authorization": f"Bearer {KEY}"}) as client:
        for i in range(10):  # warm-up: every path once, so the baseline holds what steady state needs
            request(client, i)
        rss_before, threads_before = peak_rss_mb(), threading.active_count()
        t0 = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda i: request(client, i), range(N_REQUESTS)))
        elapsed = time.monotonic() - t0
        engine = es.engine
        # every sequence freed: a client that went away is cancelled at the scheduler's next step, which may come
        # just after the last reply returned, so the server reports idle only once the engine has settled
        assert engine.settle(timeout=30) and engine.running == engine.waiting == 0
        # the gate of a streamed request whose client went away is released once the server notices the disconnect
        deadline = time.monotonic() + 30
        while (health := httpx.get(url + "/health").json())["busy"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.n_parallel == PARALLEL and health["parallel"] == PARALLEL

    assert all(status < 500 for _, status, _ in results), sorted({status for _, status, _ in results})
    valid = [(status, same) for ok, status, same in results if ok]
    assert len(valid) == 300 and all(status == 200 for status, _ in valid), [v for v in valid if v[0] != 200][:3]
    gone = [status for ok, status, _ in results if ok is None]
    assert len(gone) == 50 and set(gone) == {200}
    assert all(same for _, same in valid), ("a reply under load differs from the same request run alone",
                                            mismatches[:3])
    assert all(status == want for ok, status, want in results if ok is False)
    assert health["busy"] is False and health["queued"] == 0 and health["running"] == 0
    assert not engine.closed  # the caller owns the runtime: the app leaves it open when the server stops
    after = es.create_chat_completion([{"role": "user", "content": prompts[0]}], max_tokens=MAX_TOKENS)
    assert after["choices"][0]["finish_reason"] in ("stop", "length")
    assert engine.prefix_cache.nbytes <= engine.prefix_cache.max_bytes
    assert peak_rss_mb() - rss_before < 100, f"peak RSS grew by {peak_rss_mb() - rss_before:.0f} MB"
    assert threading.active_count() <= threads_before + 2
    assert es.prefix_cache.nbytes <= es.prefix_cache.max_bytes
    print(f"{N_REQUESTS} requests, {CONCURRENCY} concurrent, {PARALLEL} batched: {elapsed:.1f}s, "
          f"peak RSS {peak_rss_mb():.0f} MB, {engine.steps} decode steps")
