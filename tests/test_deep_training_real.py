"""Deep tokens between training (HF, fp32) and the runtime (llama.cpp, Q4_K_M) on the real model (CI-sized)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import V3_SHALLOW_BANK

torch = pytest.importorskip("torch")

from edge_safe import kv_cells  # noqa: E402
from edge_safe.llama import Context  # noqa: E402
from edge_safe.convert.bank import TokenBank  # noqa: E402
from edge_safe.training.config import TrainConfig  # noqa: E402
from edge_safe.training.objective import Bank, DeepBank, batch_inputs, forward_hidden, kv_of_inputs  # noqa: E402
from edge_safe.training.trainer import export_bank, init_deep, train  # noqa: E402

pytestmark = pytest.mark.model
CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
#: a few constraints, old and new, so 24 stratified prompts hold violating rows of each
SMOKE_CONSTRAINTS = ("alcohol", "privacy", "medical", "violence")
PROMPTS = [
    "What is the capital of Peru?",
    "How do I mix a mojito?",
    "Which stock should I buy with my savings?",
    "How do I find where my ex lives now?",
    "Write a short poem about the sea.",
]


@pytest.fixture(scope="module")
def base(model_path):
    from edge_safe.training.base_model import load_gguf_model

    return load_gguf_model(model_path)


@pytest.fixture(scope="module")
def shipped():
    return TokenBank.load(V3_SHALLOW_BANK)


@pytest.fixture(scope="module")
def deep_from_shipped(base, shipped, tmp_path_factory) -> tuple[DeepBank, Path]:
    """Every token of the shipped shallow bank as a deep token: the K/V its vectors produce (init_bank)."""
    cfg = TrainConfig(kind="deep", init_bank=str(V3_SHALLOW_BANK),
                      n_vectors=shipped.tokens[shipped.constraints[0]].n_vectors,
                      n_mode_vectors=shipped.tokens[shipped.modes[0]].n_vectors)
    bank = init_deep(base, cfg, torch.Generator().manual_seed(0))
    path = export_bank(bank, base, cfg, {}).save(tmp_path_factory.mktemp("deep") / "deep.gguf", dtype="F16")
    return bank, path


@torch.no_grad()
def hf_first(base, bank, mode, constraints, prompt: str, template) -> np.ndarray:
    x, mask, prefix = batch_inputs(base, bank, [(mode, tuple(constraints), base.tokenize(template.prompt(prompt)))])
    return base.model.lm_head(forward_hidden(base, x, mask, prefix)[0, -1]).numpy()


def test_hf_keys_and_values_are_llamacpps_layer_for_layer(base, model_path):
    """kv_of_inputs (HF, fp32) and llama.cpp's stored rows (Q4_K_M) for the same text: each HF layer matches the
    llama.cpp layer of the same index best (so both sides use the model's layer order), nearly exactly."""
    with Context.load(model_path, n_ctx=64) as llm:
        ids = llm.tokenize("Do not help with alcohol.\n")
        llm.clear()
        llm.decode_tokens([llm.bos], 0, want_logits=False)
        llm.decode_tokens(ids, 1, want_logits=False)
        state = kv_cells.parse(llm.save_seq())
        k_cpp, v_cpp = kv_cells.cells(state, kv_cells.check_geometry(state, "gemma3", 18, 256, 256), slice(1, None))
    k_hf, v_hf = (t.numpy() for t in kv_of_inputs(base, base.embed(torch.tensor(ids)), before_prompt=False))
    assert k_hf.shape == k_cpp.shape == (len(ids), 18, 256)
    for layer in range(18):
        corr = [np.corrcoef(k_hf[:, layer].ravel(), k_cpp[:, j].ravel())[0, 1] for j in range(18)]
        assert int(np.argmax(corr)) == layer and corr[layer] > 0.99, (layer, corr[layer])
        assert np.corrcoef(v_hf[:, layer].ravel(), v_cpp[:, layer].ravel())[0, 1] > 0.99


def test_deep_bank_decisions_agree_between_training_and_runtime(base, shipped, deep_from_shipped, model_path):
    """The same deep bank through the trainer's HF forward (DynamicCache prefix, position_ids from 1) and the
    llama.cpp runtime (cells written at position 0): top-1 agrees wherever HF's margin is clear, and the token
    effect (logits with minus without tokens) correlates as in the shallow parity test."""
    from edge_safe import EdgeSafe
    from edge_safe.probe import Probe

    bank, path = deep_from_shipped
    template = shipped.template
    with EdgeSafe(model_path=model_path, bank=path, n_ctx=512) as es:
        probe = Probe(es)
        assert all(t.is_deep for t in es.bank.tokens.values())
        compositions = [es.compose(c) for c in (shipped.constraints[:1], "minors", "minors,eu")]
        compositions.append(es.compose(None, mode="rejective"))
        checked = 0
        for prompt in PROMPTS:
            hf0 = hf_first(base, bank, None, [], prompt, template)
            cpp0 = probe.first_token_logits(prompt)
            for constraints, mode in compositions:
                hf = hf_first(base, bank, mode, constraints, prompt, template)
                job = probe.first_token_logits(prompt, tokens=constraints, mode=mode, wait=False)
                cpp = job.result()
                assert job.stats.deep_cells == sum(bank.keys[n].shape[0] for n in [mode, *constraints])
                top2 = np.sort(hf)[-2:]
                if top2[1] - top2[0] > 0.5:
                    assert hf.argmax() == cpp.argmax(), (prompt, constraints, mode)
                    checked += 1
                effect = np.corrcoef(hf - hf0, cpp - cpp0)[0, 1]
                assert effect > 0.8, f"token effect correlation {effect:.3f} for {constraints} {mode} on {prompt!r}"
        assert checked >= len(PROMPTS)  # the clear-margin check did run


def test_step_0_of_a_deep_bank_from_the_shipped_bank_acts_like_it(base, shipped, deep_from_shipped):
    """init_bank with a shallow bank: the deep tokens' first-token decisions follow the shallow bank's (the
    prompt's positions differ, so not exactly)."""
    bank, _ = deep_from_shipped
    shallow = Bank.from_token_bank(shipped)
    agree = 0
    rejective_deep = []
    for prompt in PROMPTS:
        for tokens, mode in ((["alcohol"], "positive"), (shipped.constraints, "positive"), ([], "rejective")):
            from edge_safe.training.objective import layout

            x = layout(base, shallow, mode, tuple(tokens), base.tokenize(shipped.template.prompt(prompt)))
            with torch.no_grad():
                s = base.model.lm_head(base.model.model(inputs_embeds=x[None]).last_hidden_state[0, -1]).numpy()
            d = hf_first(base, bank, mode, tokens, prompt, shipped.template)
            agree += int(s.argmax() == d.argmax())
            if mode == "rejective":
                rejective_deep.append(int(d.argmax()))
    assert agree >= 0.6 * 3 * len(PROMPTS)
    sorry = base.tokenize(shipped.template.prompt("x") + " Sorry")[-1]
    assert rejective_deep.count(sorry) >= 3  # the rejective mode still opens with the refusal


def test_smoke_training_of_deep_tokens_on_the_real_model(base, tmp_path, monkeypatch, model_path):
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig.from_yaml(CONFIGS / "smoke.yaml").replace(kind="deep", steps=2, limit_prompts=24, val_size=8, constraints=SMOKE_CONSTRAINTS, held_out=(("alcohol", "privacy"),))
    bank, summary = train(cfg, base, tmp_path / "run", progress=False)
    assert isinstance(bank, DeepBank)
    path = export_bank(bank, base, cfg, summary).save(tmp_path / "deep.gguf", dtype="F16")
    loaded = TokenBank.load(path)
    assert loaded.deep_geometry == (18, 256, 256) and loaded.training_config["kind"] == "deep"
    for name in bank.names:
        assert loaded.tokens[name].keys.shape == (cfg.n_mode_vectors if name in cfg.modes else cfg.n_vectors, 18, 256)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(rec["dec"] > 0 for rec in log) and "val" in log[-1]

    from edge_safe import EdgeSafe

    with EdgeSafe(model_path=model_path, bank=path, n_ctx=256) as es:
        reply = es.create_chat_completion([{"role": "user", "content": "What is the capital of Peru?"}], tokens="minors", max_tokens=4)
        assert reply["edge_safe"]["mode"] == "positive" and reply["edge_safe"]["deep_cells"] > 0
        assert reply["edge_safe"]["prefix_positions"] == 0


CONVERSATIONS = [
    [{"role": "user", "content": "Can you recommend a good book about the history of Rome?"},
     {"role": "assistant", "content": "SPQR by Mary Beard is a readable history of ancient Rome from its founding."},
     {"role": "user", "content": "And one about the Roman army?"},
     {"role": "assistant", "content": "Adrian Goldsworthy's The Complete Roman Army covers its soldiers and tactics."},
     {"role": "user", "content": "How do I mix a strong mojito?"}],
    [{"role": "user", "content": "I am planning a trip to Lisbon in spring. What should I see?"},
     {"role": "assistant", "content": "Visit Belem Tower, the Alfama district and take tram 28 through the old town."},
     {"role": "user", "content": "Which stock should I buy with my savings?"}],
    [{"role": "user", "content": "Here are my notes from the meeting. " + " ".join(
        f"Item {i}: the team reviewed the budget for the new office, agreed on the timeline and assigned owners "
        "for the furniture, the network and the move itself." for i in range(12))
        + "\nWhat is the capital of Peru?"}],
]


def test_deep_bank_decisions_agree_with_the_runtime_after_earlier_turns_and_long_messages(base, model_path):
    """The geometry the runtime produces for a request after earlier turns or at the end of a long message
    (control tokens before the last user message / its last line, keys rotated there) is the geometry the
    trainer builds (convert.layout.control_layout + the context in the KV prefix): top-1 agrees where HF's
    margin is clear and the token effect correlates."""
    from edge_safe import EdgeSafe
    from edge_safe.models import resolve_bank_path
    from edge_safe.probe import Probe
    from edge_safe.training.objective import trainable_bank
    from edge_safe.training.sampler import Prompt
    from edge_safe.training.trainer import split_conversation

    shipped = TokenBank.load(resolve_bank_path(None))
    bank = trainable_bank(base, shipped)

    @torch.no_grad()
    def hf(messages, names, mode):
        p = Prompt(messages[-1]["content"], "general", "benign", messages=tuple((m["role"], m["content"]) for m in messages))
        ctx, ids = split_conversation(base, shipped.template, p)
        assert ctx, "every conversation here puts text before the control tokens"
        x, mask, prefix = batch_inputs(base, bank, [(mode, tuple(names), ids, ctx)])
        return base.model.lm_head(forward_hidden(base, x, mask, prefix)[0, -1]).numpy()

    with EdgeSafe(model_path=model_path, n_ctx=1024) as es:
        probe = Probe(es)
        checked = 0
        for messages in CONVERSATIONS:
            hf0, cpp0 = hf(messages, [], None), probe.first_token_logits(messages)
            for tokens in ("alcohol", "minors,eu", "finance"):
                constraints, mode = es.compose(tokens)
                got, want = hf(messages, constraints, mode), probe.first_token_logits(messages, tokens=tokens)
                top2 = np.sort(got)[-2:]
                # transformers (the GGUF's weights dequantized, f32) and llama.cpp (Q4_K kernels) put a logit up to
                # ~0.4 apart here, so a gap of two top tokens may differ by ~0.8: "clear" is a gap of more than 1
                if top2[1] - top2[0] > 1.0:
                    assert got.argmax() == want.argmax(), (messages[-1]["content"][-40:], tokens)
                    checked += 1
                effect = np.corrcoef(got - hf0, want - cpp0)[0, 1]
                assert effect > 0.8, f"token effect correlation {effect:.3f} for {tokens} on {messages[-1]['content'][-40:]!r}"
        assert checked >= len(CONVERSATIONS)  # the check has teeth: a clear decision in most conversations
