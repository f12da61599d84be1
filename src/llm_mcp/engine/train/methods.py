"""What a run trains, as TRL trains it: sft (SFTTrainer, the loss on the answers) or dpo (DPOTrainer on preference
pairs; the reference is the model as the run starts: TRL copies the LoRA adapter into a frozen "ref" adapter, so
the 4-bit base is never held twice, and a fresh adapter's copy is the base itself). One shared set of arguments
(run.py) plus each method's own."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llm_mcp.config import TrainingConfig
from llm_mcp.data.rows import PREFERENCE
from llm_mcp.engine.train.choices import EngineChoices
from llm_mcp.errors import InvalidArgument

# what each method logs besides the loss, reported in the answer's metrics (the last logged value)
METHOD_METRICS = {"dpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")}


def check_data(method: str, source_format: str, param: str) -> None:
    """Preference pairs are what dpo trains on, and only dpo."""
    if method == "dpo" and source_format != PREFERENCE:
        raise InvalidArgument(param, f"rows in the {source_format!r} format", "preference pairs {prompt, chosen, "
                              "rejected} for method='dpo'")
    if method != "dpo" and source_format == PREFERENCE:
        raise InvalidArgument("method", method, "'dpo' for preference pairs {prompt, chosen, rejected} (or rows of "
                              "another format for sft)")


def adjusted(method: str, choices: EngineChoices) -> EngineChoices:
    """DPO's reference pass runs a second (frozen) LoRA adapter through peft's own layers: the patches that
    replace the LoRA layers' forward (and the batch shapes SFT's collator makes) stay off."""
    if method != "dpo":
        return choices
    return replace(choices, packing=False, padding_free=False, group_by_length=False, lean_lora_dropout=False,
                   lean_mlp=False, torch_compile=False,
                   notes=(*choices.notes, "method='dpo': LoRA-layer speed patches, length grouping and packing off "
                                          "(the reference is a frozen copy of the adapter as the run starts)."))


def build_trainer(method: str, config: TrainingConfig, choices: EngineChoices, common: dict[str, Any], *,
                  checkpointing: Any, model: Any, tokenizer: Any, train_data: Any, eval_data: Any,
                  max_length: int, callbacks: list[Any]) -> Any:
    """The method's TRL config and trainer on the shared arguments."""
    data = {"train_dataset": train_data.dataset, "eval_dataset": eval_data.dataset if eval_data else None,
            "processing_class": tokenizer, "callbacks": callbacks}
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, **checkpointing(DPOConfig), beta=config.beta, loss_type=[config.loss_type],
                         max_length=max_length, train_sampling_strategy="random")
        return DPOTrainer(model=model, ref_model=None, args=args, **data)
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common, **checkpointing(SFTConfig), packing=choices.packing, max_length=max_length,
                     train_sampling_strategy="group_by_length" if choices.group_by_length else "random",
                     assistant_only_loss=train_data.assistant_only_loss)
    return SFTTrainer(model=model, args=args, **data)


def finish(method: str, model: Any) -> None:
    """Drop DPO's reference adapter once the run is over: the final adapter, generate, evaluate, export and the
    next run see the one trained adapter."""
    if method == "dpo" and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def method_metrics(method: str, log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The method's own metrics, their last logged training values."""
    out: dict[str, float] = {}
    for entry in log_history:
        for key in METHOD_METRICS.get(method, ()):
            if key in entry:
                out[key] = float(entry[key])
    return out
