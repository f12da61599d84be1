"""Messages that cross the pipe between the server and a model worker: frozen dataclasses, pickled.

Commands go server -> worker and each carries a request_id; every command gets exactly one Done or Failed.
Progress events may come before it. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_mcp.config import (
    ExportConfig, GenerationConfig, LoadConfig, LoraSpec, RunOptions, TrainingConfig, UnslothLoadConfig,
)

DatasetSource = str | list[dict[str, Any]]


@dataclass(frozen=True)
class Load:
    request_id: str
    config: LoadConfig | UnslothLoadConfig  # the type picks the engine path: QLoRA, or Unsloth


@dataclass(frozen=True)
class Prepare:
    request_id: str
    config: TrainingConfig
    lora: LoraSpec | None = None  # attach this adapter now (the unsloth family attaches LoRA at prepare)


@dataclass(frozen=True)
class Train:
    request_id: str
    config: TrainingConfig
    train_dataset: DatasetSource
    eval_dataset: DatasetSource | None = None
    options: RunOptions = field(default_factory=RunOptions)
    warnings: tuple[str, ...] = ()  # notes from the server side, carried into the final answer
    job_id: str | None = None  # set by the job manager: the worker records the run's end under it (jobs/ends.py)


@dataclass(frozen=True)
class Generate:
    request_id: str
    config: GenerationConfig


@dataclass(frozen=True)
class Evaluate:
    request_id: str
    dataset: DatasetSource
    dataset_format: str = "auto"
    batch_size: int = 4
    use_adapter: bool = True  # false: the base model without the adapter


@dataclass(frozen=True)
class Export:
    request_id: str
    config: ExportConfig
    probe_prompt: str | None = None  # verification compares greedy answers to this (default: a fixed chat)


@dataclass(frozen=True)
class InspectDataset:
    request_id: str
    dataset: DatasetSource
    dataset_format: str = "auto"


@dataclass(frozen=True)
class Stop:
    """Stop the running Train at the next step boundary (a checkpoint is saved). Answered at once by the
    worker's reader thread, while the Train itself ends with its own Done (status 'cancelled')."""

    request_id: str


@dataclass(frozen=True)
class SetThreads:
    """Train with this many CPU threads from the next step on (None: all); the server sends it to every running
    training whenever one starts or ends, so the runs share the cores. Answered at once by the reader thread."""

    request_id: str
    threads: int | None


@dataclass(frozen=True)
class Shutdown:
    request_id: str = "shutdown"


Command = Load | Prepare | Train | Generate | Evaluate | Export | InspectDataset | Stop | SetThreads | Shutdown


@dataclass(frozen=True)
class Progress:
    request_id: str
    step: int
    total_steps: int
    loss: float | None = None
    learning_rate: float | None = None
    epoch: float | None = None
    eval_loss: float | None = None
    checkpoint: str | None = None  # set when a checkpoint was just saved
    ranks: tuple[dict[str, Any], ...] | None = None  # a run across processes: each rank's pid and whether it lives
    metrics: dict[str, float] | None = None  # the method's own metrics at a logging step (dpo's margins, grpo's reward)


@dataclass(frozen=True)
class Done:
    request_id: str
    result: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    request_id: str
    kind: str  # an errors.py class name; rebuilt on the server side
    message: str
    traceback: str = ""


Event = Progress | Done | Failed
