"""Every tool's title and behaviour hints (MCP ToolAnnotations), in one table by the tool's name without its family
prefix, so a client can auto-approve the read-only tools and warn before the destructive ones."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mcp.types import ToolAnnotations

from llm_mcp.server.dashboard import tool_meta


@dataclass(frozen=True)
class Hints:
    title: str
    read_only: bool = False
    destructive: bool = False  # may delete or replace what exists (only meaningful when not read-only)
    idempotent: bool = False  # calling again with the same arguments changes nothing more
    open_world: bool = False  # may reach outside this machine (a model hub)


# name without the family prefix -> hints; {family} in a title becomes "QLoRA" or "Unsloth"
TOOL_HINTS: dict[str, Hints] = {
    "load_model": Hints("Load a model ({family})", idempotent=False, open_world=True),
    "prepare_for_training": Hints("Set the training configuration ({family})", idempotent=True),
    "train": Hints("Fine-tune a loaded model ({family})", open_world=True),
    "list_models": Hints("List loaded models ({family})", read_only=True, idempotent=True),
    "unload_model": Hints("Unload a model ({family})", destructive=True, idempotent=True),
    "training_status": Hints("Training job status ({family})", read_only=True, idempotent=True),
    "cancel_training": Hints("Cancel a training job ({family})", destructive=True, idempotent=True),
    "list_jobs": Hints("List training jobs ({family})", read_only=True, idempotent=True),
    # generate and evaluate read the model and change nothing (sampling is seeded)
    "generate": Hints("Generate text with a loaded model ({family})", read_only=True, idempotent=True),
    "evaluate": Hints("Evaluate a loaded model on a dataset ({family})", read_only=True, idempotent=True,
                      open_world=True),
    # overwrite=true replaces an earlier export
    "export": Hints("Export a model: adapter, merged or GGUF ({family})", destructive=True),
    "estimate_memory": Hints("Estimate a fine-tuning run's memory", read_only=True, idempotent=True,
                             open_world=True),
    "inspect_dataset": Hints("Inspect a dataset before training", read_only=True, idempotent=True,
                             open_world=True),
}
FAMILY_TITLES = {"qloraevolved": "QLoRA", "unsloth": "Unsloth"}


def annotations_for(tool_name: str) -> tuple[str, ToolAnnotations]:
    """The title and annotations of a tool by its full name (family prefix included)."""
    family, _, base = tool_name.partition("_")
    if family not in FAMILY_TITLES:
        family, base = "", tool_name
    hints = TOOL_HINTS[base]
    title = hints.title.format(family=FAMILY_TITLES.get(family, ""))
    return title, ToolAnnotations(title=title, read_only_hint=hints.read_only,
                                  destructive_hint=hints.destructive and not hints.read_only,
                                  idempotent_hint=hints.idempotent, open_world_hint=hints.open_world)


def add_tool(server: Any, fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> None:
    """server.add_tool with the tool's title and annotations from TOOL_HINTS (and the dashboard's _meta.ui)."""
    name = name or fn.__name__
    title, annotations = annotations_for(name)
    server.add_tool(fn, name=name, title=title, description=description, annotations=annotations,
                    meta=tool_meta(name))
