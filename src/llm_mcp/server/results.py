"""What each tool answers, typed: the tools' return annotations, so every tool's outputSchema says what comes back.

The spec's keys are typed and required; our additions are typed and optional (absent when they do not apply);
more keys may come (additionalProperties: true), so adding a key never breaks a client. TypedDicts rather than
models: a returned dict passes through as it is, with no nulls filled in for keys an answer does not have.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, with_config
from typing_extensions import Required, TypedDict

_OPEN = ConfigDict(extra="allow")
Status = Literal["success"]


@with_config(_OPEN)
class LoadAnswer(TypedDict, total=False):
    """A loaded model: its id for the other tools, its parameters and the load config."""

    status: Required[Status]
    model_id: Required[str]
    model_name: Required[str]
    trainable_params: Required[int]
    total_params: Required[int]
    config: Required[dict[str, Any]]
    device: str
    quantization: str
    memory: dict[str, Any]
    attention: str | None
    chat_template: dict[str, Any] | None
    warnings: list[str]


@with_config(_OPEN)
class PrepareAnswer(TypedDict, total=False):
    """The training config the model is prepared with (train's defaults for this model)."""

    status: Required[Status]
    message: Required[str]
    config: Required[dict[str, Any]]
    warnings: list[str]


@with_config(_OPEN)
class TrainAnswer(TypedDict, total=False):
    """The run's end (status success or cancelled: metrics, output_dir, the loss, the effective config), or,
    while it goes on, status running with the job_id to poll."""

    status: Required[Literal["success", "cancelled", "running"]]
    output_dir: Required[str]
    metrics: dict[str, float]
    job_id: str
    model_id: str
    engine: str
    output_path: str
    global_step: int
    step: int
    total_steps: int
    peak_memory_bytes: int | None
    loss: dict[str, float] | float | None  # the end: {first, last, min}; running: the latest
    loss_history: list[dict[str, Any]]
    resumed_from: str | None
    dataset: dict[str, Any]
    effective_config: dict[str, Any]
    engine_choices: list[str]
    message: str
    warnings: list[str]


@with_config(_OPEN)
class ListModelsAnswer(TypedDict, total=False):
    status: Required[Status]
    models: Required[dict[str, dict[str, Any]]]


@with_config(_OPEN)
class UnslothLoadAnswer(TypedDict, total=False):
    status: Required[Status]
    model_id: Required[str]
    model_name: Required[str]
    max_seq_length: Required[int]
    dtype: Required[str]
    device: Required[str]
    engine: str
    attention: str | None
    chat_template: dict[str, Any] | None
    warnings: list[str]


@with_config(_OPEN)
class UnslothPrepareAnswer(TypedDict, total=False):
    status: Required[Status]
    message: Required[str]
    trainable_params: Required[int]
    total_params: Required[int]
    config: dict[str, Any]
    engine: str
    warnings: list[str]


@with_config(_OPEN)
class MessageAnswer(TypedDict, total=False):
    status: Required[Status]
    message: Required[str]


@with_config(_OPEN)
class CancelAnswer(TypedDict, total=False):
    status: Required[Status]
    job_id: Required[str]
    state: Required[str]
    message: Required[str]


@with_config(_OPEN)
class ListJobsAnswer(TypedDict, total=False):
    status: Required[Status]
    jobs: Required[list[dict[str, Any]]]


@with_config(_OPEN)
class GenerateAnswer(TypedDict, total=False):
    status: Required[Status]
    model_id: Required[str]
    text: Required[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float | None
    used_adapter: bool
    sampling: str | dict[str, Any]  # "greedy", or the sampling settings


@with_config(_OPEN)
class EvaluateAnswer(TypedDict, total=False):
    """eval_loss and perplexity; on preference pairs preference_accuracy and mean_margin instead."""

    status: Required[Status]
    model_id: Required[str]
    rows: int
    dataset_format: str
    used_adapter: bool
    eval_loss: float | None
    perplexity: float | None
    undesirable_eval_loss: float
    preference_accuracy: float
    mean_margin: float
    pairs: int
    loss_on: str
    eval_runtime: float
    warnings: list[str]


@with_config(_OPEN)
class ExportAnswer(TypedDict, total=False):
    status: Required[Status]
    model_id: Required[str]
    format: Required[str]
    output_dir: Required[str]
    verified: dict[str, Any]
    warnings: list[str]


@with_config(_OPEN)
class EstimateAnswer(TypedDict, total=False):
    """One device's bytes by part, the free memory, whether it fits and, if not, the cheapest change."""

    status: Required[Status]
    total_bytes: Required[int]
    fits: Required[bool | None]
    weights_bytes: int
    lora_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    runtime_bytes: int
    reference_bytes: int
    generation_bytes: int
    device: str
    free_bytes: int | None
    advice: str | None
    num_processes: int
    distributed_strategy: str
    needed_here_bytes: int | None
    method: str
    total_gib: float
    free_gib: float | None
    model_shape: dict[str, Any]


@with_config(_OPEN)
class InspectAnswer(TypedDict, total=False):
    """The format found, row counts, examples as training sees them, lengths and the problems training would hit."""

    status: Required[Status]
    format: Required[str | None]
    rows: int
    usable_rows: int
    columns: list[str]
    loss_on: str
    examples: list[str]
    problems: list[str]
    length_tokens: dict[str, Any]
    length_chars: dict[str, Any]
    note: str
    model_id: str


@with_config(_OPEN)
class StatusAnswer(TypedDict, total=False):
    """A job: its state, progress, losses, speed, checkpoint, log tail; with result once it has ended."""

    status: Required[Status]
    job_id: Required[str]
    state: Required[Literal["queued", "running", "succeeded", "failed", "cancelled"]]
    step: Required[int]
    total_steps: Required[int]
    model_id: str
    progress: float
    loss: float | None
    recent_losses: list[dict[str, Any]]
    eval_loss: float | None
    learning_rate: float | None
    samples_per_second: float | None
    eta_seconds: float | None
    elapsed_seconds: float
    last_checkpoint: str | None
    output_dir: str
    cancel_requested: bool
    error: str | None
    log_tail: list[str]
    method_metrics: dict[str, float]
    recent_method_metrics: list[dict[str, Any]]
    ranks: list[dict[str, Any]]
    result: dict[str, Any]
