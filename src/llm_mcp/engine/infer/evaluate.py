"""Eval loss and perplexity of a loaded model on a dataset, computed exactly as training computes its eval loss:
the same dataset preparation (answer-only loss, EOS) and TRL's SFTTrainer.evaluate; on preference pairs, the
preference accuracy (preference.py); on kto's unpaired rows, the loss of the desirable completions and that of the
undesirable ones; on grpo's prompts, the loss of the reference answers."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

from llm_mcp.data.datasets import prepare as prepare_dataset
from llm_mcp.data.rows import PREFERENCE, PROMPT_ANSWER, UNPAIRED
from llm_mcp.engine.infer.preference import preference_accuracy
from llm_mcp.engine.device import detect
from llm_mcp.engine.patches.float32_compute import bf16_slowdown, float32_compute, is_emulated, trainable_tensors_kept
from llm_mcp.engine.load.model import ModelBundle
from llm_mcp.engine.patches.guard import may_apply


def evaluate(bundle: ModelBundle, source: Any, *, dataset_format: str, batch_size: int,
             should_stop: Callable[[], bool] | None = None, use_adapter: bool = True) -> dict[str, Any]:
    """use_adapter=false evaluates the base model (the adapter disabled for the call)."""
    data = prepare_dataset(source, dataset_format=dataset_format,
                           chat_template=getattr(bundle.tokenizer, "chat_template", None), param="eval_dataset",
                           tokenizer=bundle.tokenizer, should_stop=should_stop)
    model = bundle.model
    used_adapter = use_adapter and hasattr(model, "disable_adapter")  # false: the base model answers
    without_adapter = model.disable_adapter() if not use_adapter and hasattr(model, "disable_adapter") \
        else contextlib.nullcontext()
    was_training = model.training
    try:
        with without_adapter:
            if data.source_format == PREFERENCE:
                model.eval()
                started = time.perf_counter()
                result = preference_accuracy(model, bundle.tokenizer, list(data.dataset), should_stop=should_stop)
                return {"status": "success", **result, "rows": len(data.dataset), "dataset_format": PREFERENCE,
                        "used_adapter": used_adapter,
                        "eval_runtime": round(time.perf_counter() - started, 3), "warnings": data.warnings}
            if data.source_format == UNPAIRED:
                answer = _unpaired(bundle, data, batch_size)
            else:
                answer = _eval_loss(bundle, _as_completions(data), batch_size)
    finally:
        model.train(was_training)
    answer["used_adapter"] = used_adapter
    return answer


def _as_completions(data: Any, label: bool | None = None) -> Any:
    """kto's and grpo's rows as prompt/completion rows (the desirable or undesirable ones; the reference answers)."""
    if data.source_format not in (UNPAIRED, PROMPT_ANSWER):
        return data
    rows = [r for r in data.dataset if label is None or r["label"] == label]
    if data.source_format == PROMPT_ANSWER:
        rows = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["answer"]}]
                 if isinstance(r["prompt"], list) else r["answer"]} for r in rows]
    else:
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    return dataclasses.replace(data, dataset=data.dataset.from_list(rows))


def _unpaired(bundle: ModelBundle, data: Any, batch_size: int) -> dict[str, Any]:
    """The desirable completions' loss (eval_loss: lower is better) and the undesirable ones' (higher is better)."""
    good = [r for r in data.dataset if r["label"]]
    answer = _eval_loss(bundle, _as_completions(data, True), batch_size) if good else {
        "status": "success", "eval_loss": None, "perplexity": None, "dataset_format": UNPAIRED, "warnings": []}
    if len(good) < len(data.dataset):
        bad = _eval_loss(bundle, _as_completions(data, False), batch_size)
        answer["undesirable_eval_loss"] = bad["eval_loss"]
    answer.update(rows=len(data.dataset), desirable_rows=len(good),
                  loss_on="desirable completions (eval_loss); undesirable ones (undesirable_eval_loss)")
    return answer


def _eval_loss(bundle: ModelBundle, data: Any, batch_size: int) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    hw = detect()
    with tempfile.TemporaryDirectory(prefix="llm-mcp-eval-") as scratch:  # evaluate() writes nothing we keep
        args = SFTConfig(
            output_dir=scratch, per_device_eval_batch_size=batch_size, max_length=bundle.max_length,
            assistant_only_loss=data.assistant_only_loss, packing=False, report_to=[], use_cpu=not hw.has_cuda,
            # fp32 on CPU (bf16 autocast is slower there); the compute dtype's autocast on a GPU
            bf16=hw.has_cuda and bundle.compute_dtype == "bfloat16",
            fp16=hw.has_cuda and bundle.compute_dtype == "float16",
            disable_tqdm=True, dataloader_pin_memory=False,
        )
        # SFTTrainer insists on a train_dataset; one row keeps its preprocessing cheap. Evaluating changes no
        # weight: building it would round a quantized model's adapters to bf16 in place (TRL's QLoRA cast).
        with trainable_tensors_kept(bundle.model):
            trainer = SFTTrainer(model=bundle.model, args=args, train_dataset=data.dataset.select(range(1)),
                                 eval_dataset=data.dataset, processing_class=bundle.tokenizer)
        started = time.perf_counter()
        # computed as training computes on a CPU that emulates bf16 (bf16_slowdown is None on CUDA)
        slowdown = bf16_slowdown(bundle.model) if bundle.engine == "transformers" else None
        guard_warnings: list[str] = []
        in_float32 = is_emulated(slowdown) and may_apply("float32_compute", guard_warnings, ran="evaluated")
        with float32_compute(bundle.model) if in_float32 else contextlib.nullcontext():
            metrics = trainer.evaluate()
    loss = float(metrics["eval_loss"])
    return {
        "status": "success",
        "eval_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "rows": len(data.dataset),
        "dataset_format": data.source_format,
        "loss_on": "answers only" if data.source_format != "text" else "all tokens",
        "eval_runtime": round(time.perf_counter() - started, 3),
        "warnings": data.warnings + guard_warnings + (
            ["this CPU has no bf16 instructions (its bf16 matmuls are emulated, several times slower than "
             "float32's): the 4-bit layers and adapters computed in float32, as training computes here."]
            if in_float32 else []),
    }
