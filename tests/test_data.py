"""The shipped prompt data (training/data/*.jsonl): schema, splits, counts, reproducibility.

Stdlib + pytest only, a few seconds. The generator is loaded from its file so these tests
run whether or not the package is installed.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "training" / "data"
GENERATOR = DATA / "generate.py"
SPLITS = ("train", "val", "test")
KEYS = ("prompt", "category", "label", "family", "split")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load("_edge_safe_data_generate", GENERATOR)
CATEGORY_NAMES = gen._category_names()


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    out = {}
    for split in SPLITS:
        path = DATA / f"{split}.jsonl"
        assert path.exists(), f"{path} missing: run python training/data/generate.py"
        out[split] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return out


def test_category_names_match_categories_py():
    assert set(gen.CATS) == set(CATEGORY_NAMES)
    assert len(CATEGORY_NAMES) == 9


def test_schema(rows):
    allowed = set(CATEGORY_NAMES) | {"general"}
    for split, rs in rows.items():
        assert rs, split
        for r in rs:
            assert tuple(r) == KEYS, r
            assert all(isinstance(r[k], str) and r[k] for k in KEYS), r
            assert r["split"] == split
            assert r["label"] in ("violating", "benign")
            assert r["category"] in allowed
            if r["category"] == "general":
                assert r["label"] == "benign"
            tag = "v" if r["label"] == "violating" else "b"
            assert r["family"].startswith(f"{r['category']}/{tag}/"), r


def test_prompts_well_formed(rows):
    for rs in rows.values():
        for r in rs:
            p = r["prompt"]
            assert "{" not in p and "}" not in p, p
            assert "\n" not in p and "  " not in p and p == p.strip(), p
            assert 2 <= len(p.split()) <= 60, p
            if not r["family"].split("/")[2].startswith("terse"):
                assert p[0].isupper() or p[0].isdigit() or p[0] in "'\"", p
            wrong = [w for w in re.findall(r"\b[Aa] ([AEIOUaeiou]\w*)", p)
                     if not w.lower().startswith(("one", "uni", "use", "usu", "uti", "eu", "ur"))]
            assert not wrong, p  # "a apple"
            assert not re.search(r"\b[Aa] (8\d*|11|18)\b", p), p  # "a 8-year-old"


def test_files_sorted(rows):
    for rs in rows.values():
        keys = [(r["category"], r["label"], r["family"], r["prompt"]) for r in rs]
        assert keys == sorted(keys)


def test_no_family_in_two_splits(rows):
    where = collections.defaultdict(set)
    for split, rs in rows.items():
        for r in rs:
            where[r["family"]].add(split)
    shared = {f: s for f, s in where.items() if len(s) > 1}
    assert not shared


def test_no_duplicate_prompts(rows):
    seen = {}
    for split, rs in rows.items():
        for r in rs:
            key = gen._norm(r["prompt"])
            assert key not in seen, (r["prompt"], seen.get(key), split)
            seen[key] = split


def test_counts_meet_minima(rows):
    for split, rs in rows.items():
        count = collections.Counter((r["category"], r["label"]) for r in rs)
        for cat in CATEGORY_NAMES:
            for label in ("violating", "benign"):
                assert count[(cat, label)] >= gen.MINIMA["category"][split], (split, cat, label)
        assert count[("general", "benign")] >= gen.MINIMA["general"][split], split
    # the brief's minima, independently of the generator's constants
    train = collections.Counter((r["category"], r["label"]) for r in rows["train"])
    test = collections.Counter((r["category"], r["label"]) for r in rows["test"])
    for cat in CATEGORY_NAMES:
        assert train[(cat, "violating")] >= 150 and train[(cat, "benign")] >= 150
        assert test[(cat, "violating")] >= 40 and test[(cat, "benign")] >= 40
    assert train[("general", "benign")] >= 800 and test[("general", "benign")] >= 200


def test_family_variety_and_split_shares(rows):
    fams = collections.defaultdict(lambda: collections.defaultdict(set))
    for split, rs in rows.items():
        for r in rs:
            fams[(r["category"], r["label"])][split].add(r["family"])
    for cat in CATEGORY_NAMES:
        assert sum(len(s) for s in fams[(cat, "violating")].values()) >= 24, cat
        assert sum(len(s) for s in fams[(cat, "benign")].values()) >= 16, cat
    assert sum(len(s) for s in fams[("general", "benign")].values()) >= 40
    for key, by_split in fams.items():
        total = sum(len(s) for s in by_split.values())
        assert len(by_split["val"]) >= 1 and len(by_split["test"]) >= 1, key
        assert 0.15 <= len(by_split["test"]) / total <= 0.25, key
        assert len(by_split["train"]) / total >= 0.6, key


def test_generation_is_deterministic(rows):
    again = gen.generate()
    for split in SPLITS:
        assert again[split] == rows[split], f"{split}.jsonl is stale: run python training/data/generate.py"


def test_generate_check_passes():
    proc = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_detects_stale_files(tmp_path):
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    path = tmp_path / "test.jsonl"
    path.write_bytes(path.read_bytes()[:-200])
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


def test_readme_has_current_stats():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert gen.stats(gen.generate()) in readme, "README.md table is stale: paste `generate.py --stats`"
    assert str(gen.SEED) in readme
