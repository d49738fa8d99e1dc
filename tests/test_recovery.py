from __future__ import annotations

import copy

import pytest
import torch

from cpet.adapters import add_lora
from cpet.models import layer_linears, tiny_model
from cpet.recovery import RecoveryBypass, RecoveryConfig, RecoverySet, residual_svd_init
from cpet.train import DistillConfig, distill_on_text, hidden_mse

IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


@pytest.mark.parametrize("family", ["llama", "opt", "gemma"])
def test_recovery_at_init_changes_nothing_and_switches(family):
    loaded = tiny_model(family)
    with torch.no_grad():
        reference = loaded.model(IDS).logits
        recovery = RecoverySet(loaded.model, RecoveryConfig(rank=4)).attach(loaded.model, trainable=True)
        assert torch.equal(loaded.model(IDS).logits, reference)
        for bypass in recovery.bypasses.values():
            torch.nn.init.normal_(bypass.B.weight, std=0.1)
        changed = loaded.model(IDS).logits
        assert not torch.allclose(changed, reference, atol=1e-4)
        recovery.enabled = False
        assert torch.equal(loaded.model(IDS).logits, reference)
        recovery.enabled = True
        recovery.detach()
        assert torch.equal(loaded.model(IDS).logits, reference)
        assert not hasattr(loaded.model, "cpet_recovery")


def test_recovery_composes_with_peft_lora_and_trains():
    loaded = tiny_model("llama")
    model = add_lora(loaded.model, rank=2, alpha=2, dropout=0.0, target_roles=("q", "v"))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recovery = RecoverySet(model, RecoveryConfig(rank=4)).attach(model, trainable=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_params + sum(p.numel() for p in recovery.parameters())
    assert len(recovery.targets) == 14  # 7 roles x 2 layers


def test_recovery_rejects_unknown_targets():
    with pytest.raises(ValueError, match=r"\['gate'\] do not exist.*\['down', 'k', 'o', 'q', 'up', 'v'\]"):
        RecoverySet(tiny_model("opt").model, RecoveryConfig(target_roles=("q", "gate")))
    with pytest.raises(ValueError, match="SVD initialisation needs activation='identity'"):
        RecoveryConfig(init="svd", activation="gelu")


def test_save_load_round_trip_and_base_id_check(tmp_path):
    loaded = tiny_model("qwen2")
    recovery = RecoverySet(loaded.model, RecoveryConfig(rank=3, activation="identity"))
    for bypass in recovery.bypasses.values():
        torch.nn.init.normal_(bypass.B.weight)
    recovery.save(tmp_path / "rec", {"base_id": "abc"})
    other = tiny_model("qwen2")
    again = RecoverySet.load(tmp_path / "rec", other.model, expected_base_id="abc")
    for key, value in recovery.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    with pytest.raises(ValueError, match="made for base abc, not for this base xyz"):
        RecoverySet.load(tmp_path / "rec", other.model, expected_base_id="xyz")


def test_residual_svd_init_recovers_a_low_rank_residual_exactly():
    torch.manual_seed(0)
    residual = torch.randn(48, 3) @ torch.randn(3, 32)  # rank 3
    bypass = RecoveryBypass(32, 48, rank=3, alpha=6.0, activation="identity")
    error = residual_svd_init(bypass, residual)
    assert error < 1e-5
    x = torch.randn(5, 32)
    assert torch.allclose(bypass(x), x @ residual.T, atol=1e-4)


def test_activation_weighted_svd_fits_the_outputs_better():
    torch.manual_seed(0)
    residual = torch.randn(40, 40)
    scale = torch.ones(40)
    scale[:5] = 20.0  # a few input features carry most of the activation energy (as in LLMs)
    x = torch.randn(200, 40) * scale
    errors = {}
    for name, input_scale in [("plain", None), ("weighted", scale)]:
        bypass = RecoveryBypass(40, 40, rank=5, alpha=5.0, activation="identity")
        residual_svd_init(bypass, residual, input_scale=input_scale)
        with torch.no_grad():
            errors[name] = torch.linalg.norm(x @ residual.T - bypass(x)).item()
    assert errors["weighted"] < 0.5 * errors["plain"]


def test_distillation_reduces_hidden_state_mse():
    teacher = tiny_model("llama").model
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():  # a stand-in for compression error: perturb every FFN down projection
        for index in range(2):
            down = layer_linears(student, index)["down"]
            down.weight.add_(0.3 * torch.randn_like(down.weight))
    student.requires_grad_(False)
    RecoverySet(student, RecoveryConfig(rank=8, activation="identity")).attach(student, trainable=True)
    tokenizer = tiny_model("llama").tokenizer
    text = "recovery modules learn what compression removed. " * 40

    def mse() -> float:
        ids = tokenizer(text[:300], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            s = student(ids, output_hidden_states=True).hidden_states[-1]
            t = teacher(ids, output_hidden_states=True).hidden_states[-1]
        return hidden_mse(s, t, torch.ones(s.shape[:2])).item()

    before = mse()
    losses = distill_on_text(student, teacher, tokenizer, text,
                             DistillConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2), progress=False)
    after = mse()
    assert after < 0.7 * before
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
