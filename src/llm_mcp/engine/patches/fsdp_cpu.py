"""FSDP2 on CPU processes (gloo): accelerate sets up its FSDP plugin only for accelerator devices, and on CPU
quietly trains with DDP instead (every rank holding every parameter). Torch's fully_shard itself runs on CPU over
gloo (checked: each rank holds half of every parameter, losses match one process, the adapter saves whole), so this
hands accelerate's state the plugin it was given, as it does on a GPU. Process-wide and only in a rank's own
process (a run across processes with distributed_strategy='fsdp' on a machine without CUDA)."""

from __future__ import annotations

import inspect
from typing import Any

_applied = False


def supported() -> str | None:
    """Why the patch cannot apply to the installed accelerate, or None."""
    from accelerate import state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if "fsdp_plugin" not in inspect.signature(init).parameters:
        return "accelerate's AcceleratorState no longer takes fsdp_plugin"
    missing = [name for name in ("FSDP", "MULTI_CPU") if not hasattr(DistributedType, name)]
    return f"accelerate's DistributedType lacks {missing}" if missing else None


def enable() -> None:
    """Make accelerate keep the FSDP plugin on CPU processes (idempotent)."""
    global _applied
    if _applied:
        return
    from accelerate import state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = self.distributed_type

    state.AcceleratorState.__init__ = init
    _applied = True
