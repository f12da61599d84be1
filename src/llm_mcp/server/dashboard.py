"""The live training dashboard as an MCP App (the `io.modelcontextprotocol/ui` extension, SDK `mcp.server.apps`).

`ui://llm-mcp/training.html` (dashboard.html beside this file: one self-contained page, no external scripts, styles
or fonts, as a host's sandbox allows none) is bound to each family's `*_train` and `*_training_status` tools by
`_meta.ui.resourceUri`. A host that speaks MCP Apps renders it in a sandboxed iframe after such a call; through the
host's postMessage bridge the page polls `*_training_status` every 2 s while the job is queued or running (jobs,
loss and learning-rate curve, step/total, ETA, samples/s, checkpoint, log tail) and its Cancel button calls
`*_cancel_training`. The family's prefix comes from the tool that opened it (the host's toolInfo). Tools and
answers are otherwise unchanged: a client without Apps sees the same tools (plus the `_meta`) and the same text.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from mcp.server.apps import Apps

URI = "ui://llm-mcp/training.html"
BOUND = ("train", "training_status")  # tools (by name without the family prefix) whose results the page renders
FAMILIES = ("qloraevolved", "unsloth")


@cache
def html() -> str:
    return files("llm_mcp.server").joinpath("dashboard.html").read_text(encoding="utf-8")


def apps() -> Apps:
    """The Apps extension holding the page, for `MCPServer(extensions=[...])`: it serves the resource as
    `text/html;profile=mcp-app` and advertises the extension. The tools are bound by `tool_meta` as they are added
    (they are registered per family after the server exists, not through `Apps.tool`)."""
    extension = Apps()
    extension.add_html_resource(
        URI, html(), name="training-dashboard", title="Training dashboard",
        description="Live view of a training job: loss and learning-rate curve, step/total, ETA, samples/s, "
                    "checkpoint, worker log, and a Cancel button.",
        prefers_border=True)
    return extension


def tool_meta(tool_name: str) -> dict[str, Any] | None:
    """`_meta` for a tool by its full name: the page's resourceUri for the bound tools, else None."""
    family, _, base = tool_name.partition("_")
    return {"ui": {"resourceUri": URI}} if family in FAMILIES and base in BOUND else None
