"""The README and the docs/ pages: every relative link points to a file of the repository, and every
``#anchor`` to a heading of its page (GitHub's heading ids); the README stays short and keeps the two
commands it starts with (`.ci/run` runs the second)."""
from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "bench/README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md"))
README_MAX_LINES = 200
INSTALL_AND_DEMO = "pip install -r requirements.txt && pip install -e . && python -m fused_preact.demo"
INSTALL_AND_TEST = "pip install -r requirements.txt && pip install -e . && python -m pytest"

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def heading_ids(text: str) -> set[str]:
    """GitHub's ids of a Markdown page's headings: lower case, link text for links, punctuation other
    than '-' and '_' dropped, spaces as '-', a repeated id suffixed -1, -2, ..."""
    ids: dict[str, int] = {}
    found = set()
    for line in _prose_lines(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = _LINK.sub(lambda m: m.group(1), match.group(1)).lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        count = ids.get(slug, 0)
        ids[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(text: str) -> list[str]:
    links = []
    for line in _prose_lines(text):
        for _, target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto: ...
                links.append(target)
    return links


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        text = f.read()
    broken = []
    for target in relative_links(text):
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else os.path.join(REPO, page)
        if not os.path.exists(file):
            broken.append(f"{target}: no file {os.path.relpath(file, REPO)}")
        elif anchor and file.endswith(".md"):
            with open(file, encoding="utf-8") as f:
                if anchor not in heading_ids(f.read()):
                    broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(file, REPO)}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_heading_ids_follow_github():
    text = "# A `memory=\"min\"` page\n## On the GPU: one command (`bench/x.sh --budget`)\n```\n# not a heading\n```\n## A\n## A\n"
    assert heading_ids(text) == {"a-memorymin-page", "on-the-gpu-one-command-benchxsh---budget", "a", "a-1"}


def test_readme_is_short_and_starts_with_the_two_commands():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    commands = lines[:8]
    assert INSTALL_AND_DEMO in commands and INSTALL_AND_TEST in commands
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        assert INSTALL_AND_TEST in f.read().splitlines()
