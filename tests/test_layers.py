"""`server/`'s packages import downward only: api → serving → protocol → runtime → engines (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[1] / "server"
LAYERS = ["api", "serving", "protocol", "runtime", "engines"]  # each may import those after it, never before


def imported_layers(path: Path) -> set[str]:
    """The server packages a module imports (at any depth in the file: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["shrinkserve", "server"] and len(parts) > 2 and parts[2] in LAYERS:
                out.add(parts[2])
    return out


def test_no_package_imports_upward() -> None:
    upward = []
    for layer in LAYERS:
        allowed = set(LAYERS[LAYERS.index(layer):])
        for path in sorted((SERVER / layer).rglob("*.py")):
            for bad in imported_layers(path) - allowed:
                upward.append(f"{path.relative_to(SERVER.parent)} imports server/{bad}/")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from shrinkserve.server.serving import base\n")
    assert imported_layers(module) == {"serving"}
