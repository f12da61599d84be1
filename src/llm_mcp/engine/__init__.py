"""The fine-tuning engine: loading, quantization, LoRA, training. Knows nothing of MCP; imports torch."""

import os

# oneDNN, and PyTorch's ideep layer over it, cache a compiled primitive per matmul shape, 1,024 of each by default,
# and on CPU each new batch length is a new shape, so the heap grows every step until the caches fill. 64 of each
# bounds that at the same speed (a step needs about sixteen distinct primitives; fewer slows it). Set before torch
# first uses them, so at the engine's import; a value already in the environment wins (1024 each restores the
# libraries' defaults).
CPU_KERNEL_CACHE_CAPACITY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
for _name, _capacity in CPU_KERNEL_CACHE_CAPACITY.items():
    os.environ.setdefault(_name, _capacity)
