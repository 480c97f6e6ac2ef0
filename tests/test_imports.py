"""No import circles in the package: every import counts, at the top of a module, inside a function
(a lazy import hides a circle, it does not remove it) or under TYPE_CHECKING (a circle of types is
still two modules that need each other). The graph is read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

from starter import ROOT

PACKAGE = ROOT / "resque_starter"

# Circles known to exist and owned by other work: each must still exist (so the entry is removed the
# day it is fixed), and no other circle may appear. None today.
KNOWN: set[frozenset[str]] = set()


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, wherever in the file the import statement is."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package that holds this module
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)  # a submodule by name
    return {module for module in found if module in known and module != name}


def graph(package: Path) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module: each is one or more circles."""

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reach = {name: reachable(name) for name in edges}
    return {
        frozenset(
            other for other in edges if other == name or (other in reach[name] and name in reach[other])
        )
        for name in edges
        if name in reach[name]
    }


def test_the_package_has_no_import_circle() -> None:
    found = circles(graph(PACKAGE))
    assert found - KNOWN == set(), f"import circles: {[sorted(c) for c in found - KNOWN]}"
    assert found >= KNOWN, f"fixed, remove from KNOWN: {[sorted(c) for c in KNOWN - found]}"


def test_the_checker_finds_lazy_relative_and_type_checking_circles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")  # lazy and relative
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from .d import g\n")
    (pkg / "sub" / "d.py").write_text("import pkg.sub\n")
    (pkg / "e.py").write_text("import pkg.a\n")  # imports into the circle, is not part of it
    assert circles(graph(pkg)) == {
        frozenset({"pkg.a", "pkg.b", "pkg.c"}),
        frozenset({"pkg.sub", "pkg.sub.d"}),
    }
