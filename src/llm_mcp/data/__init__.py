"""Dataset reading and format detection; no torch, no tokenization."""
