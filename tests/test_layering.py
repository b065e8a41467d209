"""The engine never imports Textual or Rich: headless servers must not need a UI toolkit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).parent.parent / "webaims_tui" / "engine"


def test_no_engine_module_imports_textual_or_rich() -> None:
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("textual", "rich")
            ]
    assert not offenders


def test_importing_the_engine_and_the_cli_loads_neither_textual_nor_rich() -> None:
    code = (
        "import sys, webaims_tui.engine.service, webaims_tui.__main__;"
        "print([m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
