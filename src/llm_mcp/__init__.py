"""llm-mcp-server: an MCP server through which an agent fine-tunes open LLMs (QLoRA, Unsloth)."""

__version__ = "0.1.0"
