"""MoEfication as a compression stage: equivalence, sparse compute, save/reload, composition, pipeline rows."""

from __future__ import annotations

import pytest
import torch

from cpet.compress import CompressedBase, compress, validate_stages
from cpet.compress.moefy import MoEfyConfig, moe_blocks
from cpet.config import PruneConfig, QuantizeConfig
from cpet.models import model_fingerprint, tiny_model
from cpet.moe import MoEFFN

from tests.test_pipeline import TUNE, write_task


def _calibration(model, n=4, seq=32):
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mistral"])
def test_with_every_expert_chosen_the_moefied_model_equals_the_dense_one(family):
    model = tiny_model(family).model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=4)], calibration=_calibration(model), progress=False)
    blocks = moe_blocks(base.model)
    assert len(blocks) == model.config.num_hidden_layers and all(b.num_experts == 4 for b in blocks)
    ids = _ids(model)
    with torch.no_grad():
        dense, moe = model(input_ids=ids).logits, base.model(input_ids=ids).logits
        for block in blocks:
            block.top_k = 2
        half = base.model(input_ids=ids).logits
    assert torch.allclose(dense, moe, atol=1e-4)
    assert (dense - half).abs().max() > 1e-2  # half of the experts is a real change


def test_a_bf16_model_is_moefied_in_its_own_dtype():
    # the CLI loads bf16 on a GPU: the formula probe and the router targets must not trip over its rounding
    model = tiny_model("llama").model.to(torch.bfloat16)
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=4)], calibration=_calibration(model), progress=False)
    assert all(b.bank("up").experts[0].weight.dtype == torch.bfloat16 for b in moe_blocks(base.model))
    ids = _ids(model)
    with torch.no_grad():
        dense, moe = model(input_ids=ids).logits.float(), base.model(input_ids=ids).logits.float()
    assert (dense - moe).abs().max() < 0.05 * dense.abs().max()  # the same function, up to bf16 rounding


def test_a_bf16_ffn_with_no_expert_chosen_answers_zeros_in_bf16():
    """With no expert chosen (an oracle choosing none) the output came back fp32 in a bf16 model."""
    model = tiny_model("llama").model.to(torch.bfloat16)
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=_calibration(model), progress=False)
    block = moe_blocks(base.model)[0]
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    out = block(x, chosen=torch.zeros(6, 4, dtype=torch.bool))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and not out.any()
    assert block(x).dtype == torch.bfloat16


def test_weight_clustering_partitions_otherwise_and_keeps_the_dense_function():
    model = tiny_model("llama").model
    bases = {clustering: compress(model, [MoEfyConfig(num_experts=4, top_k=4, clustering=clustering)],
                                  calibration=_calibration(model), progress=False)
             for clustering in ("weights", "coactivation")}
    width = model.config.intermediate_size
    for layer in range(model.config.num_hidden_layers):
        orders = {c: b.index_maps.ffn_rows(layer) for c, b in bases.items()}
        assert sorted(orders["weights"].tolist()) == list(range(width))
        experts = {c: {frozenset(o[e * width // 4:(e + 1) * width // 4].tolist()) for e in range(4)}
                   for c, o in orders.items()}
        assert experts["weights"] != experts["coactivation"]  # another grouping of the neurons, not a relabelling
        # ... grouped by their weights: gate rows within an expert point closer together than across experts
        # (0.04 against -0.01 here; clustering random vectors gives 0.005 against -0.001)
        rows = torch.nn.functional.normalize(model.model.layers[layer].mlp.gate_proj.weight[orders["weights"]], dim=1)
        cosines = rows @ rows.T
        expert_of = torch.arange(width) // (width // 4)
        same = expert_of.unsqueeze(0) == expert_of.unsqueeze(1)
        assert cosines[same & ~torch.eye(width, dtype=torch.bool)].mean() > cosines[~same].mean() + 0.02
    ids = _ids(model)
    with torch.no_grad():
        assert torch.allclose(bases["weights"].model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_the_permutation_is_the_index_map_and_experts_partition_the_neurons():
    model = tiny_model("llama").model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=_calibration(model), progress=False)
    width = model.config.intermediate_size
    for layer in range(model.config.num_hidden_layers):
        order = base.index_maps.ffn_rows(layer)
        assert sorted(order.tolist()) == list(range(width))  # every neuron exactly once
        assert not torch.equal(order, torch.arange(width))  # clustering moved neurons
        block = moe_blocks(base.model)[layer]
        original_gate = model.model.layers[layer].mlp.gate_proj.weight
        for e in range(4):
            neurons = order[e * width // 4:(e + 1) * width // 4]
            assert torch.equal(block.gate_proj.experts[e].weight, original_gate[neurons])
            assert torch.equal(block.up_proj.experts[e].weight, model.model.layers[layer].mlp.up_proj.weight[neurons])
            assert torch.equal(block.down_proj.experts[e].weight,
                               model.model.layers[layer].mlp.down_proj.weight[:, neurons])


def test_routers_are_a_function_of_the_config_seed_not_of_the_callers_random_state():
    model = tiny_model("llama").model
    routers = []
    for caller_seed, moefy_seed in [(1, 0), (2, 0), (1, 5)]:
        torch.manual_seed(caller_seed)  # what the caller drew before (validation, other stages) must not matter
        base = compress(model, [MoEfyConfig(num_experts=4, top_k=2, seed=moefy_seed)],
                        calibration=_calibration(model), progress=False)
        routers.append({k: v for k, v in base.model.state_dict().items() if "router" in k})
        after = torch.rand(1)
        torch.manual_seed(caller_seed)
        assert torch.equal(after, torch.rand(1))  # and the caller's random stream is left as it was
    assert routers[0].keys() and all(torch.equal(routers[0][k], routers[1][k]) for k in routers[0])
    assert any(not torch.equal(routers[0][k], routers[2][k]) for k in routers[0])  # the config's seed does


def test_validation_leaves_the_callers_random_stream_alone():
    model = tiny_model("llama").model
    torch.manual_seed(3)
    validate_stages(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=_calibration(model))  # builds a probe
    drawn = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(1))


def test_only_the_chosen_experts_run_on_exactly_their_tokens():
    model = tiny_model("llama").model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=1)], calibration=_calibration(model), progress=False)
    block = moe_blocks(base.model)[0]
    seen = {}
    for role in ("gate_proj", "up_proj", "down_proj"):
        for e, expert in enumerate(getattr(block, role).experts):
            expert.register_forward_pre_hook(lambda m, inputs, key=(role, e): seen.__setitem__(key, inputs[0].shape))
    dense_calls = []
    for role in ("gate_proj", "up_proj", "down_proj"):
        getattr(block, role).register_forward_pre_hook(lambda m, inputs: dense_calls.append(1))
    x = torch.randn(10, model.config.hidden_size)
    chosen = block.choose(x)
    assert chosen.sum(1).tolist() == [1] * 10
    with torch.no_grad():
        block(x)
    assert not dense_calls  # no bank ran as one dense linear
    for e in range(4):
        routed = int(chosen[:, e].sum())
        if routed == 0:
            assert ("gate_proj", e) not in seen and ("down_proj", e) not in seen
        else:
            assert seen[("gate_proj", e)] == (routed, model.config.hidden_size)
            assert seen[("down_proj", e)] == (routed, model.config.intermediate_size // 4)
    # and the right rows: the output is each token's chosen experts, computed densely here and masked
    for top_k in (1, 2):
        block.top_k = top_k
        chosen = block.choose(x)
        with torch.no_grad():
            expected = sum(chosen[:, e:e + 1] * block.bank("down").experts[e](block.expert_hidden(e, x))
                           for e in range(4))
            assert torch.allclose(block(x), expected, atol=1e-5)


def test_expert_norms_are_the_dense_ffn_output_with_only_that_experts_neurons():
    """The router's training target, checked against the dense model itself (not against the function it is)."""
    model = tiny_model("llama").model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=_calibration(model), progress=False)
    width = model.config.intermediate_size
    x = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    mlp, order = model.model.layers[0].mlp, base.index_maps.ffn_rows(0)
    with torch.no_grad():
        hidden = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        norms = moe_blocks(base.model)[0].expert_norms(x)
        for e in range(4):
            keep = torch.zeros(width)
            keep[order[e * width // 4:(e + 1) * width // 4]] = 1
            assert torch.allclose(norms[:, e], mlp.down_proj(hidden * keep).norm(dim=-1), atol=1e-5)


def test_the_router_learns_to_predict_expert_norms():
    model = tiny_model("llama").model
    calibration = _calibration(model, n=8)
    untrained = compress(model, [MoEfyConfig(num_experts=4, top_k=2, router_steps=0)], calibration=calibration,
                         progress=False)
    trained = compress(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=calibration, progress=False)
    from cpet.compress.moefy import ffn_inputs

    tokens = ffn_inputs(model, _calibration(model, n=2, seq=16))[1]
    errors = []
    for base in (untrained, trained):
        block = moe_blocks(base.model)[1]
        with torch.no_grad():
            target = block.expert_norms(tokens)
            errors.append(float((block.router(tokens) - target).pow(2).mean() / target.pow(2).mean()))
    assert errors[1] < 0.5 * errors[0]


@pytest.mark.parametrize("stages", [
    [MoEfyConfig(num_experts=4, top_k=2)],
    [PruneConfig(ffn_ratio=0.25, importance="magnitude"), MoEfyConfig(num_experts=4, top_k=2),
     QuantizeConfig("nf4")],
    [MoEfyConfig(num_experts=4, tau=0.8), QuantizeConfig("int8")],
], ids=["moefy", "prune-moefy-nf4", "moefy-dynamic-int8"])
def test_save_and_reload_give_the_same_logits(stages, tmp_path):
    model = tiny_model("llama").model
    base = compress(model, stages, calibration=_calibration(model), progress=False)
    assert not base.manifest.uniform
    base.save(tmp_path / "base")
    again = CompressedBase.load(tmp_path / "base")
    assert again.base_id == base.base_id
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(base.model(input_ids=ids).logits, again.model(input_ids=ids).logits)
    from cpet.models import load_base

    with pytest.raises(ValueError, match=r"plain transformers cannot load .*CompressedBase\.load"):
        load_base(str(tmp_path / "base"))  # transformers would drop the experts and routers with a warning


@pytest.mark.parametrize("family", ["exaone", "flint"])
def test_families_that_transformers_renames_on_save_reload_through_cpets_loader(family, tmp_path):
    """transformers writes these families under their original checkpoint names; the rebuilt base's loader reads
    the model's own names, so a MoEfied base is saved under those (it failed to reload before)."""
    model = tiny_model(family).model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=2, router_steps=2)], calibration=_calibration(model),
                    progress=False)
    base.save(tmp_path / "base")
    again = CompressedBase.load(tmp_path / "base")
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(base.model(input_ids=ids).logits, again.model(input_ids=ids).logits)


def test_a_base_saved_under_original_checkpoint_names_is_refused_with_the_cause(tmp_path):
    model = tiny_model("exaone").model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=2, router_steps=2)], calibration=_calibration(model),
                    progress=False)
    save = base.model.save_pretrained
    base.model.save_pretrained = lambda directory, **kwargs: save(directory, **{**kwargs,
                                                                                "save_original_format": True})
    base.save(tmp_path / "base")  # what CPET wrote before it chose the key format
    with pytest.raises(ValueError, match=r"original checkpoint names.*Rebuild the base"):
        CompressedBase.load(tmp_path / "base")


def test_quantization_after_moefication_quantizes_every_expert_but_not_the_routers():
    model = tiny_model("llama").model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=2), QuantizeConfig("nf4")],
                    calibration=_calibration(model), progress=False)
    import bitsandbytes as bnb

    block = moe_blocks(base.model)[0]
    assert all(isinstance(expert, bnb.nn.Linear4bit) for expert in block.gate_proj.experts)
    assert isinstance(block.router.proj, torch.nn.Linear) and not isinstance(block.router.proj, bnb.nn.Linear4bit)
    assert isinstance(base.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("config, message", [
    (dict(num_experts=5, top_k=2), r"do not split into 5 equal experts; expert counts that divide every layer's "
                                   r"width: \[2, 4, 8, 16, 32, 64, 128\]"),
    (dict(num_experts=256, top_k=2), "more than the 128 FFN neurons"),
    (dict(num_experts=1), "num_experts must be >= 2"),
    (dict(num_experts=4, top_k=5), "top_k must be in 1..num_experts"),
    (dict(num_experts=4, router_width=2), "router_width"),
    (dict(num_experts=4, tau=1.5), "tau"),
    (dict(num_experts=4, clustering="spectral"), "clustering must be one of"),
    (dict(num_experts=4, router_inputs="sparse"), "router_inputs must be one of"),
    (dict(num_experts=4, router_lr=float("inf")), "finite router_lr"),  # trained every router to NaN scores
    (dict(num_experts=4, router_lr=float("nan")), "finite router_lr"),  # failed in the first router's training
    (dict(num_experts=4, top_k=5), r"CLI: --moefy-top-k"),
])
def test_bad_moefy_configs_are_refused_before_any_work(config, message, monkeypatch):
    model = tiny_model("llama").model
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=message):  # by the config itself, or by the stage's checks on the model
        compress(model, [MoEfyConfig(**config)], calibration=_calibration(model), progress=False)


def _no_work(monkeypatch):
    """Make the expensive parts of MoEfication and pruning raise: a check that comes after them fails the test."""
    import importlib

    def no_work(*args, **kwargs):
        raise AssertionError("expensive work started before the input was checked")

    monkeypatch.setattr(importlib.import_module("cpet.compress.moefy"), "ffn_inputs", no_work)
    monkeypatch.setattr(importlib.import_module("cpet.compress.prune"), "element_scores", no_work)


def test_the_valid_expert_counts_are_listed_whole_or_said_to_be_none(monkeypatch):
    """The list was cut at 12 counts without a word, and for a width with no divisor offered only one neuron per
    expert."""
    from cpet.compress.moefy import _valid_expert_counts

    assert _valid_expert_counts([1536]) == ("expert counts that divide every layer's width: [2, 3, 4, 6, 8, 12, 16, "
                                            "24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1536]")
    assert _valid_expert_counts([96, 128]) == "expert counts that divide every layer's width: [2, 4, 8, 16, 32]"
    assert _valid_expert_counts([127]) == ("no expert count splits every layer's width into experts of two neurons "
                                           "or more (127 experts would be one neuron each)")
    assert _valid_expert_counts([127, 128]).startswith("no expert count splits")
    model = tiny_model("llama").model  # 1% pruning keeps 127 of 128 channels
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"FFN widths \[127\] do not split into 4 equal experts; no expert count"):
        compress(model, [PruneConfig(ffn_ratio=0.01, importance="magnitude"), MoEfyConfig(num_experts=4, top_k=2)],
                 calibration=_calibration(model), progress=False)


def test_moefication_needs_calibration_and_comes_before_quantization_after_pruning():
    model = tiny_model("llama").model
    with pytest.raises(ValueError, match="calibration"):
        compress(model, [MoEfyConfig(num_experts=4)], progress=False)
    with pytest.raises(ValueError, match="PruneConfig cannot run after MoEfyConfig"):
        compress(model, [MoEfyConfig(num_experts=4), PruneConfig(ffn_ratio=0.25)], calibration=_calibration(model))
    with pytest.raises(ValueError, match="MoEfyConfig cannot run after QuantizeConfig"):
        compress(model, [QuantizeConfig("nf4"), MoEfyConfig(num_experts=4)], calibration=_calibration(model))
    opt = tiny_model("opt").model  # FFN linears live in the decoder layer itself: no block to replace
    with pytest.raises(ValueError, match="MoEfication supports families with an MLP block"):
        compress(opt, [MoEfyConfig(num_experts=4)], calibration=_calibration(opt), progress=False)


def test_widths_after_pruning_are_checked_before_any_work(monkeypatch):
    model = tiny_model("llama").model  # 128 channels; 25% pruning keeps 96, which 64 experts do not divide
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"FFN widths \[96\] do not split into 64 equal experts"):
        compress(model, [PruneConfig(ffn_ratio=0.25, importance="magnitude"), MoEfyConfig(num_experts=64, top_k=8)],
                 calibration=_calibration(model), progress=False)


@pytest.mark.parametrize("reload", [False, True], ids=["compressed", "reloaded"])
def test_expert_counts_leave_padding_out(reload, tmp_path):
    """The counts behind the share of experts used (and FLOPs per token) counted padded positions as tokens."""
    model = tiny_model("llama").model
    base = compress(model, [MoEfyConfig(num_experts=4, tau=0.6)], calibration=_calibration(model), progress=False)
    if reload:
        base.save(tmp_path / "base")
        base = CompressedBase.load(tmp_path / "base")
    ids = _ids(base.model)                                    # [2, 12]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0                                           # row 1: 5 tokens of text, 7 of padding
    blocks = moe_blocks(base.model)
    chosen = []
    for block in blocks:
        block.reset_counts()
        block.register_forward_hook(lambda b, inputs, out: chosen.append(
            b.choose(inputs[0].reshape(-1, inputs[0].shape[-1]))))
    with torch.no_grad():
        base.model(input_ids=ids, attention_mask=mask)
    text = mask.reshape(-1).bool()
    for block, choice in zip(blocks, chosen):
        assert block.routed_tokens == 17
        assert block.chosen_experts == int(choice[text].sum())
    assert int(chosen[0].sum()) != int(chosen[0][text].sum())  # padding did choose experts: the test can tell
    for block in blocks:  # the mask belonged to that forward: a block run on its own counts every token
        block.reset_counts()
        block(torch.randn(1, 3, base.model.config.hidden_size))
        assert block.routed_tokens == 3


def test_moefied_pipeline_inherits_recovers_and_tunes(tmp_path):
    from cpet.pipeline import CPET
    from cpet.recovery import RecoveryConfig
    from cpet.train import DistillConfig

    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    task = write_task(tmp_path / "task.jsonl")
    pipeline = CPET(tiny_model("llama"), tmp_path / "work")
    # 3 of 4 experts: with 2 of 4 this random two-layer toy keeps too little of its FFNs for a task signal
    pipeline.compress([PruneConfig(ffn_ratio=0.25, importance="magnitude"), MoEfyConfig(num_experts=4, top_k=3),
                       QuantizeConfig("nf4")], calibration=str(tmp_path / "corpus.txt"), calibration_samples=4,
                      seq_len=32, progress=False)
    pipeline.recover(RecoveryConfig(rank=4, alpha=4, activation="identity", init="svd"),
                     DistillConfig(steps=3, seq_len=32), text=str(tmp_path / "corpus.txt"), progress=False)
    original = pipeline.tune(task, on="original", config=TUNE, progress=False)
    inherited = pipeline.tune(task, init="inherit", inherit_from=original, recovery="both", config=TUNE,
                              progress=False)
    history = inherited.meta["metrics"]["history"]
    assert history[0]["val_accuracy"] >= 0.6  # the inherited LoRA works through the permutation from step 0
    vanilla = pipeline.tune(task, recovery="shared", config=TUNE, name="vanilla", progress=False)
    assert history[0]["val_accuracy"] >= vanilla.meta["metrics"]["history"][0]["val_accuracy"] + 0.2
    model = pipeline.model_for(inherited)
    assert any(isinstance(m, MoEFFN) for m in model.modules())
    # evaluation runs the adapter through the engine's routed paths; the standalone peft copy scores the same
    from cpet.data import template_for, verbalizer_for
    from cpet.data.tasks import as_task
    from cpet.evaluate import classification_accuracy

    loaded = as_task(task)
    test = loaded.split("test")
    peft_scored = classification_accuracy(model, pipeline.tokenizer, [e.text for e in test], [e.label for e in test],
                                          template=template_for(loaded), verbalizer=verbalizer_for(loaded),
                                          labels=loaded.labels)
    assert pipeline.evaluate(inherited, task, with_predictions=True)["predictions"] == list(peft_scored.predictions)


def test_batch_expert_union_is_the_share_of_experts_any_row_chooses():
    from cpet.compress.moefy import batch_expert_union

    model = tiny_model("llama").model
    base = compress(model, [MoEfyConfig(num_experts=8, top_k=2)], calibration=_calibration(model), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (6, 10), generator=torch.Generator().manual_seed(2))
    blocks = moe_blocks(base.model)
    one_row = batch_expert_union(base.model, ids[:1])
    assert one_row == pytest.approx(2 / 8)  # one row: exactly its top-2 of 8 per position
    six_rows = batch_expert_union(base.model, ids)
    # by hand: per layer and position, the experts chosen by any of the six rows
    unions = []
    hooks = [b.register_forward_hook(lambda b, i, o: unions.append(
        b.choose(i[0].reshape(-1, i[0].shape[-1])).reshape(6, 10, 8).any(0).float().mean())) for b in blocks]
    with torch.no_grad():
        base.model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert six_rows == pytest.approx(float(torch.stack(unions).mean()))
    assert 2 / 8 < six_rows <= 1.0
    for block in blocks:
        block.top_k = 8
    counts = [(block.chosen_experts, block.routed_tokens) for block in blocks]  # from the forward by hand
    assert batch_expert_union(base.model, ids[:1]) == 1.0
    assert counts[0][1] > 0 and [(b.chosen_experts, b.routed_tokens) for b in blocks] == counts  # left alone
    with pytest.raises(ValueError, match="needs a MoEfied model"):
        batch_expert_union(model, ids)


def test_batch_expert_union_runs_the_model_in_eval_mode_and_gives_its_mode_back():
    """In train mode the attention dropout changed the routers' inputs: the share moved from call to call."""
    from cpet.compress.moefy import batch_expert_union

    model = tiny_model("llama", attention_dropout=0.5).model
    base = compress(model, [MoEfyConfig(num_experts=8, top_k=2)], calibration=_calibration(model), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (6, 10), generator=torch.Generator().manual_seed(2))
    evaluated = batch_expert_union(base.model.eval(), ids)
    base.model.train()
    torch.manual_seed(0)
    assert [batch_expert_union(base.model, ids) for _ in range(3)] == [evaluated] * 3
    assert all(module.training for module in base.model.modules())


def test_validation_predicts_the_width_of_layers_that_pruning_leaves_whole():
    """A layer at FFN ratio 0 keeps every channel whatever round_to says: the MoEfy check before any work must
    count the width pruning will really leave (128 here), not the rounded-down 96."""
    from cpet.compress.prune import planned_ffn_widths

    model = tiny_model("llama").model  # FFN width 128
    heads_only = PruneConfig(head_ratio=0.5, round_to=48, importance="magnitude")
    assert planned_ffn_widths(model, [heads_only]) == [128] * model.config.num_hidden_layers
    calibration = _calibration(model)
    validate_stages(model, [heads_only, MoEfyConfig(num_experts=64, top_k=32)], calibration=calibration)
    with pytest.raises(ValueError, match="48"):
        validate_stages(model, [heads_only, MoEfyConfig(num_experts=48, top_k=24)], calibration=calibration)


def test_routers_trained_on_other_calibration_give_another_base_id():
    """With clustering="weights" the partition ignores calibration, but the routers are trained on it: two such
    bases compute differently and must not share a base_id (adapters of one would be accepted on the other)."""
    model = tiny_model("llama").model
    config = MoEfyConfig(num_experts=4, top_k=2, clustering="weights", router_steps=20)
    one = compress(model, [config], calibration=_calibration(model), progress=False)
    other_tokens = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(7))
    other = compress(model, [config], calibration=other_tokens, progress=False)
    assert one.manifest.index_digest == other.manifest.index_digest  # the same partition
    assert one.manifest.trained_digest and one.manifest.trained_digest != other.manifest.trained_digest
    assert one.base_id != other.base_id
    again = compress(model, [config], calibration=_calibration(model), progress=False)
    assert again.base_id == one.base_id  # the same calibration: the same id
    dense = compress(model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    assert dense.manifest.trained_digest == "" and "trained_digest" not in dense.manifest.identity_payload()


def test_an_ffn_that_computes_something_else_is_refused_whatever_its_width(monkeypatch):
    # 129 neurons: odd, so no two-expert probe; three experts divide it
    model = tiny_model("llama", intermediate_size=129).model
    block = model.model.layers[0].mlp
    dense = block.forward
    monkeypatch.setattr(block, "forward", lambda x: 2 * dense(x) + 1)  # not down(act(gate(x)) * up(x))
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match="computes something other than down"):
        compress(model, [MoEfyConfig(num_experts=3, top_k=1)], calibration=_calibration(model), progress=False)


def test_quantized_input_and_malformed_calibration_are_refused_before_any_work(monkeypatch):
    loaded = tiny_model("llama")
    quantized = compress(loaded.model, [QuantizeConfig("nf4")], progress=False).model
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match="already quantized"):
        compress(quantized, [MoEfyConfig(num_experts=4)], calibration=_calibration(loaded.model), progress=False)
    good = _calibration(loaded.model)
    for bad in (good[0], good[:0], good.float()):
        with pytest.raises(ValueError, match=r"calibration must be calibration windows \[n, seq\] of token ids"):
            compress(loaded.model, [MoEfyConfig(num_experts=4)], calibration=bad, progress=False)
    # behind a stage that needs no calibration: refused before that stage runs (was after it, in MoEfication)
    before = model_fingerprint(loaded.model)
    for bad, message in ((good[:0], r"calibration must be calibration windows"),
                         (good + loaded.model.config.vocab_size, r"token ids from \d+ to \d+, outside this model's "
                                                                  r"vocabulary of \d+"),
                         # windows past the model's 256 positions: rotary positions it never saw
                         (torch.zeros(2, 257, dtype=torch.long), r"a calibration window is 257 tokens, more than "
                                                                 r"the 256 positions")):
        with pytest.raises(ValueError, match=message):
            compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude"), MoEfyConfig(num_experts=4)],
                     calibration=bad, inplace=True, progress=False)
        assert model_fingerprint(loaded.model) == before


def test_a_moefied_ffn_passes_an_empty_batch_through():
    model = tiny_model("llama").model
    base = compress(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=_calibration(model), progress=False)
    block = moe_blocks(base.model)[0]
    assert block(torch.zeros(2, 0, 64)).shape == (2, 0, 64)


def test_routers_learn_from_the_inputs_of_the_model_moefied_so_far_when_asked(monkeypatch):
    """router_inputs="moefied": layer i's clustering and router see what layer i reads once layers 0..i-1 are
    MoEfied; layer 0 reads the same either way. The default leaves the config's dict (and base_id) as before."""
    import importlib

    from cpet.config import stage_config_to_dict

    moefy = importlib.import_module("cpet.compress.moefy")  # the module (cpet.compress.compress shadows its path)

    model = tiny_model("llama").model
    calibration = _calibration(model)
    dense = compress(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=calibration, progress=False)
    trained_on = []
    train_router = moefy.train_router
    monkeypatch.setattr(moefy, "train_router", lambda block, tokens, *a: trained_on.append(tokens) or
                        train_router(block, tokens, *a))
    moefied = compress(model, [MoEfyConfig(num_experts=4, top_k=2, router_inputs="moefied")],
                       calibration=calibration, progress=False)
    monkeypatch.undo()
    # what layer 1 reads when only layer 0 is MoEfied (as the stage had it when it built layer 1)
    half = compress(model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=calibration, progress=False).model
    half.model.layers[1].mlp = model.model.layers[1].mlp
    layer0_dense, layer1_dense = moefy.ffn_inputs(model, calibration)
    assert torch.equal(trained_on[0], layer0_dense)
    assert torch.allclose(trained_on[1], moefy.ffn_inputs(half, calibration, layers=[1])[0], atol=1e-6)
    assert not torch.allclose(trained_on[1], layer1_dense, atol=1e-4)
    routers = [{k: v for k, v in b.model.state_dict().items() if "router" in k} for b in (dense, moefied)]
    first = [k for k in routers[0] if ".layers.0." in k]
    assert first and all(torch.equal(routers[0][k], routers[1][k]) for k in first)
    assert dense.base_id != moefied.base_id
    assert "router_inputs" not in stage_config_to_dict(MoEfyConfig(num_experts=4, top_k=2))
    # the calibration passes through MoEfied layers leave no expert counts behind (they would skew FLOPs)
    assert all((b.chosen_experts, b.routed_tokens) == (0, 0) for b in moe_blocks(moefied.model))


def test_ffn_inputs_of_some_layers_stop_each_pass_at_the_last_of_them():
    from cpet.compress.moefy import ffn_inputs

    model = tiny_model("llama").model
    calls = []
    later = model.model.layers[1].register_forward_pre_hook(lambda module, args: calls.append(1))
    first = ffn_inputs(model, _calibration(model), layers=[0])[0]
    later.remove()
    assert calls == [] and first.shape == (4 * 32, model.config.hidden_size)
    assert all(not layer.mlp._forward_pre_hooks for layer in model.model.layers)  # removed after the stop
    assert torch.equal(ffn_inputs(model, _calibration(model), layers=[-1])[0], ffn_inputs(model, _calibration(model))[1])
    for bad in ([], [2], [-3]):
        with pytest.raises(ValueError, match="must name at least one of the model's 2 decoder layers"):
            ffn_inputs(model, _calibration(model), layers=bad)


def test_ffn_inputs_of_a_layer_named_twice_hold_each_token_once():
    """A layer named twice before the last one (``[0, 0, 1]``, or ``[0, -2, 1]`` on two layers) got two hooks
    that both appended to its list: its inputs came back with every token twice."""
    from cpet.compress.moefy import ffn_inputs

    model = tiny_model("llama").model
    calibration = _calibration(model)
    once = ffn_inputs(model, calibration)
    for layers in ([0, 0, 1], [0, -2, 1]):
        got = ffn_inputs(model, calibration, layers=layers)
        assert [tuple(t.shape) for t in got] == [tuple(once[0].shape)] * 2 + [tuple(once[1].shape)]
        assert torch.equal(got[0], once[0]) and torch.equal(got[1], once[0]) and torch.equal(got[2], once[1])


@pytest.mark.parametrize("quantize", [[], [QuantizeConfig("nf4", embeddings=True)]], ids=["moefied", "nf4-embeddings"])
def test_a_bf16_moefied_base_reloads_with_fp32_routers_and_the_same_logits(quantize, tmp_path):
    """The routers are trained in fp32; the rebuild on reload made them bf16 (13 of 50 tokens chose other experts,
    logits 2.3 off), and with quantized embeddings config.json recorded a router's fp32 as the base's dtype, so the
    whole base came back in fp32."""
    from cpet.models import load_base

    tiny = tiny_model("llama")
    tiny.model.save_pretrained(tmp_path / "source")
    tiny.tokenizer.save_pretrained(tmp_path / "source")
    loaded = load_base(str(tmp_path / "source"), dtype=torch.bfloat16)
    base = compress(loaded.model, [MoEfyConfig(num_experts=4, top_k=2, router_steps=5), *quantize],
                    calibration=_calibration(loaded.model), progress=False)
    base.save(tmp_path / "base")
    again = CompressedBase.load(tmp_path / "base")
    assert {b.router.proj.weight.dtype for b in moe_blocks(again.model)} == {torch.float32}
    assert again.model.get_output_embeddings().weight.dtype != torch.float32  # bf16, or packed 4-bit
    ids = _ids(loaded.model)
    with torch.no_grad():
        expected = base.model(input_ids=ids).logits
        assert expected.dtype == torch.bfloat16
        assert torch.equal(again.model(input_ids=ids).logits, expected)


def test_a_model_in_train_mode_with_dropout_in_its_ffn_is_moefied_and_warned_about():
    """The formula probe ran the dense block in the model's mode: left in train mode (as from_config builds it),
    Starcoder2's residual dropout made it random and a valid FFN was refused as "something other than down(...)";
    the MoEfied FFN applies no dropout, which training on the base should be told."""
    import warnings

    model = tiny_model("starcoder2", residual_dropout=0.1).model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = compress(model, [MoEfyConfig(num_experts=4, top_k=4)], calibration=_calibration(model),
                        progress=False)
    assert any("applies dropout in training, which the MoEfied FFN does not" in str(w.message) for w in caught)
    model.eval()
    with torch.no_grad():  # all experts chosen: the dense model in eval mode
        assert torch.allclose(base.model.eval()(_ids(model)).logits, model(_ids(model)).logits, atol=1e-4)


def test_the_model_card_of_an_adapter_on_a_moefied_base_loads_it_as_written(tmp_path):
    """The card said "per-layer FFN widths" and gave PeftModel.from_pretrained(base.model, DIR), which refuses a
    LoRA on MoE expert banks: its own snippet failed."""
    import re

    from cpet.pipeline import CPET

    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    task = write_task(tmp_path / "task.jsonl")
    pipeline = CPET(tiny_model("llama"), tmp_path / "work")
    pipeline.compress([MoEfyConfig(num_experts=4, top_k=2)], calibration=str(tmp_path / "corpus.txt"),
                      calibration_samples=4, seq_len=32, progress=False)
    adapter = pipeline.tune(task, config=TUNE.__class__(**{**TUNE.to_dict(), "steps": 2, "eval_every": 2}),
                            name="x", progress=False)
    card = (adapter.directory / "README.md").read_text()
    assert "MoE blocks (expert banks and routers), which plain `from_pretrained` cannot build" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("PATH/TO/THIS/DIRECTORY",
                                                                            str(adapter.directory))
    scope: dict = {}
    exec(snippet, scope)  # the card's own code, as a reader would run it
    ids = torch.tensor([[1, 7, 42, 3, 99]])
    with torch.no_grad():
        assert torch.equal(scope["model"](input_ids=ids).logits, pipeline.model_for("x")(input_ids=ids).logits)
