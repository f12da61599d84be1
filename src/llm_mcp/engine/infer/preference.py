"""Preference accuracy on pairs {prompt, chosen, rejected}: the share of pairs where the model gives the chosen
answer the higher log-probability (summed over the answer's tokens, given the prompt), and the mean margin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llm_mcp.errors import Cancelled


def _texts(tokenizer: Any, row: dict[str, Any]) -> tuple[str, str, str, bool]:
    """(prompt, chosen, rejected) as text, and whether the prompt is a rendered chat (which writes BOS itself)."""
    if isinstance(row["prompt"], str):
        return row["prompt"], row["chosen"], row["rejected"], False
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    answer = lambda turns: "".join(m["content"] for m in turns)  # noqa: E731
    return prompt, answer(row["chosen"]), answer(row["rejected"]), True


def _answer_logprob(model: Any, prompt_ids: list[int], answer_ids: list[int], device: Any) -> float:
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer_ids, device=device)[:, None])
    return float(picked.sum())


def preference_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *,
                        should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    device = next(model.parameters()).device
    wins, margins = 0, []
    with torch.no_grad():
        for i, row in enumerate(rows):
            if should_stop is not None and should_stop():
                raise Cancelled(f"evaluating stopped: the command was cancelled at row {i}.")
            prompt, chosen, rejected, is_chat = _texts(tokenizer, row)
            prompt_ids = tokenizer(prompt, add_special_tokens=not is_chat).input_ids
            scores = [_answer_logprob(model, prompt_ids, tokenizer(a, add_special_tokens=False).input_ids, device)
                      for a in (chosen, rejected)]
            margins.append(scores[0] - scores[1])
            wins += scores[0] > scores[1]
    return {"preference_accuracy": round(wins / len(rows), 4),
            "mean_margin": round(sum(margins) / len(margins), 4), "pairs": len(rows)}
