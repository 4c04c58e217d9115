"""The folders are the architecture: who may import whom, read from the source with ``ast``.

    training -> convert <- edge (runtime) <- eval, bench, edge/cli, edge/server

The runtime imports neither eval, bench, server nor CLI; ``convert`` imports nothing of the
rest; no package's modules import each other in a circle (TYPE_CHECKING imports included).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> import name, as in pyproject.toml's package-dir
PACKAGES = {"edge": "edge_safe", "convert": "edge_safe.convert", "training": "edge_safe.training",
            "eval": "edge_safe.eval", "bench": "edge_safe.bench"}
UPPER = ("edge_safe.eval", "edge_safe.bench", "edge_safe.server", "edge_safe.cli", "edge_safe.training")


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            if "results" not in path.parts:
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every edge_safe module ``name`` imports, anywhere in the file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return {m for m in out if m.split(".")[0] == "edge_safe" and m in MODULES}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _runtime_modules() -> list[str]:
    return sorted(n for n in MODULES if n == "edge_safe" or (n.startswith("edge_safe.") and n.count(".") == 1
                  and not n.startswith(UPPER) and n != "edge_safe.convert"))


def test_the_layout_was_found():
    assert {"edge_safe.runtime", "edge_safe.cli", "edge_safe.server.app", "edge_safe.eval.evaluate",
            "edge_safe.bench.benchmark", "edge_safe.convert.bank", "edge_safe.training.trainer"} <= set(MODULES)


@pytest.mark.parametrize("name", _runtime_modules())
def test_runtime_imports_nothing_upwards(name):
    upward = sorted(m for m in GRAPH[name] if m.startswith(UPPER))
    assert not upward, f"{name} (runtime) imports {upward}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("edge_safe.convert")))
def test_convert_imports_only_convert(name):
    outside = sorted(m for m in GRAPH[name] if not m.startswith("edge_safe.convert"))
    assert not outside, f"{name} imports {outside}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(("edge_safe.eval", "edge_safe.bench"))))
def test_eval_and_bench_use_neither_server_nor_cli(name):
    bad = sorted(m for m in GRAPH[name] if m.startswith(("edge_safe.server", "edge_safe.cli")))
    if name in ("edge_safe.eval.__main__", "edge_safe.bench.__main__"):
        bad = [m for m in bad if m != "edge_safe.cli"]  # `python -m edge_safe.eval` is `edge-safe eval`
    assert not bad, f"{name} imports {bad}"


def test_no_import_cycles_within_a_package():
    def package(m):
        return next((p for p in sorted(PACKAGES.values(), key=len, reverse=True) if m == p or m.startswith(p + ".")))

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in GRAPH[node]:
                if package(nxt) != package(start) or nxt == node:
                    continue
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, MODULES) if c]
    # a package's __init__ re-exporting its submodules is not a cycle of the code's own
    cycles = [c for c in cycles if not any(n in PACKAGES.values() for n in c)]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
