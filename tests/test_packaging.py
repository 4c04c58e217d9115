"""The wheel: what it carries (LICENSE, the phrase tables, the bank) and what it leaves out (the data splits).

Builds the wheel of this checkout once (``pip wheel --no-deps --no-build-isolation``, a few seconds).
"""
from __future__ import annotations

import re
import subprocess
import sys

import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = out.glob("edge_safe-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_the_wheel_carries_no_training_split(wheel):
    splits = [n for n in wheel.namelist() if n.endswith(".jsonl")]
    assert not splits, f"training data in the wheel: {splits}"


def test_the_wheel_carries_what_an_installed_package_needs(wheel):
    names = set(wheel.namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for needed in ("edge_safe/data/default.gguf", "edge_safe/training/data/splits.json",
                   "edge_safe/training/data/tables/alcohol.json", "edge_safe/training/data/tables/real/wrappers.json",
                   "edge_safe/training/configs/default.yaml", "edge_safe/training/banks/v3_shallow.gguf",
                   "edge_safe/convert/FORMAT.md"):
        assert needed in names


def test_the_wheel_metadata(wheel):
    import edge_safe

    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert f"\nVersion: {edge_safe.__version__}\n" in meta
    assert "\nLicense-Expression: Apache-2.0\n" in meta
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "END OF TERMS AND CONDITIONS" in (ROOT / "LICENSE").read_text()


def test_the_version_is_written_once():
    """pyproject reads the version from edge_safe.__version__; no other file sets one."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "edge_safe.__version__"}
    files = subprocess.run(["git", "ls-files", "*.py", "*.toml", "*.cfg"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    setter = re.compile(r"""^\s*(__version__|version)\s*=\s*['"]\d""", re.M)
    assert [f for f in files if setter.search((ROOT / f).read_text(encoding="utf-8"))] == ["edge/__init__.py"]


def test_the_dev_extra_reuses_the_server_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "edge-safe[server]" in extras["dev"]
    server = {re.split(r"[<>=!~\[ ]", r)[0] for r in extras["server"]}
    assert not server & {re.split(r"[<>=!~\[ ]", r)[0] for r in extras["dev"]}
