"""torch.compile for training, one decoder layer at a time ("regional compilation").

Every decoder layer has the same code, so compiling each layer reuses one graph: the compile costs about a minute
on CPU for a small model instead of the whole model's several, and dynamic shapes keep length-grouped batches
from recompiling. Undone when training ends, so generation and export run eagerly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the first ModuleList whose items are *DecoderLayer / *Block modules."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                type(module[0]).__name__.endswith(("DecoderLayer", "Block")):
            return list(module)
    return []


@contextmanager
def compiled_layers(model: nn.Module) -> Iterator[int]:
    """While inside, each decoder layer runs compiled; yields how many layers (0: none found, nothing compiled)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
