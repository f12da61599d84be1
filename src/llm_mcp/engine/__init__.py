"""The fine-tuning engine: loading, quantization, LoRA, training. Knows nothing of MCP; imports torch."""
