from __future__ import annotations

import copy

import pytest
import torch

from cpet.adapters import add_lora, save_adapter
from cpet.compress import compress
from cpet.config import PruneConfig, QuantizeConfig
from cpet.inherit import inherit_lora_state, load_lora_state
from cpet.lora_init import apply_inherited_lora, apply_residual_svd_lora
from cpet.models import iter_layer_linears, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120]])


def trained_lora(family: str, tmp_path, seed: int = 0):
    """An 'original' LoRA with non-zero A and B (as after training), saved as a PEFT directory."""
    loaded = tiny_model(family)
    peft_model = add_lora(copy.deepcopy(loaded.model), rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    save_adapter(peft_model, tmp_path / "orig", {"labels": ["a", "b"]})
    return loaded, peft_model


def delta(module, adapter="default"):
    """The dense LoRA update ``B A * scaling`` of a peft LoRA layer."""
    return module.lora_B[adapter].weight @ module.lora_A[adapter].weight * module.scaling[adapter]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_identity_when_nothing_is_compressed(tmp_path, family):
    loaded, original_lora = trained_lora(family, tmp_path)
    base = compress(loaded.model, [], progress=False)
    student = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    apply_inherited_lora(student, tmp_path / "orig", base.index_maps, loaded.model.config)
    with torch.no_grad():
        assert torch.equal(student(IDS).logits, original_lora(IDS).logits)


def test_identity_through_quantization(tmp_path):
    loaded, original_lora = trained_lora("llama", tmp_path)
    base = compress(loaded.model, [QuantizeConfig("nf4")], progress=False)
    student = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    apply_inherited_lora(student, tmp_path / "orig", base.index_maps, loaded.model.config)
    for mine, theirs in zip(iter_layer_linears(student), iter_layer_linears(original_lora)):
        for role in mine.modules:
            assert torch.equal(delta(mine[role]), delta(theirs[role])), role
    x = torch.randn(3, 64)
    layer_s, layer_o = next(iter_layer_linears(student)), next(iter_layer_linears(original_lora))
    with torch.no_grad():  # same LoRA contribution for the same input
        lora_s = layer_s["q"].lora_B["default"](layer_s["q"].lora_A["default"](x))
        lora_o = layer_o["q"].lora_B["default"](layer_o["q"].lora_A["default"](x))
    assert torch.equal(lora_s, lora_o)


@pytest.mark.parametrize("family, config", [
    ("llama", PruneConfig(ffn_ratio=0.5, head_ratio=0.5, importance="magnitude")),
    ("gemma", PruneConfig(ffn_ratio=0.25, head_ratio=0.5, importance="magnitude", head_mode="kv_group")),
    ("opt", PruneConfig(ffn_ratio=0.5, importance="magnitude")),
])
def test_inheritance_through_pruning_equals_restricted_original(tmp_path, family, config):
    loaded, original_lora = trained_lora(family, tmp_path)
    base = compress(loaded.model, [config, QuantizeConfig("nf4")], progress=False)
    student = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    apply_inherited_lora(student, tmp_path / "orig", base.index_maps, loaded.model.config)
    maps = base.index_maps
    for mine, theirs in zip(iter_layer_linears(student), iter_layer_linears(original_lora)):
        i = mine.index
        expected_rows = {"gate": maps.ffn_rows(i), "up": maps.ffn_rows(i), "q": maps.q_rows(i),
                         "k": maps.kv_rows(i), "v": maps.kv_rows(i)}
        expected_cols = {"down": maps.ffn_rows(i), "o": maps.q_rows(i)}
        for role in mine.modules:
            reference = delta(theirs[role])  # computed from the original LoRA alone
            if role in expected_rows:
                reference = reference[expected_rows[role]]
            if role in expected_cols:
                reference = reference[:, expected_cols[role]]
            assert torch.allclose(delta(mine[role]), reference, atol=1e-6), (i, role)


def test_state_dict_mapping_keeps_untouched_keys(tmp_path):
    loaded, _ = trained_lora("llama", tmp_path)
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    state = load_lora_state(tmp_path / "orig")
    mapped = inherit_lora_state(state, loaded.model.config, base.index_maps)
    assert mapped.keys() == state.keys()
    key_a = next(k for k in state if "q_proj.lora_A" in k)
    assert torch.equal(mapped[key_a], state[key_a])
    key_b = next(k for k in state if "up_proj.lora_B" in k)
    assert mapped[key_b].shape == (64, 4) and state[key_b].shape == (128, 4)


def test_non_safetensors_adapters_are_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="only reads safetensors"):
        load_lora_state(tmp_path)


def test_residual_svd_lora_starts_closer_to_the_original():
    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.25, importance="magnitude"), QuantizeConfig("nf4")],
                    progress=False)
    with torch.no_grad():
        compressed_logits = base.model(IDS).logits  # peft wraps base.model in place below
    student = add_lora(base.model, rank=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        assert torch.equal(student(IDS).logits, compressed_logits)  # fresh LoRA: B = 0
    errors = apply_residual_svd_lora(student, loaded.model, base.index_maps)
    assert len(errors) == 14 and all(0 < e < 1 for e in errors.values())
    reference = compress(loaded.model, [PruneConfig(ffn_ratio=0.25, importance="magnitude")], progress=False).model
    with torch.no_grad():  # the pruned fp32 model is what nf4 + exact residual would give
        target = reference(IDS).logits
        # quantization noise is close to white, so rank 8 of 64 removes only part of it (~13% here)
        assert (student(IDS).logits - target).norm() < 0.95 * (compressed_logits - target).norm()
