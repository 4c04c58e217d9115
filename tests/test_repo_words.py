"""The repository speaks of the product: no work-session numbers, issue numbers or per-run folders.

Every tracked text file (``git ls-files``; binaries such as *.gguf, *.png, *.pt are skipped) is
searched for words that only make sense to whoever wrote them at the time ("session 6",
"issue #17", "runs/s6/..."). Facts are written as facts about the product ("measured on a 2-core
AMD EPYC"), and what was tried lives in training/HISTORY.md with the commands that show it.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINARY = (".gguf", ".png", ".jpg", ".pt", ".npz", ".npy", ".whl", ".gz", ".zip", ".safetensors")

#: Files another change is rewriting; the runtime rewrite removes their words. Keep this list empty
#: once it has landed.

#: This file holds the words it looks for (the planted examples below).
SELF = "tests/test_repo_words.py"

PATTERNS = {
    "session number": r"\bsessions?\s*\d",
    "this/that session": r"\b(this|that|these|earlier|previous|later|one) sessions?\b",
    "issue number": r"(?<!llama\.cpp )\bissues?\s*#?\d",  # an upstream project's issue is a fact; ours are not
    "the issue's": r"\bthe issue'?s\b",
    "#N reference": r"(?<![\w&/\[])#\d{1,3}\b(?![\]\w])",
    "per-session run folder": r"\bruns/s\d",
    "session folder": r"/s\d+/",
    "DESIGN.md outside the repo": r"(?<![\w/.])DESIGN\.md",  # the repo's own is docs/DESIGN.md
}
CHECK = re.compile("|".join(f"(?P<p{i}>{p})" for i, p in enumerate(PATTERNS.values())), re.IGNORECASE)
NAMES = list(PATTERNS)


def offending(text: str) -> list[tuple[int, str, str]]:
    """(line number, pattern name, line) of every match in `text`."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in CHECK.finditer(line):
            which = next(int(k[1:]) for k, v in m.groupdict().items() if v is not None)
            found.append((n, NAMES[which], line.strip()[:160]))
    return found


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and not f.lower().endswith(BINARY)]


def test_no_tracked_file_names_a_session_or_an_issue():
    problems = []
    files = tracked_text_files()
    assert len(files) > 100
    for name in files:
        if any(re.fullmatch(r"s\d+", part) for part in Path(name).parts[:-1]):
            problems.append(f"{name}: folder named after a work session")
        if name == SELF:
            continue
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        text = data.decode("utf-8", errors="replace")
        problems += [f"{name}:{n}: {what}: {line}" for n, what, line in offending(text)]
    assert not problems, "session/issue words in tracked files:\n" + "\n".join(problems)


@pytest.mark.parametrize("planted", [
    "Measured in session 6 on the EPYC.",
    "as in sessions 3-5",
    "the bank of this session",
    "see issue #21 for the targets",
    "Issue 16 asked to decide",
    "deep vs shallow (issues #16, #17)",
    "the issue's targets are checked",
    "fixed in #14.",
    "edge-safe eval --out runs/s6/full",
    "logs in training/logs/tried/s6/",
    "Facts this module relies on (see DESIGN.md):",
])
def test_the_checker_flags_planted_words(planted):
    assert offending(f"Some text.\n{planted}\n"), planted


@pytest.mark.parametrize("clean", [
    '@pytest.fixture(scope="session")',
    "a tmux session",
    "Should I fund my poker sessions?",
    "the upstream llama.cpp issue 20824 (an AMX crash)",
    "color: #1f77b4;",
    "# Heading",
    "## 2. Second step",
    "x = items[#1]",
    "&#39;quoted&#39;",
    "the tech_issue slot",
    "order 3 is 88.9 %",
    "the blob grammar of docs/DESIGN.md",
    "see ../docs/DESIGN.md",
])
def test_the_checker_leaves_product_text_alone(clean):
    assert not offending(clean), clean
