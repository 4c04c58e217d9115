"""EdgeSafe on the real bundled model (Gemma 3 270M Q4_K_M) with a from-text test bank.

One model per module, small n_ctx / n_batch, short generations: the suite runs
on 2 shared CPU cores. n_batch is 64 so that both the `minors,eu` prefix (ten rule
lines, well over 64 positions) and long prompts exercise chunked decoding.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import complete, probed, reply
from edge_safe.convert.bank import TokenBank, from_text_bank, from_text_token
from edge_safe.convert.errors import EdgeSafeError, PromptTooLongError, UnknownTokenError
from edge_safe.convert.layout import QA_TEMPLATE, clean_reply
from edge_safe.convert.model import ModelInfo
from edge_safe.decode import StopFilter
from edge_safe.llama import Context
from edge_safe.probe import Probe
from edge_safe.runtime import EdgeSafe
from edge_safe.sampling import Sampling
from edge_safe.training.categories import CATEGORIES, MODES, PROFILES

pytestmark = pytest.mark.model
N_CTX, N_BATCH = 512, 64
MODE_TEXT = {"positive": "Answer helpfully.", "negative": "Answer anything."}  # modes without a rule


def text_bank(info: ModelInfo, tokenize, modes: bool = True) -> TokenBank:
    """Every category (and mode) as the embedding rows of its rule line: a `from-text` bank."""
    toks = [from_text_token(info, tokenize, c.name, c.rule, description=c.description, refusal=c.refusal)
            for c in CATEGORIES]
    if modes:
        toks += [from_text_token(info, tokenize, m.name, m.rule or MODE_TEXT[m.name], kind="mode",
                                 description=m.description, refusal=m.refusal) for m in MODES]
    return from_text_bank(info, toks, {k: list(v) for k, v in PROFILES.items()})


@pytest.fixture(scope="module")
def info(model_path) -> ModelInfo:
    return ModelInfo.read(model_path)


@pytest.fixture(scope="module")
def bank(info) -> TokenBank:
    with Context.load(info.path, n_ctx=64) as llm:
        return text_bank(info, llm.tokenize)


@pytest.fixture(scope="module")
def es(bank):
    with EdgeSafe(bank=bank, n_ctx=N_CTX, n_batch=N_BATCH, seed=0) as es:
        yield es


@pytest.fixture(scope="module")
def probe(es) -> Probe:
    return Probe(es)


Q = "What is the capital of Peru?"


def first_logits(probe: Probe, prompt, **kw):
    """The first reply token's logits and the probe request's stats."""
    return probed(probe.first_token_logits(prompt, wait=False, **kw))


def pieces(es: EdgeSafe, prompt: str, **kw) -> list[str]:
    """The text pieces of a streamed ``create_completion`` (the final, empty chunk left out)."""
    return [c["choices"][0]["text"] for c in es.create_completion(prompt, stream=True, **kw) if c["choices"][0]["text"]]


# --- injection is exact -------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 5, 11])
def test_injected_token_rows_reproduce_the_text_path(es, info, split):
    """[BOS] + token_embd[ids]*sqrt(n_embd) as embeddings == the same ids as tokens (same batch split)."""
    ids = es.tokenize(QA_TEMPLATE.prompt(Q))
    head, tail = ids[:split], ids[split:]

    with Context(es.model, N_CTX, n_batch=N_BATCH) as llm:  # a context of its own on the runtime's model

        def run(decode_head):
            llm.clear()
            llm.decode_tokens([llm.bos], 0, want_logits=False)
            decode_head()
            llm.decode_tokens(tail, 1 + len(head))
            return llm.logits().copy()

        text = run(lambda: llm.decode_tokens(head, 1, want_logits=False))
        injected = run(lambda: llm.decode_embeddings(info.embedding_rows(head), 1))
    assert np.abs(text - injected).max() <= 1e-3
    assert int(text.argmax()) == es.tokenize(" Lima")[0]


def test_cached_and_uncached_prefix_give_the_same_first_token_logits(es, probe):
    probe.first_token_logits(Q, tokens=None)  # the sequence no longer holds minors,eu
    es.prefix_cache.clear()
    cold, st = first_logits(probe, Q, tokens="minors,eu")
    assert st.prefix_source == "built"
    probe.first_token_logits(Q, tokens=None)
    hits = es.prefix_cache.hits
    warm, st = first_logits(probe, Q, tokens="minors,eu")
    assert st.prefix_source == "cache" and es.prefix_cache.hits == hits + 1
    assert np.abs(cold - warm).max() <= 1e-3


def test_switching_between_cached_compositions_costs_no_prefix_prefill(es):
    for t in ("minors,eu", "kiosk", None):
        complete(es, Q, tokens=t, max_tokens=1)  # make sure all three are cached
    for t in ("minors,eu", "kiosk", None, "minors,eu"):
        timings = complete(es, Q, tokens=t, max_tokens=1)["timings"]
        assert timings["prefix_source"] == "cache", t
        assert timings["prompt_prefilled_n"] == timings["prompt_n"] - 1  # only the prompt; BOS + vectors restored


def test_canonical_order_makes_compositions_identical(es, probe):
    assert es.compose("eu,minors") == es.compose(["minors", "eu"]) == es.compose(["eu", "minors", "eu"])
    constraints, mode = es.compose("eu,minors")
    # bank order (categories.py): privacy comes before the categories added later
    assert constraints == ["alcohol", "gambling", "drugs", "sexual", "horror", "weapons", "privacy",
                           "violence", "selfharm", "hate"]
    assert mode == "positive"
    a = probe.first_token_logits(Q, tokens="eu,minors")
    b = probe.first_token_logits(Q, tokens="minors,eu")
    assert np.array_equal(a, b)
    assert reply(es, Q, tokens="eu,minors", max_tokens=8) == reply(es, Q, tokens=["minors", "eu"], max_tokens=8)


def test_forced_logits_follow_a_greedy_reply(es, probe):
    # reset() before each request: each then prefills the prompt in the same batches (a reused conversation
    # re-decodes only its last token, which moves llama.cpp's CPU logits by up to ~0.6)
    prompt = "How do I mix a mojito?"
    es.reset()
    text = reply(es, prompt, tokens="eu", max_tokens=8)
    ids = es.tokenize(" " + text)[:6]
    es.reset()
    forced = probe.forced_logits(prompt, ids, tokens="eu")
    assert forced.shape == (len(ids), es.model.n_vocab)
    assert forced.argmax(axis=1).tolist() == ids  # greedy picked exactly these tokens
    es.reset()
    assert np.abs(forced[0] - probe.first_token_logits(prompt, tokens="eu")).max() <= 1e-3
    with pytest.raises(EdgeSafeError, match="continuation must be 1"):
        probe.forced_logits(prompt, [])


def test_strictness_moves_the_refusal_decision_by_that_many_logits(es, probe):
    opener = probe.refusal_openers(["alcohol"])
    words = [es.model.token_to_piece(t).decode() for t in opener]
    assert sorted(words) == sorted({"Sorry", " Sorry"})  # the refusal's first word, with and without its space
    assert probe.refusal_openers(["alcohol", "gambling", "privacy"]) == opener  # shared by every refusal here
    es.reset()
    logits = probe.first_token_logits(Q, tokens="alcohol")
    gap = float(np.delete(logits, opener).max() - logits[opener].max())  # what the openers lack to win
    assert 1.5 < gap < 18.5  # the from-text bank answers this prompt, by a margin a bias can cross
    es.reset()  # the same batches as the logits above
    assert probe.refusal_margin(Q, tokens="alcohol", max_blank=0) == pytest.approx(-gap, abs=1e-4)
    word = es.bank.tokens["alcohol"].refusal.split()[0].strip(",")
    answer = reply(es, Q, tokens="alcohol", max_tokens=4)
    assert not answer.startswith(word)
    assert reply(es, Q, tokens="alcohol", max_tokens=4, strictness=gap - 1.0) == answer
    assert reply(es, Q, tokens="alcohol", max_tokens=4, strictness=gap + 1.0).startswith(word)
    assert complete(es, Q, tokens="alcohol", max_tokens=2,
                    strictness=gap + 1.0)["edge_safe"]["strictness"] == gap + 1.0
    # only with constraints in the positive mode: not for the bare model, not in the rejective/negative modes
    assert reply(es, Q, max_tokens=4, strictness=20) == reply(es, Q, max_tokens=4)
    rejective = reply(es, Q, tokens="alcohol", mode="rejective", max_tokens=4)
    assert reply(es, Q, tokens="alcohol", mode="rejective", max_tokens=4, strictness=-20) == rejective


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 20.5, -99, "high", True, None])
def test_strictness_out_of_range_is_a_clear_error_before_decoding(es, bad):
    if bad is None:  # None means "the instance default" per call; the constructor needs a number
        with pytest.raises(EdgeSafeError, match="strictness must be a number"):
            EdgeSafe(bank=es.bank, strictness=bad)
        return
    with pytest.raises(EdgeSafeError, match="strictness must be"):
        es.create_completion(Q, tokens="alcohol", strictness=bad)
    with pytest.raises(EdgeSafeError, match="strictness must be"):
        complete(es, Q, tokens="alcohol", stream=True, strictness=bad)
    with pytest.raises(EdgeSafeError, match="strictness must be"):
        es.submit(Q, tokens="alcohol", strictness=bad)
    with pytest.raises(EdgeSafeError, match="strictness must be"):
        EdgeSafe(bank=es.bank, strictness=bad)  # before the model loads


def test_reset_forgets_the_conversation_but_keeps_snapshots(es):
    complete(es, Q, tokens="kiosk", max_tokens=1)
    assert complete(es, Q, tokens="kiosk", max_tokens=1)["timings"]["prefix_source"] == "reused"
    es.reset()
    assert complete(es, Q, tokens="kiosk", max_tokens=1)["timings"]["prefix_source"] == "cache"


# --- generation -------------------------------------------------------------------------


def test_greedy_answer_and_determinism(es):
    out = complete(es, Q, max_tokens=16)
    first = out["choices"][0]["message"]["content"]
    assert first == "Lima"
    assert out["choices"][0]["finish_reason"] == "stop"
    reply(es, "How do I tie a tie?", tokens="kiosk", max_tokens=4)  # disturb the KV cache
    assert reply(es, Q, max_tokens=16) == first
    assert es.create_completion(Q, max_tokens=16)["choices"][0]["text"] == first  # a prompt is one user turn


def test_streaming_and_non_streaming_give_the_same_text(es):
    # reset() before each call: every call then decodes the prompt in the same batches (a reused
    # conversation re-decodes only its last token, and llama.cpp's CPU logits move by ~0.01 with
    # batch boundaries, enough to flip this long greedy reply's near-ties of < 0.1 logits)
    prompt = "How do I mix a mojito?"
    for tokens in (None, "minors,eu"):
        es.reset()
        out = es.create_completion(prompt, tokens=tokens, max_tokens=24)
        assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
        text = out["choices"][0]["text"]
        es.reset()
        streamed = pieces(es, prompt, tokens=tokens, max_tokens=24)
        assert "".join(streamed) == text and len(streamed) > 1
        es.reset()
        chunks = list(complete(es, prompt, tokens=tokens, max_tokens=24, stream=True))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
        es.reset()
        job = es.submit(prompt, tokens=tokens, max_tokens=24)
        assert "".join(job) == text and job.stats.completion_tokens == out["usage"]["completion_tokens"]


def test_chat_is_openai_shaped(es):
    r = complete(es, Q, tokens="eu", max_tokens=8)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Lima"}
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    n_vectors = sum(len(es.bank.tokens[n].vectors) for n in ("positive", "privacy"))
    assert r["edge_safe"] == {"tokens": ["privacy"], "mode": "positive", "prefix_positions": n_vectors, "strictness": 0.0,
                              "refusal": False, "refused_by": None}
    t = r["timings"]
    assert t["prompt_n"] == r["usage"]["prompt_tokens"] and t["predicted_n"] == r["usage"]["completion_tokens"]
    assert t["prefix_source"] in ("reused", "cache", "built") and 0 < t["prompt_prefilled_n"] < t["prompt_n"]
    assert t["ttft_ms"] > 0 and t["predicted_ms"] >= 0
    chunks = list(complete(es, Q, max_tokens=8, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["edge_safe"]["mode"] is None


def test_max_tokens_gives_finish_reason_length(es):
    r = complete(es, "Write a long story about a dragon.", max_tokens=3)
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3


def test_user_stop_strings_cut_the_reply(es):
    full = reply(es, "How do I mix a mojito?", max_tokens=24)
    word = full.split()[2]
    out = complete(es, "How do I mix a mojito?", max_tokens=24, stop=[word])
    cut = out["choices"][0]["message"]["content"]
    assert cut == full[: full.index(word)].strip() and out["choices"][0]["finish_reason"] == "stop"


def test_sampling_with_a_seed_is_reproducible(es):
    # reset() first: the same prompt batches both times (a sequence that holds part of the prompt re-decodes
    # only the rest, and the logits' ~0.01-0.6 batch-shape noise is enough to move a sampled token)
    es.reset()
    a = reply(es, "Tell me about cats.", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    es.reset()
    b = reply(es, "Tell me about cats.", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert a == b


# --- KV reuse ----------------------------------------------------------------------------


def test_multi_turn_chat_re_prefills_only_the_latest_turn(es):
    """The control tokens sit before the last user message: from the third turn on, a turn keeps the
    conversation the previous request held up to its control tokens and prefills only what follows."""
    msgs = [{"role": "user", "content": Q}]
    r1 = complete(es, msgs, tokens="eu", max_tokens=8)
    msgs += [r1["choices"][0]["message"], {"role": "user", "content": "And of France?"}]
    r2 = complete(es, msgs, tokens="eu", max_tokens=8)
    kept = len(es.tokenize(es.template.render_split(msgs)[0]))  # the first turn and its reply
    msgs += [r2["choices"][0]["message"], {"role": "user", "content": "And of Spain?"}]
    t = complete(es, msgs, tokens="eu", max_tokens=8)["timings"]
    assert t["prefix_source"] == "reused"
    assert t["prompt_prefilled_n"] <= t["prompt_n"] - 1 - kept + 1
    assert kept > 10


def test_prompt_longer_than_n_batch_works(es):
    long = "Here is some context. " * 40 + Q
    assert len(es.tokenize(long)) > 2 * N_BATCH
    out = complete(es, long, tokens="minors,eu", max_tokens=8)
    assert out["timings"]["prompt_prefilled_n"] > 2 * N_BATCH and out["edge_safe"]["prefix_positions"] > N_BATCH
    assert isinstance(out["choices"][0]["message"]["content"], str)


def test_prompt_too_long_is_a_clear_error_and_the_runtime_keeps_working(es):
    with pytest.raises(PromptTooLongError, match=r"the prompt needs \d+ positions .* context holds 512; "
                                                 r"pass a larger --n-ctx"):
        complete(es, "word " * 600, tokens="minors,eu")
    assert reply(es, Q, max_tokens=8) == "Lima"


def test_a_conversation_that_no_longer_fits_is_the_same_clear_error(es):
    turns = []
    for i in range(12):  # ~40 tokens a round: ~480 of earlier turns, then the request
        turns += [{"role": "user", "content": f"Tell me one fact about the number {i} in a full sentence."},
                  {"role": "assistant", "content": f"The number {i} comes after {i - 1} and before {i + 1}, "
                                                   "as every child learns while counting."}]
    with pytest.raises(PromptTooLongError, match=r"the prompt needs \d+ positions .* context holds 512; "
                                                 r"pass a larger --n-ctx"):
        complete(es, turns + [{"role": "user", "content": Q}], tokens="minors,eu")
    assert reply(es, Q, max_tokens=8) == "Lima"  # the runtime keeps working


def test_default_context_is_8192_for_the_api_chat_and_serve():
    import inspect

    from edge_safe.cli.chat import chat
    from edge_safe.cli.serve import serve
    from edge_safe.runtime import DEFAULT_N_CTX

    assert DEFAULT_N_CTX == 8192 and inspect.signature(EdgeSafe).parameters["n_ctx"].default == DEFAULT_N_CTX
    for cmd in (chat, serve):
        assert next(p.default for p in cmd.params if p.name == "n_ctx") == DEFAULT_N_CTX, cmd.name


def test_hitting_the_context_while_generating_is_finish_reason_length(es):
    words, n = ["one", "two", "three", "four", "five"] * ((N_CTX - 40) // 5), 0  # ~1 token per word
    while n < N_CTX - 6:  # leave room for only a few generated tokens
        words.append(("one", "two", "three", "four", "five")[len(words) % 5])
        filler = " ".join(words)
        n = 1 + len(es.tokenize(QA_TEMPLATE.prompt(filler)))
    assert n < N_CTX
    r = complete(es, filler, max_tokens=50)
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] <= N_CTX - n + 1


def test_a_second_request_while_a_stream_is_open_is_answered_and_both_are_right(es):
    """An unconsumed stream blocks nothing: the engine runs it to completion in the background, so the same
    thread may ask something else before reading on; and a stream closed early leaves the runtime consistent."""
    expected = reply(es, "How do I mix a mojito?", max_tokens=16)
    it = complete(es, "How do I mix a mojito?", max_tokens=16, stream=True)
    assert next(it)["choices"][0]["delta"] == {"role": "assistant"}
    assert reply(es, Q, max_tokens=8) == "Lima"  # same thread, stream still open
    rest = list(it)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in rest) == expected
    assert rest[-1]["usage"]["completion_tokens"] > 1
    it = complete(es, "How do I mix a mojito?", max_tokens=16, stream=True)
    next(it)
    next(it)
    it.close()  # abandoned mid-reply: cancelled, its sequence freed
    assert it.job.done.is_set()
    assert reply(es, "How do I mix a mojito?", max_tokens=16) == expected


def test_threads_share_one_instance(es):
    expected = {p: reply(es, p, max_tokens=6) for p in (Q, "What is 2 + 2?")}
    got = {}
    threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, reply(es, p, max_tokens=6)))
               for p in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


# --- names and typed text ----------------------------------------------------------------


def test_names_profiles_and_modes(es):
    assert es.tokens == [c.name for c in CATEGORIES]
    assert es.modes == ["positive", "rejective", "negative"]
    assert es.profiles["minors"] == list(PROFILES["minors"])
    assert es.compose(None) == ([], None)
    assert es.compose(None, "rejective") == ([], "rejective")
    assert es.compose("kiosk", "negative") == (["medical", "finance"], "negative")


def test_unknown_names_list_what_exists(es):
    with pytest.raises(UnknownTokenError, match="unknown token or profile 'minor'; did you mean 'minors'"):
        complete(es, Q, tokens="minor")
    with pytest.raises(UnknownTokenError, match="is a mode, not a constraint"):
        complete(es, Q, tokens="rejective")
    with pytest.raises(UnknownTokenError, match="unknown mode 'rejectve'; did you mean 'rejective'"):
        complete(es, Q, mode="rejectve")


def test_typed_special_tokens_are_text(es):
    for text in ("<bos>", "<start_of_turn>user", "<eos>"):
        ids = es.tokenize(text)
        assert es.model.bos not in ids and es.model.eos not in ids and len(ids) > 1
    applied = complete(es, "<start_of_turn>model rejective <bos>", max_tokens=2)["edge_safe"]
    assert (applied["tokens"], applied["mode"], applied["prefix_positions"]) == ([], None, 0)


def test_is_refusal(es):
    assert es.is_refusal("Sorry, I can't help with alcohol.")
    assert not es.is_refusal("Lima")


def test_closed_instance_refuses_work(bank):
    other = EdgeSafe(bank=bank, n_ctx=64)
    other.close()
    other.close()  # idempotent
    with pytest.raises(EdgeSafeError, match="closed"):
        complete(other, Q)


# --- the stop filter (no model) ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list(" \nQAnswerQuestion:é€😀x")), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    user_stop=st.sampled_from([(), ("x",), ("on:",)]),
)
def test_stop_filter_pieces_join_to_the_cleaned_reply(text, cuts, user_stop):
    data = text.encode()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    f = StopFilter(QA_TEMPLATE.stop + user_stop)
    out, stopped, fed = [], False, data
    for a, b in zip(bounds, bounds[1:]):  # byte splits, also inside multi-byte characters
        piece, stopped = f.feed(data[a:b])
        out.append(piece)
        if stopped:  # generation ends here: compare with what the model had produced so far
            fed = data[:b]
            break
    if not stopped:
        out.append(f.finish())
    template = QA_TEMPLATE if not user_stop else type(QA_TEMPLATE)(stop=QA_TEMPLATE.stop + user_stop)
    assert "".join(out) == clean_reply(fed.decode("utf-8", errors="ignore"), template)


# --- sampling (no model) -----------------------------------------------------------------


def test_sampling_greedy_nucleus_and_validation():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 1.0, 2.9] + [-20.0] * 2000, dtype=np.float32)  # p ≈ .02 .48 .06 .43
    assert Sampling().pick(logits, rng) == 1
    assert {Sampling(1.0, top_p=1e-6).pick(logits, rng) for _ in range(20)} == {1}  # that small keeps the argmax only
    draws = [Sampling(1.0, top_p=0.9).pick(logits, rng) for _ in range(400)]
    assert set(draws) == {1, 3}  # the smallest set holding 90 %
    with pytest.raises(EdgeSafeError, match="temperature must be a number >= 0"):
        Sampling(-1.0)
    with pytest.raises(EdgeSafeError, match=r"top_p must be a number in \(0, 1\]"):
        Sampling(1.0, top_p=0.0)
    with pytest.raises(EdgeSafeError, match="top_k must be a whole number >= 0"):
        Sampling(1.0, top_k=-1)
    with pytest.raises(EdgeSafeError, match=r"min_p must be a number in \[0, 1\]"):
        Sampling(1.0, min_p=1.5)
    with pytest.raises(EdgeSafeError, match="repeat_penalty must be a number > 0"):
        Sampling(repeat_penalty=0)


def test_sampling_top_k_min_p_and_the_repeat_penalty():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 1.0, 2.9] + [-20.0] * 2000, dtype=np.float32)
    assert {Sampling(1.0, top_k=1).pick(logits, rng) for _ in range(50)} == {1}
    assert set(Sampling(1.0, top_k=2).pick(logits, rng) for _ in range(400)) == {1, 3}
    assert set(Sampling(1.0, min_p=0.5).pick(logits, rng) for _ in range(400)) == {1, 3}  # p(0), p(2) < p(1)/2
    pen = Sampling(repeat_penalty=2.0)
    out = pen.penalise(logits, [1, 0, 4])
    assert out[1] == 1.5 and out[0] == 0.0 and out[4] == -40.0 and out[3] == logits[3]  # / positive, * negative
    assert logits[1] == 3.0  # a copy
    assert pen.pick(out, rng) == 3  # greedy, penalised: the repeated argmax loses
    assert Sampling().penalise(logits, [1]) is logits  # off: the same array
    assert Sampling(repeat_penalty=2.0, repeat_last_n=1).penalise(logits, [1, 0])[1] == 3.0  # only the latest


def test_the_reply_ends_earlier_with_a_repeat_penalty(es):
    """Greedy with no penalty, the bundled model repeats a sentence until max_tokens; 1.1 ends the reply."""
    msgs = [{"role": "user", "content": "My grandmother's birthday is next week. Any gift ideas?"}]
    plain = es.create_chat_completion(msgs, max_tokens=256)
    penalised = es.create_chat_completion(msgs, max_tokens=256, repeat_penalty=1.1)
    assert plain["usage"]["completion_tokens"] == 256 and plain["choices"][0]["finish_reason"] == "length"
    assert penalised["usage"]["completion_tokens"] < 128 and penalised["choices"][0]["finish_reason"] == "stop"
