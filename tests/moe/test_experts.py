"""Expert banks: the dense linear they came from, low-rank side paths read by slices, peft LoRA around them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpet.moe import ExpertBank, LowRankPath, Routed


def _linear(d_in, d_out, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def _path(d_in, d_out, rank=3, act=nn.GELU(), seed=1):
    generator = torch.Generator().manual_seed(seed)
    return LowRankPath(torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator),
                       0.5, act, nn.Identity())


def _dense_path(path, x):
    return path.act(x @ path.A.T) @ path.B.T * path.scale


@pytest.mark.parametrize("split", ["rows", "cols"])
def test_a_bank_computes_the_linear_it_was_split_from(split):
    linear = _linear(24, 16) if split == "rows" else _linear(16, 24)
    bank = ExpertBank.from_linear(linear, 4, split)
    x = torch.randn(5, linear.in_features)
    assert torch.allclose(bank(x), linear(x), atol=1e-5)
    assert (bank.in_features, bank.out_features) == (linear.in_features, linear.out_features)
    assert torch.equal(bank.dense_weight(), linear.weight)


def test_row_experts_read_their_rows_of_a_side_path():
    linear = _linear(8, 12)
    bank = ExpertBank.from_linear(linear, 3, "rows")
    path = _path(8, 12)
    x = torch.randn(4, 8)
    dense = linear(x) + _dense_path(path, x)
    for e in range(3):
        assert torch.allclose(bank.expert(e, x, (path,)), dense[:, 4 * e:4 * e + 4], atol=1e-5)


def test_the_down_bank_accumulates_a_nonlinear_side_path_over_the_chosen_experts_only():
    linear = _linear(12, 8)
    bank = ExpertBank.from_linear(linear, 3, "cols")
    path = _path(12, 8)  # GELU: summing per-expert outputs would be wrong; the bank sums before the activation
    h = torch.randn(4, 12)
    chosen = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1], [0, 1, 0]], dtype=torch.bool)
    masked = h * chosen.repeat_interleave(4, dim=1)
    parts = []
    for e in range(3):
        rows = chosen[:, e].nonzero(as_tuple=True)[0]
        parts.append(Routed(e, rows, h[rows][:, 4 * e:4 * e + 4]))
    out = bank.combine(parts, 4, (path,))
    assert torch.allclose(out, linear(masked) + _dense_path(path, masked), atol=1e-5)


def test_side_paths_attach_switch_off_and_detach():
    linear = _linear(8, 12)
    bank = ExpertBank.from_linear(linear, 2, "rows")
    path, enabled = _path(8, 12), [True]
    handle = bank.add_side_path(lambda: path if enabled[0] else None)
    x = torch.randn(3, 8)
    assert torch.allclose(bank(x), linear(x) + _dense_path(path, x), atol=1e-5)
    enabled[0] = False
    assert torch.allclose(bank(x), linear(x), atol=1e-5)
    enabled[0] = True
    handle.remove()
    assert torch.allclose(bank(x), linear(x), atol=1e-5)


def test_peft_lora_on_a_bank_has_whole_ffn_shapes_and_matches_a_dense_lora():
    from peft import LoraConfig, get_peft_model

    from cpet.moe.peft_lora import ExpertBankLora, register_bank_lora

    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.up_proj = layer

    linear = _linear(8, 12)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"], init_lora_weights=False)
    register_bank_lora(config)
    moe = get_peft_model(Block(ExpertBank.from_linear(linear, 3, "rows")), config)
    dense = get_peft_model(Block(linear), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"]))
    wrapped = moe.base_model.model.up_proj
    assert isinstance(wrapped, ExpertBankLora)
    assert wrapped.lora_A["default"].weight.shape == (2, 8) and wrapped.lora_B["default"].weight.shape == (12, 2)
    dense_layer = dense.base_model.model.up_proj
    dense_layer.lora_A["default"].weight.data.copy_(wrapped.lora_A["default"].weight)
    dense_layer.lora_B["default"].weight.data.copy_(wrapped.lora_B["default"].weight)
    x = torch.randn(5, 8)
    reference = dense_layer(x)
    assert torch.allclose(wrapped(x), reference, atol=1e-5)
    for e in range(3):
        assert torch.allclose(wrapped.expert(e, x), reference[:, 4 * e:4 * e + 4], atol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        wrapped.merge()


def test_a_bf16_bank_sums_its_experts_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    linear = nn.Linear(1024, 64, bias=False).to(torch.bfloat16)
    bank = ExpertBank.from_linear(linear, 64, "cols")  # 64 experts of 16 inputs
    x = torch.randn(32, 1024).to(torch.bfloat16)
    every = torch.arange(32)
    out = bank.combine([Routed(e, every, x[:, bank.expert_slice(e)]) for e in range(64)], 32)
    exact = x.double() @ linear.weight.double().T
    assert out.dtype == torch.bfloat16
    # one rounding of the fp32 sum, as the dense bf16 linear rounds once (64 bf16 roundings were ~2x off)
    dense_error = (linear(x).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 1.2 * dense_error


def test_peft_puts_a_banks_lora_in_the_banks_dtype():
    from peft import LoraConfig, get_peft_model

    from cpet.moe.peft_lora import register_bank_lora

    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.up_proj = layer

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"])
    register_bank_lora(config)
    bank = ExpertBank.from_linear(_linear(8, 12).double(), 3, "rows")
    wrapped = get_peft_model(Block(bank), config).base_model.model.up_proj
    assert wrapped.lora_A["default"].weight.dtype == torch.float64  # as peft does for a float64 nn.Linear
