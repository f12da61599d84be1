"""Every configuration object and every default, written once.

The spec's defaults live here and nowhere else: tool signatures reuse them (`= LoadConfig.lora_rank`) and
the typed aliases below carry each bound and description into both the MCP schema and config validation.
Leaf module: imports nothing from the package but errors and rewards (GRPO's declared rewards), and never torch.
"""

from __future__ import annotations

from dataclasses import asdict, field, fields
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from llm_mcp.errors import InvalidArgument
from llm_mcp.rewards import HELP as REWARDS_HELP, parse_rewards

QuantType = Literal["nf4", "nf4_optimized", "int4", "fp8", "int8", "none"]
ComputeDtype = Literal["float16", "bfloat16", "float32"]
Optimizer = Literal[
    "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
]
LrScheduler = Literal[
    "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
]
ReportTo = Literal["tensorboard", "none"]
DatasetFormat = Literal["auto", "text", "alpaca", "prompt_completion", "messages", "preference", "unpaired",
                        "prompt_answer"]
TrainingMethod = Literal["sft", "dpo", "orpo", "kto", "grpo"]
# Each method's settings, by TRL's names, with TRL's defaults (beta and loss_type: null = the method's default).
METHOD_LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "sft": (), "orpo": (), "dpo": ("sigmoid", "ipo", "hinge", "robust"), "kto": ("kto", "apo_zero_unpaired"),
    "grpo": ("dapo", "grpo", "dr_grpo", "bnpo")}
METHOD_BETA: dict[str, float | None] = {"sft": None, "dpo": 0.1, "orpo": 0.1, "kto": 0.1, "grpo": 0.0}
LossType = Literal["sigmoid", "ipo", "hinge", "robust", "kto", "apo_zero_unpaired", "dapo", "grpo", "dr_grpo", "bnpo"]
Beta = Annotated[float | None, Field(ge=0, le=100, description=(
    "dpo/kto: how far the model may move from the reference (higher: closer); orpo: the weight of the odds-ratio "
    "term; grpo: the KL coefficient (0: no reference pass). null: TRL's default (0.1; grpo 0.0)."))]
MethodLossType = Annotated[LossType | None, Field(description=(
    "The method's loss by TRL's names; null: its default. dpo: sigmoid (default), ipo, hinge, robust; kto: kto "
    "(default), apo_zero_unpaired; grpo: dapo (default), grpo, dr_grpo, bnpo."))]
UnpairedWeight = Annotated[float, Field(gt=0, le=100, description="kto: weight of the desirable (label true) or "
                                                                  "undesirable (label false) examples' losses.")]
NumGenerations = Annotated[int, Field(ge=2, le=256, description=(
    "grpo: completions sampled per prompt; batch_size x gradient_accumulation_steps x num_processes must be a "
    "multiple of it."))]
MaxCompletionLength = Annotated[int, Field(ge=1, le=32768, description="grpo: most tokens generated per completion.")]
SamplingTemperature = Annotated[float, Field(gt=0, le=5, description="grpo: sampling temperature of the completions.")]
Rewards = Annotated[tuple[dict[str, Any], ...] | None, Field(max_length=16, description=(
    "grpo (required there): " + REWARDS_HELP + ". Options: exact_match/contains against the row's answer "
    "(ignore_case, ignore_whitespace, ignore_punctuation); regex (pattern, full_match, ignore_case); numeric_match "
    "(the last number equals the answer's within tolerance); json_valid; json_schema (schema); length (min, max, "
    "unit: tokens|words|chars); format (one_line, ends_with_eos, starts_with, ends_with). Declared, never code."))]

FOUR_BIT_QUANT_TYPES: tuple[str, ...] = ("nf4", "nf4_optimized", "int4")
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linear layers LoRA leaves out by default (engine/load/model.py and memory.py both read it): output heads, and routers /
# gates that pick experts or scale a shared expert (a few logits per token; adapting them shifts the expert choice).
NOT_DEFAULT_LORA_TARGETS = frozenset({"lm_head", "embed_out", "gate", "router", "shared_expert_gate", "score",
                                      "classifier"})

# Typed, bounded parameters: one definition serves the tool schema and the dataclass validation.
MaxLength = Annotated[int, Field(ge=16, le=131072, description="Maximum tokens per training example; longer ones are cut.")]
Nf4OptimizedBudget = Annotated[float, Field(ge=0, le=4, description=(
    "nf4_optimized only: extra weight memory allowed for keeping the linear layers that NF4 distorts most in "
    "16-bit, as a fraction of plain NF4's linear-layer bytes (0.1 = at most 10% more)."))]
LoraRank = Annotated[int, Field(ge=1, le=1024, description="Rank r of the LoRA matrices (8-64 is typical).")]
LoraAlpha = Annotated[float, Field(gt=0, le=4096, description="LoRA scaling numerator: updates are scaled by alpha/r.")]
LoraDropout = Annotated[float, Field(ge=0, lt=1, description="Dropout on the LoRA branch, in [0, 1).")]
LearningRate = Annotated[float, Field(gt=0, le=1, description="Peak learning rate, in (0, 1].")]
BatchSize = Annotated[int, Field(ge=1, le=4096, description="Examples per device per step.")]
GradAccum = Annotated[int, Field(ge=1, le=4096, description="Micro-batches accumulated per optimizer step.")]
Epochs = Annotated[float, Field(gt=0, le=1000, description="Passes over the training data (used when max_steps=-1).")]
MaxSteps = Annotated[int, Field(ge=-1, le=10_000_000, description="Optimizer steps to run; -1 means use num_train_epochs.")]
WarmupRatio = Annotated[float, Field(ge=0, lt=1, description="Fraction of the steps spent warming the learning rate up.")]
WeightDecay = Annotated[float, Field(ge=0, le=1, description="AdamW weight decay.")]
MaxGradNorm = Annotated[float, Field(ge=0, le=1000, description="Gradient clipping norm (0 disables clipping).")]
Steps = Annotated[int, Field(ge=1, le=10_000_000)]
DeviceMap = Annotated[str, Field(pattern=r"^(auto|cpu|balanced|balanced_low_0|sequential|cuda(:\d{1,2})?|\d{1,2})$",
                                 description="'auto' places the model on the GPU when there is one (spilling to CPU "
                                             "memory when it does not fit); or 'cpu', 'cuda', 'cuda:N', "
                                             "'balanced', 'sequential'.")]
MAX_TOKEN_CHARS = 512
MAX_ID_CHARS = 128  # model_id and job_id
SaveLimit = Annotated[int, Field(ge=1, le=1000, description="Checkpoints kept in output_dir; older ones are deleted.")]
NumProcesses = Annotated[int, Field(ge=1, le=1024, description=(
    "Training processes (ranks), one per device: 1 trains in the model's own process; more run through torch's "
    "launcher on this machine, or as Ray Train workers when the server has --ray-address. The global batch is "
    "batch_size x gradient_accumulation_steps x num_processes."))]
DistributedStrategy = Literal["auto", "ddp", "fsdp"]
RAY_ADDRESS_ENV = "LLM_MCP_RAY_ADDRESS"  # the server's --ray-address, as its model workers see it
CHAT_TEMPLATE_NAMES: tuple[str, ...] = ("chatml", "gemma", "llama3", "mistral", "phi3", "qwen2.5")
ChatTemplate = Annotated[str | None, Field(max_length=100_000, description=(
    "Chat template for chat rows and messages: null = the tokenizer's own (ChatML, with a warning, when it has "
    "none); or a name: " + ", ".join(CHAT_TEMPLATE_NAMES) + "; or a Jinja template string. Turn markers the "
    "tokenizer lacks are written as text, and a missing end-of-turn token becomes EOS (no tokens are added)."))]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Random seed for data order, dropout and LoRA init.")]

_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_STRICT)
class LoadConfig:
    """What `*_load_model` takes: the base model, its quantization and the LoRA adapter (spec defaults)."""

    model_name: str
    max_length: MaxLength = 2048
    load_in_4bit: bool = True
    quant_type: QuantType = "nf4"
    use_double_quant: bool = True
    compute_dtype: ComputeDtype = "bfloat16"
    lora_rank: LoraRank = 64
    lora_alpha: LoraAlpha = 16
    lora_dropout: LoraDropout = 0.1
    target_modules: tuple[str, ...] | None = None  # None: DEFAULT_TARGET_MODULES that exist in the model
    device_map: DeviceMap = "auto"
    trust_remote_code: bool = False
    nf4_optimized_budget: Nf4OptimizedBudget = 0.10
    chat_template: ChatTemplate = None

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise InvalidArgument("model_name", self.model_name, "a local model folder or a hub id")
        check_chat_template(self.chat_template)
        if self.target_modules is not None and not self.target_modules:
            raise InvalidArgument("target_modules", [], "a non-empty list of module names, or null for the default")

    @property
    def effective_quant_type(self) -> str:
        """The quantization that really runs: load_in_4bit=false turns the 4-bit types off (plain LoRA)."""
        if not self.load_in_4bit and self.quant_type in FOUR_BIT_QUANT_TYPES:
            return "none"
        return self.quant_type

    def spec_dict(self) -> dict[str, Any]:
        """The `config` object of the spec's load response (compute dtype under its bitsandbytes name)."""
        out = asdict(self)
        out["bnb_4bit_compute_dtype"] = out.pop("compute_dtype")
        out["target_modules"] = list(self.target_modules or DEFAULT_TARGET_MODULES)
        order = ["model_name", "max_length", "load_in_4bit", "quant_type", "use_double_quant", "bnb_4bit_compute_dtype",
                 "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "device_map", "trust_remote_code"]
        return {k: out[k] for k in order}


def _engine_flag(default: bool | None, doc: str) -> Any:
    """A TrainingConfig field that is an engine flag: its default and a sentence of what it does."""
    return field(default=default, metadata={"engine_flag": doc})


@dataclass(frozen=True, config=_STRICT)
class TrainingConfig:
    """What `*_prepare_for_training` takes and `*_train` may override (spec defaults, spec names)."""

    output_dir: str = "./qlora_evolved_output"
    learning_rate: LearningRate = 2e-4
    batch_size: BatchSize = 4
    gradient_accumulation_steps: GradAccum = 4
    num_train_epochs: Epochs = 3
    max_steps: MaxSteps = -1
    warmup_ratio: WarmupRatio = 0.03
    weight_decay: WeightDecay = 0.01
    optim: Optimizer = "paged_adamw_32bit"
    lr_scheduler_type: LrScheduler = "cosine"
    max_grad_norm: MaxGradNorm = 0.3
    logging_steps: Steps = 10
    save_steps: Steps = 200
    save_total_limit: SaveLimit = 3
    report_to: ReportTo = "tensorboard"
    use_gradient_checkpointing: bool = True
    use_flash_attention_2: bool = True
    use_cpu_offload: bool = False
    seed: Seed = 42
    # Not in the qloraevolved spec; set by the unsloth family (None: decided from the ratio / the hardware).
    warmup_steps: Annotated[int, Field(ge=0, le=10_000_000)] | None = None
    bf16: bool | None = None
    fp16: bool | None = None
    # Training across processes (both families): auto = DDP where a full copy of the 4-bit model fits each device,
    # FSDP2 where it does not.
    num_processes: NumProcesses = 1
    distributed_strategy: DistributedStrategy = "auto"
    # What is trained (both families): sft (supervised, on answers); dpo, orpo (preference pairs {prompt, chosen,
    # rejected}); kto (unpaired {prompt, completion, label}); grpo (prompts with an answer, rewards declared). The
    # method's settings by TRL's names and defaults; a reference model is the base without the adapter.
    method: TrainingMethod = "sft"
    beta: Beta = None
    loss_type: MethodLossType = None
    desirable_weight: UnpairedWeight = 1.0
    undesirable_weight: UnpairedWeight = 1.0
    num_generations: NumGenerations = 8
    max_completion_length: MaxCompletionLength = 512
    temperature: SamplingTemperature = 1.0
    rewards: Rewards = None
    # Engine flags: choices that make training faster or leaner without changing what is learned. Each is one
    # _engine_flag entry here (its default and what it does, which the docs, bench --ablate and the train answer
    # read through ENGINE_FLAGS) plus its implementation in the engine (engine/train/choices.py decides it).
    padding_free: bool | None = _engine_flag(None, "Each batch's examples in one row without padding (position ids "
                                             "keep them apart); null: where flash-attention's varlen kernel runs.")
    packing: bool = _engine_flag(False, "Pack examples into max_length rows: fewer, fuller steps (an epoch then has "
                                        "fewer steps).")
    group_by_length: bool | None = _engine_flag(None, "Examples of similar length share a batch; null: wherever "
                                                      "padding remains.")
    auto_gradient_checkpointing: bool = _engine_flag(True, "Skip gradient checkpointing when the memory estimate "
                                                           "without it is under half of the free memory.")
    auto_precision: bool = _engine_flag(True, "On CPU, float32 compute instead of bf16 autocast; on CPUs without "
                                              "bf16 instructions the 4-bit layers and adapters in float32 too.")
    lean_lora_dropout: bool = _engine_flag(True, "LoRA dropout keeps a seed, not a float copy of each adapted "
                                                 "input (without autocast).")
    lean_mlp: bool = _engine_flag(True, "LoRA SwiGLU MLPs keep the gate and up outputs only and recompute "
                                        "silu(gate) * up in the backward pass (without autocast).")
    lean_rmsnorm: bool = _engine_flag(True, "RMSNorm with its backward in closed form, keeping x and 1/rms "
                                            "(float32, without autocast).")
    liger_kernel: bool | None = _engine_flag(None, "Liger's fused RMSNorm, SwiGLU and RoPE kernels; null: on CUDA "
                                                   "where liger-kernel is installed.")
    torch_compile: bool = _engine_flag(False, "Compile each decoder layer; the first step pays the compile time.")
    release_memory: bool = _engine_flag(False, "CPU: the heap's freed pages go back to the OS after each step "
                                               "(lower peak memory, slower steps).")
    reuse_freed_memory: bool = _engine_flag(False, "CPU: what a step frees stays in the heap for the next step "
                                                   "(faster steps, higher peak memory).")

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise InvalidArgument("fp16", True, "false when bf16=true (pick one mixed-precision mode)")
        if self.max_steps == 0:
            raise InvalidArgument("max_steps", 0, "-1 (train for num_train_epochs) or an integer >= 1")
        if not self.output_dir.strip():
            raise InvalidArgument("output_dir", self.output_dir, "a folder path inside the workspace")
        check_method_settings(self)

    def method_settings(self) -> dict[str, Any]:
        """The method's own settings as they run (nulls resolved to the method's defaults)."""
        m = self.method
        out: dict[str, Any] = {}
        if METHOD_BETA[m] is not None:
            out["beta"] = METHOD_BETA[m] if self.beta is None else self.beta
        if METHOD_LOSS_TYPES[m]:
            out["loss_type"] = self.loss_type or METHOD_LOSS_TYPES[m][0]
        if m == "kto":
            out.update(desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        if m == "grpo":
            out.update(num_generations=self.num_generations, max_completion_length=self.max_completion_length,
                       temperature=self.temperature,
                       rewards=[r.as_dict() for r in parse_rewards(self.rewards or [], "rewards")])
        return out

    def spec_dict(self) -> dict[str, Any]:
        """The `config` object of the spec's prepare response (seed is ours, kept last)."""
        values = asdict(self)
        return {k: values[k] for k in _QLORA_PREPARE_KEYS}


METHOD_FIELDS = ("method", "beta", "loss_type", "desirable_weight", "undesirable_weight", "num_generations",
                 "max_completion_length", "temperature", "rewards")


def check_method_settings(c: Any) -> None:
    """The method's settings fit it: its loss types, a positive beta where it is a strength, rewards for grpo
    only, grpo's generations dividing the global batch, kto's batch of at least two (its KL estimate)."""
    m = c.method
    if c.loss_type is not None and c.loss_type not in METHOD_LOSS_TYPES[m]:
        allowed = METHOD_LOSS_TYPES[m]
        raise InvalidArgument("loss_type", c.loss_type, (f"one of {', '.join(allowed)} for method={m!r}" if allowed
                                                         else f"null: method={m!r} has no loss_type"))
    if c.beta is not None and m in ("dpo", "orpo", "kto") and c.beta <= 0:
        raise InvalidArgument("beta", c.beta, f"a number > 0 for method={m!r} (or null for its default 0.1)")
    if m == "grpo":
        if not c.rewards:
            raise InvalidArgument("rewards", c.rewards, f"{REWARDS_HELP}: method='grpo' learns from them")
        parse_rewards(c.rewards, "rewards")
        batch = c.batch_size * c.gradient_accumulation_steps * c.num_processes
        if batch % c.num_generations:
            fits = [n for n in range(2, batch + 1) if batch % n == 0]
            raise InvalidArgument("num_generations", c.num_generations, (
                f"a divisor of the global batch {batch} (batch_size x gradient_accumulation_steps x num_processes): "
                f"{', '.join(map(str, fits)) or 'none; raise batch_size or gradient_accumulation_steps'}"))
    elif c.rewards:
        raise InvalidArgument("rewards", list(c.rewards), f"null for method={m!r} (rewards are for method='grpo')")
    if m == "kto" and c.batch_size < 2:
        raise InvalidArgument("batch_size", c.batch_size, "2 or more for method='kto' (its KL term pairs each "
                                                          "example with another of the same batch)")


# training_config flag -> (default, what it does): every engine flag, in TrainingConfig's order
ENGINE_FLAGS: dict[str, tuple[Any, str]] = {
    f.name: (f.default, f.metadata["engine_flag"]) for f in fields(TrainingConfig) if "engine_flag" in f.metadata}
_QLORA_PREPARE_KEYS = [f for f in TrainingConfig.__dataclass_fields__
                       if f not in ("warmup_steps", "bf16", "fp16", *ENGINE_FLAGS)]


def engine_flags_markdown() -> str:
    """The engine flags as a Markdown table (docs/engine-flags.md is this, checked by a test)."""
    rows = ["| flag | default | what it does |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | `{'null' if default is None else str(default).lower()}` | {doc} |"
             for name, (default, doc) in ENGINE_FLAGS.items()]
    return "\n".join(rows)


@dataclass(frozen=True, config=_STRICT)
class LoraSpec:
    """A LoRA adapter to attach at prepare time (the unsloth family attaches LoRA there, not at load)."""

    r: LoraRank = 16
    lora_alpha: LoraAlpha = 16
    lora_dropout: LoraDropout = 0.0
    target_modules: tuple[str, ...] | None = None  # None: DEFAULT_TARGET_MODULES that exist in the model
    gradient_checkpointing: bool | Literal["unsloth"] = True
    seed: Seed = 42


@dataclass(frozen=True, config=_STRICT)
class UnslothLoadConfig:
    """What `unsloth_load_model` takes (spec defaults)."""

    model_name: str
    max_seq_length: MaxLength = 2048
    load_in_4bit: bool = True
    token: str | None = field(default=None, repr=False)  # never echoed, logged or written
    device_map: DeviceMap = "auto"
    chat_template: ChatTemplate = None

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise InvalidArgument("model_name", self.model_name, "a local model folder or a hub id")
        check_chat_template(self.chat_template)

    def spec_dict(self, dtype: str) -> dict[str, Any]:
        """The `config` of the spec's unsloth_list_models entry (no token)."""
        return {"model_name": self.model_name, "max_seq_length": self.max_seq_length, "dtype": dtype,
                "load_in_4bit": self.load_in_4bit, "device_map": self.device_map}


@dataclass(frozen=True, config=_STRICT)
class UnslothTrainingConfig:
    """What `unsloth_prepare_for_training(training_config=...)` takes (spec defaults), LoRA included."""

    learning_rate: LearningRate = 2e-4
    batch_size: BatchSize = 2
    gradient_accumulation_steps: GradAccum = 4
    warmup_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 10
    max_steps: MaxSteps = 100
    num_train_epochs: Epochs = 1
    output_dir: str = "unsloth_finetuned_model"
    fp16: bool | None = None  # None: true where bf16 is not supported
    bf16: bool | None = None  # None: true where supported
    logging_steps: Steps = 1
    save_steps: Steps = 100
    save_total_limit: SaveLimit = 3
    optim: Optimizer = "adamw_8bit"
    weight_decay: WeightDecay = 0.01
    lr_scheduler_type: LrScheduler = "cosine"
    max_grad_norm: MaxGradNorm = 1.0
    report_to: ReportTo = "tensorboard"
    seed: Seed = 42
    use_gradient_checkpointing: bool | Literal["unsloth"] = True
    r: LoraRank = 16
    lora_alpha: LoraAlpha = 16
    lora_dropout: LoraDropout = 0.0
    target_modules: tuple[str, ...] | None = None
    num_processes: NumProcesses = 1
    distributed_strategy: DistributedStrategy = "auto"
    method: TrainingMethod = "sft"  # and its settings: as TrainingConfig's
    beta: Beta = None
    loss_type: MethodLossType = None
    desirable_weight: UnpairedWeight = 1.0
    undesirable_weight: UnpairedWeight = 1.0
    num_generations: NumGenerations = 8
    max_completion_length: MaxCompletionLength = 512
    temperature: SamplingTemperature = 1.0
    rewards: Rewards = None

    def __post_init__(self) -> None:
        self.to_training_config()  # cross-field checks live there

    def to_training_config(self) -> TrainingConfig:
        """The engine's TrainingConfig for these values (warmup in steps, precision flags as given)."""
        return TrainingConfig(
            output_dir=self.output_dir, learning_rate=self.learning_rate, batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps, warmup_ratio=0.0, warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay, optim=self.optim, lr_scheduler_type=self.lr_scheduler_type,
            max_grad_norm=self.max_grad_norm, logging_steps=self.logging_steps, save_steps=self.save_steps,
            save_total_limit=self.save_total_limit, report_to=self.report_to,
            use_gradient_checkpointing=bool(self.use_gradient_checkpointing), use_flash_attention_2=False,
            seed=self.seed, bf16=self.bf16, fp16=self.fp16, num_processes=self.num_processes,
            distributed_strategy=self.distributed_strategy,
            **{name: getattr(self, name) for name in METHOD_FIELDS},
        )

    def lora(self) -> LoraSpec:
        return LoraSpec(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                        target_modules=self.target_modules, gradient_checkpointing=self.use_gradient_checkpointing,
                        seed=self.seed)


@dataclass(frozen=True, config=_STRICT)
class RunOptions:
    """Per-run choices of `*_train` that are not training hyper-parameters."""

    dataset_format: DatasetFormat = "auto"
    resume_from_checkpoint: bool | str = False  # True: latest checkpoint in output_dir; str: a checkpoint folder
    overwrite_output_dir: bool = False
    eval_steps: int | None = None  # None: evaluate at the end only
    skip_invalid_rows: bool = False  # False: a malformed row refuses the run, naming it; True: skipped and counted


ExportFormat = Literal["adapter", "merged_16bit", "gguf"]
GgufQuantization = Literal["f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]
MaxNewTokens = Annotated[int, Field(ge=1, le=8192, description="Most tokens to generate; generation stops at EOS.")]
Temperature = Annotated[float, Field(ge=0, le=5, description="Sampling temperature; 0 = greedy (deterministic).")]
TopP = Annotated[float, Field(gt=0, le=1, description="Nucleus sampling: keep the smallest token set with this "
                                                     "probability mass (used when temperature > 0).")]
MAX_PROMPT_CHARS = 200_000


@dataclass(frozen=True, config=_STRICT)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


@dataclass(frozen=True, config=_STRICT)
class GenerationConfig:
    """What `*_generate` takes: a prompt (raw text) or chat messages (rendered with the model's chat template)."""

    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_new_tokens: MaxNewTokens = 256
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    use_adapter: bool = True
    seed: Seed = 42

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidArgument("prompt", self.prompt, "exactly one of prompt (text) or messages (a list of "
                                                         "{role, content})")
        if self.messages is not None and not self.messages:
            raise InvalidArgument("messages", [], "a non-empty list of {role, content}")


@dataclass(frozen=True, config=_STRICT)
class ExportConfig:
    """What `*_export` takes: which artefact to write, where, and how to check it."""

    format: ExportFormat = "adapter"
    output_dir: str = "./exported_model"
    gguf_quantization: GgufQuantization = "q8_0"
    save_dtype: Literal["float16", "bfloat16"] = "float16"
    verify: bool = True
    overwrite: bool = False


@dataclass(frozen=True, config=_STRICT)
class OAuthConfig:
    """HTTP as an OAuth 2.1 resource server: JWT access tokens from `issuer`, signed by a key of its JWKS (a URL,
    or a local file), for `audience`, carrying every required scope. No secrets here: only public keys are used."""

    issuer: str  # the tokens' `iss`, compared exactly; advertised in the protected resource metadata
    audience: str  # the tokens' `aud` must hold it (the CLI's default: resource_url)
    resource_url: str  # this server's public URL (RFC 9728 `resource`), e.g. https://mcp.example.com/mcp
    jwks_url: str | None = None  # exactly one of jwks_url and jwks_file
    jwks_file: str | None = None
    required_scopes: tuple[str, ...] = ()


@dataclass(frozen=True, config=_STRICT)
class ServerConfig:
    """How the server runs: where it may write, and which Python runs the model workers."""

    workspace: str = "."
    worker_python: str | None = None  # None: the server's own interpreter
    unsloth_python: str | None = None  # interpreter of the unsloth family's workers; None: worker_python
    state_dir: str | None = None  # None: <workspace>/.llm-mcp
    worker_env: dict[str, str] = field(default_factory=dict)
    allow_read: tuple[str, ...] = ()  # folders outside the workspace that datasets and models may be read from
    allow_remote_code: bool = False  # whether a tool call may ask for trust_remote_code=true
    max_dataset_bytes: int | None = None  # a dataset file larger than this is refused (None: data/'s default)
    max_dataset_rows: int | None = None  # a dataset with more rows than this is refused (None: data/'s default)
    ray_address: str | None = None  # runs with num_processes > 1 go to this Ray cluster (None: local processes)
    families: tuple[str, ...] = ("qloraevolved", "unsloth")  # the tool families listed (estimate_memory and
    # inspect_dataset always are)
    oauth: OAuthConfig | None = None  # HTTP only: accept the issuer's JWT access tokens


def check_chat_template(value: str | None) -> None:
    """A chat_template is null, a known name, or a Jinja string (rendered and checked at load)."""
    if value is None or "{{" in value or "{%" in value:
        return
    if value.strip().lower() not in CHAT_TEMPLATE_NAMES:
        raise InvalidArgument("chat_template", value, f"one of {list(CHAT_TEMPLATE_NAMES)} or a Jinja template "
                                                      "string (containing '{{' or '{%')")


def validated(cls: type, values: dict[str, Any], *, where: str) -> Any:
    """Build a config dataclass from agent-supplied values, turning validation errors into InvalidArgument."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise InvalidArgument.from_validation(exc, where=where) from None
    except TypeError as exc:  # an unknown key reaches the dataclass __init__ before pydantic
        raise InvalidArgument(where, sorted(values), f"known keys only ({exc})") from None
