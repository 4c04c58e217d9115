"""The shipped prompt data (training/data/*.jsonl): schema, splits, counts, reproducibility.

Stdlib + pytest only, a few seconds; the generator runs as `edge-safe data generate`.
"""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_safe.cli import cli
from edge_safe.training.data import generate as gen

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "training" / "data"
SPLITS = ("train", "val", "test")
KEYS = ("prompt", "category", "label", "family", "split")
#: Keys of the real-traffic rows, in file order; the last three only where they apply.
REAL_KEYS = KEYS + ("slice",)
REAL_OPTIONAL = ("wrapper", "messages", "context_category")
SLICES = ("general-real", "sounds-risky", "styled", "wrapped", "multi-turn")


CATEGORY_NAMES = gen.CATEGORY_NAMES


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    out = {}
    for split in SPLITS:
        path = DATA / f"{split}.jsonl"
        assert path.exists(), f"{path} missing: run edge-safe data generate"
        out[split] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return out


@pytest.fixture(scope="module")
def classic(rows) -> dict[str, list[dict]]:
    """The original rows (no "slice" field): the old eval slices stay comparable on them."""
    return {split: [r for r in rs if "slice" not in r] for split, rs in rows.items()}


@pytest.fixture(scope="module")
def real(rows) -> dict[str, list[dict]]:
    return {split: [r for r in rs if "slice" in r] for split, rs in rows.items()}


def test_category_names_match_categories_py():
    assert set(gen.CATS) == set(CATEGORY_NAMES)
    assert len(CATEGORY_NAMES) == 13  # the nine of the shipped bank, then violence, selfharm, hate, crime
    assert gen.ORIGINAL_CATEGORIES == CATEGORY_NAMES[:9] and gen.NEW_CATEGORIES == CATEGORY_NAMES[9:]


def test_schema(classic):
    allowed = set(CATEGORY_NAMES) | {"general"}
    for split, rs in classic.items():
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


def test_prompts_well_formed(classic):
    for rs in classic.values():
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
        keys = [(SLICES.index(r["slice"]) + 1 if "slice" in r else 0, r["category"], r["label"], r["family"], r["prompt"])
                for r in rs]
        assert keys == sorted(keys)
        first_real = next((i for i, r in enumerate(rs) if "slice" in r), len(rs))
        assert all("slice" in r for r in rs[first_real:]), "classic rows must all come first"


def test_classic_rows_unchanged_by_the_new_slices(classic):
    """The classic rows are exactly what the generator's classic part makes on its own: the original
    nine categories and general first, the categories added later (made after the real slices) on
    their own, neither changed by the other or by the slices."""
    again = gen._classic_rows(set())
    added = gen._classic_rows(set(), gen.NEW_CATEGORIES, general=False)
    for split in SPLITS:
        assert [r for r in classic[split] if r["category"] not in gen.NEW_CATEGORIES] == again[split]
        assert [r for r in classic[split] if r["category"] in gen.NEW_CATEGORIES] == added[split]


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
            key = gen._conv_key(r["messages"]) if "messages" in r else gen._norm(r["prompt"])
            assert key not in seen, (r["prompt"], seen.get(key), split)
            seen[key] = split


def test_counts_meet_minima(classic):
    rows = classic
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


def test_family_variety_and_split_shares(classic):
    fams = collections.defaultdict(lambda: collections.defaultdict(set))
    for split, rs in classic.items():
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
        assert again[split] == rows[split], f"{split}.jsonl is stale: run edge-safe data generate"


def test_generate_check_passes():
    r = CliRunner().invoke(cli, ["data", "generate", "--check"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ok: train.jsonl (")


def test_check_detects_stale_files(tmp_path):
    assert CliRunner().invoke(cli, ["data", "generate", "--out", str(tmp_path)]).exit_code == 0
    assert CliRunner().invoke(cli, ["data", "generate", "--check", "--out", str(tmp_path)]).exit_code == 0
    path = tmp_path / "test.jsonl"
    path.write_bytes(path.read_bytes()[:-200])
    r = CliRunner().invoke(cli, ["data", "generate", "--check", "--out", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr == f"Error: stale: {path} (run: edge-safe data generate --out {tmp_path})\n"


def test_readme_has_current_stats():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert gen.stats(gen.generate()) in readme, "README.md table is stale: paste `edge-safe data generate --stats`"
    assert str(gen.SEED) in readme


# ------------------------------------------------------------------ real-traffic slices
def test_real_schema(real):
    allowed = set(CATEGORY_NAMES) | {"general"}
    for split, rs in real.items():
        assert {r["slice"] for r in rs} == set(SLICES), split
        for r in rs:
            keys = tuple(r)
            assert keys[:len(REAL_KEYS)] == REAL_KEYS and set(keys[len(REAL_KEYS):]) <= set(REAL_OPTIONAL), r
            assert r["split"] == split and r["slice"] in SLICES
            assert r["label"] in ("violating", "benign") and r["category"] in allowed, r
            assert isinstance(r["prompt"], str) and r["prompt"] == r["prompt"].strip() and r["prompt"], r
            assert not gen.PLACEHOLDER.search(r["prompt"]), r
            tag = "v" if r["label"] == "violating" else "b"
            assert r["family"].startswith(f"{r['category']}/{tag}/"), r
            if r["category"] == "general":
                assert r["label"] == "benign", r
            assert ("wrapper" in r) == (r["slice"] == "wrapped"), r
            assert ("messages" in r) == (r["slice"] == "multi-turn"), r
            if r["slice"] in ("general-real", "sounds-risky"):
                assert r["label"] == "benign", r
            if r["slice"] == "styled":
                assert r["label"] == "violating", r
            if r["slice"] == "sounds-risky":
                assert r["category"] in CATEGORY_NAMES, r  # the category it sounds like


def test_multi_turn_conversations(real):
    refusal = {c.name: c.refusal for c in gen.CATEGORIES}
    kinds = collections.Counter()
    for split, rs in real.items():
        for r in (r for r in rs if r["slice"] == "multi-turn"):
            msgs = r["messages"]
            assert len(msgs) >= 3 and len(msgs) % 2 == 1, r
            for i, m in enumerate(msgs):
                assert set(m) == {"role", "content"} and m["content"] == m["content"].strip() and m["content"], r
                assert m["role"] == ("user" if i % 2 == 0 else "assistant"), r
            assert msgs[-1]["content"] == r["prompt"]
            refused = [msgs[i]["content"] for i in range(1, len(msgs), 2) if msgs[i]["content"] in refusal.values()]
            if "context_category" in r:
                assert r["context_category"] in CATEGORY_NAMES
                assert refused == [refusal[r["context_category"]]], r
                kinds[(split, r["label"], "after-refusal")] += 1
            else:
                assert not refused, r
            if r["label"] == "violating":
                assert r["category"] in CATEGORY_NAMES, r
            else:
                assert r["category"] == "general", r
            kinds[(split, r["label"])] += 1
    for split in SPLITS:  # every split measures both: a later violating turn, a benign turn after a refusal
        assert kinds[(split, "violating")] >= 50 and kinds[(split, "benign", "after-refusal")] >= 20, (split, kinds)


def test_real_families_disjoint_across_splits(real):
    """Wrapper, style and conversation-shape families never cross splits: test measures unseen ones."""
    for key in ("wrapper", "family"):
        where = collections.defaultdict(set)
        for split, rs in real.items():
            for r in rs:
                name = r.get("wrapper") if key == "wrapper" else r["family"].split("/", 2)[2]
                if name is not None:
                    where[(r["slice"], name)].add(split)
        shared = {k: v for k, v in where.items() if len(v) > 1}
        assert not shared, shared
    wrappers = {split: {r["wrapper"] for r in rs if r["slice"] == "wrapped"} for split, rs in real.items()}
    assert all(len(wrappers[s]) >= 2 for s in SPLITS), wrappers
    assert len(wrappers["train"]) >= 3 * len(wrappers["test"]) - 2, wrappers  # about 70 / 10 / 20


def test_real_minima_and_variety(real):
    for split, rs in real.items():
        count = collections.Counter((r["slice"], r["category"], r["label"]) for r in rs)
        for cat in gen.ORIGINAL_CATEGORIES:  # the slices draw over the nine original categories only
            assert count[("styled", cat, "violating")] >= gen.REAL_MINIMA["styled"][split], (split, cat)
            assert count[("wrapped", cat, "violating")] >= gen.REAL_MINIMA["wrapped/violating"][split], (split, cat)
            assert count[("multi-turn", cat, "violating")] >= gen.REAL_MINIMA["multi-turn/violating"][split]
            assert count[("sounds-risky", cat, "benign")] >= gen.REAL_MINIMA["sounds-risky"][split], (split, cat)
        assert count[("general-real", "general", "benign")] >= gen.REAL_MINIMA["general-real"][split]
    train = [r for r in real["train"] if r["slice"] == "general-real"]
    fams = {r["family"] for r in train}
    assert len(fams) >= 15
    prompts = [r["prompt"] for r in train]
    # the things real traffic has and the classic rows do not
    assert sum("\n" in p for p in prompts) >= 50  # pasted code / text, lists, paragraphs
    assert sum(len(p.split()) <= 2 for p in prompts) >= 10  # "hi", "tell me a joke"-short
    assert sum(p == p.lower() for p in prompts) >= 100  # lowercase
    assert sum(any(ord(ch) > 127 for ch in p) for p in prompts) >= 5  # non-English


def test_transforms():
    rng = gen.random.Random(0)
    assert gen._transform("How do I Fix it?", "lower", rng) == "how do i fix it"
    assert gen._transform("tell me", "leet", rng) == "73ll m3"
    typo = gen._transform("please explain something interesting about elephants", "typo", gen.random.Random(3))
    assert typo != "please explain something interesting about elephants" and len(typo.split()) == 6
    with pytest.raises(ValueError, match="unknown transform"):
        gen._transform("x", "rot13", rng)
    forms = gen._request_slots("tell me a joke")
    assert forms["req"] == "Tell me a joke." and forms["req_inline"] == "tell me a joke"
    assert forms["req_reversed"] == "joke a me tell" and forms["req_a"] + " " + forms["req_b"] == "tell me a joke"


def test_bad_table_is_reported(tmp_path, monkeypatch):
    (tmp_path / "styles.json").write_text("{not json", encoding="utf-8")
    monkeypatch.setattr(gen, "REAL", tmp_path)
    with pytest.raises(SystemExit, match="styles.json: not valid JSON"):
        gen._real_table("styles")
    with pytest.raises(SystemExit, match="phrase table missing"):
        gen._real_table("nope")
    with pytest.raises(SystemExit, match="non-empty list of templates"):
        gen._family_spec("x", [])


# ------------------------------------------------------------------ an installed package's splits


def test_splits_json_records_the_committed_files():
    """training/data/splits.json is what an installed package checks its regenerated splits against."""
    import hashlib

    manifest = json.loads((DATA / "splits.json").read_text())
    assert manifest["seed"] == gen.SEED
    for split in SPLITS:
        data = (DATA / f"{split}.jsonl").read_bytes()
        assert manifest["splits"][split] == {"sha256": hashlib.sha256(data).hexdigest(), "rows": data.count(b"\n")}, (
            f"{split}.jsonl changed: record it with "
            "python -c 'from edge_safe.training.data.splits import write_manifest; write_manifest()'")


def test_a_package_without_the_splits_regenerates_them_into_the_cache(tmp_path, monkeypatch):
    from edge_safe.eval.data import default_data_path
    from edge_safe.training.data import splits

    monkeypatch.setattr(splits, "HERE", tmp_path / "package")  # an installed package: no .jsonl files
    monkeypatch.setenv("EDGE_SAFE_CACHE", str(tmp_path / "cache"))
    path = default_data_path()
    assert path == tmp_path / "cache" / "data" / "test.jsonl"
    for split in SPLITS:
        assert (tmp_path / "cache" / "data" / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes()
    path.write_text("tampered\n")  # a damaged cache copy is made again
    assert splits.split_path("test").read_bytes() == (DATA / "test.jsonl").read_bytes()
