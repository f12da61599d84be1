"""Developer tools, outside the server's runtime path: the benchmark, the demo, tiny random-init models and
the real models fetched from PyPI wheels."""
