"""`llm-mcp bench --methods sft,dpo,orpo,kto,grpo`: seconds per optimizer step of each training method through our
engine, and through the hand-written TRL script for the same method (the method's TRL trainer on a bitsandbytes +
peft model with TRL's defaults and gradient checkpointing, as bench's SFT baseline), on the same model, rows, seed
and hyper-parameters; each run in its own child process, the ratio against the baseline of the same run.

Rows come from the short-sequence job: pairs take the row's completion as chosen and the next row's as rejected,
kto unpairs them, grpo's answer is the completion's first word (a `contains` reward; the baseline's reward is the
same check written as a Python function, as a hand-written GRPO script has it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llm_mcp.dev.bench_data import make_model, make_short_dataset
from llm_mcp.dev.bench_records import describe_machine, record

METHODS = ("sft", "dpo", "orpo", "kto", "grpo")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the job every method runs: batch 8 (grpo: 8 completions, one prompt's group), a fixed number of steps
JOB = {"learning_rate": 2e-4, "batch_size": 8, "gradient_accumulation_steps": 1, "seed": 42, "max_steps": 8}
GRPO = {"num_generations": 8, "max_completion_length": 16}


def method_rows(method: str, rows: int, max_length: int) -> list[dict[str, Any]]:
    base = make_short_dataset(rows, max_length)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": base[(i + 1) % len(base)]["completion"]}
             for i, r in enumerate(base)]
    pairs = [p for p in pairs if p["chosen"].strip() != p["rejected"].strip()]
    if method in ("dpo", "orpo"):
        return pairs
    if method == "kto":
        return [row for p in pairs for row in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                               {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    if method == "grpo":
        return [{"prompt": r["prompt"], "answer": r["completion"].split()[0]} for r in base]
    return base


def contains_answer(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
    """The baseline's grpo reward, as a hand-written script writes it."""
    return [float(a.lower() in str(c).lower()) for c, a in zip(completions, answer)]


# -- one run, in a child process ---------------------------------------------------------------------------------
def run_child(variant: str, method: str, model_dir: str, data_file: str, max_length: int) -> dict[str, Any]:
    rows = json.loads(Path(data_file).read_text())
    out = tempfile.mkdtemp(prefix=f"bench-{method}-{variant}-")
    if variant == "baseline":
        runtime, loss = _baseline(method, model_dir, rows, max_length, out)
    else:
        runtime, loss = _engine(method, model_dir, rows, max_length, out)
    from llm_mcp.engine.device import peak_memory_bytes

    return {"variant": variant, "method": method, "seconds_per_step": runtime / JOB["max_steps"],
            "train_runtime": runtime, "train_loss": loss, "peak_memory_bytes": peak_memory_bytes()}


def _engine(method: str, model_dir: str, rows: list, max_length: int, out: str) -> tuple[float, float]:
    from llm_mcp.config import LoadConfig, RunOptions, TrainingConfig
    from llm_mcp.engine.load.sources import load_qlora
    from llm_mcp.engine.train.run import train

    bundle = load_qlora(LoadConfig(model_name=model_dir, max_length=max_length, lora_rank=64))
    extra = {**GRPO, "rewards": ({"type": "contains"},)} if method == "grpo" else {}
    config = TrainingConfig(output_dir=out, logging_steps=1, save_steps=10**6, report_to="none", method=method,
                            optim="paged_adamw_32bit", **JOB, **extra)
    answer = train(bundle, config, rows, None, RunOptions(), on_progress=lambda *a: None, should_stop=lambda: False,
                   notes=[])
    return answer["metrics"]["train_runtime"], answer["metrics"]["train_loss"]


def _baseline(method: str, model_dir: str, rows: list, max_length: int, out: str) -> tuple[float, float]:
    import datasets
    import torch
    import trl
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from llm_mcp.engine.device import reset_peak_memory
    from llm_mcp.engine.load.model import avoid_cpu_repack_bug

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": 0} if cuda else {"": "cpu"})
    avoid_cpu_repack_bug(model)
    model = get_peft_model(prepare_model_for_kbit_training(model),
                           LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                      task_type="CAUSAL_LM"))
    reset_peak_memory()
    common = dict(output_dir=out, per_device_train_batch_size=JOB["batch_size"], max_steps=JOB["max_steps"],
                  gradient_accumulation_steps=JOB["gradient_accumulation_steps"], learning_rate=JOB["learning_rate"],
                  seed=JOB["seed"], optim="paged_adamw_32bit" if cuda else "adamw_torch", save_strategy="no",
                  report_to=[], logging_steps=1, disable_tqdm=True, use_cpu=not cuda, bf16=True)
    data = {"train_dataset": datasets.Dataset.from_list(rows), "processing_class": tokenizer}
    if method == "grpo":
        args = trl.GRPOConfig(**common, **GRPO)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[contains_answer], args=args, **data)
    elif method == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common, max_length=max_length), **data)
    else:
        config_cls, trainer_cls = {"sft": (trl.SFTConfig, trl.SFTTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer),
                                   "kto": (trl.KTOConfig, trl.KTOTrainer)}[method]
        trainer = trainer_cls(model=model, args=config_cls(**common, max_length=max_length), **data)
    metrics = trainer.train().metrics
    return metrics["train_runtime"], metrics["train_loss"]


# -- the orchestrating run ---------------------------------------------------------------------------------------
def _child(variant: str, method: str, model_dir: Path, work: Path, max_length: int) -> dict[str, Any]:
    data_file = work / f"{method}.json"
    out = work / f"{method}-{variant}.json"
    cmd = [sys.executable, "-m", "llm_mcp.dev.bench_methods", variant, method, str(model_dir), str(data_file),
           str(max_length), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        return {"variant": variant, "method": method,
                "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr else "failed"}
    return json.loads(out.read_text())


def run_methods_bench(methods: list[str], model: str, record_to: Path | None, json_path: str | None,
                      rows: int = 64, max_length: int = 256) -> int:
    work = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-methods-"))
    model_dir = make_model(work, model)
    results = []
    for method in methods:
        (work / f"{method}.json").write_text(json.dumps(method_rows(method, rows, max_length)))
        pair = [_child(v, method, model_dir, work, max_length) for v in ("baseline", "qloraevolved")]
        results.append(pair)
        print(table([pair]), flush=True)
    text = table(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    if record_to is not None:
        command = f"llm-mcp bench --methods {','.join(methods)} --models {model} --record"
        record(record_to, "llm-mcp bench --methods", (
            f"Command: `{command}`; machine: {describe_machine()}; NF4 + LoRA r=64, batch 8 (grpo: 8 completions "
            f"of one prompt, max_completion_length {GRPO['max_completion_length']}), {JOB['max_steps']} steps, "
            f"max_length {max_length}, rows from the short-sequence job. Baseline: the method's TRL trainer on a "
            f"bitsandbytes + peft model with TRL's defaults (gradient checkpointing on).\n\n{text}"))
    return 0


def table(results: list[list[dict[str, Any]]]) -> str:
    lines = ["| method | variant | s/step | time x baseline | peak MiB | train loss |", "| --- | --- | --- | --- | --- | --- |"]
    for pair in results:
        base = pair[0]
        for r in pair:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['variant']} | failed: {r['error']} | | | |")
                continue
            ratio = (f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}" if "error" not in base else "-")
            lines.append(f"| {r['method']} | {r['variant']} | {r['seconds_per_step']:.3f} | {ratio} | "
                         f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['train_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # a child run: variant method model_dir data_file max_length out
    variant, method, model_dir, data_file, max_length, out = sys.argv[1:7]
    Path(out).write_text(json.dumps(run_child(variant, method, model_dir, data_file, int(max_length))))
