"""The repository stands alone: no tracked file points outside it, and every cited architecture anchor exists.

Code, tests and docs cite ``docs/architecture.md#<anchor>`` (or ``docs/design.md``). A reference to the project's
old background folder, to a path above the repository, or to a numbered section of a document that is not in the
repository cannot be followed from a clone, so this test fails on any.
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".ruff_cache"}

# written in pieces so this file does not match itself
FORBIDDEN = [
    ("a path into the background folder outside the repository", re.compile("shared" + r"/")),
    ("an absolute path into the work area", re.compile(r"/work" + r"/")),
    ("a relative path above the repository", re.compile(r"\.\./+(?:" + "spec" + r"|shared|notes)\b")),
    ("a numbered section of a document not in the repository", re.compile("\u00a7" + r"\s*\d")),
]
ANCHOR_REF = re.compile(r"architecture\.md#([A-Za-z0-9_-]+)")
ANCHOR_DEF = re.compile(r'<a id="([A-Za-z0-9_-]+)"></a>')


def tracked_text_files() -> List[str]:
    """Repository-relative paths of the tracked files (every file outside build/venv folders without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        paths = [p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            paths += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    return [p for p in paths if os.path.isfile(os.path.join(ROOT, p))]


def read_text(path: str) -> str:
    """The file's text, or "" for a binary file."""
    with open(os.path.join(ROOT, path), "rb") as f:
        data = f.read()
    if b"\0" in data[:8192]:
        return ""
    return data.decode("utf-8", errors="replace")


def test_no_tracked_file_points_outside_the_repository():
    this = os.path.relpath(os.path.abspath(__file__), ROOT)
    problems = []
    for path in tracked_text_files():
        if path == this:
            continue
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            for what, pattern in FORBIDDEN:
                if pattern.search(line):
                    problems.append(f"{path}:{lineno}: {what}: {line.strip()[:120]}")
    assert not problems, ("cite docs/architecture.md#<anchor> or docs/design.md instead:\n" + "\n".join(problems))


def test_every_cited_architecture_anchor_exists():
    with open(ARCHITECTURE, encoding="utf-8") as f:
        defined = set(ANCHOR_DEF.findall(f.read()))
    assert {"config", "ids", "decoder-layer", "loss", "labels", "hf-state-dict"} <= defined
    missing = []
    for path in tracked_text_files():
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            missing += [f"{path}:{lineno}: #{a}" for a in ANCHOR_REF.findall(line) if a not in defined]
    assert not missing, "anchors cited but not defined in docs/architecture.md:\n" + "\n".join(missing)


def test_the_checks_catch_what_they_are_for():
    """The patterns match the reference styles they exist to refuse (so the scan above cannot pass vacuously)."""
    bad = ["see " + "shared" + "/spec/x.md", "(spec " + "\u00a7" + "1.5)", "../" + "spec/anchors.md"]
    for text in bad:
        assert any(p.search(text) for _, p in FORBIDDEN), text
    assert not any(p.search("docs/architecture.md#decoder-layer") for _, p in FORBIDDEN)
