"""The lean LoRA dropout (engine/patches/lean_lora.py) against peft's layers with a plain-autograd dropout drawing the same
masks: the same loss and gradients from the same seed, less memory kept for the backward pass than peft's own
dropout, the dropout rate asked for, unchanged adapter parameters and state dict, and everything restored after."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llm_mcp.engine.patches.lean_lora import LeanDropoutLinear, keep_mask, lean_lora_dropout, new_seed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class MaskDropout(torch.nn.Module):
    """nn.Dropout with lean_lora's mask draws, in plain autograd: the reference for the fused function."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * keep_mask(x.shape, self.p, new_seed()) / (1 - self.p)


@pytest.fixture()
def peft_pair(tiny_model):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config)
    model.train()
    return model, copy.deepcopy(model)


def _step(model, seed: int = 7) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward/backward on a fixed batch; returns the loss, the LoRA gradients and the bytes autograd kept."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.arange(4 * 48).reshape(4, 48) % 400 + 5
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(kept.values())


def test_same_loss_and_gradients_with_less_memory(peft_pair):
    plain, lean = peft_pair
    reference = copy.deepcopy(plain)
    for module in reference.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = MaskDropout(module.lora_dropout["default"].p)
    _, _, plain_bytes = _step(plain)  # peft's own nn.Dropout: what the memory is compared with
    loss, grads, _ = _step(reference)
    with lean_lora_dropout(lean) as swapped:
        assert swapped == 2 * len(TARGETS)  # two layers of the tiny model
        lean_loss, lean_grads, lean_bytes = _step(lean)
    assert lean_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == lean_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # peft keeps, per adapted projection, a float noise tensor and the float dropped-out input; lean keeps a bool
    # mask and the shared input
    assert lean_bytes < 0.8 * plain_bytes, (lean_bytes, plain_bytes)  # 0.76 measured (logits weigh much here)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.05, 0.003])
def test_mask_keeps_one_minus_p(p):
    """p=0.003 is not a multiple of 1/65536 within 0.1%, so it is drawn with 32 bits."""
    keep = keep_mask((1000, 1000), p, seed=123)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    std = (p * (1 - p) / 1e6) ** 0.5
    assert keep.float().mean().item() == pytest.approx(1 - p, abs=5 * std)


def test_mask_is_a_function_of_its_seed_and_torch_decides_the_seed():
    """The backward pass draws the forward's mask again from its seed; torch.manual_seed fixes the seeds."""
    assert torch.equal(keep_mask((64, 37), 0.1, seed=5), keep_mask((64, 37), 0.1, seed=5))
    assert not torch.equal(keep_mask((64, 37), 0.1, seed=5), keep_mask((64, 37), 0.1, seed=6))
    torch.manual_seed(3)
    first = [new_seed() for _ in range(3)]
    torch.manual_seed(3)
    assert [new_seed() for _ in range(3)] == first and len(set(first)) == 3
    odd = keep_mask((3, 5), 0.5, seed=1)  # a size that is not a whole number of 64-bit words
    assert odd.shape == (3, 5)


def test_dropout_really_drops(peft_pair):
    """Different seeds give different losses (the mask is random), and eval mode is deterministic."""
    _, lean = peft_pair
    with lean_lora_dropout(lean):
        first, _, _ = _step(lean, seed=1)
        lean.zero_grad()
        second, _, _ = _step(lean, seed=2)
        lean.eval()
        with torch.no_grad():
            ids = torch.arange(48).reshape(1, 48) + 5
            assert torch.equal(lean(input_ids=ids).logits, lean(input_ids=ids).logits)
    assert first != second


def test_modules_parameters_and_state_dict_are_restored(peft_pair):
    _, lean = peft_pair
    keys = list(lean.state_dict())
    params = [id(p) for p in lean.parameters()]
    with lean_lora_dropout(lean):
        assert list(lean.state_dict()) == keys  # checkpoints saved during training keep peft's names
        assert [id(p) for p in lean.parameters()] == params  # the optimizer's parameters stay the same objects
        assert any(isinstance(m, LeanDropoutLinear) for m in lean.modules())
    assert not any(isinstance(m, LeanDropoutLinear) for m in lean.modules())
    layer = lean.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout) and layer.lora_dropout["default"].p == 0.1
