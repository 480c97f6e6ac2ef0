"""The settings table of docs/configuration.md, generated from the declarations (config.SETTINGS).

`python -m resque_starter.settings_doc` rewrites the table between its markers; `--check` exits 1 when
the committed table differs from the code (tests/test_config.py runs the same comparison).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resque_starter.config import SETTINGS, Setting

BEGIN = "<!-- settings-table:begin -->"
END = "<!-- settings-table:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(s: Setting) -> str:
    names = f"`{s.env}`<br>`{s.flag}`" + (f"<br>`{s.name} =`" if s.in_file else "")
    return f"| {names} | {_cell(s.doc)} | {_cell(s.kind.allowed)} | {_cell(s.shown_default())} |"


def table() -> str:
    """The settings, one table per section, in declaration order."""
    lines: list[str] = []
    for section in dict.fromkeys(s.section for s in SETTINGS):
        if lines:
            lines.append("")
        lines += [
            f"#### {section}",
            "",
            "| variable, flag, config file | what it does | allowed | default |",
            "|---|---|---|---|",
        ]
        lines += [_row(s) for s in SETTINGS if s.section == section]
    return "\n".join(lines)


def render(page: str) -> str:
    """`page` with the text between the markers replaced by the current table."""
    head, begin, rest = page.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} markers")
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page's table is not current")
    parser.add_argument("page", nargs="?", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    text = args.page.read_text()
    current = render(text)
    if args.check:
        if current != text:
            print(f"{args.page}: the settings table differs from the code; regenerate it", file=sys.stderr)
            return 1
        return 0
    args.page.write_text(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
