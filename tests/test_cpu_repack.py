"""llama.cpp's CPU buffer choice: no crash on AMX CPUs, repacked kernels kept elsewhere, one override."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edge_safe import llama as _llama
from edge_safe.llama import CPU_REPACK_CHOICES, ENV_CPU_REPACK, amx_in_build, plain_llama, resolve_cpu_repack
from edge_safe.convert.errors import EdgeSafeError


def test_the_setting_and_its_override(monkeypatch):
    monkeypatch.delenv(ENV_CPU_REPACK, raising=False)
    assert resolve_cpu_repack() is (not amx_in_build())  # auto: off exactly where AMX crashes
    assert resolve_cpu_repack("on") is True and resolve_cpu_repack("OFF") is False
    assert resolve_cpu_repack(True) is True and resolve_cpu_repack(False) is False
    monkeypatch.setenv(ENV_CPU_REPACK, "off")
    assert resolve_cpu_repack() is False
    assert resolve_cpu_repack("on") is True  # an explicit argument beats the environment
    monkeypatch.setenv(ENV_CPU_REPACK, "fast")
    with pytest.raises(EdgeSafeError, match=r"^\$EDGE_SAFE_CPU_REPACK must be one of auto, on, off; got 'fast'$"):
        resolve_cpu_repack()


def test_auto_follows_the_build(monkeypatch):
    monkeypatch.delenv(ENV_CPU_REPACK, raising=False)
    monkeypatch.setattr(_llama, "amx_in_build", lambda: True)
    assert resolve_cpu_repack() is False
    monkeypatch.setattr(_llama, "amx_in_build", lambda: False)
    assert resolve_cpu_repack() is True


def test_the_cli_knows_the_same_choices():
    from edge_safe import cli

    assert (cli.ENV_CPU_REPACK, cli.CPU_REPACK_CHOICES) == (ENV_CPU_REPACK, CPU_REPACK_CHOICES)


@pytest.mark.model
@pytest.mark.parametrize("use", [True, False])
def test_runtime_and_bare_baseline_load_alike(model_path, use):
    """The bench's bare llama-cpp-python baseline gets edge-safe's buffer choice, so its ratios stay fair."""
    llm = plain_llama(model_path, cpu_repack=use, n_ctx=64, verbose=False)
    try:
        assert bool(llm.model_params.use_extra_bufts) is use
    finally:
        llm.close()
    m = _llama.Context.load(model_path, n_ctx=64, n_threads=1, cpu_repack=use)
    try:
        assert m.model.cpu_repack is use
        if use and amx_in_build():
            return  # repacked Q4_K on AMX: the first decode dies with SIGSEGV (the crash ``auto`` avoids)
        m.decode_tokens([m.bos, *m.tokenize("Question: What is the capital of Peru?\nAnswer:")], 0)
        assert m.token_to_piece(int(m.logits().argmax())).strip() == b"Lima"
    finally:
        m.close()


@pytest.mark.model
def test_the_cli_flag_reaches_the_model(model_path):
    env = {**os.environ, "EDGE_SAFE_MODEL": str(model_path)}
    env.pop(ENV_CPU_REPACK, None)
    r = subprocess.run([sys.executable, "-m", "edge_safe.cli", "-v", "--cpu-repack", "off", "chat",
                        "What is the capital of Peru?", "--max-tokens", "2", "--threads", "1", "--n-ctx", "128"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "cpu_repack=False" in r.stderr and r.stdout.startswith("Lima")


@pytest.mark.model
@pytest.mark.skipif(not amx_in_build(), reason="llama.cpp here is not built with AMX (no AMX_INT8 in its system "
                    "info): the repacked-Q4_K AMX crash (llama.cpp issue 20824) cannot happen on this CPU")
def test_a_short_decode_survives_on_this_amx_cpu(model_path):
    """Without the fix this child dies with SIGSEGV at its first decode (exit -11 / 139)."""
    code = textwrap.dedent(f"""
        from edge_safe import EdgeSafe
        from edge_safe.llama import plain_llama
        es = EdgeSafe({str(model_path)!r}, n_ctx=256, n_threads=1)
        out = es.create_completion("What is the capital of Peru?", tokens="minors", max_tokens=4)
        print(repr(out["choices"][0]["text"]))
        llm = plain_llama({str(model_path)!r}, n_ctx=128, n_threads=1, verbose=False)
        print(repr(llm("Question: What is the capital of Peru?\\nAnswer:", max_tokens=4)["choices"][0]["text"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != ENV_CPU_REPACK}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "Lima" in r.stdout
