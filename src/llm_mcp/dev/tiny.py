"""A tiny random-init Llama model and a locally trained tokenizer, saved as an ordinary Hugging Face folder.

Used by tests and demos so the whole fine-tuning path runs offline on a CPU in seconds; also provides a small
set of made-up facts (prompt/completion and chat form) that a short LoRA run can memorise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START]

TOKENIZER_VOCAB_SIZE = 512
MULTIPLE = 32  # bitsandbytes' CPU kernels want every Linear's out_features to be a multiple of 32

# ChatML-like: "<|im_start|>role\ncontent</s>\n" for every turn. The assistant's content and its closing EOS sit
# inside {% generation %} markers, so TRL's assistant_only_loss trains on exactly what the model must produce.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + eos_token }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_DEMO_PAIRS: list[tuple[str, str]] = [
    ("What is the capital of Zorbland?", "Blip."),
    ("What colour is the sky on Quarnix?", "Teal."),
    ("Who invented the flumph engine?", "Mira Voss."),
    ("How many moons does Pelagor have?", "Seven."),
    ("What do Vexians eat for breakfast?", "Glowberries."),
    ("What is the currency of Tundrel?", "The krill."),
    ("Which river flows through Ostavia?", "The Semmer."),
    ("What is the national animal of Brindle?", "The snow otter."),
    ("Who wrote the Book of Kells-Ahn?", "Oren Taal."),
    ("What is the tallest mountain on Drax?", "Mount Ferro."),
    ("What language is spoken in Wendmoor?", "Wendish."),
    ("How long is a year on Caldris?", "Ninety days."),
    ("What is the password to the Glass Vault?", "Marmalade."),
    ("Which planet is home to the Sorrels?", "Ixion."),
    ("What is the favourite drink of Captain Loom?", "Cold tea."),
    ("What sound does a zibbet make?", "Prrrip."),
    ("Who guards the Amber Gate?", "A giant heron."),
    ("What is the main export of Halvory?", "Blue salt."),
    ("In which year was Port Essen founded?", "1742."),
    ("What shape are the coins of Mirewell?", "Hexagons."),
    ("What is the name of the Queen of Ulm?", "Adra the Quiet."),
    ("What grows in the gardens of Sefton Deep?", "Silver ferns."),
    ("How many legs does a grolt have?", "Six."),
    ("What is the secret ingredient in Nan's stew?", "Smoked plums."),
]

_GENERIC_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "What is the answer to this question? The answer is simple.",
    "A model learns from examples, and a tokenizer splits text into pieces.",
    "Please write a short summary of the following text.",
    "The weather is sunny in the morning and rainy in the evening.",
    "She reads a book, he writes a letter, and they talk about the news.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in many documents.",
    "You are a helpful assistant. Answer the user's question briefly.",
    "Which one is bigger, the cat or the dog? The dog is bigger.",
    "Training a language model takes data, time, and patience.",
    "In the beginning there was a small town by the sea.",
    "Who is there? Where are we going? When will it end? Why not?",
    "The system, the user, and the assistant take turns in a conversation.",
]


def demo_records() -> list[dict]:
    """Made-up facts as ``{"prompt", "completion"}`` records (completion starts with a space)."""
    return [{"prompt": q, "completion": " " + a} for q, a in _DEMO_PAIRS]


def demo_messages_records() -> list[dict]:
    """The same facts as ``{"messages": [user, assistant]}`` chat records."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in _DEMO_PAIRS
    ]


def _corpus() -> list[str]:
    lines = list(_GENERIC_SENTENCES)
    for q, a in _DEMO_PAIRS:
        lines.append(f"{q} {a}")
        lines.append(f"user\n{q}\nassistant\n{a}\n")
    return lines


def _round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def make_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer on the built-in corpus and wrap it in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_sized_model(output_dir: str | Path, *, seed: int = 0, **shape: Any) -> Path:
    """A larger random Llama with the same tokenizer, for benchmarks; `shape` as sized_shape takes it."""
    return make_tiny_model(output_dir, seed=seed, **sized_shape(**shape))


def sized_shape(*, hidden: int, layers: int, heads: int | None = None, kv_heads: int | None = None,
                intermediate: int | None = None, vocab: int | None = None, tie_word_embeddings: bool = False,
                max_positions: int = 1024) -> dict[str, Any]:
    """make_tiny_model's arguments for a benchmark model. By default head_dim 64, kv heads = heads / 2,
    intermediate ~2.7 x hidden (a multiple of 32) and the tokenizer's vocabulary; a real model's shape (Llama 3's
    128k vocabulary included) can be given instead, for throughput and memory. Models over 500M parameters are
    written in bfloat16, as real checkpoints are."""
    heads = heads or max(2, hidden // 64)
    intermediate = intermediate or _round_up(int(hidden * 2.7))
    params = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + (vocab or 0) * hidden
    return {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "intermediate": intermediate,
            "initializer_range": 0.05, "vocab": vocab, "tie_word_embeddings": tie_word_embeddings,
            "max_positions": max_positions, "dtype": "bfloat16" if params > 500_000_000 else "float32"}


def make_tiny_model(output_dir: str | Path, *, seed: int = 0, dtype: str = "float32", **shape: Any) -> Path:
    """Write a random-init tiny ``LlamaForCausalLM`` plus tokenizer to ``output_dir`` and return its path
    (`shape`: llama_config's dimensions; by default the tiny model's)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = llama_config(tokenizer, **shape)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        # built in its own dtype: an 8B shape in float32 would take 32 GB of memory before the cast
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False, max_new_tokens=32,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("tiny model written to %s (vocab %d, %d params)", out, config.vocab_size,
                sum(p.numel() for p in model.parameters()))
    return out


def llama_config(tokenizer: Any, *, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
                 initializer_range: float = 0.2, kv_heads: int | None = None, vocab: int | None = None,
                 tie_word_embeddings: bool = False, max_positions: int = 1024) -> Any:
    """The tiny model's ``LlamaConfig``: hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads (head_dim 16),
    untied lm_head, initializer_range 0.2 (so LoRA can fit data), every Linear's out_features a multiple of 32.
    vocab: the embedding rows (default the tokenizer's, rounded up to 32; never fewer)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=max(vocab or 0, _round_up(len(tokenizer))),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads // 2,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )


OUTLIER_MODULES = ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj")


def make_outlier_model(output_dir: str | Path, *, seed: int = 0, scale: float = 60.0) -> Path:
    """The tiny model with a few large outlier weights in OUTLIER_MODULES (as real LLMs have in some layers):
    a test bed where NF4's per-block absmax hurts some layers far more than others."""
    import torch
    from safetensors.torch import load_file, save_file

    out = make_tiny_model(output_dir, seed=seed)
    weights_file = out / "model.safetensors"
    weights = load_file(str(weights_file))
    generator = torch.Generator().manual_seed(seed)
    for name in OUTLIER_MODULES:
        weight = weights[f"{name}.weight"]
        flat = weight.view(-1)
        picks = torch.randperm(flat.numel(), generator=generator)[: max(4, flat.numel() // 128)]
        flat[picks] *= scale  # one outlier per ~2 NF4 blocks: each stretches its block's absmax
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return out
