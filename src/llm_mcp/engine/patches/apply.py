"""Every change the engine makes to a library's internals while training, behind one context: `applied`.

Each patch is scoped: it is undone when training ends, so generation and export run on peft's own model. Which
ones apply is decided in engine/train/choices.py (where engine/patches/guard.py says their internals are present).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

from llm_mcp.engine.train.choices import EngineChoices
from llm_mcp.engine.device import freed_memory_reused
from llm_mcp.engine.patches.float32_compute import float32_compute
from llm_mcp.engine.patches.lean_lora import lean_lora_dropout
from llm_mcp.engine.patches.lean_mlp import lean_mlp
from llm_mcp.engine.patches.lean_norm import lean_rmsnorm
from llm_mcp.engine.load.model import ModelBundle
from llm_mcp.engine.patches.regional_compile import compiled_layers

# EngineChoices field -> the context manager applying it to the model, in the order they are entered:
# float32_compute first, since the lean functions read the dtypes it sets.
PATCHES: dict[str, Callable[[Any], AbstractContextManager[Any]]] = {
    "float32_compute": float32_compute,
    "lean_mlp": lean_mlp,
    "lean_rmsnorm": lean_rmsnorm,
    "lean_lora_dropout": lean_lora_dropout,
    "torch_compile": compiled_layers,
}


@contextmanager
def applied(model: Any, choices: EngineChoices) -> Iterator[None]:
    """The patches `choices` turned on, and the CPU heap kept for reuse where chosen, for the life of the block."""
    with ExitStack() as stack:
        for name, patch in PATCHES.items():
            if getattr(choices, name):
                stack.enter_context(patch(model))
        if choices.reuse_freed_memory:
            stack.enter_context(freed_memory_reused())
        yield


def set_attention(bundle: ModelBundle, attn: str) -> None:
    """The attention kernel chosen, on the loaded model (Unsloth patches attention itself)."""
    if bundle.engine == "unsloth":
        return
    base = bundle.model.get_base_model()
    if getattr(base.config, "_attn_implementation", None) != attn:
        base.set_attn_implementation(attn)
