"""The probes exports are verified with, and greedy token answers from a Hugging Face model.

A probe is the agent's probe_prompt (or a short default chat), rendered with the model's chat template as the
generate tool renders `messages`; other probes follow (the same prompt raw, a longer chat, a story opening) for a
model that answers the first with EOS alone, because an empty answer agreeing with another empty answer proves
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_mcp.config import ChatMessage, GenerationConfig
from llm_mcp.engine.infer.generate import stop_ids

DEFAULT_PROBE = "Hello! What can you do?"
LONGER_PROBE = "Please describe in a few full sentences what you know and what you can help me with."
RAW_PROBE = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
NEAR_TIE = 0.5  # logits: two answers that part where the reference's top choice leads by less is rounding, not damage


@dataclass(frozen=True)
class Probe:
    """A prompt as the model reads it."""

    label: str  # the user's message, or the raw prompt
    text: str  # the rendered chat (or the raw prompt)
    is_chat: bool  # rendered with the chat template (which writes BOS itself where the model wants one)

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        if self.is_chat:
            return GenerationConfig(messages=(ChatMessage(role="user", content=self.label),),
                                    max_new_tokens=max_new_tokens)
        return GenerationConfig(prompt=self.text, max_new_tokens=max_new_tokens)

    def input_ids(self, tokenizer: Any) -> list[int]:
        return tokenizer(self.text, add_special_tokens=not self.is_chat).input_ids

    @property
    def kind(self) -> str:
        return "chat" if self.is_chat else "raw prompt"

    def describe(self) -> dict[str, Any]:
        return {"prompt": self.label, "chat_template": self.is_chat}


def probes(tokenizer: Any, probe_prompt: str | None) -> list[Probe]:
    """The probe to use first, then others for a model that answers it with nothing: the agent's probe_prompt as a
    raw prompt too (a model trained on prompt/completion rows answers it so, as the generate tool's `prompt` does),
    a longer chat, and a raw story opening."""
    out: list[Probe] = []
    chat = bool(getattr(tokenizer, "chat_template", None))
    for message in dict.fromkeys([probe_prompt or DEFAULT_PROBE, LONGER_PROBE]):
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True)
            out.append(Probe(message, text, True))
        if not chat or (probe_prompt and message == probe_prompt):
            out.append(Probe(message, message, False))
    out.append(Probe(RAW_PROBE, RAW_PROBE, False))
    return out


def greedy_tokens(model: Any, tokenizer: Any, probe: Probe, n: int) -> dict[str, Any]:
    """Up to n greedy tokens (the stop token included when one comes), their text, and the prompt ids."""
    ids = probe.input_ids(tokenizer)
    stops = stop_ids(tokenizer, model)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, len(ids):].tolist()
    first_stop = next((k for k, t in enumerate(tokens) if t in stops), None)
    if first_stop is not None:
        tokens = tokens[:first_stop + 1]
    return {"tokens": tokens, "text": tokenizer.decode(tokens, skip_special_tokens=True), "prompt_ids": ids,
            "stops": stops}


def is_empty(tokens: list[int], stops: list[int]) -> bool:
    """No answer at all: nothing generated, or the stop token first."""
    return not tokens or tokens[0] in stops


def prefers_by(model: Any, prefix_ids: list[int], mine: int, theirs: int) -> float:
    """How much the model prefers token `mine` over `theirs` after prefix_ids (logits): where two answers part, a
    small preference is a near-tie that rounding flips, a large one a real difference."""
    logits = _logits(model, prefix_ids)[-1]
    return round(float(logits[mine] - logits[theirs]), 4)


def first_disagreement(model: Any, prompt_ids: list[int], tokens: list[int]) -> dict[str, Any] | None:
    """Teacher-force another model's greedy answer through this model: the first position where this model would
    choose otherwise, and by how many logits it prefers its own token there; None where it agrees throughout."""
    if not tokens:
        return None
    logits = _logits(model, prompt_ids + tokens)[len(prompt_ids) - 1:-1]
    own = logits.argmax(-1).tolist()
    for k, (mine, theirs) in enumerate(zip(own, tokens)):
        if mine != theirs:
            return {"position": k, "margin": round(float(logits[k, mine] - logits[k, theirs]), 4)}
    return None


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    """The model's float logits at every position of one sequence, in eval mode (its mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    finally:
        model.train(was_training)
