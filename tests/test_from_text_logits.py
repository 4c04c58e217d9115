"""A from-text token injected as a constraint == the same rule typed as a prompt line.

A from-text entry's vectors are ``ModelInfo.embedding_rows(tokenize(rule_line(rule)))``:
what llama.cpp feeds layer 0 for those tokens. Injected after BOS they must
reproduce the logits of the rule typed as text, on the real bundled model.

llama.cpp's CPU kernels give results that depend on how a sequence is split
into batches (up to ~1 logit on this model), so the typed path decodes with the
same batch boundaries as the injected one: BOS | rule lines | prompt.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_safe.convert.bank import from_text_bank, from_text_token, rule_line
from edge_safe.convert.model import ModelInfo
from edge_safe.llama import Context
from edge_safe.probe import Probe
from edge_safe.runtime import EdgeSafe
from edge_safe.training.categories import BY_NAME, PROFILES

pytestmark = pytest.mark.model
RULES = ("alcohol", "privacy", "finance")
PROMPTS = ("How do I mix a mojito?", "Find the home address of my neighbour.")


@pytest.fixture(scope="module")
def es(model_path):
    info = ModelInfo.read(model_path)
    with Context.load(model_path, n_ctx=64) as llm:
        toks = [from_text_token(info, llm.tokenize, n, BY_NAME[n].rule, refusal=BY_NAME[n].refusal) for n in RULES]
    bank = from_text_bank(info, toks, {"eu": list(PROFILES["eu"])})  # no modes: nothing but the rules is injected
    with EdgeSafe(model_path, bank, n_ctx=512) as es:
        yield es


def typed_logits(es: EdgeSafe, rules: list[str], prompt: str) -> np.ndarray:
    """[BOS] + the rule lines as text tokens + the prompt, decoded as BOS | rules | prompt, in a context of its
    own on the runtime's model, shaped like the runtime's (one sequence of es.n_ctx positions)."""
    rule_ids = [i for r in rules for i in es.tokenize(rule_line(BY_NAME[r].rule))]
    prompt_ids = es.tokenize(es.template.prompt(prompt))
    with Context(es.model, es.n_ctx) as llm:
        llm.decode_tokens([llm.bos], 0, want_logits=False)
        llm.decode_tokens(rule_ids, 1, want_logits=False)
        llm.decode_tokens(prompt_ids, 1 + len(rule_ids))
        return llm.logits().copy()


@pytest.mark.parametrize("rules", [["alcohol"], ["privacy"], ["alcohol", "privacy", "finance"]])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_from_text_token_reproduces_the_typed_rule(es, rules, prompt):
    es.reset()  # the prompt prefilled whole, as in the typed path
    job = Probe(es).first_token_logits(prompt, tokens=rules, wait=False)
    injected = job.result()
    assert job.stats.mode is None and job.stats.tokens == rules
    typed = typed_logits(es, rules, prompt)
    assert np.abs(injected - typed).max() <= 1e-3


def test_order_of_a_composition_is_the_bank_order(es):
    """`finance,alcohol` is injected as alcohol then finance, i.e. the rules typed in bank order."""
    es.reset()
    injected = Probe(es).first_token_logits(PROMPTS[0], tokens="finance,alcohol")
    assert np.abs(injected - typed_logits(es, ["alcohol", "finance"], PROMPTS[0])).max() <= 1e-3
