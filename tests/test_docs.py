"""The documentation holds together: a short README that reaches every page of docs/, links that
resolve (files and #anchors), and a table of contents in each long page that matches its headings.

`python tests/test_docs.py` rewrites the tables of contents after headings changed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 12_000
LONG_PAGE = 4_000  # characters; a page longer than this starts with a table of contents
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CONTENTS = "## Contents\n\n"


def markdown_files() -> list[Path]:
    others = [ROOT / "CHANGELOG.md", ROOT / "k8s" / "groups" / "README.md", *(ROOT / "examples").glob("*.md")]
    return [README, *PAGES, *[path for path in others if path.exists()]]


def prose(text: str) -> str:
    """The text outside fenced code blocks, where links and headings live."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str, deepest: int = 6) -> list[tuple[int, str]]:
    return [
        (len(m.group(1)), m.group(2))
        for m in re.finditer(r"^(#{1,6}) (.+)$", prose(text), re.M)
        if len(m.group(1)) <= deepest
    ]


def anchors(path: Path) -> set[str]:
    return {slug(title) for _, title in headings(path.read_text())}


def table_of_contents(text: str) -> str:
    """The list a page's Contents section must hold: its ## and ### headings after the Contents one."""
    entries = [(level, title) for level, title in headings(text, 3) if level >= 2 and title != "Contents"]
    return "\n".join(f"{'  ' * (level - 2)}- [{title}](#{slug(title)})" for level, title in entries)


def contents_section(text: str) -> str | None:
    if CONTENTS not in text:
        return None
    return text.split(CONTENTS, 1)[1].split("\n\n", 1)[0]


def test_readme_is_short() -> None:
    size = len(README.read_text())
    assert size <= README_LIMIT, f"README.md: {size} characters, over {README_LIMIT}: move details to docs/"


def test_readme_links_every_page_of_docs() -> None:
    linked = {
        (README.parent / unquote(target.split("#", 1)[0])).resolve()
        for target in LINK.findall(prose(README.read_text()))
    }
    assert PAGES, "docs/ has no pages"
    assert [page.name for page in PAGES if page.resolve() not in linked] == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link names an existing file, and every #anchor a heading of its page."""
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert broken == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_page_holds_merge_conflict_markers(path: Path) -> None:
    markers = re.findall(r"^(?:<{7}|={7}|>{7})(?: .*)?$", path.read_text(), re.M)
    assert markers == [], f"{path.name}: an unresolved merge"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_long_pages_have_a_table_of_contents_that_matches_their_headings(page: Path) -> None:
    text = page.read_text()
    found = contents_section(text)
    if len(text) > LONG_PAGE:
        assert found is not None, f"{page.name} is long and has no '## Contents' (python {__file__})"
    if found is not None:
        assert found == table_of_contents(text), f"stale table of contents: python {__file__}"


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(body)))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def documented_commands(prefix: str) -> list[tuple[str, str]]:
    """(file, command) for each shell command in the docs that starts with prefix, with its
    continuation lines joined and its trailing comment dropped."""
    found = []
    for path in markdown_files():
        for language, body in code_blocks(path.read_text()):
            for command in re.sub(r"\\\n\s*", " ", body).splitlines() if language in ("", "sh") else []:
                if command.startswith(prefix):
                    found.append((path.name, command.split("  #", 1)[0].strip()))
    return found


def test_documented_docker_runs_leave_a_graceful_stop_its_time() -> None:
    """The grace rule in every `docker run` of a worker on a shared Redis: --stop-timeout >= 25 + 5."""
    runs = [(name, cmd) for name, cmd in documented_commands("docker run ") if "REDIS_URL" in cmd]
    assert len(runs) >= 3, runs
    for name, command in runs:
        timeout = re.search(r"--stop-timeout[ =](\d+)", command)
        assert timeout and int(timeout.group(1)) >= 30, f"{name}: {command}"


def rewrite_tables_of_contents() -> None:
    for page in PAGES:
        text = page.read_text()
        found = contents_section(text)
        if found is not None:
            page.write_text(text.replace(CONTENTS + found, CONTENTS + table_of_contents(text), 1))


if __name__ == "__main__":
    rewrite_tables_of_contents()
    sys.exit(0)
