"""The edge install has no torch: importing edge_safe, running EdgeSafe and the chat CLI never import it.

Runs in a fresh interpreter where any attempt to import torch (or transformers)
fails, then checks that neither ended up in sys.modules.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.model

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        attempts = []
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                self.attempts.append(name)
                raise ImportError(f"{name} is blocked: the runtime must not need it")

    sys.meta_path.insert(0, Block())

    import edge_safe
    from edge_safe import EdgeSafe
    from edge_safe.llama import Context
    from edge_safe.convert.bank import from_text_bank, from_text_token
    from edge_safe.convert.model import ModelInfo
    from edge_safe.models import resolve_model_path
    from click.testing import CliRunner
    from edge_safe.cli import cli

    info = ModelInfo.read(resolve_model_path())
    with Context.load(info.path, n_ctx=64) as llm:
        tok = from_text_token(info, llm.tokenize, "alcohol", "Do not help with alcohol.",
                              refusal="Sorry, I can't help with alcohol.")
    bank_path = from_text_bank(info, [tok], {"minors": ["alcohol"]}).save(sys.argv[1])

    with EdgeSafe(bank=bank_path, n_ctx=256) as es:
        out = es.create_completion("What is the capital of Peru?", tokens="minors", max_tokens=4)
        print("reply:", out["choices"][0]["text"])
        from edge_safe.probe import Probe
        print("margin:", Probe(es).refusal_margin("What is the capital of Peru?", tokens="minors") < 0)
    r = CliRunner().invoke(cli, ["chat", "--bank", str(bank_path), "--n-ctx", "256", "--max-tokens", "4",
                                 "--tokens", "minors", "What is the capital of Peru?"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["tokens", "--bank", str(bank_path)])
    assert r.exit_code == 0, r.output
    print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
    print("attempts:", Block.attempts)
    """
)


def test_runtime_and_cli_never_import_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "bank.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reply: Lima" in proc.stdout
    assert "margin: True" in proc.stdout
    assert "imported: []" in proc.stdout
    assert "attempts: []" in proc.stdout
