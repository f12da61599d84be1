"""The operations behind the tools, shared by both tool families: load, prepare, train, unload, list.

A family differs only in its names, its config classes and where LoRA is attached (`Family`); the work goes to
the model's worker process. Answers shared by both families are shaped here; family-specific shapes live in the
tool modules. Knows nothing of torch, and nothing of MCP but a progress callback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mcp import memory, output_lock
from llm_mcp.config import (
    MAX_ID_CHARS, METHOD_FIELDS, ExportConfig, GenerationConfig, LoadConfig, RunOptions, TrainingConfig,
    UnslothLoadConfig, UnslothTrainingConfig,
    validated,
)
from llm_mcp.errors import InvalidArgument, ModelIdTaken, TrainingFailed, WorkerBusy
from llm_mcp.jobs.manager import JobManager
from llm_mcp.server.sandbox import Sandbox
from llm_mcp.workers.pool import LoadedModel, WorkerPool, new_request_id
from llm_mcp.workers.protocol import (
    DatasetSource, Evaluate, Export, Generate, InspectDataset, Load, Prepare, Progress, Train,
)

_MODEL_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_CHARS - 1}}}$")
ProgressSink = Callable[[int, int, str], Awaitable[None]]


def _check_fits(config: LoadConfig | UnslothLoadConfig, source: str) -> list[str]:
    """Refuse a load whose weights alone clearly exceed free memory; warn when a default training run would not
    fit. Only local model folders (source: resolved) are checked (reading a hub config could block on the
    network)."""
    if not Path(source).is_dir():
        return []
    try:
        shape = memory.read_shape(source)
    except InvalidArgument:
        return []  # the worker's load reports the folder's problem
    quant = config.effective_quant_type if isinstance(config, LoadConfig) else (
        "nf4" if config.load_in_4bit else "none")
    dtype = config.compute_dtype if isinstance(config, LoadConfig) else "bfloat16"
    rank = config.lora_rank if isinstance(config, LoadConfig) else UnslothTrainingConfig.r
    length = config.max_length if isinstance(config, LoadConfig) else config.max_seq_length
    run = memory.estimate(shape, quant_type=quant, compute_dtype=dtype, lora_rank=rank,
                          batch_size=TrainingConfig.batch_size, max_length=length, use_gradient_checkpointing=True)
    if run.free_bytes is not None and run.weights_bytes + run.runtime_bytes > run.free_bytes:
        raise InvalidArgument("model_name", config.model_name, (
            f"a model that fits: its weights alone need ~{(run.weights_bytes + run.runtime_bytes) / memory.GIB:.1f} "
            f"GiB with quant_type={quant!r} and {run.device} has {run.free_bytes / memory.GIB:.1f} GiB free. "
            f"Use a 4-bit quant_type or a smaller model, or pass force=true to try anyway"))
    if run.fits is False:
        return [f"a training run with batch_size={TrainingConfig.batch_size} and max_length={length} is estimated at "
                f"{run.total_bytes / memory.GIB:.1f} GiB, more than the {run.free_bytes / memory.GIB:.1f} GiB free: "
                f"{run.advice} (see estimate_memory)."]
    return []


def _describe_dataset(source: DatasetSource) -> str:
    return f"inline: {len(source)} rows" if isinstance(source, list) else str(source)


TrainingSettings = TrainingConfig | UnslothTrainingConfig


@dataclass(frozen=True)
class Family:
    """A tool family: its tool-name prefix, how it names models, and its training config class."""

    prefix: str  # "qloraevolved" | "unsloth"
    id_suffix: str  # model ids look like "<basename>-<suffix>[-<time>]"
    with_timestamp: bool
    training_config: type  # TrainingConfig | UnslothTrainingConfig: the defaults of prepare_for_training

    def tool(self, verb: str) -> str:
        return f"{self.prefix}_{verb}"


QLORA = Family("qloraevolved", "qlora-evolved", with_timestamp=True, training_config=TrainingConfig)
UNSLOTH = Family("unsloth", "unsloth", with_timestamp=False, training_config=UnslothTrainingConfig)


_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_gradient_checkpointing")


def _lora_shape(lora: Any) -> Any:
    return dataclasses.replace(lora, seed=0)  # the seed only matters when the adapter is created


def _lora_fields(settings: UnslothTrainingConfig) -> dict[str, Any]:
    return {k: getattr(settings, k) for k in _LORA_KEYS}


def engine_training_config(settings: TrainingSettings) -> TrainingConfig:
    return settings.to_training_config() if isinstance(settings, UnslothTrainingConfig) else settings


class ModelService:
    def __init__(self, pool: WorkerPool, jobs: JobManager, sandbox: Sandbox, *,
                 allow_remote_code: bool = False) -> None:
        self.pool = pool
        self.jobs = jobs
        self.sandbox = sandbox
        self.allow_remote_code = allow_remote_code

    # -- load / unload / list ---------------------------------------------------------------------------------
    async def load(self, family: Family, config: LoadConfig | UnslothLoadConfig, model_id: str | None,
                   force: bool = False) -> LoadedModel:
        source = self.sandbox.model_source("model_name", config.model_name)
        if getattr(config, "trust_remote_code", False) and not self.allow_remote_code:
            raise InvalidArgument("trust_remote_code", True, "false: this server was started without "
                                                             "--allow-remote-code, so code shipped with a model "
                                                             "never runs; the operator can restart it with "
                                                             "--allow-remote-code for models they trust")
        model_id = self._claim_id(family, config.model_name, model_id)
        notes = [] if force else _check_fits(config, source)
        loaded = await self.pool.load(model_id, family.prefix, Load(new_request_id(), config), config)
        loaded.info["warnings"] = notes + loaded.info["warnings"]
        return loaded

    def _claim_id(self, family: Family, model_name: str, model_id: str | None) -> str:
        if model_id is not None:
            if not _MODEL_ID.match(model_id):
                raise InvalidArgument("model_id", model_id, f"1-{MAX_ID_CHARS} characters of letters, digits, '.', "
                                                            "'_' or '-', starting with a letter or digit")
            if self.pool.is_taken(model_id):
                raise ModelIdTaken(model_id, family.tool("unload_model"))
            return model_id
        base = re.sub(r"[^a-z0-9._-]+", "-", Path(model_name.rstrip("/")).name.lower()).strip("-._") or "model"
        base = base.removesuffix("-hf") or base  # the spec: meta-llama/Llama-2-7b-hf -> llama-2-7b-...
        stem = f"{base[:80]}-{family.id_suffix}" + (f"-{int(time.time())}" if family.with_timestamp else "")
        candidate, n = stem, 2
        while self.pool.is_taken(candidate):  # never a silent overwrite of a loaded model
            candidate, n = f"{stem}-{n}", n + 1
        return candidate

    async def unload(self, family: Family, model_id: str) -> dict[str, Any]:
        self._get(family, model_id)
        active = self.jobs.active_job(model_id)
        if active is not None:
            raise WorkerBusy(model_id, f"training job {active.job_id!r}; call {family.tool('cancel_training')}"
                                       f"(job_id={active.job_id!r}) first, then unload")
        await self.pool.unload(model_id)
        return {"status": "success", "message": f"Model {model_id} unloaded"}

    def models(self, family: Family) -> list[LoadedModel]:
        return self.pool.models(family.prefix)

    @staticmethod
    def model_state(loaded: LoadedModel) -> str:
        if not loaded.worker.is_alive:
            return f"lost: {loaded.worker.exit_reason}; load it again"
        if loaded.worker.running:
            return f"busy: {loaded.worker.running}"
        return "ready" if loaded.training_config is None else "prepared"

    # -- prepare / train ----------------------------------------------------------------------------------------
    async def prepare(self, family: Family, model_id: str, settings: TrainingSettings) -> dict[str, Any]:
        """Send the training settings (and, for the unsloth family, the LoRA adapter) to the worker; return its
        answer: parameter counts after LoRA, and warnings."""
        loaded = self._get(family, model_id)
        self.sandbox.writable("output_dir", settings.output_dir)
        lora = settings.lora() if isinstance(settings, UnslothTrainingConfig) else None
        if lora is not None and isinstance(loaded.training_config, UnslothTrainingConfig) \
                and _lora_shape(lora) != _lora_shape(loaded.training_config.lora()):
            raise InvalidArgument("training_config", _lora_fields(settings), "the LoRA settings this model was "
                                  "prepared with (r, lora_alpha, lora_dropout, target_modules, "
                                  "use_gradient_checkpointing): the adapter is attached; load the model again "
                                  "to change them")
        result = await loaded.worker.request(Prepare(new_request_id(), engine_training_config(settings), lora))
        loaded.training_config = settings
        return result

    async def train(self, family: Family, model_id: str, train_dataset: DatasetSource,
                    eval_dataset: DatasetSource | None, overrides: dict[str, Any], wait_seconds: float,
                    on_progress: ProgressSink | None) -> dict[str, Any]:
        """Start a training job; answer its final result if it ends within wait_seconds, else 'running'."""
        loaded = self._get(family, model_id)
        settings, options = self._training_plan(family, loaded, overrides)
        train_dataset = self.sandbox.dataset("train_dataset", train_dataset)
        if eval_dataset is not None:
            eval_dataset = self.sandbox.dataset("eval_dataset", eval_dataset)
        self.sandbox.writable("output_dir", settings.output_dir)
        if isinstance(options.resume_from_checkpoint, str):
            self.sandbox.writable("resume_from_checkpoint", options.resume_from_checkpoint)
        notes = []
        if loaded.training_config is None:
            notes.append(f"{model_id} was not prepared; prepared now with {family.tool('prepare_for_training')}'s "
                         f"defaults (and the overrides given).")
            notes += (await self.prepare(family, model_id, settings)).get("warnings", [])
            # the method and its settings are this call's; later calls start from sft as a prepare would
            loaded.training_config = dataclasses.replace(settings, **_method_defaults(family))
        config = engine_training_config(settings)
        # A folder another live run or export holds is refused here, before a job exists (the worker's claim is
        # the authoritative check)
        output_lock.refuse_if_held(self.sandbox.writable("output_dir", config.output_dir), doing="training")
        command = Train(new_request_id(), config, train_dataset, eval_dataset, options, tuple(notes))
        record = self.jobs.start(loaded, command, family_cancel_tool=family.tool("cancel_training"),
                                 dataset_description=_describe_dataset(train_dataset))

        last_step = -1

        async def forward(event: Progress) -> None:
            nonlocal last_step
            if event.step > last_step:  # MCP progress must increase; eval/checkpoint events repeat a step
                last_step = event.step
                loss = "" if event.loss is None else f", loss {event.loss:.4f}"
                await on_progress(event.step, event.total_steps, f"step {event.step}/{event.total_steps}{loss}")

        record = await self.jobs.wait(record.job_id, wait_seconds, forward if on_progress else None)
        if record.state == "failed":
            raise TrainingFailed(f"training job {record.job_id} failed: {record.error}")
        if record.is_terminal:  # a call's overrides apply to its run only; the prepared config stays
            return record.result
        return {
            "status": "running",
            "job_id": record.job_id,
            "model_id": model_id,
            "step": record.step,
            "total_steps": record.total_steps,
            "loss": record.loss,
            "output_dir": f"{config.output_dir.rstrip('/')}/final",
            "message": (f"Training continues in the background. Call {family.tool('training_status')}"
                        f"(job_id={record.job_id!r}) every 30-60 s until state is 'succeeded'; "
                        f"{family.tool('cancel_training')} stops it with a checkpoint."),
        }

    # -- try, evaluate, ship ------------------------------------------------------------------------------------
    async def generate(self, family: Family, model_id: str, config: GenerationConfig) -> dict[str, Any]:
        answer = await self._get(family, model_id).worker.request(Generate(new_request_id(), config), queue=True)
        return {"status": "success", "model_id": model_id, **answer}

    async def evaluate(self, family: Family, model_id: str, dataset: DatasetSource, dataset_format: str,
                       batch_size: int, *, use_adapter: bool = True) -> dict[str, Any]:
        loaded = self._get(family, model_id)
        dataset = self.sandbox.dataset("eval_dataset", dataset)
        command = Evaluate(new_request_id(), dataset, dataset_format, batch_size, use_adapter)
        return {**await loaded.worker.request(command, queue=True),
                "model_id": model_id}

    async def export(self, family: Family, model_id: str, config: ExportConfig,
                     probe_prompt: str | None) -> dict[str, Any]:
        loaded = self._get(family, model_id)
        output_lock.refuse_if_held(self.sandbox.writable("output_dir", config.output_dir), doing="export")
        if loaded.training_config is None and family is UNSLOTH:
            raise InvalidArgument("model_id", model_id, f"a model with a LoRA adapter: call "
                                                        f"{family.tool('prepare_for_training')} and "
                                                        f"{family.tool('train')} first")
        return {**await loaded.worker.request(Export(new_request_id(), config, probe_prompt)), "model_id": model_id}

    async def inspect_dataset(self, dataset: DatasetSource, dataset_format: str,
                              model_id: str | None) -> dict[str, Any]:
        """With a model: its tokenizer, chat template and max_length, in its worker. Without: here, no torch."""
        dataset = self.sandbox.dataset("dataset", dataset)
        if model_id is None:
            from llm_mcp.data.inspect import inspect_dataset

            return await asyncio.to_thread(inspect_dataset, dataset, dataset_format=dataset_format)
        loaded = self.pool.find(model_id)
        return {**await loaded.worker.request(InspectDataset(new_request_id(), dataset, dataset_format),
                                                queue=True),
                "model_id": model_id}

    # -- jobs -----------------------------------------------------------------------------------------------------
    def training_status(self, family: Family, model_id: str | None, job_id: str | None) -> dict[str, Any]:
        return self.jobs.status(self.jobs.find(family=family.prefix, model_id=model_id, job_id=job_id))

    def loss_plot(self, family: Family, model_id: str | None, job_id: str | None) -> bytes:
        return self.loss_plot_of(self.jobs.find(family=family.prefix, model_id=model_id, job_id=job_id))

    def loss_plot_of(self, record: Any) -> bytes:
        """A job's loss curve as a PNG (the status tool's include_plot and the job's loss.png resource)."""
        from llm_mcp.jobs.plot import loss_curve_png

        return loss_curve_png(self.jobs.store.points(record.job_id),
                              title=f"{record.model_id} · {record.job_id} · {record.state}")

    def cancel_training(self, family: Family, model_id: str | None, job_id: str | None) -> dict[str, Any]:
        record = self.jobs.find(family=family.prefix, model_id=model_id, job_id=job_id)
        if record.is_terminal:
            return {"status": "success", "job_id": record.job_id, "state": record.state,
                    "message": f"job {record.job_id} had already ended ({record.state}); nothing to cancel."}
        record = self.jobs.cancel(record)
        return {"status": "success", "job_id": record.job_id, "state": "cancelling",
                "message": (f"job {record.job_id} stops at the next step boundary and saves a checkpoint; "
                            f"{family.tool('training_status')} shows 'cancelled' once it has.")}

    def list_jobs(self, family: Family) -> dict[str, Any]:
        jobs = []
        for r in map(self.jobs.reconciled, self.jobs.store.list(family.prefix)):
            jobs.append({
                "job_id": r.job_id, "model_id": r.model_id, "state": r.state, "step": r.step,
                "total_steps": r.total_steps, "loss": r.loss, "output_dir": r.output_dir,
                "final_dir": (r.result or {}).get("output_dir"), "last_checkpoint": r.last_checkpoint,
                "created_at": r.created_at, "finished_at": r.finished_at, "error": r.error,
            })
        return {"status": "success", "jobs": jobs}

    def _training_plan(self, family: Family, loaded: LoadedModel,
                       overrides: dict[str, Any]) -> tuple[TrainingSettings, RunOptions]:
        """The prepared settings (or the family's defaults) with this call's overrides, validated."""
        base = loaded.training_config or family.training_config()
        option_keys = {f.name for f in dataclasses.fields(RunOptions)}
        run_values = {k: v for k, v in overrides.items() if k in option_keys}
        train_values = {k: v for k, v in overrides.items() if k not in option_keys}
        values = dataclasses.asdict(base)
        if train_values.get("method", base.method) != base.method:  # another method: not the old one's settings
            values.update(_method_defaults(family))
        settings = validated(type(base), {**values, **train_values}, where="training_config")
        options = validated(RunOptions, run_values, where="training_config")
        if isinstance(base, UnslothTrainingConfig) and loaded.training_config is not None \
                and _lora_shape(settings.lora()) != _lora_shape(base.lora()):
            raise InvalidArgument("training_config", _lora_fields(settings),
                                  "no LoRA changes after prepare_for_training attached the adapter (r, lora_alpha, "
                                  "lora_dropout, target_modules, use_gradient_checkpointing); load the model again "
                                  "to change them")
        return settings, options

    def _get(self, family: Family, model_id: str) -> LoadedModel:
        return self.pool.get(model_id, family=family.prefix, load_tool=family.tool("load_model"))


def _method_defaults(family: Family) -> dict[str, Any]:
    """The family's default method (sft) and method settings, by field name."""
    defaults = dataclasses.asdict(family.training_config())
    return {k: defaults[k] for k in METHOD_FIELDS}
