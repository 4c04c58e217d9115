"""The folders are the architecture: who may import whom, read from the source with ``ast``.

    convert <- runtime (edge/) <- eval <- bench;  training -> convert, runtime;  edge/cli, edge/server on top
    data (edge_safe.training.data: prompt tables, splits, third-party sources; no torch) <- eval, training

Imports point one way (:data:`MAY_IMPORT`, TYPE_CHECKING and lazy imports included); no
package's modules import each other in a circle; no module reads another module's private
members (:func:`private_accesses`); and every entry point is an ``edge-safe`` subcommand:
no ``python -m`` scripts outside the CLI.
"""
from __future__ import annotations

import ast
import re
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


def _layer(module: str) -> str:
    """convert, data, training, eval, bench, cli, server, or runtime (the rest of edge_safe)."""
    parts = module.split(".")
    if parts[1:3] in (["training", "data"], ["training", "categories"]):  # category definitions are data too
        return "data"
    if len(parts) > 1 and parts[1] in ("convert", "training", "eval", "bench", "cli", "server"):
        return parts[1]
    return "runtime"


#: layer -> the layers it may import. Nothing imports upwards; the CLI sits on top of everything.
MAY_IMPORT = {
    "convert": {"convert"},
    "runtime": {"convert", "runtime"},
    "data": {"convert", "data"},  # the prompt data: read by eval and training alike
    "eval": {"convert", "runtime", "data", "eval"},
    "bench": {"convert", "runtime", "eval", "bench"},
    "training": {"convert", "runtime", "data", "training"},  # and of the runtime only its public API (no _modules)
    "server": {"convert", "runtime", "server"},
    "cli": {"convert", "runtime", "data", "eval", "bench", "training", "server", "cli"},
}


def test_the_layout_was_found():
    assert {"edge_safe.runtime", "edge_safe.cli", "edge_safe.server.app", "edge_safe.eval.evaluate",
            "edge_safe.bench.benchmark", "edge_safe.convert.bank", "edge_safe.training.trainer"} <= set(MODULES)
    assert {_layer(m) for m in MODULES} == set(MAY_IMPORT)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_one_way(name):
    bad = sorted(m for m in GRAPH[name] if _layer(m) not in MAY_IMPORT[_layer(name)])
    assert not bad, f"{name} ({_layer(name)}) imports {bad}; {_layer(name)} may import only {sorted(MAY_IMPORT[_layer(name)])}"


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


# --- entry points -----------------------------------------------------------------------------

#: The one `python -m` entry point: `python -m edge_safe.cli` is the `edge-safe` command.
CLI_MAIN = "edge/cli/__main__.py"


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return False
    sides = [node.test.left, *node.test.comparators]
    return (any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
            and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides))


def script_entry_points(path: Path, source: str) -> list[str]:
    """Why ``path`` is a `python -m` entry point outside the CLI: a __main__.py, or a main guard."""
    rel = path.as_posix()
    if rel == CLI_MAIN:
        return []
    found = [f"{rel}: a __main__.py"] if path.name == "__main__.py" else []
    return found + [f"{rel}:{n.lineno}: if __name__ == '__main__'" for n in ast.walk(ast.parse(source))
                    if _is_main_guard(n)]


def test_every_entry_point_is_an_edge_safe_subcommand():
    found = [hit for p in MODULES.values()
             for hit in script_entry_points(p.relative_to(ROOT), p.read_text(encoding="utf-8"))]
    assert not found, "python -m entry points outside the CLI (make them `edge-safe` subcommands): " + "; ".join(found)


def test_the_entry_point_check_flags_a_planted_script():
    planted = "def main():\n    pass\n\n\nif __name__ == '__main__':\n    main()\n"
    assert script_entry_points(Path("eval/x.py"), planted) == ["eval/x.py:5: if __name__ == '__main__'"]
    assert script_entry_points(Path("bench/__main__.py"), "") == ["bench/__main__.py: a __main__.py"]
    assert script_entry_points(Path(CLI_MAIN), "from edge_safe.cli import main\n\nmain()\n") == []


# --- private members --------------------------------------------------------------------------
#
# The rule, kept simple (no type inference): a module reads another module's private member when it
#   1. imports a private name or module: ``from edge_safe.x import _name``, ``import edge_safe._x``,
#      ``from edge_safe import _x`` (a single leading underscore; dunders such as __version__ are public);
#   2. reads ``<expr>._name`` where <expr> is not ``self``, ``cls`` or ``super()`` and ``_name`` is not
#      defined in the same file: by a def or class, an assignment or import anywhere in it, or an
#      assignment to ``self._name`` / ``cls._name`` (so a module may use its own classes' internals);
#   3. marks an access ``noqa: SLF001`` (ruff's private-member rule): the marker admits a reach into
#      another module's internals that rule 2 cannot tell from the file's own same-named attribute.
# ALLOWED lists the third-party internals that have no public equivalent, each with its reason.

ALLOWED = {
    "sys._getframe": "the caller's frame: the stdlib has no public spelling",
    "os._exit": "exit a forked child without running the parent's cleanup",
    "._fields_": "ctypes: a Structure's field layout is declared under this name",
    "._pack_": "ctypes: a Structure's packing is declared under this name",
    "._as_parameter_": "ctypes: how an object is passed to a C function",
    "._replace": "namedtuple's public API (underscored so it cannot clash with a field)",
    "._asdict": "namedtuple's public API (underscored so it cannot clash with a field)",
    "._fields": "namedtuple's public API (underscored so it cannot clash with a field)",
}

#: Files that read another module's private members today, all in code being rewritten right now
#: (the runtime's single decode path); the rewrite empties this set. Nothing else may join it.


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_here(tree: ast.AST) -> set[str]:
    """Every name the file itself binds: defs, classes, assignments, imports, self./cls. attributes."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for x in ast.walk(target):
                    if isinstance(x, ast.Name):
                        out.add(x.id)
                    elif isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name) and x.value.id in ("self", "cls"):
                        out.add(x.attr)
    return out


def _is_self(node: ast.expr) -> bool:
    return ((isinstance(node, ast.Name) and node.id in ("self", "cls"))
            or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"))


def _allowed(node: ast.Attribute) -> bool:
    return f"{ast.unparse(node.value)}.{node.attr}" in ALLOWED or f".{node.attr}" in ALLOWED


def private_accesses(source: str, module: str = "edge_safe.x") -> list[str]:
    """``line: expression`` of every read of another module's private member in ``source`` (rules above)."""
    tree = ast.parse(source)
    package = module.rpartition(".")[0]
    here = _defined_here(tree)
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"{node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "edge_safe" and any(map(_private, a.name.split(".")))]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "edge_safe" or base == module:
                continue
            names = [a.name for a in node.names]
            if any(map(_private, base.split("."))) or any(map(_private, names)):
                out.append(f"{node.lineno}: from {base} import {', '.join(names)}")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and not _is_self(node.value):
            marked = re.search(r"noqa:[^#]*\bSLF001\b", lines[node.lineno - 1])
            if (node.attr not in here or marked) and not _allowed(node):
                out.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(set(out), key=lambda hit: int(hit.split(":")[0]))


def _offenders() -> dict[str, list[str]]:
    found = {}
    for name, path in MODULES.items():
        hits = private_accesses(path.read_text(encoding="utf-8"), name)
        if hits:
            found[path.relative_to(ROOT).as_posix()] = hits
    return found


OFFENDERS = _offenders()


def test_no_module_reads_another_modules_private_members():
    bad = OFFENDERS
    assert not bad, "private members read across modules (add a public API instead):\n" + "\n".join(
        f"  {f}:{hit}" for f, hits in bad.items() for hit in hits)


def test_the_private_member_check_flags_planted_snippets():
    planted = (
        "from edge_safe.runtime import EdgeSafe, _helper\n"  # 1: a private name
        "import edge_safe._llama\n"  # 2: a private module
        "from edge_safe import _llama\n"  # 3: the same, spelled differently
        "from . import _sibling\n"  # 4: relative
        "def f(es):\n"
        "    return es._llm.n_ctx\n"  # 6: another object's private attribute
        "class C:\n"
        "    def __init__(self, es):\n"
        "        self._lock = es._lock  # noqa: SLF001\n"  # 9: admitted, though _lock is also this file's
        "        self._own = 1\n"
        "    def g(self, other):\n"
        "        return self._own + other._own + super()._x + _module_helper() + sys._getframe().f_lineno\n"
        "def _module_helper():\n"
        "    return C.__init__, C()._own, mod._fields_\n"
    )
    assert private_accesses(planted, "edge_safe.eval.x") == [
        "1: from edge_safe.runtime import EdgeSafe, _helper",
        "2: import edge_safe._llama",
        "3: from edge_safe import _llama",
        "4: from edge_safe.eval import _sibling",
        "6: es._llm",
        "9: es._lock",
    ]
    assert private_accesses("import edge_safe.llama\nfrom edge_safe import __version__\nx = y.__dict__\n") == []
