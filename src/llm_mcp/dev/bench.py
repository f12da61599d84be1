"""`llm-mcp bench`: the same fine-tuning job through the hand-written baseline, our qloraevolved engine and
(where an Unsloth environment exists) the unsloth family; tokens/s, peak memory, time to first step and losses,
each as a ratio to the baseline.

Each variant runs in its own child process on the same model, data, seed and hyper-parameters (NF4 + double
quantization, LoRA r=64 on the 7 projections, the spec's optimizer settings); its peak memory runs from the start
of its training (model loaded) to the end: VmHWM on CPU, max allocated on CUDA.
The baseline is what a user writes by hand today: transformers + peft + bitsandbytes + TRL's SFTTrainer with its
defaults (dynamic padding, no packing) and gradient checkpointing on. Output is for a person: print.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llm_mcp.dev.bench_data import DATASETS, MODEL_SIZES, make_model
from llm_mcp.dev.bench_methods import METHODS, run_methods_bench
from llm_mcp.dev.bench_records import benchmarks_file, describe_machine, find_checkout, record

_PROCESS_START = time.monotonic()  # time to first step counts imports too, the same for every variant
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The job every variant runs: the qloraevolved spec's hyper-parameters (paged optimizer -> its CPU twin).
JOB = {"learning_rate": 2e-4, "batch_size": 8, "gradient_accumulation_steps": 1, "warmup_ratio": 0.03,
       "weight_decay": 0.01, "lr_scheduler_type": "cosine", "max_grad_norm": 0.3, "seed": 42}
# -- one variant, in a child process ----------------------------------------------------------------------------
def run_variant(variant: str, model_dir: str, data_file: str, max_length: int, epochs: float,
                options: dict[str, Any] | None = None, name: str | None = None) -> dict[str, Any]:
    started = _PROCESS_START
    data = json.loads(Path(data_file).read_text())
    train_rows, eval_rows = data["train"], data["eval"]
    job = {**JOB, **data.get("job", {})}
    output_dir = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    first_step: list[float] = []

    def on_progress(step: int, total: int, logs: dict) -> None:
        if step >= 1 and not first_step:
            first_step.append(time.monotonic() - started)

    from llm_mcp.engine.device import peak_memory_bytes

    if variant == "baseline":
        result, tokenizer = _run_baseline(model_dir, train_rows, eval_rows, max_length, epochs, output_dir,
                                          on_progress, job)
        choices: dict[str, Any] = {"padding_free": False, "packing": False, "use_gradient_checkpointing": True,
                                   "cpu_kernel_cache_capacity": int(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])}
    else:
        result, tokenizer, choices = _run_engine(variant, model_dir, train_rows, eval_rows, max_length, epochs,
                                                 output_dir, on_progress, options or {}, job)
    tokens = sum(min(len(tokenizer(r["prompt"] + r["completion"]).input_ids) + 1, max_length)
                 for r in train_rows) * epochs
    name = name or _variant_name(variant, options or {})
    return {"variant": name, "tokens_per_second": tokens / result["train_runtime"],
            "train_runtime": result["train_runtime"], "time_to_first_step": first_step[0] if first_step else None,
            "peak_memory_bytes": peak_memory_bytes(), "train_loss": result["train_loss"],
            "eval_loss": result["eval_loss"], "choices": choices}


def _run_baseline(model_dir: str, train_rows: list, eval_rows: list, max_length: int, epochs: float,
                  output_dir: str, on_progress: Any, job: dict[str, Any]) -> tuple[dict, Any]:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llm_mcp.engine.device import reset_peak_memory
    from llm_mcp.engine.load.model import avoid_cpu_repack_bug

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
        device_map={"": 0} if cuda else {"": "cpu"})
    avoid_cpu_repack_bug(model)  # without it, LoRA gradients are wrong on avx512_bf16 CPUs (stack facts)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_progress(state.global_step, state.max_steps, {})

    reset_peak_memory()  # where the engine's train() resets it: the peak of the training, the model resident

    args = SFTConfig(output_dir=output_dir, num_train_epochs=epochs, per_device_train_batch_size=job["batch_size"],
                     per_device_eval_batch_size=job["batch_size"],
                     gradient_accumulation_steps=job["gradient_accumulation_steps"],
                     learning_rate=job["learning_rate"], warmup_steps=job["warmup_ratio"],
                     weight_decay=job["weight_decay"], lr_scheduler_type=job["lr_scheduler_type"],
                     max_grad_norm=job["max_grad_norm"], seed=job["seed"], max_length=max_length,
                     optim="paged_adamw_32bit" if cuda else "adamw_torch", save_strategy="no", report_to=[],
                     logging_steps=10, disable_tqdm=True, use_cpu=not cuda, bf16=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train_rows),
                         eval_dataset=datasets.Dataset.from_list(eval_rows), processing_class=tokenizer,
                         callbacks=[FirstStep()])
    metrics = trainer.train().metrics
    return {"train_runtime": metrics["train_runtime"], "train_loss": metrics["train_loss"],
            "eval_loss": trainer.evaluate()["eval_loss"]}, tokenizer


# What the table shows of each engine run besides every engine flag as the run took it (config.ENGINE_FLAGS; those
# set to null come back decided): the choices the flags lead to.
DERIVED_CHOICES = ("use_gradient_checkpointing", "bf16", "float32_compute", "use_liger_kernel", "optim",
                   "cpu_kernel_cache_capacity")


def _run_engine(variant: str, model_dir: str, train_rows: list, eval_rows: list, max_length: int, epochs: float,
                output_dir: str, on_progress: Any, options: dict[str, Any],
                job: dict[str, Any]) -> tuple[dict, Any, dict]:
    from llm_mcp.config import ENGINE_FLAGS, LoadConfig, LoraSpec, RunOptions, TrainingConfig, UnslothLoadConfig

    if variant == "unsloth":
        from llm_mcp.engine.load import unsloth_backend

        bundle = unsloth_backend.load_model(UnslothLoadConfig(model_name=model_dir, max_seq_length=max_length))
        unsloth_backend.attach_lora(bundle, LoraSpec(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=tuple(TARGETS),
                                                     gradient_checkpointing=True, seed=job["seed"]))
    else:
        from llm_mcp.engine.load.sources import load_qlora  # as the server loads (--ablate num_processes=2 repeats it)

        bundle = load_qlora(LoadConfig(model_name=model_dir, max_length=max_length, lora_rank=64))
    from llm_mcp.engine.train.run import train

    config = TrainingConfig(output_dir=output_dir, num_train_epochs=epochs, max_steps=-1, logging_steps=10,
                            save_steps=10**6, report_to="none", optim="paged_adamw_32bit", **{**job, **options})
    answer = train(bundle, config, train_rows, eval_rows, RunOptions(), on_progress=on_progress,
                   should_stop=lambda: False, notes=[])
    if variant == "unsloth" and answer["engine"] != "unsloth":
        raise RuntimeError("Unsloth could not be imported in this interpreter")
    metrics = answer["metrics"]
    return ({"train_runtime": metrics["train_runtime"], "train_loss": metrics["train_loss"],
             "eval_loss": metrics["eval_loss"]}, bundle.tokenizer,
            {k: answer["effective_config"][k] for k in (*ENGINE_FLAGS, *DERIVED_CHOICES)})


# -- the orchestrating run -------------------------------------------------------------------------------------
def _unsloth_python() -> str | None:
    checkout = find_checkout()
    python = os.environ.get("LLM_MCP_UNSLOTH_PYTHON") or (
        str(checkout / ".venv-unsloth" / "bin" / "python") if checkout else "")
    return python if python and Path(python).is_file() else None


# Process-wide engine settings that are environment variables, not training_config fields: --ablate sets them for
# the engine's child; the baseline child always runs with the libraries' defaults, as a hand-written script does.
ENV_OPTIONS = {"cpu_kernel_cache_capacity": ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
LIBRARY_DEFAULTS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}


def _variant_name(variant: str, options: dict[str, Any]) -> str:
    return variant + "".join(f" {k}={v}" for k, v in options.items())


def _child(index: int, variant: str, python: str, model_dir: Path, data_file: Path, max_length: int,
           epochs: float, options: dict[str, Any] | None = None) -> dict:
    out = data_file.with_name(f"run{index}-{variant}-{model_dir.name}-{max_length}.json")
    options = dict(options or {})
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(LIBRARY_DEFAULTS if variant == "baseline" else {})}
    for key, names in ENV_OPTIONS.items():
        if key in options:
            env.update({name: str(options[key]) for name in names})
    cmd = [python, "-m", "llm_mcp.dev.bench", "--variant", variant, "--model-dir", str(model_dir), "--data",
           str(data_file), "--max-length", str(max_length), "--epochs", str(epochs), "--json", str(out),
           "--options", json.dumps({k: v for k, v in options.items() if k not in ENV_OPTIONS}),
           "--name", _variant_name(variant, options)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"variant": variant, "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr else "failed"}
    return json.loads(out.read_text())


MEASURES = ("tokens_per_second", "peak_memory_bytes", "eval_loss")  # reported as ratios to the baseline


def summarize(rounds: list[list[dict]]) -> list[dict]:
    """One row per variant over repeated rounds: the median of each number, and the median, min and max over the
    rounds of its ratio to the same round's baseline (this shared machine drifts by more than 10% between
    minutes, and a round's variants run back to back)."""
    from statistics import median

    out = []
    for i, first in enumerate(rounds[0]):
        runs = [rnd[i] for rnd in rounds if "error" not in rnd[i]]
        if not runs:
            out.append(first)
            continue
        row = {**runs[0], **{k: median(r[k] for r in runs) for k in (*MEASURES, "train_runtime", "train_loss")},
               "time_to_first_step": median(r["time_to_first_step"] or 0.0 for r in runs), "repeats": len(runs)}
        ratios = {k: [] for k in MEASURES}
        for rnd in rounds:
            base = next((r for r in rnd if r["variant"] == "baseline" and "error" not in r), None)
            if base and "error" not in rnd[i]:
                for k in MEASURES:
                    ratios[k].append(rnd[i][k] / base[k])
        if all(ratios.values()):
            row["x_baseline"] = {k: {"median": median(v), "min": min(v), "max": max(v)} for k, v in ratios.items()}
        out.append(row)
    return out


def run_bench(quick: bool, record_to: Path | None, json_path: str | None, models: list[str] | None = None,
              lengths: list[int] | None = None, ablations: list[dict[str, Any]] | None = None,
              repeats: int = 1, rows: int | None = None, dataset: str = "long") -> int:
    work = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    models = models or (["tiny-0.3M"] if quick else ["tiny-0.3M", "llama-3.5M", "llama-25M"])
    make_rows, job, dataset_rows, dataset_lengths, described = DATASETS[dataset]
    lengths = lengths or ([128] if quick else dataset_lengths)
    default_rows = 64 if quick else dataset_rows
    rows, epochs = rows or default_rows, 1.0
    variants = [("baseline", sys.executable, None), ("qloraevolved", sys.executable, None)]
    variants += [("qloraevolved", sys.executable, options) for options in ablations or []]
    if _unsloth_python():
        variants.append(("unsloth", _unsloth_python(), None))
    results = []
    for model_dir in (make_model(work, name) for name in models):
        for max_length in lengths:
            data = make_rows(rows + rows // 8, max_length)
            data_file = work / f"data-{max_length}.json"
            data_file.write_text(json.dumps({"train": data[:rows], "eval": data[rows:], "job": job}))
            rounds = [[_child(i, v, py, model_dir, data_file, max_length, epochs, opts)
                       for i, (v, py, opts) in enumerate(variants)] for _ in range(repeats)]
            results.append({"model": model_dir.name, "max_length": max_length, "rows": rows,
                            "runs": summarize(rounds), "rounds": rounds})
            print(_table([results[-1]]), flush=True)
    text = _table(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    if record_to is not None:
        command = "llm-mcp bench" + (" --quick" if quick else "") + " --record"
        command += f" --dataset {dataset}" if dataset != "long" else ""
        if models != ["tiny-0.3M", "llama-3.5M", "llama-25M"] and not quick:
            command += f" --models {','.join(models)}"
        if lengths != dataset_lengths and not quick:
            command += f" --lengths {','.join(map(str, lengths))}"
        command += "".join(f" --ablate {','.join(f'{k}={v}' for k, v in o.items())}" for o in ablations or [])
        command += f" --repeats {repeats}" if repeats > 1 else ""
        command += f" --rows {rows}" if rows != default_rows else ""
        spread = (f" Each variant ran {repeats} times, the variants in turn; each figure is the median of its runs, "
                  f"each ratio the median (min-max) of the rounds' ratios." if repeats > 1 else "")
        record(record_to, "llm-mcp bench", f"Command: `{command}`; machine: {describe_machine()}; NF4 + LoRA r=64, "
                                f"batch 8, {epochs:g} epoch, {described}. Ratios are against the "
                                f"baseline (TRL defaults + gradient checkpointing); tokens are real (non-padding) "
                                f"tokens.{spread}\n\n{text}")
    return 0


def _table(results: list[dict]) -> str:
    rows = ["| model | max_length | variant | tokens/s | x baseline | peak MiB | x baseline | first step s | "
            "train loss | eval loss | eval x baseline | engine choices |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        for r in res["runs"]:
            if "error" in r:
                rows.append(f"| {res['model']} | {res['max_length']} | {r['variant']} | failed: {r['error']} |"
                            + " |" * 8)
                continue

            def ratio(k: str, r: dict = r) -> str:
                x = r.get("x_baseline", {}).get(k)
                if x is None:
                    return "-"
                return f"{x['median']:.2f}" + (f" ({x['min']:.2f}-{x['max']:.2f})" if r["repeats"] > 1 else "")
            choices = ", ".join(f"{k}={v}" for k, v in r["choices"].items())
            rows.append(f"| {res['model']} | {res['max_length']} | {r['variant']} | {r['tokens_per_second']:.0f} | "
                        f"{ratio('tokens_per_second')} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                        f"{ratio('peak_memory_bytes')} | {r['time_to_first_step'] or 0:.1f} | {r['train_loss']:.3f} | "
                        f"{r['eval_loss']:.3f} | {ratio('eval_loss')} | {choices} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-mcp bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one length: under a minute")
    parser.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    parser.add_argument("--docs", default=None, metavar="FILE",
                        help="the file --record appends to (default: docs/benchmarks.md of the checkout holding "
                             "the working directory)")
    parser.add_argument("--json", default=None, help="write the results (or, with --variant, one run) as JSON")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {list(MODEL_SIZES)}")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated max_length values (default 256,512; 256 with --dataset short)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="long",
                        help="the job's rows: long (long-tailed lengths up to max_length, the default) or short "
                             "(prompts of 3-180 words, completions of 1-8 words, 400 rows, lr 2e-3)")
    parser.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also run the engine with these training_config values (repeatable), e.g. "
                             "--ablate lean_lora_dropout=false (the engine flags: docs/engine-flags.md); "
                             "cpu_kernel_cache_capacity=N sets oneDNN's and ideep's cache capacities (environment "
                             "variables) for that run")
    parser.add_argument("--generate", action="store_true",
                        help="measure generation instead: tokens/s of the engine (NF4 + LoRA) against plain "
                             "transformers and llama.cpp on the same weights (--models; default smollm2-135m)")
    parser.add_argument("--methods", default=None, metavar="M[,M]",
                        help="seconds per step of each training method (" + ",".join(METHODS) + ") against the "
                             "method's hand-written TRL script, on --models' first model (default llama-3.5M)")
    parser.add_argument("--tokens", type=int, default=48, metavar="N", help="tokens generated per run (--generate)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="run every variant N times, in turn, and report medians with the ratios' spread")
    parser.add_argument("--rows", type=int, default=None, metavar="N",
                        help="training rows per job (default 256, 400 with --dataset short; 64 with --quick); eval "
                             "rows are N/8")
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["baseline", "qloraevolved", "unsloth"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # a child run
        if args.variant == "unsloth":
            import unsloth  # noqa: F401  (before transformers, as Unsloth requires)
        result = run_variant(args.variant, args.model_dir, args.data, args.max_length, args.epochs,
                             json.loads(args.options), name=args.name)
        Path(args.json).write_text(json.dumps(result))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats: {args.repeats} is not an integer >= 1")
    if args.rows is not None and args.rows < 8:
        parser.error(f"--rows: {args.rows} is not an integer >= 8 (one batch)")
    for name in (args.models or "").split(","):
        if name and name not in MODEL_SIZES:
            parser.error(f"--models: {name!r} is not one of {list(MODEL_SIZES)}")
    record_to = None
    if args.record:  # found before the run, which takes minutes
        try:
            record_to = benchmarks_file(args.docs)
        except ValueError as e:
            parser.error(f"--record: {e}")
    if args.generate:
        return _generate_bench(args, record_to)
    if args.methods:
        methods = args.methods.split(",")
        for name in methods:
            if name not in METHODS:
                parser.error(f"--methods: {name!r} is not one of {list(METHODS)}")
        return run_methods_bench(methods, (args.models or "llama-3.5M").split(",")[0], record_to, args.json,
                                 rows=args.rows or 64)
    return run_bench(args.quick, record_to, args.json,
                     models=args.models.split(",") if args.models else None,
                     lengths=[int(n) for n in args.lengths.split(",")] if args.lengths else None,
                     ablations=[_parse_ablation(parser, text) for text in args.ablate], repeats=args.repeats,
                     rows=args.rows, dataset=args.dataset)


def _generate_bench(args: argparse.Namespace, record_to: Path | None) -> int:
    from llm_mcp.dev.bench_generate import run_generate_bench, table

    models = args.models.split(",") if args.models else ["smollm2-135m"]
    work = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    rows = run_generate_bench([make_model(work, name) for name in models], args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if record_to is not None:
        command = f"llm-mcp bench --generate --record --models {','.join(models)} --tokens {args.tokens}"
        record(record_to, "llm-mcp bench --generate",
               f"Command: `{command}`; machine: {describe_machine()}. Greedy tokens/s from the same prompt, the "
               "same number of tokens in each variant (the engine's answer sets it), best of three runs after a "
               "warm-up; in brackets the ratio to plain transformers in float32.\n\n" + table(rows))
    return 0


def _parse_ablation(parser: argparse.ArgumentParser, text: str) -> dict[str, Any]:
    """'lean_lora_dropout=false,group_by_length=false' -> TrainingConfig overrides (values read as JSON)."""
    from llm_mcp.config import TrainingConfig

    options: dict[str, Any] = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        if key not in TrainingConfig.__dataclass_fields__ and key not in ENV_OPTIONS or not value:
            parser.error(f"--ablate: {pair!r} is not KEY=VALUE with KEY a training_config field or one of "
                         f"{list(ENV_OPTIONS)}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


if __name__ == "__main__":
    sys.exit(main())
