"""Where `--record` writes (docs/benchmarks.md of the checkout holding the working directory, or a file named),
how a dated section is appended, and the machine line every table carries."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def find_checkout(start: Path | None = None) -> Path | None:
    """The llm-mcp-server checkout holding the working directory (pyproject.toml beside docs/benchmarks.md), if
    any: an installed package does not know where its source lives."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "docs" / "benchmarks.md").is_file():
            return folder
    return None


def benchmarks_file(named: str | None) -> Path:
    """The file --record appends to: --docs FILE, else LLM_MCP_BENCHMARKS_FILE, else the docs/benchmarks.md of
    the checkout holding the working directory. ValueError says how to name one where none is found."""
    if named or os.environ.get("LLM_MCP_BENCHMARKS_FILE"):
        return Path(named or os.environ["LLM_MCP_BENCHMARKS_FILE"])
    checkout = find_checkout()
    if checkout is None:
        raise ValueError(f"no docs/benchmarks.md in {Path.cwd()} or a folder above it (run from the repository's "
                         "checkout, or name the file with --docs FILE)")
    return checkout / "docs" / "benchmarks.md"


def record(path: Path, title: str, body: str) -> None:
    """Append a dated section to the benchmarks file (every benchmark's --record)."""
    with open(path, "a") as f:
        f.write(f"\n## {title} ({time.strftime('%Y-%m-%d')})\n\n{body}\n")


def describe_machine() -> str:
    """The machine a table was measured on: architecture, cores and GPU (nvidia-smi's name; no torch import)."""
    from llm_mcp.memory import nvidia_smi_query

    gpus = nvidia_smi_query("name")
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {', '.join(gpus) if gpus else 'no GPU'}"
