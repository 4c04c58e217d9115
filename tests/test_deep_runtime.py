"""Deep control tokens through llama.cpp on the real bundled model (CI-sized).

A deep token here is made of the key/value rows llama.cpp itself computed for real text
(read back from the sequence state), so what writing them must reproduce is known exactly.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import DEEP_TEXTS as TEXTS  # the deep_bank fixture's tokens and texts
from conftest import probed, reply, text_cells
from edge_safe import kv_cells
from edge_safe.convert.bank import TokenBank
from edge_safe.convert.model import ModelInfo
from edge_safe.llama import Context
from edge_safe.probe import Probe
from edge_safe.runtime import EdgeSafe

pytestmark = pytest.mark.model
PROMPT = "Question: How do I mix a mojito?\nAnswer:"
Q = "How do I mix a mojito?"


@pytest.fixture(scope="module")
def info(model_path) -> ModelInfo:
    return ModelInfo.read(model_path)


@pytest.mark.parametrize("flash_attn, kv_type", [(None, None), (False, None), (None, "f32"), (False, "f32")],
                         ids=["fa-auto-f16", "fa-off-f16", "fa-auto-f32", "fa-off-f32"])
def test_written_cells_reproduce_the_decoded_ones_exactly(model_path, flash_attn, kv_type):
    """K/V read back from llama.cpp for real tokens, written back at their positions: the same blob, the same logits."""
    with Context.load(model_path, n_ctx=256, flash_attn=flash_attn, kv_type=kv_type) as llm:
        ids, keys, values, groups = text_cells(llm, TEXTS["alcohol"])
        decoded = llm.save_seq()
        assert kv_cells.serialise(kv_cells.parse(decoded)) == decoded  # the parser is byte-exact on real blobs
        v_trans = kv_cells.parse(decoded).sections[0].v_trans
        assert v_trans == (1 if flash_attn is False else 0)
        prompt = llm.tokenize(PROMPT)
        llm.decode_tokens(prompt, 1 + len(ids))
        reference = llm.logits().copy()

        llm.clear()
        llm.decode_tokens([llm.bos], 0, want_logits=False)
        bos_blob = llm.save_seq()
        bos = kv_cells.parse(bos_blob)
        written = kv_cells.serialise(kv_cells.with_cells(bos, keys, values, groups, pos=np.arange(1, 1 + len(ids))))
        assert written == decoded
        # the engine's splice, in place in the context's scratch buffer: the same bytes
        assert kv_cells.append_cells(bos_blob, keys, values, groups, pos=np.arange(1, 1 + len(ids))) == decoded
        buf, n = llm.save_seq_scratch(0, spare=kv_cells.added_bytes(len(ids), len(groups), *keys.shape[1:], values.shape[2]))
        assert bytes(buf[:n]) == bos_blob
        n = kv_cells.append_cells_in_place(buf, n, keys, values, groups, pos=np.arange(1, 1 + len(ids)))
        assert bytes(buf[:n]) == decoded
        llm.load_seq(buf[:n])  # a buffer, not bytes: the same state
        assert llm.save_seq() == decoded
        llm.load_seq(written)
        assert llm.pos_max() == len(ids)
        llm.decode_tokens(prompt, 1 + len(ids))
        assert np.abs(llm.logits() - reference).max() == 0.0


def first_logits(es: EdgeSafe, prompt, **kw):
    """The first reply token's logits and the probe request's stats."""
    return probed(Probe(es).first_token_logits(prompt, wait=False, **kw))


def relabelled_logits(llm: Context, texts: list[str], prompt: list[int], shallow: np.ndarray | None = None,
                      cells: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """The reference for a deep composition, built by hand: decode [BOS] + each text, relabel the text's cells
    to position 0 (or take ``cells``), then (mixed) the shallow vectors at 1.., then the prompt."""
    cells = cells or [text_cells(llm, t)[1:3] for t in texts]
    groups = kv_cells.layer_sections("gemma3", 18)
    llm.clear()
    llm.decode_tokens([llm.bos], 0, want_logits=False)
    state = kv_cells.parse(llm.save_seq())
    for k, v in cells:
        state = kv_cells.with_cells(state, k, v, groups, pos=0)
    llm.load_seq(kv_cells.serialise(state))
    n = 0 if shallow is None else len(shallow)
    if n:
        llm.decode_embeddings(shallow, 1)
    llm.decode_tokens(prompt, 1 + n)
    return llm.logits().copy()


@pytest.mark.parametrize("flash_attn", [None, False], ids=["v_trans0", "v_trans1"])
def test_edgesafe_writes_a_deep_composition_at_position_0(model_path, deep_bank, flash_attn):
    with EdgeSafe(model_path, deep_bank, n_ctx=256, flash_attn=flash_attn) as es:
        plain = Probe(es).first_token_logits(Q)
        got, st = first_logits(es, Q, tokens="alcohol,privacy")
        n_cells = deep_bank.tokens["alcohol"].n_vectors + deep_bank.tokens["privacy"].n_vectors
        assert (st.prefix_source, st.deep_cells, st.prefix_positions) == ("built", n_cells, 0)
        assert st.prefilled_tokens == len(es.tokenize(PROMPT))
        # sequence 0 holds the request: deep cells take no position, the prompt is at 1..
        assert es.engine.ctx.pos_range(0) == (0, len(es.tokenize(PROMPT)))
        with Context.load(model_path, n_ctx=256, flash_attn=flash_attn) as llm:
            # the bank's own rows (made with flash attention on, which computes them slightly differently)
            bank_cells = [(deep_bank.tokens[n].keys, deep_bank.tokens[n].values) for n in ("alcohol", "privacy")]
            want = relabelled_logits(llm, [], llm.tokenize(PROMPT), cells=bank_cells)
        assert np.abs(got - want).max() <= 1e-4
        assert np.abs(got - plain).max() > 1.0  # the cells act
        es.reset()
        again, st = first_logits(es, Q, tokens="privacy,alcohol")  # a set: the same cached composition
        assert st.prefix_source == "cache" and np.array_equal(again, got)


def test_a_composition_is_a_set_cells_in_any_order_give_the_same_logits(model_path):
    """All cells sit at position 0, so their order changes only the order of the attention sums. llama.cpp's CPU
    kernels round the activations to 8 bits before each quantized matmul, which turns that into up to ~1 logit of
    noise (measured 0.42-0.80, f16/f32 cache, flash attention on/off; the same noise as a different batch split);
    the runtime always writes a set in bank order, so one composition always gets the same cells in the same order."""
    with Context.load(model_path, n_ctx=256) as llm:
        prompt = llm.tokenize(PROMPT)
        ab = relabelled_logits(llm, [TEXTS["alcohol"], TEXTS["privacy"]], prompt)
        ba = relabelled_logits(llm, [TEXTS["privacy"], TEXTS["alcohol"]], prompt)
        alone = relabelled_logits(llm, [TEXTS["alcohol"]], prompt)
    assert ab.argmax() == ba.argmax() and np.abs(ab - ba).max() < 1.5
    assert np.corrcoef(ab, ba)[0, 1] > 0.999
    assert np.abs(ab - alone).max() > 3 * np.abs(ab - ba).max()  # far below what a different set changes


def test_mixed_deep_and_shallow_tokens_deep_at_0_shallow_after_bos(model_path, deep_bank):
    with EdgeSafe(model_path, deep_bank, n_ctx=256) as es:
        got, st = first_logits(es, Q, tokens="minors")  # alcohol (deep) + gambling (shallow)
        cells = (deep_bank.tokens["alcohol"].n_vectors, deep_bank.tokens["gambling"].n_vectors)
        assert st.tokens == ["alcohol", "gambling"] and (st.deep_cells, st.prefix_positions) == cells
        with Context.load(model_path, n_ctx=256) as llm:
            want = relabelled_logits(llm, [TEXTS["alcohol"]], llm.tokenize(PROMPT),
                                     shallow=deep_bank.tokens["gambling"].vectors)
        assert np.abs(got - want).max() <= 1e-4


def cells_of(bank: TokenBank, tokens: str) -> int:
    """Deep cells a request writes: its deep constraints' positions."""
    return sum(bank.tokens[n].n_vectors for n in bank.resolve(tokens) if bank.tokens[n].is_deep)


def test_cells_of_one_request_never_leak_into_the_next(model_path, deep_bank):
    """Deep, shallow, mixed and bare requests interleaved (cached, rebuilt, reused) give exactly what a fresh
    instance gives for each."""
    sequence = [None, "alcohol", "gambling", None, "alcohol,privacy", "minors", "privacy", None, "alcohol",
                "gambling", "minors"]
    with EdgeSafe(model_path, deep_bank, n_ctx=256, prefix_cache_bytes=0) as fresh:
        want = {}
        for tokens in dict.fromkeys(sequence):
            fresh.reset()
            want[tokens] = Probe(fresh).first_token_logits(Q, tokens=tokens)
    with EdgeSafe(model_path, deep_bank, n_ctx=256) as es:
        sources = []
        for tokens in sequence:
            got, st = first_logits(es, Q, tokens=tokens)
            sources.append(st.prefix_source)
            assert np.abs(got - want[tokens]).max() <= 1e-4, tokens
            assert st.deep_cells == cells_of(deep_bank, tokens)
        assert {"built", "cache"} <= set(sources)
        # a continued conversation keeps its earlier turns ("reused"), its deep cells before the last message
        msgs = [{"role": "user", "content": Q}]
        for follow_up in ("And a daiquiri?", "And a mojito?"):
            reply = es.create_chat_completion(msgs, tokens="alcohol", max_tokens=3)
            msgs += [reply["choices"][0]["message"], {"role": "user", "content": follow_up}]
        out = es.create_chat_completion(msgs, tokens="alcohol", max_tokens=3)
        assert out["timings"]["prefix_source"] == "reused"
        assert out["timings"]["prompt_prefilled_n"] < out["timings"]["prompt_n"] - len(es.tokenize(PROMPT))
        assert out["edge_safe"]["deep_cells"] == cells_of(deep_bank, "alcohol") > 0
        assert out["edge_safe"]["prefix_positions"] == 0
        assert es.engine.ctx.pos_range(0)[0] == 0  # BOS still at position 0
        shallow = es.create_chat_completion([{"role": "user", "content": Q}], tokens="gambling", max_tokens=3)
        assert "deep_cells" not in shallow["edge_safe"]  # shallow replies are shaped as before


def test_deep_and_shallow_requests_interleaved_through_the_server(model_path, deep_bank):
    from edge_safe.server import create_app

    with EdgeSafe(model_path, deep_bank, n_ctx=256, n_parallel=4) as es:
        app = create_app(es)  # 4 sequences decoded together: the batching engine writes the deep cells
        assert app.state.edge_safe.es.n_parallel == 4
        client = TestClient(app)
        listed = {t["id"]: t for t in client.get("/v1/tokens").json()["data"]}
        assert listed["alcohol"]["depth"] == "deep" and "depth" not in listed["gambling"]
        assert listed["alcohol"]["n_vectors"] == deep_bank.tokens["alcohol"].n_vectors
        body = lambda tokens: {"messages": [{"role": "user", "content": Q}], "max_tokens": 4, "tokens": tokens}  # noqa: E731
        first = {}
        for tokens in ["alcohol", "gambling", "", "alcohol,privacy", "minors", "alcohol", "", "gambling", "minors"]:
            r = client.post("/v1/chat/completions", json=body(tokens))
            assert r.status_code == 200, r.text
            out = r.json()
            reply = out["choices"][0]["message"]["content"]
            assert first.setdefault(tokens, reply) == reply, tokens  # the same request, the same greedy reply
            deep = out["edge_safe"].get("deep_cells", 0)
            assert deep == cells_of(deep_bank, tokens)
        es.reset()
        es.prefix_cache.clear()
        for tokens, reply in first.items():  # rebuilt from scratch: still the same replies
            assert client.post("/v1/chat/completions", json=body(tokens)).json()["choices"][0]["message"]["content"] == reply


def test_a_quantized_kv_cache_is_refused_for_a_deep_bank_only(model_path, deep_bank, info):
    with pytest.raises(kv_cells.KVCacheTypeError, match="the K cache is q8_0; deep control tokens"):
        EdgeSafe(model_path, deep_bank, n_ctx=256, kv_type="q8_0", flash_attn=True)
    shallow = replace(deep_bank, tokens={"gambling": deep_bank.tokens["gambling"]}, profiles={})
    with EdgeSafe(model_path, shallow, n_ctx=256, kv_type="q8_0", flash_attn=True) as es:
        assert reply(es, Q, tokens="gambling", max_tokens=2) is not None


def test_a_deep_bank_for_another_layer_count_is_refused(model_path, deep_bank):
    from edge_safe.convert.errors import BankMismatchError

    tok = deep_bank.tokens["alcohol"]
    other = replace(deep_bank, tokens={"alcohol": replace(tok, keys=tok.keys[:, :12], values=tok.values[:, :12])},
                    profiles={})
    with pytest.raises(BankMismatchError, match=r"layer count \(deep tokens hold one key/value row per layer\) "
                                                r"expected 12 .*got 18"):
        EdgeSafe(model_path, other, n_ctx=256)


def test_deep_cells_do_not_eat_the_context(model_path, deep_bank):
    """n_ctx counts positions; the KV cache is enlarged by the bank's deep cells, so a conversation may use
    every position it could use without tokens (llama.cpp would otherwise run out of KV slots)."""
    with EdgeSafe(model_path, deep_bank, n_ctx=256) as es:
        assert es.n_ctx == 256
        n_prompt = len(es.tokenize(PROMPT))
        continuation = es.tokenize(" " + "one two three " * 200)[: 256 - 2 - n_prompt]  # fills up to position 253
        out, st = probed(Probe(es).forced_logits(Q, continuation, tokens="alcohol,privacy", wait=False))
        assert out.shape == (len(continuation), es.model.n_vocab)
        assert st.deep_cells == cells_of(deep_bank, "alcohol,privacy") == 15
        assert es.engine.ctx.pos_max(0) == 1 + n_prompt + len(continuation) - 2


def test_bench_runs_a_deep_bank_and_times_its_kv_write(deep_bank, tmp_path):
    """`edge-safe bench` on a deep composition: cold builds it by writing cells (no BOS or vector decode); its
    concurrency section runs the bank's measured compositions on the engine (no minors/eu profiles here)."""
    import json

    from click.testing import CliRunner

    from edge_safe.cli import cli

    bank = deep_bank.save(tmp_path / "deep.gguf")
    out = tmp_path / "bench"
    r = CliRunner().invoke(cli, ["bench", "--quick", "--repeats", "1", "--warmup", "0", "--max-tokens", "4",
                                 "-c", "alcohol,privacy", "--baseline", "alcohol,privacy", "--threads", "1",
                                 "--no-rss", "--no-plots", "--concurrency", "2", "--bank", str(bank), "--out", str(out)])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    conc = results["concurrency"]
    assert conc["config"]["compositions"] == ["alcohol,privacy"] and conc["levels"]["2"]["completion_tokens"] > 0
    row = results["compositions"]["alcohol,privacy"]
    assert row["deep_cells"] == cells_of(deep_bank, "alcohol,privacy") and row["prefix_positions"] == 0
    split = row["time_split_cold_s"]
    assert "kv_write_s" in split and "bos_s" not in split
    assert "BOS + deep cells written to KV" in (out / "RESULTS.md").read_text()


def test_an_exact_refusal_choosing_among_deep_constraints_caches_their_true_compositions(model_path, deep_bank):
    """With several constraints active, a reply forced to open like a refusal is finished as the refusal of the
    one that refuses most surely alone; the single compositions it builds for that hold their deep cells, so the
    snapshots they leave in the prefix cache are the real ones."""
    with EdgeSafe(model_path, deep_bank, n_ctx=256, prefix_cache_bytes=0) as fresh:
        want = {t: Probe(fresh).first_token_logits(Q, tokens=t) for t in ("alcohol", "privacy", "gambling")}
    with EdgeSafe(model_path, deep_bank, n_ctx=256) as es:
        out = es.create_chat_completion([{"role": "user", "content": Q}], tokens="alcohol,privacy,gambling",
                                        strictness=20, max_tokens=16)
        assert out["edge_safe"]["refusal"] and out["edge_safe"]["deep_cells"] == cells_of(deep_bank, "alcohol,privacy")
        assert out["edge_safe"]["refused_by"] in ("alcohol", "privacy", "gambling")
        assert out["choices"][0]["message"]["content"] == deep_bank.tokens[out["edge_safe"]["refused_by"]].refusal
        assert {("alcohol",), ("privacy",), ("gambling",)} <= set(es.prefix_cache.keys())
        for tokens, logits in want.items():
            es.reset()
            got, st = first_logits(es, Q, tokens=tokens)
            assert st.prefix_source == "cache" and np.abs(got - logits).max() <= 1e-4, tokens
