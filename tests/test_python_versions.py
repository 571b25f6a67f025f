"""pyproject.toml's requires-python holds for the code and the tests: nothing in them needs a later Python's syntax or
standard modules unguarded. (It was >= 3.10 until Dec 2026, when vermin -t=3.10- found only test_install_platforms'
tomllib; it is >= 3.11 now, as diffusers', transformers' and accelerate's releases are.)"""

import ast
import re

from conftest import REPO

# Standard modules added after 3.10 ("What's New in Python" 3.11 to 3.14): importing one unguarded fails on an older Python.
NEWER_MODULES = {"tomllib": (3, 11), "wsgiref.types": (3, 11), "dbm.sqlite3": (3, 13), "annotationlib": (3, 14),
                 "compression": (3, 14), "concurrent.interpreters": (3, 14), "string.templatelib": (3, 14)}  # fmt: skip


def oldest_python() -> tuple[int, int]:
    found = re.search(r'^requires-python = ">=(\d+)\.(\d+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    return int(found.group(1)), int(found.group(2))


def python_files() -> list:
    return sorted(path for folder in ("finetune", "tests", "demo") for path in (REPO / folder).rglob("*.py"))


def guarded(tree: ast.Module) -> set[int]:
    """The lines of imports inside a `try` that falls back on ModuleNotFoundError or ImportError."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(ast.unparse(h.type or ast.Name("")) in ("ModuleNotFoundError", "ImportError") for h in node.handlers):
            lines |= {inner.lineno for statement in node.body for inner in ast.walk(statement) if isinstance(inner, ast.Import | ast.ImportFrom)}
    return lines


def newer_needs(path, oldest: tuple[int, int]) -> list[str]:
    """Where a file needs a Python newer than `oldest`: its syntax must parse as that Python's (the parser's
    feature_version: `except*` and the like; a SyntaxError here), and a standard module that Python lacks is imported
    only in a `try` with a fallback (tomli for tomllib)."""
    tree = ast.parse(path.read_text(), str(path), feature_version=oldest)
    fallbacks, needs = guarded(tree), []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        for name in names:
            newer = [version for module, version in NEWER_MODULES.items() if name == module or name.startswith(module + ".")]
            if any(version > oldest for version in newer) and node.lineno not in fallbacks:
                needs.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}, new in Python {newer[0]}")
    return needs


def test_no_file_needs_a_python_newer_than_requires_python():
    oldest = oldest_python()
    assert oldest >= (3, 11)  # read from pyproject.toml
    assert [need for path in python_files() for need in newer_needs(path, oldest)] == []
