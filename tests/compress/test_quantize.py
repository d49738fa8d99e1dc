from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cpet.compress import CompressedBase, compress
from cpet.compress.quantize import keep_4bit_layout
from cpet.config import PruneConfig, QuantizeConfig
from cpet.models import layer_linears, tiny_config, tiny_model
from cpet.recovery import dequantized_weight

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120]])


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.detach(), approx.detach()
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum()))


# Bounds measured on the tiny models' Gaussian weights (std 0.15): int8 ~40 dB, nf4 ~20 dB, fp4 ~17 dB.
@pytest.mark.parametrize("method, min_db", [("int8", 35.0), ("nf4", 18.0), ("fp4", 15.0)])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_quantized_weights_within_stated_sqnr(family, method, min_db):
    loaded = tiny_model(family)
    base = compress(loaded.model, [QuantizeConfig(method=method)], progress=False)
    for role, module in layer_linears(base.model, 0).modules.items():
        assert type(module).__module__.startswith("bitsandbytes"), role
        original = layer_linears(loaded.model, 0)[role].weight
        assert sqnr_db(original, dequantized_weight(module)) > min_db, role
    assert not type(base.model.lm_head).__module__.startswith("bitsandbytes")  # default skip list


@pytest.mark.parametrize("method", ["int8", "nf4", "fp4"])
def test_gradients_flow_to_inputs_and_not_to_quantized_weights(method):
    loaded = tiny_model("llama")
    base = compress(loaded.model, [QuantizeConfig(method=method)], progress=False)
    embeddings = base.model.get_input_embeddings()(IDS).detach().requires_grad_(True)
    base.model(inputs_embeds=embeddings).logits.pow(2).mean().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in base.model.parameters())


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_base_reloads_without_the_original(tmp_path, method):
    loaded = tiny_model("qwen2")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.25, importance="magnitude"), QuantizeConfig(method)],
                    progress=False)
    base.save(tmp_path / "b")
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
        # bitsandbytes >= 0.50 repacks 4-bit weights for AVX512-BF16 CPUs on the first eval call (other
        # numerics); CPET keeps the canonical kernel, and so must the plain model to compare logits exactly
        keep_4bit_layout(plain)
        assert torch.equal(plain(IDS).logits, base.model(IDS).logits)
        again = CompressedBase.load(tmp_path / "b")
        assert torch.equal(again.model(IDS).logits, base.model(IDS).logits)
    records = again.manifest.stages
    assert [r.config["stage"] for r in records] == ["prune", "quantize"]
    assert records[1].bytes_after < records[1].bytes_before


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("method, embeddings", [("int8", False), ("nf4", False), ("nf4", True)])
def test_a_bf16_base_stays_bf16_through_quantization(family, method, embeddings, tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.bfloat16)
    base = compress(model, [QuantizeConfig(method, embeddings=embeddings)], progress=False)
    unquantized = {name: p.dtype for name, p in base.model.named_parameters()
                   if p.dtype.is_floating_point and not type(p).__module__.startswith("bitsandbytes")}
    assert any(".bias" in name for name in unquantized) == (family == "qwen2")
    assert set(unquantized.values()) == {torch.bfloat16}, unquantized  # not widened to float32
    base.save(tmp_path / "b")
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as saved:
        stored = [name for name in unquantized if name in saved.keys()]
        assert stored and all(saved.get_slice(name).get_dtype() == "BF16" for name in stored)
    # the activations stay bf16 too (quantized embeddings once gave fp32 out). Saved dtypes are checked first: at
    # its first forward, bitsandbytes' Linear4bit casts its own bias to the compute dtype (fp32 here), in place
    with torch.no_grad():
        assert base.model.get_input_embeddings()(IDS).dtype == torch.bfloat16
        assert base.model(IDS).logits.dtype == torch.bfloat16
    if embeddings:  # an unquantized bf16 linear after a quantized embedding once met fp32 inputs and failed
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.bfloat16)
        down = layer_linears(model, 0).names["down"]
        partly = compress(model, [QuantizeConfig(method, modules=(down,), embeddings=True)], progress=False)
        with torch.no_grad():
            assert partly.model(IDS).logits.dtype == torch.bfloat16


def test_only_named_modules_are_quantized():
    loaded = tiny_model("llama")
    name = layer_linears(loaded.model, 0).names["down"]
    base = compress(loaded.model, [QuantizeConfig(method="nf4", modules=(name,))], progress=False)
    assert type(base.model.get_submodule(name)).__module__.startswith("bitsandbytes")
    assert not type(layer_linears(base.model, 0)["up"]).__module__.startswith("bitsandbytes")


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_a_base_transformers_cannot_build_is_quantized_in_place_and_reloads(method, tmp_path):
    loaded = tiny_model("llama")
    stages = [PruneConfig(layer_schedule={0: 0.5}, importance="magnitude"), QuantizeConfig(method=method)]
    base = compress(loaded.model, stages, progress=False)
    assert not base.manifest.uniform
    layer0, layer1 = layer_linears(base.model, 0), layer_linears(base.model, 1)
    assert layer0["up"].out_features == 64 and layer1["up"].out_features == 128
    assert all(type(m).__module__.startswith("bitsandbytes") for m in [*layer0.modules.values(),
                                                                        *layer1.modules.values()])
    base.save(tmp_path / "base")
    again = CompressedBase.load(tmp_path / "base")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(base.model(input_ids=ids).logits, again.model(input_ids=ids).logits)


@pytest.mark.parametrize("stages, message", [
    ([QuantizeConfig(modules=("model.layers.0.input_layernorm",))], "bitsandbytes quantizes only nn.Linear"),
    ([QuantizeConfig(modules=("model.layers.9.mlp",))], "not a module of this model"),
    ([QuantizeConfig(modules=("lm_head",))], "skip_modules fragment 'lm_head' leaves it in full precision"),
    ([QuantizeConfig(modules=("lm_head",), skip_modules=())], "outside the decoder layers"),
    ([QuantizeConfig(modules=("model.layers.0.self_attn.q_proj",), skip_modules=("self_attn",))],
     "skip_modules fragment 'self_attn'"),
    ([QuantizeConfig(), PruneConfig(ffn_ratio=0.5, importance="magnitude")], "put PruneConfig before"),
    ([QuantizeConfig(), QuantizeConfig()], "at most one QuantizeConfig"),
    (["nf4"], "unknown compression stages"),
    # a stage that quantizes nothing was accepted: a "quantized" base, a new base_id, the same weights
    ([QuantizeConfig(modules=())], r"selects no linear to quantize \(modules=\[\] leaves none"),
    ([QuantizeConfig(skip_modules=("model.",))], r"selects no linear to quantize \(skip_modules=\['model\.'\]"),
])
def test_bad_quantize_input(stages, message):
    with pytest.raises(ValueError, match=message):
        compress(tiny_model("llama").model, stages, progress=False)


def test_bad_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype"):
        QuantizeConfig(compute_dtype="int4")


@pytest.mark.parametrize("fragment", ["self_attn", "model.layers.*.self_attn", "*self_attn"])
def test_skip_modules_select_the_same_linears_on_both_quantization_paths(fragment):
    """A fragment is a substring on the transformers path too (which itself reads skip entries as anchored
    regexes or suffixes), so a plain base and a per-layer-width base (quantized in place) skip alike. Passed on
    as regexes, 'model.layers.*.self_attn' skipped attention only on the in-place path (as a regex it matched
    on the other), and '*self_attn', no valid regex, failed in transformers after the pruning stage had run."""
    import bitsandbytes as bnb

    config = QuantizeConfig("nf4", skip_modules=("lm_head", "embed_tokens", fragment))
    plain = compress(tiny_model("llama").model, [config], progress=False).model
    custom = compress(tiny_model("llama").model, [PruneConfig(layer_schedule={0: 0.5}, importance="magnitude"),
                                                   config], progress=False).model
    for model in (plain, custom):
        kinds = {name: isinstance(module, bnb.nn.Linear4bit) for name, module in model.named_modules()
                 if name.endswith(("q_proj", "o_proj", "up_proj", "down_proj"))}
        attention_skipped = fragment == "self_attn"  # the others are in no module name: they skip nothing
        assert kinds and all(kinds[n] == ("mlp" in n or not attention_skipped) for n in kinds), (fragment, kinds)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_skip_list_without_the_lm_head_still_leaves_it_in_full_precision(family):
    """transformers drops its default skips (the LM head, tied weights) once any skip list is given: the head of
    a tied model then became 4-bit, sharing its weight with the embedding, and the first forward failed."""
    config = QuantizeConfig("nf4", skip_modules=("self_attn",))
    base = compress(tiny_model(family).model, [config], progress=False)
    assert not type(base.model.get_output_embeddings()).__module__.startswith("bitsandbytes")
    logits = base.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_a_named_moefied_linear_quantizes_its_expert_slices():
    import bitsandbytes as bnb

    from cpet.compress.moefy import MoEfyConfig

    loaded = tiny_model("llama")
    calibration = torch.randint(0, loaded.model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    base = compress(loaded.model, [MoEfyConfig(num_experts=4, top_k=2),
                                   QuantizeConfig("nf4", modules=("model.layers.0.mlp.up_proj",))],
                    calibration=calibration, progress=False)
    quantized = sorted(n for n, m in base.model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    assert quantized == [f"model.layers.0.mlp.up_proj.experts.{e}" for e in range(4)]
