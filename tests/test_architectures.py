"""The architecture matrix: tiny random-init models of every common architecture (llm_mcp.dev.tiny_archs) through the
real stack. In the engine: every quantization type loads and LoRA on every projection gets gradients. Through the
MCP client: load -> train (the loss falls) -> generate (answers a trained fact, stops at EOS) -> evaluate ->
export adapter, merged_16bit and gguf -> each export reloaded. The README's architecture table states these results.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FAST_LOAD, FAST_TRAIN, McpSession, merge_agrees
from llm_mcp import memory
from llm_mcp.config import LoadConfig, ServerConfig
from llm_mcp.server.app import create_server
from llm_mcp.dev.tiny import demo_messages_records
from llm_mcp.dev.tiny_archs import ARCHITECTURES, MOE_ARCHITECTURES, make_tiny_arch

QUANT_TYPES = ("nf4", "nf4_optimized", "int8", "int4", "fp8", "none")
GGUF_UNSUPPORTED = ("opt",)  # llama.cpp has no OPT architecture
# The tiny LayerNorm models with learned positions (GPT-2, OPT) memorise the facts only with a higher learning rate.
TRAIN_LR = {"gpt2": 5e-3, "opt": 1e-2}
TRAIN_STEPS = {"gpt2": 160}
# Every projection of attention and MLP, by the names each architecture uses (fused ones and Conv1D included).
EXPECTED_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
for _arch in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "qwen2_moe"):
    EXPECTED_TARGETS[_arch] = EXPECTED_TARGETS["llama"]


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archs")
    for arch in ARCHITECTURES:
        make_tiny_arch(arch, root / arch)
    return root


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_quant_type_loads_and_lora_trains_every_projection(arch, arch_dir):
    """In the engine, each quant type loads the architecture, LoRA sits on every projection (experts included for
    MoE) and one backward step reaches every adapter."""
    from llm_mcp.engine.load.model import load_model

    for quant in QUANT_TYPES:
        bundle = load_model(LoadConfig(model_name=str(arch_dir / arch), quant_type=quant, compute_dtype="float32",
                                       lora_rank=4, lora_alpha=8))
        ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2]], device=bundle.model.device)
        assert bundle.target_modules == EXPECTED_TARGETS[arch], (quant, bundle.target_modules)
        if arch in MOE_ARCHITECTURES:
            assert bundle.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
            if quant != "none":
                assert any("experts' fused weights" in w and "stay in" in w for w in bundle.warnings), bundle.warnings
        bundle.model.train()
        bundle.model(input_ids=ids, labels=ids).loss.backward()
        lora_b = {n: p.grad for n, p in bundle.model.named_parameters() if "lora_B" in n}
        assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values()), (quant, arch)
        expected_attention = "eager" if arch == "gemma2" else "sdpa"
        assert bundle.attention == expected_attention
        if quant == "none":  # estimate_memory counts the same adapters (experts included) from config.json alone
            estimate = memory.estimate(memory.read_shape(str(arch_dir / arch)), quant_type="none",
                                       compute_dtype="float32", lora_rank=4, batch_size=1, max_length=16,
                                       use_gradient_checkpointing=True)
            assert estimate.lora_bytes // 4 == bundle.param_counts()[0]
        del bundle


def test_unknown_target_names_are_refused_listing_the_real_ones(arch_dir):
    """target_modules that do not exist: the error names the parameter and lists what the model has."""
    from llm_mcp.engine.load.model import load_model
    from llm_mcp.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"target_modules.*o_proj.*qkv_proj.*gate_up_proj"):
        load_model(LoadConfig(model_name=str(arch_dir / "phi3"), quant_type="none", target_modules=("q_proj",)))
    with pytest.raises(InvalidArgument, match=r"target_modules.*expert weights.*mlp.experts.gate_up_proj"):
        load_model(LoadConfig(model_name=str(arch_dir / "mixtral"), quant_type="none", target_modules=("w1",)))
    bundle = load_model(LoadConfig(model_name=str(arch_dir / "mixtral"), quant_type="none", lora_dropout=0.0,
                                   target_modules=("q_proj", "gate_up_proj")))
    assert bundle.target_modules == ["q_proj"] and bundle.target_parameters == ["mlp.experts.gate_up_proj"]


@pytest.fixture(scope="module")
def matrix_mcp(arch_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("matrix-workspace")
    config = ServerConfig(workspace=str(workspace), allow_read=(str(arch_dir),))
    with McpSession(create_server(config)) as session:
        session.workspace = workspace
        yield session


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_flow_through_mcp(arch, arch_dir, matrix_mcp):
    """load (nf4) -> train -> generate -> evaluate -> export adapter / merged_16bit / gguf, through the MCP
    client, each export reloaded; GGUF refused with the supported list where llama.cpp has no such architecture."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    mcp, model_id = matrix_mcp, f"m-{arch}"
    chats = demo_messages_records()
    loaded = mcp.ok("qloraevolved_load_model", {"model_name": str(arch_dir / arch), "model_id": model_id,
                                                **FAST_LOAD})
    assert loaded["config"]["target_modules"] == EXPECTED_TARGETS[arch]
    assert loaded["attention"] == ("eager" if arch == "gemma2" else "sdpa")
    before = mcp.ok("qloraevolved_evaluate", {"model_id": model_id, "eval_dataset": chats[:8]})
    trained = mcp.ok("qloraevolved_train", {"model_id": model_id, "train_dataset": chats, "wait_seconds": -1,
                                            "training_config": {**FAST_TRAIN, "max_steps": TRAIN_STEPS.get(arch, 60),
                                                                "learning_rate": TRAIN_LR.get(arch, FAST_TRAIN["learning_rate"]),
                                                                "output_dir": f"run-{arch}"}})
    assert trained["status"] == "success", trained
    after = mcp.ok("qloraevolved_evaluate", {"model_id": model_id, "eval_dataset": chats[:8]})
    assert after["eval_loss"] < 0.5 * before["eval_loss"], (before["eval_loss"], after["eval_loss"])

    question, fact = (m["content"] for m in chats[0]["messages"])
    answer = mcp.ok("qloraevolved_generate", {"model_id": model_id, "max_new_tokens": 24,
                                              "messages": [{"role": "user", "content": question}]})
    assert answer["finish_reason"] == "eos" and answer["text"].strip() == fact, answer

    adapter = mcp.ok("qloraevolved_export", {"model_id": model_id, "format": "adapter",
                                             "output_dir": f"export-{arch}/adapter"})
    base = AutoModelForCausalLM.from_pretrained(str(arch_dir / arch), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(mcp.workspace / adapter["adapter_dir"]))
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n) == loaded["trainable_params"]

    merged = mcp.ok("qloraevolved_export", {"model_id": model_id, "format": "merged_16bit",
                                            "output_dir": f"export-{arch}/merged", "probe_prompt": question})
    assert merged["verified"]["loads_with_transformers"] is True
    assert merge_agrees(merged["verified"]), merged["verified"]
    assert AutoModelForCausalLM.from_pretrained(str(mcp.workspace / merged["merged_dir"])).config.model_type == \
        base.config.model_type

    gguf_args = {"model_id": model_id, "format": "gguf", "output_dir": f"export-{arch}/gguf", "probe_prompt": question}
    if arch in GGUF_UNSUPPORTED:
        error = mcp.error("qloraevolved_export", gguf_args)
        assert "LlamaForCausalLM" in error and "Gemma3ForCausalLM" in error, error
        assert not (mcp.workspace / f"export-{arch}" / "gguf").exists()
    else:
        exported = mcp.ok("qloraevolved_export", gguf_args)
        assert (mcp.workspace / exported["gguf_file"]).is_file()
        ran = exported["verified_llama_cpp"]  # llama.cpp ran the q8_0 file and answered what the model learned
        assert ran["greedy_matches_merged_model"] is True and ran["answer"].strip() == fact, ran
    mcp.ok("qloraevolved_unload_model", {"model_id": model_id})



def test_moe_experts_stay_in_the_compute_dtype_under_4_bit(arch_dir):
    """bitsandbytes quantizes Linear layers only; the experts' fused weights stay in the compute dtype (peft's
    k-bit preparation would upcast them to float32, doubling most of an MoE model's bytes)."""
    from llm_mcp.engine.load.model import load_model

    bundle = load_model(LoadConfig(model_name=str(arch_dir / "mixtral"), quant_type="nf4", compute_dtype="bfloat16",
                                   lora_rank=4))
    experts = {n: p.dtype for n, p in bundle.model.named_parameters() if p.dim() == 3}
    assert experts and set(experts.values()) == {torch.bfloat16}, experts
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]], device=bundle.model.device)
    bundle.model.train()
    with torch.autocast(bundle.model.device.type, dtype=torch.bfloat16):
        loss = bundle.model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in bundle.model.named_parameters() if "experts" in n and "lora_B" in n)


@pytest.mark.parametrize("arch, targets", [("qwen2_moe", ("down_proj",)), ("mixtral", ("q_proj", "gate_up_proj")),
                                           ("gpt2", ("c_proj",))])
def test_estimate_counts_the_adapters_named_targets_give(arch, targets, arch_dir):
    """estimate_memory with target_modules counts what the engine adapts for them: a leaf name that is a Linear
    (Qwen2-MoE's shared-expert down_proj) is not also an expert weight; a leaf used twice (GPT-2's c_proj) counts
    both layers."""
    from llm_mcp.engine.load.model import load_model

    bundle = load_model(LoadConfig(model_name=str(arch_dir / arch), quant_type="none", compute_dtype="float32",
                                   lora_rank=4, lora_dropout=0.0, target_modules=targets))
    estimate = memory.estimate(memory.read_shape(str(arch_dir / arch)), quant_type="none", compute_dtype="float32",
                               lora_rank=4, batch_size=1, max_length=16, use_gradient_checkpointing=True,
                               target_modules=targets)
    assert estimate.lora_bytes // 4 == bundle.param_counts()[0]
