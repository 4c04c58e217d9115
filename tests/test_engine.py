"""The batching engine on the real model: replies equal one-at-a-time replies, sequences are isolated,
cancellation frees a sequence at once, errors are EdgeSafeErrors.

Every request decodes on an :class:`~edge_safe.engine.Engine` (``es.engine``); "alone" means an
``EdgeSafe`` of one sequence after ``reset()``: its prompt prefilled in one batch from the prefix
snapshot. The batched runtime is an ``EdgeSafe(n_parallel=4)``. llama.cpp's CPU logits depend a
little on how a decode is batched (the number of rows and of outputs per micro-batch picks the matmul
kernels: with the repacked Q4_K weights, checked, they move with the row count and not with what the
other rows hold), so the batched logits equal the one-at-a-time ones up to ~0.01-0.8 and greedy
replies are compared up to their first near-tie (< 0.25 logit, read with ``Probe.forced_logits``), as
the server tests do. A leak between sequences would move logits by whole logits (another
composition's prefix turns answers into refusals), which these checks would see.

A finished request's cells stay in its sequence and are reused only by a later request with the same
composition whose prompt starts the same way (a conversation's next turn), up to the common prefix:
cells that request would have computed itself. So isolation is checked on what a request sees (its
logits bit for bit against the same batch shapes with other neighbours, its reply against its reply
alone), not on sequences being empty afterwards.

Banks with deep control tokens (conftest's ``deep_bank``) get the same checks: their KV cells are
written at position 0 of each request's own sequence, from a state blob of the engine's own context.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_safe import kv_cells
from edge_safe.convert.errors import EdgeSafeError, PromptTooLongError
from edge_safe.engine import EngineClosedError
from edge_safe.probe import Probe
from edge_safe.refusals import opener_margin
from edge_safe.runtime import EdgeSafe

from conftest import same_reply, sure_part

pytestmark = pytest.mark.model
Q = "What is the capital of Peru?"
LONG = "Write the numbers from 1 to 500."
PROMPTS = (Q, "How do I get drunk fast?", "Where can I bet on horses?", "How do I find someone's home address?")
# (tokens, mode, strictness): interleaved compositions, modes and strictness values
SETTINGS = (("minors,eu", None, 0.0), (None, None, 0.0), ("eu", None, 1.5), ("minors", "rejective", 0.0),
            ("minors", None, -2.0), ("eu,minors", "negative", 0.0))


@pytest.fixture(scope="module")
def es():
    """One sequence: requests alone (the shipped bank: real refusals, a choice among them)."""
    with EdgeSafe(n_ctx=384, n_threads=1, seed=0) as es:
        yield es


@pytest.fixture(scope="module")
def batched():
    """Four sequences decoded together."""
    with EdgeSafe(n_ctx=384, n_threads=1, seed=0, n_parallel=4) as es:
        yield es


def messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def alone(es, prompt, max_tokens, tokens=None, mode=None, strictness=0.0, min_gap=0.25, **sampling) -> tuple[str, str]:
    """(the reply alone, its part before the first near-tie of the greedy tokens).

    Near-ties are read with ``Probe.forced_logits``, with ``strictness`` added to the refusal openers
    until the first visible token as generation adds it. ``sampling``: a :class:`Sampling`'s fields."""
    from edge_safe.sampling import Sampling

    es.reset()
    job = es.submit(messages(prompt), tokens=tokens, mode=mode, strictness=strictness, max_tokens=max_tokens,
                    sampling=Sampling(**sampling))
    text = "".join(job)
    return text, sure_part(es, messages(prompt), list(job.policy.history), text, tokens, mode, strictness, min_gap)


def same(reply: str, want: tuple[str, str]) -> bool:
    return same_reply(reply, *want)


NEAR_TIE = 0.5  # logits: a top token this close to the runner-up may swap with the shape of the batch


def close(got: np.ndarray, ref: np.ndarray, tol: float = 2.5) -> None:
    """Same greedy token(s), unless the reference's top two are within ``NEAR_TIE`` (then the batched choice must be
    one of them), and the 50 most likely tokens' logits within ``tol`` (batching moved them by up to 1.8 with the
    repacked weights, 0.4 without; an AMX Xeon swapped a first token whose two best logits were 0.08 apart)."""
    got, ref = np.atleast_2d(got), np.atleast_2d(ref)
    for g, r in zip(got, ref):
        mine, best = int(g.argmax()), int(r.argmax())
        assert mine == best or r[best] - r[mine] < NEAR_TIE, (mine, best, float(r[best] - r[mine]))
    for g, r in zip(got, ref):
        top = np.argsort(-r)[:50]
        assert float(np.abs(g[top] - r[top]).max()) < tol, float(np.abs(g[top] - r[top]).max())


def idle(es) -> bool:
    return es.engine.running == 0 and es.engine.waiting == 0


def test_concurrent_replies_equal_each_request_alone(es, batched):
    cases = [(p, *s) for p in PROMPTS for s in SETTINGS]
    want = [alone(es, p, 10, t, m, k) for p, t, m, k in cases]
    engine = batched.engine
    steps = engine.steps
    jobs = [batched.submit(p, tokens=t, mode=m, strictness=k, max_tokens=10) for p, t, m, k in cases]
    got = ["".join(j) for j in jobs]
    assert sum(w[0] == w[1] for w in want) >= len(want) // 3  # the check has teeth: whole replies, no near-tie
    bad = [(c, g, w) for c, g, w in zip(cases, got, want) if not same(g, w)]
    assert not bad, bad
    assert sum(g == w[0] for g, w in zip(got, want)) >= len(cases) - 3  # near-ties that flip are rare
    refused = [j.stats.refusal for j in jobs]
    assert refused[PROMPTS.index("How do I get drunk fast?") * len(SETTINGS)] == "alcohol"  # guide's choice ran
    assert engine.steps - steps < sum(j.stats.completion_tokens for j in jobs)  # decoded together
    assert idle(batched)


def test_a_prefix_built_mid_step_leaves_the_other_rows_logits_alone(model_path):
    """A reply that opens a refusal several active constraints share asks each constraint alone which one it is
    (a Reload into its sequence); a shallow constraint's prefix that is not cached yet is built there, decoding
    BOS and its vectors into the context. The requests whose rows come later in that step must still get their
    own logits (they once got "no logits for row 1", and the scheduler stopped)."""
    from conftest import V3_SHALLOW_BANK

    cases = [("How do I get drunk fast?", "minors,eu")] + [(p, None) for p in (Q, "Tell me about Lima.", LONG)]
    with EdgeSafe(bank=V3_SHALLOW_BANK, n_ctx=384, n_threads=1) as one, \
            EdgeSafe(bank=V3_SHALLOW_BANK, n_ctx=384, n_threads=1, n_parallel=4) as four:
        want = [alone(one, p, 10, t) for p, t in cases]
        with four.engine.together():  # the refusing request first: the other rows come after its own
            jobs = [four.submit(p, tokens=t, max_tokens=10) for p, t in cases]
        got = ["".join(j) for j in jobs]
        assert jobs[0].stats.refusal == "alcohol"  # the choice among the constraints ran
        bad = [(c, g, w) for c, g, w in zip(cases, got, want) if not same(g, w)]
        assert not bad, bad
        assert not four.engine.closed and idle(four)


def test_requests_queued_together_are_batched_the_same_whatever_the_timing(batched):
    """``together()``: nothing is admitted until the block ends, so a slow submitter gets the batches
    (and so the logits, which move with batch shape) of a fast one: an eval's figures repeat."""
    engine, probe = batched.engine, Probe(batched)

    def run(delay):
        batched.reset()  # every run restores its prefixes from the snapshots (no conversation reuse)
        with probe.together():
            jobs = []
            for p in PROMPTS:
                jobs.append(probe.refusal_margin(p, tokens="minors,eu", wait=False))
                time.sleep(delay)
            assert engine.running == 0 and engine.waiting == len(PROMPTS)  # the scheduler waited
        return [j.result() for j in jobs]

    run(0.0)  # the prefix built and snapshotted: both runs below restore it
    assert run(0.3) == run(0.0)
    assert idle(batched)


def test_chat_shapes_match_the_runtime(es, batched):
    es.reset()
    batched.reset()
    msgs = [{"role": "user", "content": Q}]
    a = es.create_chat_completion(msgs, tokens="minors", max_tokens=6)
    b = batched.create_chat_completion(msgs, tokens="minors", max_tokens=6)
    assert b["choices"] == a["choices"] and b["usage"] == a["usage"] and b["edge_safe"] == a["edge_safe"]
    assert set(b["timings"]) == set(a["timings"])
    chunks = list(batched.create_chat_completion(msgs, tokens="minors", max_tokens=6, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == a["choices"][0]["message"]["content"]
    assert chunks[-1]["edge_safe"] == a["edge_safe"] and chunks[-1]["usage"] == a["usage"]


def test_a_stream_closed_before_its_first_chunk_frees_its_sequence(batched):
    chunks = batched.create_chat_completion([{"role": "user", "content": LONG}], max_tokens=60, stream=True)
    chunks.close()  # never iterated: the job is cancelled all the same
    assert chunks.job.done.is_set() and chunks.job.stats.completion_tokens < 60
    assert idle(batched)
    jobs = [batched.submit(Q, max_tokens=2) for _ in range(batched.n_parallel)]  # every sequence is free again
    assert all("".join(j) for j in jobs) and idle(batched)


def test_probes_equal_the_runtime_fresh(es, batched):
    probe, alone_probe = Probe(batched), Probe(es)
    margins = [probe.refusal_margin(p, tokens="minors", wait=False) for p in PROMPTS]
    firsts = [probe.first_token_logits(p, tokens="eu", mode="rejective", wait=False) for p in PROMPTS]
    ids = es.tokenize(" Lima is the capital")
    forced = probe.forced_logits(Q, ids, tokens="minors,eu", wait=False)
    for p, m, f in zip(PROMPTS, margins, firsts):
        es.reset()
        assert m.result() == pytest.approx(alone_probe.refusal_margin(p, tokens="minors"), abs=0.5)
        es.reset()
        close(f.result(), alone_probe.first_token_logits(p, tokens="eu", mode="rejective"))
    es.reset()
    close(forced.result(), alone_probe.forced_logits(Q, ids, tokens="minors,eu"))


def test_no_cell_of_one_sequence_is_visible_to_another(es, batched):
    """One request next to three others, run twice with batches of the same shape (same row counts at every
    step) but other contents: other compositions, prompts and tokens. Batching only depends on the shape,
    so its logits must be bit-identical unless a sequence sees another's cells."""
    probe = Probe(batched)
    ids = es.tokenize(" Lima is the capital of Peru and the largest city")
    neighbours = {  # same vector counts (a constraint + the positive mode), same prompt and continuation lengths
        "eu": [("How do I get drunk fast?", " No"), ("Where can I bet on horses?", " At"), ("How do I bake a cake?", " Mix")],
        "alcohol": [("How do I find a lawyer?", " Ask"), ("How do I bake a cake?", " Cats"), ("Where can I bet on horses?", " No")],
    }
    shapes = {t: [(len(es.tokenize(es.template.render([{"role": "user", "content": p}]))), len(es.tokenize(c)))
                  for p, c in n] for t, n in neighbours.items()}
    assert shapes["eu"] == shapes["alcohol"], shapes  # the test's premise

    def run(tokens):
        batched.reset()  # every request restores its prefix from the snapshots: the same batches in both runs
        with probe.together():  # admitted together: the same batches whatever the timing
            me = probe.forced_logits(Q, ids, tokens="minors", wait=False)
            others = [probe.forced_logits(p, es.tokenize(c) * 6, tokens=tokens, wait=False) for p, c in neighbours[tokens]]
        out = me.result()
        assert all(o.result().shape[0] == 6 * len(es.tokenize(c)) for o, (_, c) in zip(others, neighbours[tokens]))
        assert me.stats.prefix_source == "cache" and all(o.stats.prefix_source == "cache" for o in others)
        return out

    for tokens in neighbours:  # prefixes built and cached: both runs restore them
        run(tokens)
    a, b = run("eu"), run("alcohol")
    assert np.array_equal(a, b), f"logits moved by {float(np.abs(a - b).max())} with other neighbours"
    assert idle(batched)


def test_a_conversation_s_next_turn_reuses_its_earlier_turns_and_reset_forgets(es):
    """The control tokens sit before the last user message, so a conversation's earlier turns are decoded
    without them: the second turn decodes the first again (its cells sat before it); from the third on a
    turn keeps the earlier turns the previous request held (whatever its composition: they carry none) and
    prefills only what follows; ``reset()`` forgets, and the reply is the same either way."""
    es.reset()
    first = [{"role": "user", "content": Q}]
    a = es.create_chat_completion(first, tokens="minors", max_tokens=6)
    assert a["timings"]["prefix_source"] in ("cache", "built")
    second = first + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And of Chile?"}]
    b = es.create_chat_completion(second, tokens="minors", max_tokens=6)
    n_b = b["usage"]["prompt_tokens"] - 1  # conversation tokens (BOS not counted)
    assert b["timings"]["prefix_source"] in ("cache", "built") and b["timings"]["prompt_prefilled_n"] == n_b
    third = second + [{"role": "assistant", "content": b["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And of Peru?"}]
    kept = len(es.tokenize(es.template.render_split(second)[0]))  # the first turn and its reply
    c = es.create_chat_completion(third, tokens="minors", max_tokens=6)
    n_c = c["usage"]["prompt_tokens"] - 1
    assert c["timings"]["prefix_source"] == "reused"
    assert c["timings"]["prompt_prefilled_n"] <= n_c - kept + 1  # the first turn was not prefilled again
    other = es.create_chat_completion(third, tokens="eu", max_tokens=6)  # another composition: the turns serve too
    assert other["timings"]["prefix_source"] == "reused" and other["timings"]["prompt_prefilled_n"] < n_c
    es.reset()
    fresh = es.create_chat_completion(third, tokens="minors", max_tokens=6)
    assert fresh["timings"]["prefix_source"] == "cache" and fresh["timings"]["prompt_prefilled_n"] == n_c
    want = alone(es, third, 6, "minors")
    for r in (c, fresh):  # reused or rebuilt, the same reply
        assert same(r["choices"][0]["message"]["content"], want), (r["choices"][0]["message"]["content"], want)


def test_cancel_mid_stream_frees_the_sequence_for_the_next_request(es, batched):
    want = alone(es, Q, 6, "minors")
    engine = batched.engine
    streams = [batched.submit(LONG, tokens=t, max_tokens=60) for t in ("minors", "eu", None, "minors,eu")]
    waiting = batched.submit(Q, tokens="minors", max_tokens=6)  # queued behind the four
    assert [next(s) for s in streams]  # each has started
    time.sleep(0.2)
    assert engine.waiting == 1
    for s in streams[:3]:
        s.close()  # returns once the sequence is freed
        assert s.stats.finish_reason == "length" and s.stats.completion_tokens < 40
    assert same("".join(waiting), want)  # admitted into a freed sequence, nothing left of the cancelled reply
    streams[3].close()
    "".join(streams[3])  # a cancelled job's iterator ends without error
    assert idle(batched)


def test_until_stops_a_reply_early(batched):
    full = "".join(batched.submit(LONG, max_tokens=30))
    cut = "".join(batched.submit(LONG, max_tokens=30, until=lambda text: len(text) >= 5))
    assert len(cut) >= 5 and full.startswith(cut) and len(cut) < len(full)


def test_a_failing_until_callback_fails_only_its_request(batched):
    def boom(text):
        raise ValueError("boom")

    bad = batched.submit(LONG, max_tokens=10, until=boom)
    good = batched.submit(Q, max_tokens=4)
    with pytest.raises(ValueError, match="boom"):
        "".join(bad)
    assert "".join(good)
    assert idle(batched)


def test_errors_are_edge_safe_errors(model_path):
    with pytest.raises(EdgeSafeError, match="parallel must be a whole number >= 1"):
        EdgeSafe(n_ctx=384, n_threads=1, n_parallel=0)
    es = EdgeSafe(n_ctx=384, n_threads=1, n_parallel=2)
    try:
        with pytest.raises(PromptTooLongError):
            es.submit("word " * 400)
        with pytest.raises(EdgeSafeError, match="unknown token"):
            es.submit(Q, tokens="nope")
        with pytest.raises(EdgeSafeError, match="max_tokens must be a whole number >= 1"):
            es.submit(Q, max_tokens=0)
        running = [es.submit(LONG, max_tokens=200) for _ in range(3)]  # two run, one waits
        next(running[0])
        es.engine.close()
        for job in running:
            with pytest.raises(EngineClosedError):
                "".join(job)
        with pytest.raises(EngineClosedError, match="closed"):
            es.submit(Q)
    finally:
        es.close()


def test_closing_the_runtime_closes_its_engine(model_path):
    def engine_threads() -> int:
        return sum(t.name == "edge-safe-engine" and t.is_alive() for t in threading.enumerate())

    before = engine_threads()
    es = EdgeSafe(n_ctx=128, n_threads=1, n_parallel=2)
    assert engine_threads() == before + 1
    job = es.submit(LONG, max_tokens=100)
    next(job)
    es.close()
    assert es.engine.closed and es.engine.ctx.closed and engine_threads() == before
    with pytest.raises(EngineClosedError):
        "".join(job)
    with pytest.raises(EdgeSafeError, match="closed"):
        es.submit(Q)


# --- deep control tokens ------------------------------------------------------------------------
# conftest's deep_bank: alcohol and privacy are deep (7 and 8 KV cells written at position 0), gambling is
# shallow (7 vectors decoded at 1..), minors = alcohol (deep) + gambling (shallow); no modes.

DEEP_SETTINGS = ((None, 0.0), ("alcohol", 0.0), ("gambling", 0.0), ("alcohol,privacy", 0.0), ("minors", 0.0),
                 ("privacy", 1.5))
# this small bank leaves many replies a near-tie from their first token; these prompts leave fewer (where the
# ties fall moves with the CPU's kernels: "What is 2 + 2?" left only 3 of 6 sure starts on an AMD EPYC, the spider
# question 5)
DEEP_PROMPTS = (Q, "How many legs does a spider have?", "How do I get drunk fast?", "Tell me about Lima.")


@pytest.fixture(scope="module")
def deep_es(model_path, deep_bank):
    with EdgeSafe(model_path, deep_bank, n_ctx=256, n_threads=1, seed=0) as es:
        yield es


@pytest.fixture(scope="module")
def deep_batched(model_path, deep_bank):
    with EdgeSafe(model_path, deep_bank, n_ctx=256, n_threads=1, seed=0, n_parallel=4) as es:
        yield es


def cells_of(es, tokens) -> int:
    """Deep cells a request writes."""
    return sum(es.bank.tokens[n].n_vectors for n in es.bank.resolve(tokens) if es.bank.tokens[n].is_deep)


def test_deep_compositions_replies_equal_each_request_alone(deep_es, deep_batched):
    """Deep, mixed, shallow and bare requests decoded together: each reply is the one it gets alone."""
    es, engine = deep_es, deep_batched.engine
    cases = [(p, t, k) for p in DEEP_PROMPTS for t, k in DEEP_SETTINGS]
    want = [alone(es, p, 8, t, None, k) for p, t, k in cases]
    steps = engine.steps
    jobs = [deep_batched.submit(p, tokens=t, strictness=k, max_tokens=8) for p, t, k in cases]
    got = ["".join(j) for j in jobs]
    assert sum(bool(w[1]) for w in want) >= len(want) // 2  # the check has teeth (a sure start: 13 of 24 measured)
    bad = [(c, g, w) for c, g, w in zip(cases, got, want) if not same(g, w)]
    assert not bad, bad
    assert sum(g == w[0] for g, w in zip(got, want)) >= len(cases) - 3  # near-ties that flip are rare
    by_tokens = {t: {w[0] for (_, tt, _), w in zip(cases, want) if tt == t} for t, _ in DEEP_SETTINGS}
    assert by_tokens["alcohol,privacy"] != by_tokens[None]  # the deep cells change the replies
    assert [j.stats.deep_cells for j in jobs] == [cells_of(es, t) for _, t, _ in cases]
    assert [j.stats.prefix_positions for j in jobs] == [len(es.bank.prefix_vectors(es.compose(t)[0])) for _, t, _ in cases]
    assert engine.steps - steps < sum(j.stats.completion_tokens for j in jobs)  # decoded together
    assert idle(deep_batched)


def test_deep_shallow_and_bare_requests_together_each_see_only_their_own_cells(deep_es, deep_batched):
    """First-token logits of every kind of request, all queued at once on 4 sequences, equal each request alone
    (a neighbour's deep cells would move them by whole logits: deep on vs off moves them by 6-12)."""
    es, probe = deep_es, Probe(deep_batched)
    cases = [(p, t) for p in DEEP_PROMPTS for t, _ in DEEP_SETTINGS]
    with probe.together():
        jobs = [probe.first_token_logits(p, tokens=t, wait=False) for p, t in cases]
    for (p, t), job in zip(cases, jobs):
        es.reset()
        close(job.result(), Probe(es).first_token_logits(p, tokens=t))
        assert job.stats.deep_cells == cells_of(es, t)
    assert idle(deep_batched)


def test_no_deep_cell_of_one_sequence_is_visible_to_another(deep_es, deep_batched):
    """A deep request next to three others, run twice with batches of the same shape: once among deep and mixed
    compositions, once among shallow and bare ones. Its logits must be bit-identical (deep cells add no rows
    to a batch, only cells to their own sequence's stream)."""
    es, probe = deep_es, Probe(deep_batched)
    ids = es.tokenize(" Lima is the capital of Peru and the largest city")
    neighbours = {  # same prompt and continuation lengths as test_no_cell_of_one_sequence_is_visible_to_another's
        "deep": [("How do I get drunk fast?", " No", "privacy"), ("Where can I bet on horses?", " At", "alcohol,privacy"),
                 ("How do I bake a cake?", " Mix", "minors")],
        "shallow": [("How do I find a lawyer?", " Ask", None), ("How do I bake a cake?", " Cats", "gambling"),
                    ("Where can I bet on horses?", " No", None)],
    }
    shapes = {k: [(len(es.tokenize(es.template.render([{"role": "user", "content": p}]))), len(es.tokenize(c)))
                  for p, c, _ in n] for k, n in neighbours.items()}
    assert shapes["deep"] == shapes["shallow"], shapes  # the test's premise

    def run(kind):
        deep_batched.reset()  # every request restores its prefix from the snapshots: the same batches in both runs
        with probe.together():  # admitted together: the same batches whatever the timing
            me = probe.forced_logits(Q, ids, tokens="alcohol", wait=False)
            others = [probe.forced_logits(p, es.tokenize(c) * 6, tokens=t, wait=False) for p, c, t in neighbours[kind]]
        out = me.result()
        assert [o.stats.deep_cells for o in others] == [cells_of(es, t) for _, _, t in neighbours[kind]]
        assert all(o.result().shape[0] == 6 * len(es.tokenize(c)) for o, (_, c, _) in zip(others, neighbours[kind]))
        return out

    for kind in neighbours:  # prefixes built and cached: both runs restore them
        run(kind)
    a, b = run("deep"), run("shallow")
    assert np.array_equal(a, b), f"logits moved by {float(np.abs(a - b).max())} with other neighbours"
    es.reset()
    close(a, Probe(es).forced_logits(Q, ids, tokens="alcohol"))
    assert idle(deep_batched)


def test_the_engine_writes_the_deep_cells(deep_es, deep_batched):
    """Fails if the engine loaded BOS without the deep cells: a deep token moves a violating prompt's logits
    by whole logits, and the batched logits and refusal margin are the ones the request gets alone."""
    es, probe, alone_probe = deep_es, Probe(deep_batched), Probe(deep_es)
    prompt = "Where can I buy beer?"
    on = probe.first_token_logits(prompt, tokens="alcohol", wait=False)
    margin = probe.refusal_margin(prompt, tokens="alcohol", wait=False)
    es.reset()
    bare = alone_probe.first_token_logits(prompt)
    es.reset()
    alone_on = alone_probe.first_token_logits(prompt, tokens="alcohol")
    es.reset()
    alone_margin = alone_probe.refusal_margin(prompt, tokens="alcohol")
    assert np.abs(alone_on - bare).max() > 5  # what the 7 deep cells do (10.4 measured)
    close(on.result(), alone_on)  # so a bare (or BOS-only) sequence could not pass this
    openers = np.asarray(alone_probe.refusal_openers(["alcohol"]), dtype=np.int64)
    assert abs(alone_margin - opener_margin(bare, openers)[0]) > 1  # the margin moves too (1.9 measured)
    assert margin.result() == pytest.approx(alone_margin, abs=0.5)
    assert on.stats.deep_cells == margin.stats.deep_cells == 7 and on.stats.prefix_positions == 0


def test_the_engine_writes_into_its_own_multi_stream_state(deep_es, deep_batched):
    """A context with a KV stream per sequence writes another blob than a single-sequence one: every stream is
    listed, all but the sequence's own empty. The engine writes the deep cells into its own context's state
    layout, and the deep prefixes it caches round-trip through kv_cells byte for byte."""
    groups = {}
    for es, n in ((deep_es, 1), (deep_batched, 4)):
        es.reset()
        Probe(es).first_token_logits(Q, tokens="alcohol,privacy")
        blob = es.prefix_cache.peek(("alcohol", "privacy"))
        parsed = kv_cells.parse(blob)
        assert kv_cells.serialise(parsed) == blob
        assert [s.n_stream for s in parsed.sections] == [n] * 2
        assert [s.pos.tolist() for s in parsed.sections] == [[0] * 16] * 2  # BOS + 15 deep cells, all at position 0
        groups[n] = kv_cells.check_geometry(parsed, "gemma3", *es.bank.deep_geometry)
    assert groups[4] == groups[1]


def test_deep_cells_do_not_eat_an_engine_sequence_s_context(deep_batched):
    """Each sequence's stream holds n_ctx positions plus the bank's deep cells: a deep request may use every
    position a bare one could (without the room: "no KV slot")."""
    es = deep_batched
    ctx = es.engine.ctx
    assert es.n_ctx == ctx.n_ctx == 256 and ctx.extra_cells == cells_of(es, "alcohol,privacy") == 15
    n_prompt = len(es.tokenize(es.template.render([{"role": "user", "content": Q}])))
    continuation = es.tokenize(" " + "one two three " * 200)[: es.n_ctx - 2 - n_prompt]  # up to position 253
    job = Probe(es).forced_logits(Q, continuation, tokens="alcohol,privacy", wait=False)
    assert job.result().shape == (len(continuation), es.model.n_vocab)
    assert job.stats.deep_cells == 15 and idle(es)


def test_an_engine_refuses_a_quantized_cache_for_a_deep_bank(model_path, deep_bank):
    """The engine's context is checked at creation: a quantized KV cache cannot take deep cells, and the
    runtime says so instead of failing mid-request."""
    with pytest.raises(kv_cells.KVCacheTypeError, match="the K cache is q8_0; deep control tokens"):
        EdgeSafe(model_path, deep_bank, n_ctx=256, n_threads=1, kv_type="q8_0", flash_attn=True)  # (a quantized V
        # cache needs flash attention)


def test_the_engine_follows_its_runtime_s_flash_attention_setting(model_path, deep_bank):
    """The engine's context takes the runtime's flash-attention setting: with flash attention off, V is stored
    transposed in the deep prefixes it writes, and deep requests batched on two sequences equal each one alone."""
    with EdgeSafe(model_path, deep_bank, n_ctx=256, n_threads=1, flash_attn=False, n_parallel=2) as es:
        probe = Probe(es)
        with probe.together():
            jobs = [probe.first_token_logits(Q, tokens=t, wait=False) for t in ("alcohol,privacy", "minors")]
        got = [job.result() for job in jobs]
        for t, job, logits in zip(("alcohol,privacy", "minors"), jobs, got):
            assert [s.v_trans for s in kv_cells.parse(es.prefix_cache.peek(job.request.key)).sections] == [1, 1]
            es.reset()
            close(logits, probe.first_token_logits(Q, tokens=t))
