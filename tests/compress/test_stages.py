"""The stage registry: a toy stage added purely by registration runs through compress, inheritance and save/load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from cpet.adapters import add_lora
from cpet.compress import CompressedBase, IndexMaps, compress, register_stage, unregister_stage
from cpet.config import PruneConfig, QuantizeConfig, stage_config_from_dict
from cpet.lora_init import apply_inherited_lora
from cpet.models import family_of, geometry, iter_layer_linears, tiny_model
from tests.test_inherit import trained_lora

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120]])


@dataclass(frozen=True)
class PermuteFFNConfig:
    """Reorder the FFN channels of every layer by a seeded random permutation (the function is unchanged)."""

    seed: int = 0
    stage: ClassVar[str] = "permute_ffn"


class PermuteFFN:
    """Moves gate/up rows and the matching down columns; knows nothing but the generic index-map API."""

    def validate(self, model, config, context, previous):
        if config.seed < 0:
            raise ValueError("permute_ffn: seed must be >= 0")

    def apply(self, model, config, context):
        maps = IndexMaps.identity(geometry(model), family_of(model).roles)
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            for layer in iter_layer_linears(model):
                perm = torch.randperm(layer["up"].out_features, generator=generator)
                for role in ("gate", "up"):
                    if role in layer.modules:
                        module = layer[role]
                        module.weight.data = module.weight.data[perm].contiguous()
                        if module.bias is not None:
                            module.bias.data = module.bias.data[perm].contiguous()
                        maps.set(layer.index, role, rows=perm)
                layer["down"].weight.data = layer["down"].weight.data[:, perm].contiguous()
                maps.set(layer.index, "down", cols=perm)
        return model, maps

    def rebuild(self, model, config, index_maps):
        return model  # widths unchanged: the saved weights are already permuted


@pytest.fixture
def permute_stage():
    register_stage(PermuteFFNConfig, PermuteFFN(), rank=200)  # after pruning, before quantization
    yield PermuteFFNConfig
    unregister_stage(PermuteFFNConfig)


def delta(module):
    return module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]


@pytest.mark.parametrize("family, before", [
    ("llama", []),
    ("opt", []),
    ("llama", [PruneConfig(ffn_ratio=0.5, head_ratio=0.5, importance="magnitude")]),
])
def test_inheritance_through_a_registered_stage_equals_the_permuted_original(tmp_path, permute_stage, family,
                                                                            before):
    loaded, original = trained_lora(family, tmp_path)
    base = compress(loaded.model, [*before, permute_stage(seed=1)], progress=False)
    maps = base.index_maps
    rows = maps.rows(0, "up")
    assert not torch.equal(rows, rows.sort().values)  # a real permutation, composed onto what came before
    for orig, mine in zip(iter_layer_linears(loaded.model), iter_layer_linears(base.model)):  # weights follow maps
        assert torch.equal(orig["up"].weight[maps.rows(orig.index, "up")], mine["up"].weight)
        assert torch.equal(orig["down"].weight[:, maps.cols(orig.index, "down")], mine["down"].weight)
    student = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    apply_inherited_lora(student, tmp_path / "orig", maps, loaded.model.config)
    for mine, theirs in zip(iter_layer_linears(student), iter_layer_linears(original)):
        for role in mine.modules:
            expected = delta(theirs[role])  # from the original LoRA alone, rows/columns moved as the maps say
            r, c = maps.rows(mine.index, role), maps.cols(mine.index, role)
            expected = expected if r is None else expected[r]
            expected = expected if c is None else expected[:, c]
            assert torch.equal(delta(mine[role]), expected), (mine.index, role)
    if not before:  # a permutation alone changes no function: same logits as the original model + its LoRA
        with torch.no_grad():
            assert torch.allclose(student(IDS).logits, original(IDS).logits, atol=1e-5)


@pytest.mark.parametrize("stages, uniform", [
    (lambda cfg: [cfg(seed=2)], True),  # plain from_pretrained, then every stage's rebuild
    (lambda cfg: [PruneConfig(layer_schedule={0: 0.5}, importance="magnitude"), cfg(seed=2)], False),  # rebuilt
    (lambda cfg: [PruneConfig(ffn_ratio=0.25, importance="magnitude"), cfg(seed=2), QuantizeConfig("nf4")], True),
])
def test_a_base_made_with_a_registered_stage_round_trips(tmp_path, permute_stage, stages, uniform):
    base = compress(tiny_model("llama").model, stages(permute_stage), progress=False)
    assert base.manifest.uniform is uniform
    base.save(tmp_path / "b")
    again = CompressedBase.load(tmp_path / "b")
    assert again.base_id == base.base_id and again.index_maps == base.index_maps
    assert again.manifest.stage_configs()[-2 if len(stages(permute_stage)) == 3 else -1] == permute_stage(seed=2)
    with torch.no_grad():
        assert torch.equal(again.model(IDS).logits, base.model(IDS).logits)
    assert stage_config_from_dict({"stage": "permute_ffn", "seed": 4}) == permute_stage(seed=4)


def test_a_base_of_an_unregistered_stage_is_refused_naming_it(tmp_path, permute_stage):
    compress(tiny_model("llama").model, [permute_stage()], progress=False).save(tmp_path / "b")
    unregister_stage(permute_stage)
    with pytest.raises(ValueError, match=r"compressed with a stage this process has not registered .*'permute_ffn'"):
        CompressedBase.load(tmp_path / "b")
    with pytest.raises(ValueError, match=r"unknown compression stages \['PermuteFFNConfig'\]"):
        compress(tiny_model("llama").model, [permute_stage()], progress=False)


@pytest.mark.parametrize("stages, message", [
    (lambda cfg: [QuantizeConfig(), cfg()], r"PermuteFFNConfig cannot run after QuantizeConfig \(stages that select "
                                            r"or move weights need them in full precision\): put PermuteFFNConfig"),
    (lambda cfg: [cfg(), PruneConfig(ffn_ratio=0.5, importance="magnitude")],
     "PruneConfig cannot run after PermuteFFNConfig: put PruneConfig before PermuteFFNConfig"),
    (lambda cfg: [cfg(seed=-1)], "seed must be >= 0"),
])
def test_order_and_validation_of_a_registered_stage(permute_stage, stages, message):
    model = tiny_model("llama").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        compress(model, stages(permute_stage), inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any work


def test_registering_something_that_is_not_a_stage_fails():
    with pytest.raises(TypeError, match=r"lacks \['rebuild'\]"):
        register_stage(PermuteFFNConfig, type("Half", (), {"validate": print, "apply": print})(), rank=1)


@pytest.mark.parametrize("stages", [
    [PruneConfig(ffn_ratio=0.5, importance="magnitude")],
    [PruneConfig(layer_schedule={0: 0.5}, importance="magnitude"), QuantizeConfig("nf4")],  # rebuilt from config
], ids=["pruned", "scheduled-nf4"])
def test_a_bf16_base_reloads_in_bf16_with_the_same_logits(stages, tmp_path):
    """A bf16 base was read back in fp32 (other logits, twice the memory); and load_base's cast had made the
    rotary inv_freq bf16, which from_pretrained(dtype=bf16) keeps in fp32, so even a bf16 reload differed."""
    from cpet.models import load_base

    tiny = tiny_model("llama")
    tiny.model.save_pretrained(tmp_path / "source")
    tiny.tokenizer.save_pretrained(tmp_path / "source")
    loaded = load_base(str(tmp_path / "source"), dtype=torch.bfloat16)
    inv_freq = dict(loaded.model.named_buffers())["model.rotary_emb.inv_freq"]
    assert inv_freq.dtype == torch.float32  # computed at init, kept as from_pretrained keeps it
    calibration = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(1))
    base = compress(loaded.model, stages, calibration=calibration, progress=False)
    base.save(tmp_path / "base")
    again = CompressedBase.load(tmp_path / "base")
    assert {p.dtype for p in again.model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, base.model(input_ids=ids).logits)
