"""The MCP layer: tool signatures and response shapes. Never imports torch."""
