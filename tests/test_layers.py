"""The package's layers: every import in pmemfs/ points down or sideways, and none forms
a cycle (docs/DESIGN.md, "Layers").

Read with ast, not by importing: an import inside a function counts as much as one at
the top of a module (a lazy import is still a dependency). Only an import under
`if TYPE_CHECKING:` is left out of the cycle check, since it never runs; it must still
point down or sideways.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The layer order, lowest first; DESIGN.md's "Layers" writes the same line. Each layer
# is a subpackage of pmemfs, except "client": the modules directly in pmemfs/
# (direct.py, kernel.py).
LAYERS = ("media", "fs", "serve", "client", "tools")
ORDER = " < ".join(LAYERS)


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the pmemfs package under root."""
    out = {}
    for p in sorted((root / "pmemfs").rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS[-1]  # pmemfs/__init__.py: the package itself, above everything
    if len(parts) == 2 and parts[1] not in LAYERS:
        return "client"
    return parts[1] if parts[1] in LAYERS and parts[1] != "client" else None


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside an `if TYPE_CHECKING:` body."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    out |= {id(n) for n in ast.walk(child) if isinstance(n, ast.Import | ast.ImportFrom)}
    return out


def imports(root: Path) -> list[tuple[str, str, int, bool]]:
    """(importer, imported module, line, runs) for every pmemfs import under root.

    The imported module is the most specific one that exists: `from ..media import check`
    names pmemfs.media.check, `from ..fs.engine import Engine` names pmemfs.fs.engine.
    runs is False for an import under `if TYPE_CHECKING:`."""
    files = module_files(root)

    def resolve(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    out = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = _type_checking_only(tree)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "pmemfs"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != "pmemfs":
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                out.append((mod, resolve(t), node.lineno, id(node) not in typing_only))
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a self-import
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def problems(root: Path) -> list[str]:
    """Every module outside a layer, every upward import and every cycle, one line each."""
    out = []
    files = module_files(root)
    for mod in files:
        if layer_of(mod) is None:
            out.append(f"{mod}: in no layer (layers: {ORDER})")
    edges: dict[str, set[str]] = {}
    for mod, target, line, runs in imports(root):
        a, b = layer_of(mod), layer_of(target)
        if a is not None and b is not None and LAYERS.index(b) > LAYERS.index(a):
            out.append(f"{files[mod].relative_to(root)}:{line}: {mod} ({a}) imports {target} ({b}), "
                       f"a higher layer ({ORDER})")
        if runs and target != "pmemfs":
            edges.setdefault(mod, set()).add(target)
    for comp in _cycles(edges):
        where = sorted({f"{a} -> {b} (line {line})" for a, b, line, runs in imports(root)
                        if runs and a in comp and b in comp})
        out.append(f"import cycle of {len(comp)} module(s): {', '.join(comp)}: " + "; ".join(where))
    return out


def test_imports_only_look_down_and_form_no_cycle():
    found = problems(ROOT)
    assert not found, "\n" + "\n".join(found)


def test_every_module_is_seen():
    """The walk finds the layers' modules and their imports (a checker that saw nothing
    would pass anything)."""
    files = module_files(ROOT)
    assert {"pmemfs.media.format", "pmemfs.fs.engine", "pmemfs.serve.daemon", "pmemfs.direct",
            "pmemfs.tools.cli"} <= set(files)
    seen = {(a, b) for a, b, _, _ in imports(ROOT)}
    assert ("pmemfs.fs.engine", "pmemfs.media.format") in seen  # from ..media.format import ...
    assert ("pmemfs.fs.engine", "pmemfs.fs.kobj") in seen
    assert ("pmemfs.serve.control", "pmemfs.fs.placement") in seen  # lazy, inside a function
    assert ("pmemfs.serve.fuse_ops", "pmemfs.fs.holes") in seen  # from ..fs import holes


def test_the_order_is_the_one_in_design_md():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text[text.index("## Layers"):]
    section = section[:section.index("\n## ", 1)]
    assert re.search(rf"`{re.escape(ORDER)}`", section), f"DESIGN.md's Layers must say `{ORDER}`"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"pmemfs/__init__.py": "", "pmemfs/media/__init__.py": "",
                       "pmemfs/fs/__init__.py": "", "pmemfs/serve/__init__.py": "",
                       "pmemfs/tools/__init__.py": "", **files}.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_an_upward_import_fails_even_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "pmemfs/media/format.py": "def f():\n    from ..fs.engine import Engine\n",
        "pmemfs/fs/engine.py": "from ..media import format\nimport pmemfs.serve.daemon\n",
        "pmemfs/serve/daemon.py": "from pmemfs import direct\n",
        "pmemfs/direct.py": "from .tools.cli import main\n",
        "pmemfs/tools/cli.py": "from ..fs.engine import Engine\nfrom .. import direct\n",
        "pmemfs/misc/stray.py": "",
    })
    found = problems(root)
    assert any("pmemfs.media.format (media) imports pmemfs.fs.engine (fs)" in p for p in found), found
    assert any("pmemfs.fs.engine (fs) imports pmemfs.serve.daemon (serve)" in p for p in found), found
    assert any("pmemfs.serve.daemon (serve) imports pmemfs.direct (client)" in p for p in found), found
    assert any("pmemfs.direct (client) imports pmemfs.tools.cli (tools)" in p for p in found), found
    assert not any("pmemfs.tools.cli (tools) imports" in p for p in found), found  # down is fine
    assert "pmemfs.misc.stray: in no layer (layers: media < fs < serve < client < tools)" in found, found
    cycles = [p for p in found if p.startswith("import cycle")]
    assert len(cycles) == 1 and "pmemfs.fs.engine -> pmemfs.serve.daemon (line 2)" in cycles[0], found
    assert "pmemfs.media.format -> pmemfs.fs.engine (line 2)" in cycles[0], found


def test_a_cycle_within_a_layer_fails_unless_type_only(tmp_path):
    root = _tree(tmp_path, {
        "pmemfs/fs/engine.py": "def f():\n    from . import packing\n",
        "pmemfs/fs/packing.py": "from .engine import Engine\n",
        "pmemfs/fs/kobj.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .placement import P\n"),
        "pmemfs/fs/placement.py": "from . import kobj\n",
    })
    found = problems(root)
    assert len(found) == 1 and "pmemfs.fs.engine, pmemfs.fs.packing" in found[0], found
    assert "pmemfs.fs.engine -> pmemfs.fs.packing (line 2)" in found[0], found
