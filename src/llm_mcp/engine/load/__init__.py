"""Loading a model: weights from a folder, hub id or GGUF, quantized (bitsandbytes, torchao, nf4_optimized), with LoRA through peft or Unsloth."""
