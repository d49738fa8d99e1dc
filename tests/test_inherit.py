from __future__ import annotations

import copy
import json
import re

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
    layer = int(key_b.split("layers.")[1].split(".")[0])
    assert torch.equal(mapped[key_b], state[key_b][base.index_maps.ffn_rows(layer)])  # the kept rows, in order


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


def test_residual_svd_lora_trains_where_compression_changed_nothing():
    """A base only pruned keeps the kept weights exactly: its residual is 0, and the SVD start set A and B both to 0,
    a LoRA that gets no gradient and never trains. Those components keep peft's start (random A, B = 0)."""
    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.25, importance="magnitude")], progress=False)
    torch.manual_seed(0)
    student = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    start = {n: p.clone() for n, p in student.named_parameters() if "lora_A" in n}
    apply_residual_svd_lora(student, loaded.model, base.index_maps)
    lora = dict(student.named_parameters())
    assert all(torch.equal(lora[n], p) for n, p in start.items())  # peft's random A, untouched
    assert all(not p.any() for n, p in lora.items() if "lora_B" in n)
    student(IDS).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)


def test_residual_svd_lora_on_a_quantized_base_uses_every_component():
    """Quantization noise has full rank: every component of the SVD start is the residual's (none kept at peft's)."""
    from cpet.lora_init import live_components

    loaded = tiny_model("llama")
    base = compress(loaded.model, [QuantizeConfig("nf4")], progress=False)
    student = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    apply_residual_svd_lora(student, loaded.model, base.index_maps)
    modules = [m for m in student.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert modules and all(live_components(m.lora_B["default"].weight, m.lora_A["default"].weight).all()
                           for m in modules)


# --------------------------------------------------------------------------------------------------
# Plain PEFT adapters (trained elsewhere) with rsLoRA, per-module ranks/alphas, or DoRA
# --------------------------------------------------------------------------------------------------

PLAIN_TARGETS = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]


def plain_peft_dir(model, directory, seed: int = 3, **fields):
    """A LoRA "trained elsewhere": plain peft with extra LoraConfig ``fields``, non-zero B, no cpet.json."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=PLAIN_TARGETS,
                                                                 **fields))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(directory))
    return peft_model


def dense_output_delta(module) -> torch.Tensor:
    """What a peft LoRA layer adds to its base layer's output, as a dense ``[d_out, d_in]`` matrix.

    Read off the forward pass on the identity (not from ``scaling``), so a wrong scale or rank shows.
    """
    eye = torch.eye(module.base_layer.in_features)
    with torch.no_grad():
        return (module(eye) - module.base_layer(eye)).T


PLAIN_FIELDS = {
    "rslora": dict(use_rslora=True),
    "patterns": dict(rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"up_proj": 3, "o_proj": 16}),
    "rslora+patterns": dict(use_rslora=True, rank_pattern={"k_proj": 8, "layers.0.mlp.up_proj": 1},
                            alpha_pattern={"layers.1.self_attn.q_proj": 2}),
}
COMPRESSIONS = {
    "quantized": [QuantizeConfig("nf4")],  # identity index maps
    "pruned": [PruneConfig(ffn_ratio=0.5, head_ratio=0.5, importance="magnitude"), QuantizeConfig("nf4")],
}


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fields", PLAIN_FIELDS)
def test_plain_peft_scaling_and_per_module_ranks_are_inherited(tmp_path, fields, compression):
    from cpet.lora_init import lora_shape_of

    loaded = tiny_model("llama")
    source = plain_peft_dir(loaded.model, tmp_path / "plain", **PLAIN_FIELDS[fields])
    base = compress(loaded.model, COMPRESSIONS[compression], progress=False)
    student = add_lora(base.model, dropout=0.0, **lora_shape_of(tmp_path / "plain"))
    apply_inherited_lora(student, tmp_path / "plain", base.index_maps, loaded.model.config)
    maps, checked = base.index_maps, 0
    for mine, theirs in zip(iter_layer_linears(student), iter_layer_linears(source)):
        for role, module in mine.modules.items():
            if not hasattr(module, "lora_A"):
                continue
            # the source's delta in original coordinates, restricted by the index maps themselves (a reference
            # built with kept_indices, the function under test, let kept rows in reverse order pass)
            reference = dense_output_delta(theirs[role])
            reference = reference[maps.full(mine.index, role, "rows")][:, maps.full(mine.index, role, "cols")]
            got = dense_output_delta(module)
            assert got.shape == reference.shape and reference.abs().max() > 1e-2, (mine.index, role)
            assert (got - reference).abs().max() < 1e-5, (mine.index, role)
            checked += 1
    assert checked == 2 * len(PLAIN_TARGETS)
    theirs_cfg, mine_cfg = source.peft_config["default"], student.peft_config["default"]
    assert (mine_cfg.use_rslora, mine_cfg.rank_pattern, mine_cfg.alpha_pattern) == (
        theirs_cfg.use_rslora, theirs_cfg.rank_pattern, theirs_cfg.alpha_pattern)  # a faithful PEFT dir


def test_dora_adapters_are_refused_with_the_reason(tmp_path):
    from cpet.adapters import plain_peft_meta
    from cpet.lora_init import lora_shape_of

    loaded = tiny_model("llama")
    plain_peft_dir(loaded.model, tmp_path / "dora", use_dora=True)
    reason = r"DoRA .*does not support DoRA inheritance.*per output row of the full weight"
    with pytest.raises(ValueError, match=reason):
        plain_peft_meta(tmp_path / "dora", loaded.model, ["tiny-llama"])
    with pytest.raises(ValueError, match=reason):
        lora_shape_of(tmp_path / "dora")
    # read without the model (the pipeline reads the source here before the original model loads)
    from cpet.adapters import plain_peft_source

    with pytest.raises(ValueError, match=reason):
        plain_peft_source(tmp_path / "dora")
    plain_peft_dir(loaded.model, tmp_path / "bin")
    (tmp_path / "bin" / "adapter_model.safetensors").rename(tmp_path / "bin" / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"has no adapter_model.safetensors \(CPET reads safetensors adapters only"):
        plain_peft_source(tmp_path / "bin")


@pytest.mark.parametrize("fields, named", [(dict(bias="lora_only"), "bias='lora_only'"),
                                           (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
                                           (dict(lora_bias=True), "lora_bias=True"),
                                           (dict(trainable_token_indices=[0, 1]), "trainable_token_indices=[0, 1]")])
def test_lora_with_more_than_its_factors_is_refused_before_it_reaches_the_base(tmp_path, fields, named):
    from cpet.adapters import plain_peft_meta
    from cpet.lora_init import lora_shape_of

    loaded = tiny_model("llama")
    plain_peft_dir(loaded.model, tmp_path / "extra", **fields)
    # peft would load these tensors into the compressed base's own frozen biases / lm_head (strict=False)
    reason = re.escape(named) + r".*CPET inherits plain LoRA factors only"
    with pytest.raises(ValueError, match=reason):
        plain_peft_meta(tmp_path / "extra", loaded.model, ["tiny-llama"])
    with pytest.raises(ValueError, match=reason):
        lora_shape_of(tmp_path / "extra")


def test_unconverted_pissa_family_sources_and_stray_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from cpet.adapters import plain_peft_meta
    from cpet.lora_init import lora_shape_of

    loaded = tiny_model("llama")
    plain_peft_dir(loaded.model, tmp_path / "pissa", init_lora_weights="pissa")
    reason = r"init_lora_weights='pissa' and not converted.*path_initial_model_for_weight_conversion"
    with pytest.raises(ValueError, match=reason):
        plain_peft_meta(tmp_path / "pissa", loaded.model, ["tiny-llama"])
    with pytest.raises(ValueError, match=reason):
        lora_shape_of(tmp_path / "pissa")
    # not a plain delta on every token: LoRA-GA saved unconverted, an activated LoRA, a rebuilt layer stack
    for name, extra, message in (("lora-ga", {"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga' and not"),
                                 ("alora", {"alora_invocation_tokens": [5, 6]}, "is an activated LoRA"),
                                 ("replicated", {"layer_replication": [[0, 2]]}, "LoRA on a rebuilt layer stack")):
        plain_peft_dir(loaded.model, tmp_path / name)
        config_path = tmp_path / name / "adapter_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **extra}))
        with pytest.raises(ValueError, match=message):
            plain_peft_meta(tmp_path / name, loaded.model, ["tiny-llama"])
    plain_peft_dir(loaded.model, tmp_path / "stray")
    weights = tmp_path / "stray" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.model.norm.extra_delta"] = torch.ones(4)  # something no LoRA layer would read
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"holds 'base_model.model.model.norm.extra_delta', which is not a LoRA A/B"):
        plain_peft_meta(tmp_path / "stray", loaded.model, ["tiny-llama"])


def test_a_source_on_some_layers_only_is_inherited_on_those_layers_only(tmp_path):
    from cpet.lora_init import lora_shape_of

    loaded = tiny_model("llama")
    source = plain_peft_dir(loaded.model, tmp_path / "layer1", layers_to_transform=[1])
    base = compress(loaded.model, COMPRESSIONS["pruned"], progress=False)
    student = add_lora(base.model, dropout=0.0, **lora_shape_of(tmp_path / "layer1"))
    apply_inherited_lora(student, tmp_path / "layer1", base.index_maps, loaded.model.config)
    for mine, theirs in zip(iter_layer_linears(student), iter_layer_linears(source)):
        has = {role for role, module in mine.modules.items() if hasattr(module, "lora_A")}
        assert has == ({role for role, module in theirs.modules.items() if hasattr(module, "lora_A")}), mine.index
        assert bool(has) == (mine.index == 1)  # no fresh, never-trained LoRA on layer 0
        for role in has:
            maps = base.index_maps  # the reference restricted by the maps, not by kept_indices (under test)
            reference = dense_output_delta(theirs[role])
            reference = reference[maps.full(mine.index, role, "rows")][:, maps.full(mine.index, role, "cols")]
            assert (dense_output_delta(mine[role]) - reference).abs().max() < 1e-5, role
    assert student.peft_config["default"].layers_to_transform == [1]


@pytest.fixture(scope="module")
def quantized_pipeline(tmp_path_factory):
    """A CPET pipeline whose compressed base is the tiny llama in nf4, and a two-label task file."""
    import json
    import random

    from cpet.pipeline import CPET

    root = tmp_path_factory.mktemp("inherit-pipeline")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    rng = random.Random(0)
    rows = [{"text": f"it was {word} {rng.randint(0, 99)}", "label": label}
            for label, word in (rng.choice([("pos", "good"), ("neg", "bad")]) for _ in range(60))]
    (root / "task.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pipeline = CPET(tiny_model("llama"), root / "work")
    pipeline.compress([QuantizeConfig("nf4")], calibration=str(root / "corpus.txt"), calibration_samples=2,
                      seq_len=16, progress=False)
    return pipeline, str(root / "task.jsonl")


def test_pipeline_inherits_rslora_and_patterns_faithfully(quantized_pipeline, tmp_path):
    import json

    from cpet.train import TuneConfig

    pipeline, task = quantized_pipeline
    fields = PLAIN_FIELDS["rslora+patterns"]
    source = plain_peft_dir(pipeline.original.model, tmp_path / "plain", **fields)
    config = TuneConfig(steps=1, batch_size=4, lr=1e-12, eval_every=1, eval_limit=4)  # lr ~ 0: keeps the init
    adapter = pipeline.tune(task, init="inherit", inherit_from=tmp_path / "plain", config=config,
                            name="rslora-patterns", progress=False)
    saved = json.loads((adapter.directory / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["rank_pattern"] == fields["rank_pattern"]
    assert saved["alpha_pattern"] == fields["alpha_pattern"] and saved["r"] == 4 and saved["lora_alpha"] == 8
    served = pipeline.model_for(adapter)  # read back with plain peft from the saved directory
    for mine, theirs in zip(iter_layer_linears(served), iter_layer_linears(source)):
        for role, module in mine.modules.items():
            if hasattr(module, "lora_A"):
                assert (dense_output_delta(module) - dense_output_delta(theirs[role])).abs().max() < 1e-5, role
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with pipeline.running(adapter) as model, torch.no_grad():  # the assembly's scales: rsLoRA and the patterns
        assert torch.allclose(model(input_ids=ids).logits, served(input_ids=ids).logits, atol=1e-5)


def test_pipeline_refuses_a_source_with_lora_outside_the_layers_linears_before_any_work(quantized_pipeline,
                                                                                        tmp_path):
    from peft import LoraConfig, get_peft_model

    pipeline, task = quantized_pipeline
    source = get_peft_model(copy.deepcopy(pipeline.original.model),
                            LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    source.save_pretrained(str(tmp_path / "head"))
    with pytest.raises(ValueError, match="has a LoRA on 'lm_head'; CPET carries LoRA on the layers' linears only"):
        pipeline.tune(task, init="inherit", inherit_from=tmp_path / "head", name="head", progress=False)
    assert not (pipeline.work_dir / "adapters" / "head").exists()


def test_pipeline_refuses_dora_before_any_work(quantized_pipeline, tmp_path):
    pipeline, task = quantized_pipeline
    plain_peft_dir(pipeline.original.model, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="does not support DoRA inheritance"):
        pipeline.tune(task, init="inherit", inherit_from=tmp_path / "dora", name="dora", progress=False)
    assert not (pipeline.work_dir / "adapters" / "dora").exists()


def test_inheritance_through_moefication_permutes_rows_and_columns(tmp_path):
    from cpet.compress.moefy import MoEfyConfig

    loaded, original_lora = trained_lora("llama", tmp_path)
    calibration = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    base = compress(loaded.model, [MoEfyConfig(num_experts=4, top_k=4)], calibration=calibration, progress=False)
    student = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    apply_inherited_lora(student, tmp_path / "orig", base.index_maps, loaded.model.config)
    for mine, theirs in zip(iter_layer_linears(student), iter_layer_linears(original_lora)):
        order = base.index_maps.ffn_rows(mine.index)
        assert not torch.equal(order, torch.arange(len(order)))
        for role in mine.modules:
            expected = delta(theirs[role])
            if role in ("gate", "up"):
                expected = expected[order]
            elif role == "down":
                expected = expected[:, order]
            assert torch.equal(delta(mine[role]), expected), role
    with torch.no_grad():  # every expert chosen: the MoEfied model with the inherited LoRA is the original one
        assert torch.allclose(student(IDS).logits, original_lora(IDS).logits, atol=1e-4)


def test_training_through_the_routed_experts_equals_training_the_dense_model(tmp_path):
    """Every expert chosen: the LoRA's gradients through the experts' slices are the dense model's, permuted,
    and a few optimizer steps keep the two models' losses equal (the routed path trains as the dense one)."""
    from cpet.compress.moefy import MoEfyConfig

    loaded, dense = trained_lora("llama", tmp_path)
    calibration = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    base = compress(loaded.model, [MoEfyConfig(num_experts=4, top_k=4)], calibration=calibration, progress=False)
    routed = add_lora(base.model, rank=4, alpha=8, dropout=0.0)
    apply_inherited_lora(routed, tmp_path / "orig", base.index_maps, loaded.model.config)
    batch = torch.randint(0, 259, (3, 16), generator=torch.Generator().manual_seed(2))
    models = (dense, routed)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in models]
    history = []
    for step in range(3):
        losses = []
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0]), (step, losses)
        if step == 0:
            for mine, theirs in zip(iter_layer_linears(routed), iter_layer_linears(dense)):
                order = base.index_maps.ffn_rows(mine.index)
                for role in ("gate", "up", "down"):
                    a_grad = theirs[role].lora_A["default"].weight.grad
                    b_grad = theirs[role].lora_B["default"].weight.grad
                    if role == "down":
                        a_grad = a_grad[:, order]
                    else:
                        b_grad = b_grad[order]
                    assert b_grad.abs().max() > 0
                    assert torch.allclose(mine[role].lora_A["default"].weight.grad, a_grad, atol=1e-5), role
                    assert torch.allclose(mine[role].lora_B["default"].weight.grad, b_grad, atol=1e-5), role
        for optimizer in optimizers:
            optimizer.step()
        history.append(losses[0])
    assert history[-1] < history[0]  # the steps did move both models


def test_state_dict_mapping_keeps_keys_outside_the_map_and_restricts_every_key_by_its_own_layer(tmp_path):
    """Every key restricted by its own layer's maps, keys outside the module map copied unchanged (restricting all
    with layer 0's maps, or dropping the others, passed the test above)."""
    loaded, _ = trained_lora("llama", tmp_path)
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    maps = base.index_maps
    assert not torch.equal(maps.ffn_rows(0), maps.ffn_rows(1))  # otherwise a wrong layer would not show
    state = load_lora_state(tmp_path / "orig")
    extra = {"base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
             "base_model.model.lm_head.lora_B.weight": torch.randn(259, 4)}
    mapped = inherit_lora_state({**state, **extra}, loaded.model.config, maps)
    assert mapped.keys() == state.keys() | extra.keys()
    for key, tensor in extra.items():  # outside the module map: copied unchanged (documented behaviour)
        assert torch.equal(mapped[key], tensor), key
    suffix = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}
    checked = set()
    for key, tensor in state.items():
        layer = int(key.split("layers.")[1].split(".")[0])
        role = suffix[key.split(".lora_")[0].rsplit(".", 1)[-1]]
        if ".lora_B." in key:
            expected = tensor[maps.full(layer, role, "rows")]
        else:
            expected = tensor[:, maps.full(layer, role, "cols")]
        assert torch.equal(mapped[key], expected), key
        checked.add((layer, role))
    assert len(checked) == 14


def test_residual_svd_lora_is_the_best_rank_r_approximation_of_the_residual():
    """The residual-SVD start is the truncated SVD (Eckart-Young) of original minus base: components 2..r+1
    instead of 1..r still started 'closer' with every component live, and passed the tests above."""
    from cpet.lora_init import apply_residual_svd_lora
    from cpet.recovery import dequantized_weight, relative_error

    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.25, importance="magnitude"), QuantizeConfig("nf4")],
                    progress=False)
    maps = base.index_maps
    student = add_lora(base.model, rank=8, alpha=16, dropout=0.0)
    errors = apply_residual_svd_lora(student, loaded.model, maps)
    originals = {layer.index: layer for layer in iter_layer_linears(loaded.model)}
    checked = 0
    for layer in iter_layer_linears(student):
        for role, module in layer.modules.items():
            weight = originals[layer.index][role].weight.detach().float()
            weight = weight[maps.full(layer.index, role, "rows")][:, maps.full(layer.index, role, "cols")]
            residual = weight - dequantized_weight(module.base_layer)  # original minus what the base holds
            U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
            best = (U[:, :8] * S[:8]) @ Vh[:8]  # Eckart-Young: the best rank-8 approximation
            got = dense_output_delta(module)  # what the LoRA adds, read off the forward pass
            assert (got - best).abs().max() < 1e-4 * best.abs().max(), (layer.index, role)
            assert errors[layer.names[role]] == pytest.approx(relative_error(residual, best), abs=1e-4)
            checked += 1
    assert checked == 14


def test_a_damaged_inheritance_source_is_named(tmp_path):
    """load_lora_state passed safetensors' bare error (no file named) for a truncated source."""
    trained_lora("llama", tmp_path)
    weights = tmp_path / "orig" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"orig/adapter_model.safetensors is not a readable safetensors file"):
        load_lora_state(tmp_path / "orig")


@pytest.mark.parametrize("pattern", [False, True])
def test_a_plain_peft_source_whose_factors_have_another_rank_than_its_config_is_refused_first(tmp_path, pattern):
    """adapter_config.json saying r=8 over rank-4 factors passed plain_peft_meta; the run then failed in peft with
    a bare "size mismatch" after the base had loaded. Serving refuses such a directory (load_factors): so does
    inheritance now, by the same check."""
    from cpet.adapters import plain_peft_meta

    loaded = tiny_model("llama")
    plain_peft_dir(loaded.model, tmp_path / "src")
    config_path = tmp_path / "src" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update({"rank_pattern": {"k_proj": 2}} if pattern else {"r": 8})
    config_path.write_text(json.dumps(config))
    module = r"\S+\.k_proj" if pattern else r"\S+"  # r=8: the first module read
    with pytest.raises(ValueError, match=rf"module {module} has rank-4 factors, but adapter_config.json says rank "
                                         rf"{2 if pattern else 8} for it"):
        plain_peft_meta(tmp_path / "src", loaded.model, ["tiny-llama"])
