"""Training on the real bundled model, and training/runtime layout parity (CI-sized)."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import V3_SHALLOW_BANK

torch = pytest.importorskip("torch")

from edge_safe.convert.bank import TokenBank  # noqa: E402
from edge_safe.training.config import TrainConfig  # noqa: E402
from edge_safe.training.objective import Bank, layout  # noqa: E402
from edge_safe.training.trainer import export_bank, train  # noqa: E402

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
def runtime(model_path):
    from edge_safe import EdgeSafe

    # the v3 shallow bank: this is the parity of the shallow layout (deep banks: test_deep_training_real.py)
    es = EdgeSafe(model_path=model_path, bank=V3_SHALLOW_BANK, n_ctx=512)
    yield es
    es.close()


@torch.no_grad()
def hf_first_logits(base, bank: Bank, mode, constraints, prompt: str, template) -> np.ndarray:
    x = layout(base, bank, mode, tuple(constraints), base.tokenize(template.prompt(prompt)))
    hidden = base.model.model(inputs_embeds=x[None]).last_hidden_state[0, -1]
    return base.model.lm_head(hidden).numpy()


def test_layout_parity_hf_training_vs_llamacpp_runtime(base, runtime):
    """The trainer's HF forward and the llama.cpp runtime lay out the v3 shallow bank identically.

    fp32 transformers and Q4_K_M llama.cpp differ by up to ~1 logit, so near-ties may flip:
    top-1 must agree wherever HF's margin is clear, and the *effect* of the tokens (logits with
    tokens minus logits without) must match between the two; a layout bug (order, scale,
    position, template) breaks both.
    Measured: 0.86-0.99 for the shipped bank; dropping the mode vectors in one path gave 0.82 on
    one prompt, so this is a coarse check and the top-1 check is the sharp one.
    """
    from edge_safe.probe import Probe

    tb, probe = runtime.bank, Probe(runtime)
    bank = Bank.from_token_bank(tb)
    compositions = [runtime.compose(c) for c in (tb.constraints[:1], "minors", "minors,eu")]
    if "rejective" in tb.modes:  # a mode with a large effect (negative ≈ no tokens: noise only)
        compositions.append(runtime.compose(None, mode="rejective"))
    for prompt in PROMPTS:
        hf0 = hf_first_logits(base, bank, None, [], prompt, tb.template)
        cpp0 = probe.first_token_logits(prompt)
        for constraints, mode in compositions:
            hf = hf_first_logits(base, bank, mode, constraints, prompt, tb.template)
            cpp = probe.first_token_logits(prompt, tokens=constraints, mode=mode)
            top2 = np.sort(hf)[-2:]
            if top2[1] - top2[0] > 0.5:
                assert hf.argmax() == cpp.argmax(), (prompt, constraints, mode)
            effect = np.corrcoef(hf - hf0, cpp - cpp0)[0, 1]
            assert effect > 0.8, f"token effect correlation {effect:.3f} for {constraints} {mode} on {prompt!r}"


def test_smoke_training_on_real_model_exports_a_bank_the_runtime_loads(base, tmp_path, monkeypatch, model_path):
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig.from_yaml(CONFIGS / "smoke.yaml").replace(steps=2, limit_prompts=24, val_size=8, constraints=SMOKE_CONSTRAINTS, held_out=(("alcohol", "privacy"),))
    bank, summary = train(cfg, base, tmp_path / "run", progress=False)
    path = export_bank(bank, base, cfg, summary).save(tmp_path / "smoke.gguf", dtype="F16")
    loaded = TokenBank.load(path)
    for name in bank.names:  # F16 storage: round-trips within half precision
        np.testing.assert_allclose(loaded.tokens[name].vectors, bank.vectors[name].detach().numpy(), rtol=1e-3, atol=1e-2)
    assert loaded.origin == "trained" and loaded.training_config["steps"] == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(rec["dec"] > 0 for rec in log)  # the decision loss of the shipped recipe ran
    # smoke.yaml trains on every slice: conversations rendered with the template went through the teacher
    assert cfg.slices[0] == "classic" and "multi-turn" in cfg.slices
    assert summary["train_prompts_by_slice"].get("multi-turn", 0) >= 1, summary["train_prompts_by_slice"]

    from edge_safe import EdgeSafe

    with EdgeSafe(model_path=model_path, bank=path, n_ctx=256) as es:
        assert es.tokens == list(cfg.constraints)
        reply = es.create_chat_completion([{"role": "user", "content": "What is the capital of Peru?"}], tokens="minors", max_tokens=4)
        assert reply["edge_safe"]["mode"] == "positive"
        assert reply["edge_safe"]["tokens"] == [c for c in cfg.constraints if c in loaded.profiles["minors"]]


def test_validate_bank_reports_the_shipped_banks_first_token_decisions(base, model_path, monkeypatch):
    from edge_safe.models import default_bank_path
    from edge_safe.training import validate as v

    monkeypatch.setattr("edge_safe.training.base_model.load_gguf_model", lambda path, device="cpu": base)
    out = v.validate_bank(str(default_bank_path()), str(model_path), size=40, runtime=True)
    assert out["n"] >= 40 and set(out["auc_by_kind"]) == {"near-miss", "inactive", "general"}
    assert out["rejective_refusal"] == 1.0  # the shipped bank's rejective mode refuses at the first token
    assert out["auc"] > 0.6  # its tokens rank violating above should-answer prompts (random vectors: ≈ 0.5)
    rt = out["runtime"]  # the same positive-mode decisions through llama.cpp
    assert 0 < rt["vs_float32"]["n"] < out["n"] and "rejective_refusal" not in rt  # modes are not in it
    assert rt["auc"] > 0.6 and rt["vs_float32"]["margin_correlation"] > 0.5  # one model, two precisions


def test_validate_cli_names_the_model_a_foreign_bank_was_made_for(tmp_path):
    from dataclasses import replace

    from click.testing import CliRunner

    from edge_safe.cli import cli
    from edge_safe.models import default_bank_path

    other = replace(TokenBank.load(default_bank_path()), base_fingerprint="ab" * 32, base_name="Other 1B")
    path = other.save(tmp_path / "other.gguf")
    r = CliRunner().invoke(cli, ["train", "validate", str(path), "--size", "8"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert "fingerprint" in r.stderr and "Other 1B" in r.stderr
