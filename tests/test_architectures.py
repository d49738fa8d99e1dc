"""Every decoder-only architecture of the installed transformers (5.24): its module map is derived from its
structure, or it is refused with an error naming the module that does not fit. Each one that maps runs the
whole product on a tiny random model: info facts, a local-directory load, compress (50% FFN channels + nf4),
recover, tune on the original, inherit onto the compressed base, save and reload with identical logits.

After a transformers upgrade, ``test_every_causal_lm_architecture_is_listed`` names the new model types: add
each to FITS, REFUSED or NOT_TINY after looking at what ``family_of(tiny_config(type))`` says.
"""

from __future__ import annotations

import copy

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from cpet.cli import model_info
from cpet.compress import CompressedBase, compress
from cpet.config import PruneConfig, QuantizeConfig
from cpet.inherit import inherit_lora_state, load_lora_state
from cpet.models import (
    FAMILIES,
    UnsupportedArchitectureError,
    byte_tokenizer,
    derive_family,
    family_of,
    geometry,
    iter_layer_linears,
    layer_linears,
    load_base,
    model_fingerprint,
    tiny_config,
    tiny_model,
)
from cpet.pipeline import CPET
from cpet.recovery import RecoveryConfig
from cpet.train import DistillConfig, TuneConfig

FITS = (
    "apertus", "apertus1p5_text", "arcee", "biogpt", "cohere", "cohere2", "cwm", "diffllama", "ernie4_5", "exaone",
    "exaone4", "falcon_h1", "flint", "gemma", "gemma2", "gemma3_text", "granite", "granite_swa", "helium",
    "hunyuan_v1_dense", "hyperclovax", "internlm3", "iquestcoder", "jais2", "llama", "ministral", "ministral3",
    "mistral", "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "opt", "phi", "qwen2", "qwen3", "seed_oss",
    "smollm3", "stablelm", "starcoder2", "vaultgemma", "xglm",
)
HEADS_FIXED = {  # fitting architectures whose attention heads cannot be pruned, and why
    "biogpt": "head width = hidden / heads", "opt": "head width = hidden / heads",
    "xglm": "head width = hidden / heads", "stablelm": "head width = hidden / heads",
    "helium": "o_proj input = hidden size, whatever the heads", "flint": "attention sinks per head",
    "granite_swa": "attention sinks per head", "olmo2": "q/k norms over all heads",
    "olmo3": "q/k norms over all heads",
}
HEADS_INTERLEAVED = {  # shapes fit head pruning, but o_proj's input is not one block per head: refused by running
    "diffllama": "o_proj input laid out per head pair (h, h + H/2)",
}
REFUSED = {  # model type -> the module (or fact) the refusal names
    # fused, low-rank or extra projections
    "afmoe": "model.layers.0.self_attn.gate_proj", "axk1": "model.layers.0.self_attn.q_a_proj",
    "beam": "model.layers.0.self_attn.gate_proj", "bloom": "transformer.h.0.self_attention.query_key_value",
    "codegen": "transformer.h.0.attn.qkv_proj", "ctrl": "transformer.h.0.multi_head_attention.Wq",
    "deepseek_v2": "model.layers.0.self_attn.q_a_proj", "deepseek_v3": "model.layers.0.self_attn.q_a_proj",
    "doge": "model.layers.0.self_attn.dt_proj", "dory": "model.layers.0.self_attn.gate_proj",
    "falcon": "transformer.h.0.self_attention.query_key_value",
    "glm": "model.layers.0.mlp.gate_up_proj", "glm4": "model.layers.0.mlp.gate_up_proj",
    "glm4_moe_lite": "model.layers.0.self_attn.q_a_proj", "gpt-sw3": "transformer.h.0.attn.c_attn",
    "gpt2": "transformer.h.0.attn.c_attn", "gpt_bigcode": "transformer.h.0.attn.c_attn",
    "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
    "gpt_neox_japanese": "gpt_neox_japanese.layers.0.attention.query_key_value",
    "inkling_text": "model.layers.0.self_attn.r_proj", "laguna": "model.layers.0.self_attn.g_proj",
    "minicpm3": "model.layers.0.self_attn.q_a_proj", "modernbert-decoder": "model.layers.0.attn.Wo",
    "mpt": "transformer.blocks.0.attn.Wqkv", "openai-gpt": "transformer.h.0.attn.c_attn",
    "persimmon": "model.layers.0.self_attn.query_key_value", "phi3": "model.layers.0.self_attn.qkv_proj",
    "phi4_multimodal": "model.layers.0.self_attn.qkv_proj", "rwkv": "rwkv.blocks.0.attention.receptance",
    "youtu": "model.layers.0.self_attn.q_a_proj", "sarvam_mla": "model.layers.0.self_attn.kv_a_proj_with_mqa",
    # mixtures of experts and other FFN blocks that are not a plain MLP
    "aria_text": "model.layers.0.mlp", "cohere2_moe": "model.layers.0.mlp",
    "ernie4_5_moe": "model.layers.1.mlp", "exaone_moe": "model.layers.1.mlp",
    "flex_olmo": "model.layers.0.mlp", "glm4_moe": "model.layers.1.mlp", "gpt_oss": "model.layers.0.mlp",
    "granitemoe": "model.layers.0.block_sparse_moe", "granitemoe_swa": "model.layers.0.block_sparse_moe",
    "granitemoeshared": "model.layers.0.block_sparse_moe", "hunyuan_v1_moe": "model.layers.0.mlp",
    "hy_v3": "model.layers.1.mlp", "kolibri1": "model.layers.0.mlp",
    "llama4_text": "model.layers.0.feed_forward", "mellum": "model.layers.0.mlp",
    "minimax": "model.layers.0.mlp", "minimax_m2": "model.layers.0.mlp",
    "minimax_m3_vl_text": "model.layers.0.mlp", "mixtral": "model.layers.0.mlp",
    "olmoe": "model.layers.0.mlp", "phimoe": "model.layers.0.mlp", "qwen2_moe": "model.layers.0.mlp",
    "qwen3_moe": "model.layers.0.mlp", "solar_open": "model.layers.0.mlp",
    "sarvam_moe": "model.layers.1.mlp",
    # projections nested below the attention block (encoder-style blocks, wrapped linears, indexers)
    "axk2": "model.layers.0.self_attn.indexer.wq_b",
    "bailing_hybrid": "model.layers.0.self_attn.forget_gate.f_proj",
    "bert": "bert.encoder.layer.0.attention.self.query",
    "bert-generation": "bert.encoder.layer.0.attention.self.query",
    "big_bird": "bert.encoder.layer.0.attention.self.query",
    "cpmant": "cpmant.encoder.layers.0.self_att.self_attention.project_q",
    "deepseek_v32": "model.layers.0.self_attn.indexer.wq_b",
    "deepseek_v4": "model.layers.0.self_attn.compressor.kv_proj",
    "electra": "electra.encoder.layer.0.attention.self.query",
    "ernie": "ernie.encoder.layer.0.attention.self.query", "git": "git.encoder.layer.0.attention.self.query",
    "glm_moe_dsa": "model.layers.0.self_attn.indexer.wq_b", "gpt_neo": "transformer.h.0.attn.attention.k_proj",
    "hy_v4": "model.layers.0.self_attn.indexer.wq_b",
    "jetmoe": "model.layers.0.self_attention.experts.router.layer",
    "kimi_linear": "model.layers.0.self_attn.forget_gate.f_a_proj",
    "megatron-bert": "bert.encoder.layer.0.attention.self.query",
    "moshi": "model.layers.0.self_attn.q_proj.linear",
    "rembert": "rembert.encoder.layer.0.attention.self.query",
    "roc_bert": "roc_bert.encoder.layer.0.attention.self.query",
    "roformer": "roformer.encoder.layer.0.attention.self.query",
    "zaya": "model.layers.0.self_attn.qkv_proj.q_proj",
    # layers without exactly one attention block (state-space, hybrid, cross-attention)
    "bamba": "model.layers.0", "falcon_mamba": "backbone.layers.0", "granitemoehybrid": "model.layers.0",
    "inkling2_text": "model.layers.0", "inkling2_loop_text": "model.layers.0", "lara_mini": "model.layers.0",
    "jamba": "model.layers.0", "lfm3": "model.layers.0",
    "mamba": "backbone.layers.0", "nemotron_h": "model.layers.0", "olmo_hybrid": "model.layers.0",
    "qwen3_5_moe_text": "model.layers.0", "qwen3_5_text": "model.layers.0", "qwen3_next": "model.layers.0",
    "qwen4_exp_text": "model.layers.0", "recurrent_gemma": "model.layers.0",
    "trocr": "model.decoder.layers.0", "xlm": "transformer.ffns.0", "xlstm": "backbone.blocks.0",
    # no list of num_hidden_layers decoder layers (encoder-decoders, multimodal wrappers)
    "bart": "BartForCausalLM", "bigbird_pegasus": "BigBirdPegasusForCausalLM",
    "blenderbot": "BlenderbotForCausalLM", "blenderbot-small": "BlenderbotSmallForCausalLM",
    "blt": "BltForCausalLM", "dots3_note": "Dots3NoteForCausalLM", "emu3": "Emu3ForCausalLM",
    "fuyu": "FuyuForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
    "gemma4": "Gemma4ForConditionalGeneration", "gemma4_unified": "Gemma4UnifiedForConditionalGeneration",
    "gemma4_unified_assistant": "Gemma4UnifiedAssistantForCausalLM",
    "got_ocr2": "GotOcr2ForConditionalGeneration", "hrm_text": "HrmTextForCausalLM",
    "llama4": "Llama4ForCausalLM", "longcat_flash": "LongcatFlashForCausalLM", "marian": "MarianForCausalLM",
    "mbart": "MBartForCausalLM", "mllama": "MllamaForCausalLM",
    "moss_transcribe_diarize": "MossTranscribeDiarizeForConditionalGeneration", "mvp": "MvpForCausalLM",
    "pegasus": "PegasusForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForCausalLM",
    # channel-indexed FFN tensors outside the linears (would be left unpruned)
    "bitnet": "model.layers.0.mlp.ffn_sub_norm.weight",
    # layers of different shapes (Gemma 4: wider heads in its global-attention layers)
    "gemma4_text": "differ in head_dim", "gemma4_unified_text": "differ in head_dim",
    "dots3_note_text": "per_layer_config",
    # shapes the config does not state (a pruned base could not be rebuilt from its config)
    "gptj": "transformer.h.0.mlp.fc_in", "lfm2": "model.layers.0.feed_forward.w3",
    "gemma3n_text": "model.layers.0.mlp.up_proj", "mimo_v2_flash": "model.layers.0.self_attn.v_proj",
}
NOT_TINY = (  # transformers itself cannot build a tiny random one with the shared sizes
    "camembert", "cohere_compass_text", "data2vec-text", "dbrx", "dots1", "gemma3n", "gemma4_assistant",
    "lfm2_moe", "mamba2", "musicgen", "musicgen_melody", "plbart", "prophetnet",
    "qwen4_exp", "reformer", "roberta", "roberta-prelayernorm", "whisper", "xlm-roberta", "xlm-roberta-xl",
    "xlnet", "xmod", "zamba", "zamba2",
)
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120]])


# --------------------------------------------------------------------------------------------------
# Classification: every causal LM of transformers maps, is refused naming a module, or cannot be built
# --------------------------------------------------------------------------------------------------


def test_every_causal_lm_architecture_is_listed():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    listed = [*FITS, *REFUSED, *NOT_TINY]
    assert len(listed) == len(set(listed)), "a model type is listed twice"
    shipped = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert not shipped - set(listed), f"classify these new architectures: {sorted(shipped - set(listed))}"
    assert not set(listed) - shipped, f"no longer shipped: {sorted(set(listed) - shipped)}"
    assert len(FITS) >= 8 and set(HEADS_FIXED) <= set(FITS)


@pytest.mark.parametrize("model_type", FITS)
def test_fitting_architecture_maps_with_config_shapes(model_type):
    """From the config alone (a meta-device build): every role found, head pruning known, shapes implied."""
    config = tiny_config(model_type)
    spec = family_of(config)
    assert set(spec.roles) >= {"q", "k", "v", "o", "up", "down"}
    assert spec.head_pruning == (model_type not in HEADS_FIXED), HEADS_FIXED.get(model_type)
    geo = geometry(config)
    assert (geo.num_layers, geo.hidden_size, geo.intermediate_size, geo.head_dim) == (2, 64, 128, 16)
    assert geo.num_heads == 4 and geo.num_kv_heads in (2, 4)  # MHA-only architectures keep 4 KV heads


@pytest.mark.parametrize("model_type, module", sorted(REFUSED.items()))
def test_refused_architecture_names_the_module(model_type, module):
    with pytest.raises(UnsupportedArchitectureError, match="does not fit CPET's module map") as info:
        family_of(tiny_config(model_type))
    assert module in str(info.value)


# of NOT_TINY, the types whose config classes refuse the tiny sizes outright (transformers 5.24)
CONFIG_REJECTS_TINY_SIZES = {"gemma4_assistant", "mamba2", "xlnet", "zamba", "zamba2"}


@pytest.mark.parametrize("model_type", NOT_TINY)
def test_architectures_without_a_tiny_model(model_type):
    if model_type in CONFIG_REJECTS_TINY_SIZES:  # the config class's own validation refuses the shared sizes
        from huggingface_hub.errors import StrictDataclassClassValidationError

        with pytest.raises(StrictDataclassClassValidationError):
            tiny_config(model_type)
        return
    with pytest.raises(UnsupportedArchitectureError, match="transformers cannot build it"):
        family_of(tiny_config(model_type))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_derived_maps_equal_the_table_overrides(family):
    for model_type in family.model_types:
        derived = derive_family(tiny_config(model_type))
        assert derived.derived and not family.derived
        assert (derived.layers, derived.attention, derived.mlp, derived.linears, derived.intermediate_attr,
                derived.head_pruning) == (family.layers, family.attention, family.mlp, family.linears,
                                          family.intermediate_attr, family.head_pruning)


def test_a_refused_architecture_is_refused_on_load_and_on_compress(tmp_path):
    from transformers import AutoModelForCausalLM

    phi3 = AutoModelForCausalLM.from_config(tiny_config("phi3"))
    phi3.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"'phi3'.*model\.layers\.0\.self_attn\.qkv_proj"):
        load_base(str(tmp_path))
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.layers\.0\.self_attn\.qkv_proj"):
        compress(phi3, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)


# --------------------------------------------------------------------------------------------------
# End to end on every architecture that maps
# --------------------------------------------------------------------------------------------------


def write_task(path, n=48):
    rng = random.Random(0)
    words = {"pos": ["good", "great", "nice"], "neg": ["bad", "awful", "poor"]}
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(words))
        rows.append({"text": f"it was {rng.choice(words[label])} {rng.randint(0, 99)}", "label": label})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return str(corpus), write_task(root / "task.jsonl")


TUNE = TuneConfig(steps=2, batch_size=8, lr=1e-2, eval_every=2, rank=4, alpha=8, dropout=0.0)
# lr ~ 0: the inherited adapter stays at its initialisation, so it can be checked against the index maps
INHERIT = TuneConfig(steps=2, batch_size=8, lr=1e-12, eval_every=2, rank=4, alpha=8, dropout=0.0)


def assert_info(loaded):
    """What ``cpet info`` reports, and the module map's shapes against it."""
    info = model_info(loaded)
    geo = geometry(loaded.model)
    assert (info["layers"], info["hidden_size"], info["intermediate_size"], info["heads"], info["head_dim"]) == (
        2, 64, 128, 4, 16)
    q, kv = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
    expected = {"q": (q, 64), "k": (kv, 64), "v": (kv, 64), "o": (64, q), "gate": (128, 64), "up": (128, 64),
                "down": (64, 128)}
    for layer in iter_layer_linears(loaded.model):
        assert {r: tuple(m.weight.shape) for r, m in layer.modules.items()} == {r: expected[r] for r in layer.modules}
        assert all(loaded.model.get_submodule(name) is layer[role] for role, name in layer.names.items())


def restricted_by_hand(state: dict, family, maps) -> dict:
    """An original LoRA restricted to what compression kept, read off the index maps directly: each module's B keeps
    its kept output rows, its A its kept input columns (the layer and role taken from the tensor's name)."""
    import re

    role_of = {attr: role for role, attr in family.linears.items()}
    out = {}
    for key, tensor in state.items():
        layer = int(re.search(re.escape(family.layers) + r"\.(\d+)\.", key).group(1))
        role = role_of[key.split(".lora_")[0].rsplit(".", 1)[-1]]
        rows, cols = maps.rows(layer, role), maps.cols(layer, role)
        if ".lora_B." in key and rows is not None:
            tensor = tensor.index_select(0, rows)
        if ".lora_A." in key and cols is not None:
            tensor = tensor.index_select(1, cols)
        out[key] = tensor
    return out


@pytest.mark.parametrize("model_type", FITS)
def test_end_to_end(model_type, files, tmp_path):
    corpus, task = files
    loaded = tiny_model(model_type)
    assert_info(loaded)
    loaded.model.save_pretrained(tmp_path / "source")  # a local directory loads back as the same model
    loaded.tokenizer.save_pretrained(tmp_path / "source")
    assert model_fingerprint(load_base(str(tmp_path / "source")).model) == model_fingerprint(loaded.model)

    pipeline = CPET(loaded, tmp_path / "work")
    pipeline.compress([PruneConfig(ffn_ratio=0.5, importance="activation"), QuantizeConfig("nf4")],
                      calibration=corpus, calibration_samples=2, seq_len=16, progress=False)
    base = pipeline.load_compressed()
    assert geometry(base.model).intermediate_size == 64
    for layer in iter_layer_linears(base.model):
        assert layer["up"].out_features == layer["down"].in_features == 64
        assert all(type(m).__name__ == "Linear4bit" for m in layer.modules.values())
    pipeline.recover(RecoveryConfig(rank=2, alpha=2, activation="identity", init="svd"),
                     DistillConfig(steps=2, seq_len=16, batch_size=2), text=corpus, progress=False)

    original = pipeline.tune(task, on="original", config=TUNE, progress=False)
    inherited = pipeline.tune(task, init="inherit", recovery="shared", inherit_from=original, config=INHERIT,
                              progress=False)
    source = load_lora_state(original.directory)
    expected = inherit_lora_state(source, loaded.model.config, base.index_maps)
    got = load_file(str(inherited.directory / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and len(got) == 2 * 2 * len(family_of(loaded.model).roles)
    by_hand = restricted_by_hand(source, family_of(loaded.model), base.index_maps)  # not through inherit.py
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-6), key
        assert torch.equal(by_hand[key], expected[key]), key

    again = CPET.load(pipeline.save(tmp_path / "saved"), original=loaded)
    with torch.no_grad():
        assert torch.equal(again.load_compressed().model(IDS).logits, base.model(IDS).logits)
        ours = pipeline.model_for(inherited)(input_ids=IDS).logits
        assert torch.equal(again.model_for(inherited.directory.parent.name)(input_ids=IDS).logits, ours)
        assert torch.isfinite(ours).all()


@pytest.mark.parametrize("model_type", [t for t in FITS if t not in HEADS_FIXED and t not in HEADS_INTERLEAVED])
def test_query_heads_prune_and_reload(model_type, tmp_path):
    loaded = tiny_model(model_type)
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, head_ratio=0.5, importance="magnitude")],
                    progress=False)
    geo = geometry(base.model)
    assert (geo.num_heads, geo.intermediate_size, geo.head_dim) == (geometry(loaded.model).num_kv_heads, 64, 16)
    q_rows = base.index_maps.q_rows(0)
    assert torch.equal(layer_linears(loaded.model, 0)["q"].weight[q_rows], layer_linears(base.model, 0)["q"].weight)
    base.save(tmp_path / "base")
    with torch.no_grad():
        assert torch.equal(CompressedBase.load(tmp_path / "base").model(IDS).logits, base.model(IDS).logits)


@pytest.mark.parametrize("model_type", sorted(HEADS_FIXED))
def test_head_pruning_is_refused_where_heads_are_fixed(model_type):
    with pytest.raises(ValueError, match="cannot be pruned"):
        compress(tiny_model(model_type).model, [PruneConfig(head_ratio=0.5, importance="magnitude")], progress=False)


@pytest.mark.parametrize("model_type", [t for t in FITS if t not in HEADS_FIXED and t not in HEADS_INTERLEAVED])
def test_a_pruned_head_is_the_original_with_that_heads_o_columns_zeroed(model_type):
    """What head pruning must compute: the original model without the cut heads, i.e. with their o_proj input
    columns zeroed (DiffLlama's pruned model was 5.5 off that, its o_proj input being laid out per head pair)."""
    loaded = tiny_model(model_type)
    base = compress(loaded.model, [PruneConfig(head_ratio=0.5, importance="magnitude")], progress=False)
    reference = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for index in range(geometry(loaded.model).num_layers):
            o = layer_linears(reference, index)["o"]
            cut = torch.ones(o.in_features, dtype=torch.bool)
            cut[base.index_maps.q_rows(index)] = False
            o.weight[:, cut] = 0
        assert torch.allclose(base.model(IDS).logits, reference(IDS).logits, atol=1e-5)


def test_the_head_layout_probe_runs_in_eval_mode_and_leaves_the_mode_as_it_was():
    """Left in train mode with attention dropout, every head moved at random and head pruning was refused."""
    model = tiny_model("starcoder2", attention_dropout=0.3).model.train()
    base = compress(model, [PruneConfig(head_ratio=0.5, importance="magnitude")], progress=False)
    assert geometry(base.model).num_heads == geometry(model).num_heads // 2 and model.training


@pytest.mark.parametrize("model_type", sorted(HEADS_INTERLEAVED))
def test_head_pruning_is_refused_where_o_proj_is_not_laid_out_per_head(model_type):
    loaded = tiny_model(model_type)
    before = model_fingerprint(loaded.model)
    with pytest.raises(ValueError, match=r"its heads cannot be pruned \(its attention output is not laid out one "
                                         r"head_dim block per query head"):
        compress(loaded.model, [PruneConfig(head_ratio=0.5, importance="magnitude")], inplace=True, progress=False)
    assert model_fingerprint(loaded.model) == before  # the probe's perturbation is undone


def test_per_head_tensors_are_found_when_the_head_count_equals_head_dim():
    """granite_swa's attention sinks are (num_heads,): with 16 heads of 16 they passed the (head_dim,) shape test,
    head pruning cut q/o and left the sinks whole, and the saved base failed at its first forward."""
    config = tiny_config("granite_swa", num_attention_heads=16, num_key_value_heads=4, head_dim=16, hidden_size=256)
    assert family_of(config).head_pruning is False
    loaded = tiny_model("granite_swa", num_attention_heads=16, num_key_value_heads=4, head_dim=16, hidden_size=256)
    with pytest.raises(ValueError, match="cannot be pruned"):
        compress(loaded.model, [PruneConfig(head_ratio=0.5, importance="magnitude")], progress=False)


def test_head_counts_the_architecture_cannot_take_are_refused_before_work():
    loaded = tiny_model("diffllama")  # differential attention splits values along an even number of KV heads
    before = model_fingerprint(loaded.model)
    with pytest.raises(ValueError, match="leaves 2 query / 1 KV heads, which this architecture cannot be built"):
        compress(loaded.model, [PruneConfig(head_ratio=0.5, head_mode="kv_group", importance="magnitude")],
                 inplace=True, progress=False)
    assert model_fingerprint(loaded.model) == before


# --------------------------------------------------------------------------------------------------
# From a GGUF: derived architectures that transformers reads from llama.cpp files
# --------------------------------------------------------------------------------------------------

# model type -> (GGUF architecture, offset llama.cpp adds to norm weights: Gemma and Nemotron store 1 + w)
GGUF_CASES = {"starcoder2": ("starcoder2", 0.0), "stablelm": ("stablelm", 0.0), "nemotron": ("nemotron", 1.0),
              "gemma3_text": ("gemma3", 1.0)}


def write_gguf(loaded, path, arch: str, norm_offset: float) -> None:
    """An fp32 GGUF of a tiny model: config keys as transformers maps them, byte-level vocabulary, weights
    under llama.cpp's names (transformers' own name map, inverted)."""
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    writer = gguf.GGUFWriter(str(path), arch)
    for key, attr in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(loaded.model.config, attr, None) if attr else None
        if value is not None and key != "vocab_size":
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    tokenizer = loaded.tokenizer
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))  # without merges, transformers recovers them from scores
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    state = loaded.model.state_dict()
    for gguf_name, hf_name in get_gguf_hf_weights_map(loaded.model, TensorProcessor()).items():
        tensor = state[hf_name].detach().float() + (norm_offset if "norm.weight" in hf_name else 0.0)
        writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("model_type", sorted(GGUF_CASES))
def test_gguf_of_a_derived_architecture_loads_and_compresses(model_type, tmp_path):
    source = tiny_model(model_type)
    write_gguf(source, tmp_path / "model.gguf", *GGUF_CASES[model_type])
    loaded = load_base(str(tmp_path / "model.gguf"))
    assert model_info(loaded)["family"] == model_type and family_of(loaded.model).derived
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, source.model(IDS).logits)
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude"), QuantizeConfig("nf4")],
                    tokenizer=loaded.tokenizer, progress=False)
    base.save(tmp_path / "base")
    with torch.no_grad():
        assert torch.equal(CompressedBase.load(tmp_path / "base").model(IDS).logits, base.model(IDS).logits)


def test_a_map_giving_two_roles_one_attribute_name_is_refused():
    """T5-style blocks name both the attention output and the FFN down projection ``wo``: one peft target name and
    one inheritance lookup for two index maps, so such a map is refused rather than mixed up."""
    from dataclasses import replace

    from cpet.module_map import _check_names_unique

    loaded = tiny_model("llama")
    spec = loaded.family
    _check_names_unique(loaded.model.config, loaded.model, spec, 2)  # llama's own map passes
    clash = replace(spec, linears={**spec.linears, "o": spec.linears["down"]})
    with pytest.raises(UnsupportedArchitectureError, match=r"two roles share the attribute name down_proj"):
        _check_names_unique(loaded.model.config, loaded.model, clash, 2)
