"""The release: the workflow that builds the wheel and the image runs on semver tags only, and the
changelog keeps an [Unreleased] section and a dated section for the package's version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def github_filter(pattern: str) -> re.Pattern[str]:
    """A GitHub Actions tag filter as a regex: `[0-9]+` one or more digits, `*` anything but `/`."""
    translated = ""
    for token in re.findall(r"\[[^\]]*\][+?]?|\*\*|\*|[^[*]", pattern):
        if token == "**":
            translated += ".*"
        elif token == "*":
            translated += "[^/]*"
        elif token.startswith("["):
            translated += token
        else:
            translated += re.escape(token)
    return re.compile(translated)


def test_the_release_workflow_runs_on_semver_tags_only() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    patterns = [github_filter(p) for p in workflow[True]["push"]["tags"]]  # YAML 1.1 reads `on` as True

    def releases(tag: str) -> bool:
        return any(p.fullmatch(tag) for p in patterns)

    assert [tag for tag in ("v0.1.0", "v1.12.3", "v2.0.0-rc.1") if not releases(tag)] == []
    assert [tag for tag in ("0.1.0", "v1.2", "latest", "v1.2.3.4", "vx.y.z") if releases(tag)] == []
    assert set(workflow["jobs"]) == {"dist", "image"}
    assert "OWNER/resque-starter" in workflow["env"]["IMAGE"]
    steps = " ".join(str(step.get("run", "")) for step in workflow["jobs"]["dist"]["steps"])
    assert "python -m build" in steps and "GITHUB_REF_NAME" in str(workflow["jobs"]["dist"]["steps"])


def test_the_changelog_keeps_an_unreleased_section_and_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert sections[0] == ("Unreleased", ""), "Keep a Changelog: [Unreleased] comes first"
    released = [name for name, date in sections[1:] if date]
    assert len(released) == len(sections) - 1, "every released version has a date"
    assert all(re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.]+)?", name) for name in released)
    assert VERSION in released, f"pyproject's version {VERSION} has no section in CHANGELOG.md"
    for name, _ in sections:
        assert re.search(rf"^\[{re.escape(name)}\]: https://", text, re.M), f"no link for [{name}]"
