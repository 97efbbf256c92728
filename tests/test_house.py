"""No giant rooms: every module of the package, the tools and the examples stays under
MODULE_LINES lines and every function under FUNCTION_LINES, unless EXCEPTIONS gives the
written reason (docs/DESIGN.md, "Layers"). Read with ast, as tests/test_layers.py reads
the imports.

Test modules are not held to it: each is a list of independent cases about one
behaviour, read one case at a time, and its length is the number of cases.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_LINES = 500
FUNCTION_LINES = 60
WHERE = ("pmemfs", "tools", "examples")

# "path" for a module, "path:function" for a function (a method: "path:Class.method").
EXCEPTIONS: dict[str, str] = {}


def sources(root: Path) -> list[Path]:
    return sorted(p for top in WHERE for p in (root / top).rglob("*.py"))


def functions(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function, methods as Class.name."""
    out = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                # From the def line: decorators (click's options) declare, they do not run.
                out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")

    walk(tree, "")
    return out


def oversized(root: Path) -> list[str]:
    found = []
    for path in sources(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        lines = text.count("\n")
        if lines > MODULE_LINES and rel not in EXCEPTIONS:
            found.append(f"{rel}: {lines} lines (at most {MODULE_LINES})")
        for name, line, n in functions(ast.parse(text)):
            if n > FUNCTION_LINES and f"{rel}:{name}" not in EXCEPTIONS:
                found.append(f"{rel}:{line} {name}: {n} lines (at most {FUNCTION_LINES})")
    return found


def test_no_module_or_function_is_over_the_limit():
    found = oversized(ROOT)
    assert not found, "\n" + "\n".join(found)


def test_every_exception_is_still_needed_and_says_why():
    """An exception names something that exists and is over the limit, with a reason."""
    stale = []
    for key, reason in EXCEPTIONS.items():
        assert len(reason) > 20, f"{key}: say why"
        rel, _, name = key.partition(":")
        path = ROOT / rel
        if not path.exists():
            stale.append(f"{key}: no such file")
            continue
        text = path.read_text()
        if not name:
            if text.count("\n") <= MODULE_LINES:
                stale.append(f"{key}: within the limit now")
            continue
        sizes = {n: lines for n, _, lines in functions(ast.parse(text))}
        if sizes.get(name, 0) <= FUNCTION_LINES:
            stale.append(f"{key}: {'within the limit now' if name in sizes else 'no such function'}")
    assert not stale, "\n" + "\n".join(stale)


def test_the_checker_sees_what_it_measures(tmp_path):
    """A module and a function over the limits are reported (a checker that saw
    nothing would pass anything)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES))
    (tmp_path / "pmemfs").mkdir()
    (tmp_path / "pmemfs" / "big.py").write_text(
        "class C:\n    def m(self):\n" + body.replace("    ", "        ") + "\n" + "\n" * MODULE_LINES)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "ok.py").write_text("def f():\n    return 1\n")
    found = oversized(tmp_path)
    assert any(f.startswith("pmemfs/big.py:") and "C.m" in f for f in found), found
    assert any(f.startswith("pmemfs/big.py: ") for f in found), found
    assert not any("tools/ok.py" in f for f in found), found
