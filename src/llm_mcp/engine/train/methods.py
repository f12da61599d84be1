"""What a run trains, as TRL trains it: sft (SFTTrainer, the loss on the answers); dpo and orpo on preference pairs;
kto on unpaired completions labelled desirable or not; grpo on prompts, from completions the model samples and
the declared rewards score (llm_mcp/rewards.py: data, never code).

dpo and kto compare with a reference, the model as the run starts: TRL copies the LoRA adapter into a frozen "ref"
adapter (a fresh adapter's copy is the base itself), so the 4-bit base is never held twice; orpo needs none; grpo
only with beta > 0 (then the base with the adapter switched off). One shared set of arguments (run.py) plus each
method's own, by TRL's names (TrainingConfig.method_settings)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from llm_mcp.config import TrainingConfig
from llm_mcp.data.rows import PREFERENCE, PROMPT_ANSWER, UNPAIRED
from llm_mcp.engine.train.choices import EngineChoices
from llm_mcp.errors import InvalidArgument
from llm_mcp.rewards import parse_rewards, scorers

SFT_FORMATS = ("text", "alpaca", "prompt_completion", "messages", "sharegpt")
# the row formats each method trains on (kto unpairs preference pairs itself: chosen true, rejected false)
FORMATS = {"sft": SFT_FORMATS, "dpo": (PREFERENCE,), "orpo": (PREFERENCE,), "kto": (UNPAIRED, PREFERENCE),
           "grpo": (PROMPT_ANSWER,)}
NEEDS = {"sft": "rows with text, instruction/output, prompt/completion or messages",
         "dpo": "preference pairs {prompt, chosen, rejected}", "orpo": "preference pairs {prompt, chosen, rejected}",
         "kto": "unpaired rows {prompt, completion, label} (or preference pairs, which it unpairs)",
         "grpo": "prompts with a reference answer {prompt, answer} or {messages, answer}"}
_PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
# what each method logs besides the loss: shown in progress and status, the last values in the answer's metrics
METHOD_METRICS = {"dpo": _PAIR_METRICS, "orpo": (*_PAIR_METRICS, "log_odds_ratio", "nll_loss"),
                  "kto": ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
                  "grpo": ("reward", "reward_std", "completions/mean_length")}


def check_data(method: str, source_format: str, param: str) -> None:
    """The rows fit the method: each method trains on its own formats."""
    if source_format in FORMATS[method]:
        return
    fits = [m for m, formats in FORMATS.items() if source_format in formats and m != "sft"]
    if method == "sft" and fits:
        raise InvalidArgument("method", method, f"{' or '.join(repr(m) for m in fits)} for {NEEDS[fits[-1]]} (or "
                                                f"rows of another format for sft)")
    raise InvalidArgument(param, f"rows in the {source_format!r} format", f"{NEEDS[method]} for method={method!r}")


def adjusted(method: str, choices: EngineChoices) -> EngineChoices:
    """The preference and RL trainers run their own forward passes (a frozen reference adapter, sampled
    completions) through peft's own layers: the patches that replace the LoRA layers' forward, and the batch shapes
    SFT's collator makes, stay off."""
    if method == "sft":
        return choices
    return replace(choices, packing=False, padding_free=False, group_by_length=False, lean_lora_dropout=False,
                   lean_mlp=False, torch_compile=False,
                   notes=(*choices.notes, f"method={method!r}: LoRA-layer speed patches, length grouping and packing "
                                          "off (the trainer runs its own passes through peft's layers)."))


def build_trainer(method: str, config: TrainingConfig, choices: EngineChoices, common: dict[str, Any], *,
                  checkpointing: Any, model: Any, tokenizer: Any, train_data: Any, eval_data: Any,
                  max_length: int, callbacks: list[Any]) -> Any:
    """The method's TRL config and trainer on the shared arguments."""
    data = {"train_dataset": train_data.dataset, "eval_dataset": eval_data.dataset if eval_data else None,
            "processing_class": tokenizer, "callbacks": callbacks}
    settings = config.method_settings()
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, **checkpointing(DPOConfig), beta=settings["beta"],
                         loss_type=[settings["loss_type"]], max_length=max_length, train_sampling_strategy="random")
        return DPOTrainer(model=model, ref_model=None, args=args, **data)
    if method == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental since TRL 1.x
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, **checkpointing(ORPOConfig), beta=settings["beta"], max_length=max_length)
        return ORPOTrainer(model=model, args=args, **data)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        # kto's KL term pairs each example with the next one in its batch: TRL asks for the data in order
        args = KTOConfig(**common, **checkpointing(KTOConfig), beta=settings["beta"], loss_type=settings["loss_type"],
                         desirable_weight=settings["desirable_weight"],
                         undesirable_weight=settings["undesirable_weight"], max_length=max_length,
                         train_sampling_strategy="sequential")
        return KTOTrainer(model=model, ref_model=None, args=args, **data)
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        specs = parse_rewards(config.rewards, "rewards")
        args = GRPOConfig(**common, **checkpointing(GRPOConfig), beta=settings["beta"],
                          loss_type=settings["loss_type"], num_generations=settings["num_generations"],
                          max_completion_length=settings["max_completion_length"],
                          temperature=settings["temperature"], reward_weights=[s.weight for s in specs],
                          remove_unused_columns=False)
        return GRPOTrainer(model=model, reward_funcs=scorers(specs, tokenizer.eos_token_id), args=args, **data)
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common, **checkpointing(SFTConfig), packing=choices.packing, max_length=max_length,
                     train_sampling_strategy="group_by_length" if choices.group_by_length else "random",
                     assistant_only_loss=train_data.assistant_only_loss)
    return SFTTrainer(model=model, args=args, **data)


def engine_notes(method: str, engine: str, trainer: Any) -> list[str]:
    """Say so where the unsloth family's run is not Unsloth's own trainer for the method (its CPU mode patches
    SFTTrainer only; on a GPU Unsloth patches TRL's preference and GRPO trainers as it imports)."""
    name = type(trainer).__name__
    if engine != "unsloth" or method == "sft" or "unsloth" in (name + type(trainer).__module__).lower():
        return []
    return [f"method={method!r} ran TRL's {name} on the Unsloth-loaded model: Unsloth did not patch that trainer "
            "here (its CPU mode patches SFTTrainer only)."]


def finish(method: str, model: Any) -> None:
    """Drop the reference adapter dpo and kto train against once the run is over: the final adapter, generate,
    evaluate, export and the next run see the one trained adapter."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def logged_metrics(method: str, entry: dict[str, Any]) -> dict[str, float]:
    """The method's own metrics in one log entry (grpo: also each reward's mean, rewards/<name>/mean)."""
    names = METHOD_METRICS.get(method, ())
    out = {k: float(v) for k, v in entry.items() if k in names and isinstance(v, (int, float))}
    if method == "grpo":
        out.update({k: float(v) for k, v in entry.items()
                    if k.startswith("rewards/") and k.endswith("/mean") and isinstance(v, (int, float))})
    return out


def method_metrics(method: str, log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The method's own metrics, their last logged training values."""
    out: dict[str, float] = {}
    for entry in log_history:
        if "loss" in entry:
            out.update(logged_metrics(method, entry))
    return out
