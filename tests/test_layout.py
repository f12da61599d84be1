"""docs/ARCHITECTURE.md and the source tree tell the same story: every engine and dev module is described there
under its own folder, and the server's runtime path never imports the developer tools."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llm_mcp"
ARCHITECTURE = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()


def test_every_engine_module_is_described_in_its_folder():
    block = ARCHITECTURE[ARCHITECTURE.index("engine/   "):ARCHITECTURE.index("data/     ")]
    sections = dict(re.findall(r"\n  (\w+)/ +(.*?)(?=\n  \w+/ |\Z)", block, re.S))
    folders = sorted(p.name for p in (SRC / "engine").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert sorted(sections) == folders
    for folder in folders:
        for module in sorted((SRC / "engine" / folder).glob("*.py")):
            if module.name != "__init__.py":
                assert module.name in sections[folder], f"engine/{folder}/{module.name} is not in ARCHITECTURE.md"
    for module in sorted((SRC / "engine").glob("*.py")):
        assert module.name in block, f"engine/{module.name} is not in ARCHITECTURE.md"


def test_the_server_and_workers_never_import_the_dev_tools():
    for folder in ("server", "workers", "jobs", "engine", "data"):
        for module in (SRC / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(module.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not any(n.startswith("llm_mcp.dev") for n in names), f"{module} imports {names}"
