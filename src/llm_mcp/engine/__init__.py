"""The fine-tuning engine: loading, quantization, LoRA, training. Knows nothing of MCP; imports torch."""

import os

# oneDNN, and PyTorch's ideep layer over it, cache a compiled primitive per matmul shape, 1,024 of each by default,
# and on CPU each new batch length is a new shape: the heap grew ~15 MiB a training step until the caches filled
# (+400 MiB over an epoch of the bench's llama-3.5M x 512 job). 64 of each bounds that at the same speed (a step
# needs ~16 distinct primitives; under 16 it slows). Set before torch first uses them, so at the engine's import;
# a value already in the environment wins (1024 each restores the libraries' defaults).
CPU_KERNEL_CACHE_CAPACITY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
for _name, _capacity in CPU_KERNEL_CACHE_CAPACITY.items():
    os.environ.setdefault(_name, _capacity)
