"""Using the loaded model: generation and evaluation."""
