from __future__ import annotations

import copy
import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from cpet.compress import CompressedBase, calibration_ids, compress
from cpet.compress.prune import valid_head_ratios
from cpet.config import HeadMode, PruneConfig
from cpet.models import family_of, geometry, layer_linears, tiny_model

prune_module = importlib.import_module("cpet.compress.prune")  # the package's `prune` is the function

TEXT = "calibration text for tiny models, long enough for a few windows. " * 20
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120]])


def calib(tokenizer):
    return calibration_ids(tokenizer, TEXT, n_samples=4, seq_len=32)


CASES = [  # family, config
    ("llama", PruneConfig(ffn_ratio=0.25, head_ratio=0.5, importance="taylor")),
    ("qwen2", PruneConfig(ffn_ratio=0.5, head_ratio=0.5, importance="activation")),
    ("gemma", PruneConfig(ffn_ratio=0.25, head_ratio=0.5, importance="magnitude", head_mode="kv_group")),
    ("mistral", PruneConfig(ffn_ratio=0.25, importance="activation")),
    ("opt", PruneConfig(ffn_ratio=0.5, importance="taylor")),
]


@pytest.mark.parametrize("family, config", CASES)
def test_pruned_shapes_config_and_plain_reload(tmp_path, family, config):
    loaded = tiny_model(family)
    original = copy.deepcopy(loaded.model)
    base = compress(loaded.model, [config], calibration=calib(loaded.tokenizer), tokenizer=loaded.tokenizer,
                    progress=False)
    geo, before = geometry(base.model), geometry(original)
    kept_ffn = round(128 * (1 - config.ffn_ratio))
    assert geo.intermediate_size == kept_ffn
    assert geo.head_dim == before.head_dim
    if config.head_ratio:
        if config.head_mode == HeadMode.QUERY:
            assert (geo.num_heads, geo.num_kv_heads) == (2, 2)
        else:
            assert (geo.num_heads, geo.num_kv_heads) == (2, 1)
    for index in range(geo.num_layers):
        linears = layer_linears(base.model, index)
        assert linears["up"].out_features == kept_ffn == linears["down"].in_features
        assert linears["q"].out_features == geo.num_heads * geo.head_dim == linears["o"].in_features
        assert linears["k"].out_features == geo.num_kv_heads * geo.head_dim
    # the model still runs, and reloads with plain transformers giving the same logits
    base.save(tmp_path / "base")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert torch.allclose(plain(IDS).logits, base.model(IDS).logits, atol=1e-6)
        again = CompressedBase.load(tmp_path / "base")
        assert torch.equal(again.model(IDS).logits, plain(IDS).logits)
    assert again.manifest.base_id == base.manifest.base_id and again.index_maps == base.index_maps
    assert not any(p.requires_grad for p in again.model.parameters())
    assert loaded.model is not base.model  # not in place by default
    assert geometry(loaded.model) == before


@pytest.mark.parametrize("family, config", CASES)
def test_index_maps_reconstruct_pruned_weights_from_original(family, config):
    loaded = tiny_model(family)
    base = compress(loaded.model, [config], calibration=calib(loaded.tokenizer), progress=False)
    maps = base.index_maps
    for index in range(2):
        orig, pruned = layer_linears(loaded.model, index), layer_linears(base.model, index)
        ffn, q, kv = maps.ffn_rows(index), maps.q_rows(index), maps.kv_rows(index)
        for role in ("gate", "up"):
            if role in orig.modules:
                assert torch.equal(orig[role].weight[ffn], pruned[role].weight)
        assert torch.equal(orig["down"].weight[:, ffn], pruned["down"].weight)
        assert torch.equal(orig["q"].weight[q], pruned["q"].weight)
        assert torch.equal(orig["k"].weight[kv], pruned["k"].weight)
        assert torch.equal(orig["v"].weight[kv], pruned["v"].weight)
        assert torch.equal(orig["o"].weight[:, q], pruned["o"].weight)
        if orig["up"].bias is not None:
            assert torch.equal(orig["up"].bias[ffn], pruned["up"].bias)
            assert torch.equal(orig["down"].bias, pruned["down"].bias)


def test_query_mode_keeps_heads_per_kv_group_consistent():
    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(head_ratio=0.5, importance="magnitude")], progress=False)
    for index in range(2):
        heads = base.index_maps.layers[index].q_heads.tolist()
        assert len(heads) == 2 and heads[0] in (0, 1) and heads[1] in (2, 3)  # one per KV group of 2

    # and the important ones: head 1 made large and head 2 zero in layer 0 (16 rows of q, 16 columns of o each)
    loaded = tiny_model("llama")
    with torch.no_grad():
        q, o = layer_linears(loaded.model, 0)["q"].weight, layer_linears(loaded.model, 0)["o"].weight
        q[16:32].mul_(100.0), o[:, 16:32].mul_(100.0)
        q[32:48].zero_(), o[:, 32:48].zero_()
    base = compress(loaded.model, [PruneConfig(head_ratio=0.5, importance="magnitude")], progress=False)
    assert base.index_maps.layers[0].q_heads.tolist() == [1, 3]


def test_kv_group_mode_keeps_the_important_group():
    loaded = tiny_model("llama")  # 2 KV groups of 2 query heads; group 1 = KV head 1 and query heads 2, 3
    with torch.no_grad():
        for role in ("k", "v"):
            layer_linears(loaded.model, 0)[role].weight[16:32].mul_(100.0)
    base = compress(loaded.model, [PruneConfig(head_ratio=0.5, head_mode="kv_group", importance="magnitude")],
                    progress=False)
    assert base.index_maps.layers[0].kv_heads.tolist() == [1]
    assert base.index_maps.layers[0].q_heads.tolist() == [2, 3]


def test_two_prune_stages_compose_into_original_coordinates():
    loaded = tiny_model("llama")
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude"),
                                   PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    rows = base.index_maps.ffn_rows(0)
    assert len(rows) == 32
    assert torch.equal(layer_linears(loaded.model, 0)["up"].weight[rows], layer_linears(base.model, 0)["up"].weight)


def test_magnitude_keeps_the_largest_groups():
    loaded = tiny_model("llama")
    with torch.no_grad():
        layer_linears(loaded.model, 0)["up"].weight[7].mul_(100.0)
        layer_linears(loaded.model, 0)["up"].weight[9].mul_(0.0)
        layer_linears(loaded.model, 0)["gate"].weight[9].mul_(0.0)
        layer_linears(loaded.model, 0)["down"].weight[:, 9].mul_(0.0)
    base = compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    kept = base.index_maps.ffn_rows(0).tolist()
    assert 7 in kept and 9 not in kept


@pytest.mark.parametrize("importance", ["magnitude", "activation", "taylor"])
def test_each_importance_keeps_the_channels_its_formula_ranks_highest(importance):
    """The kept FFN channels of every layer are the top half under the importance computed here by hand:
    per weight |W|, |W| * rms(input feature) or |W * dL/dW|, summed over gate/up rows and down columns."""
    loaded = tiny_model("llama")
    model = loaded.model
    calibration = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    probe = copy.deepcopy(model)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in probe.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    probe(input_ids=calibration, labels=calibration).loss.backward()
    for hook in hooks:
        hook.remove()
    base = compress(model, [PruneConfig(ffn_ratio=0.5, importance=importance)], calibration=calibration,
                    progress=False)
    for i, layer in enumerate(probe.model.layers):
        scores = {}
        for role in ("gate", "up", "down"):
            linear = getattr(layer.mlp, f"{role}_proj")
            weight = linear.weight.detach()
            if importance == "magnitude":
                scores[role] = weight.abs()
            elif importance == "activation":
                x = inputs[f"model.layers.{i}.mlp.{role}_proj"].reshape(-1, weight.shape[1])
                scores[role] = weight.abs() * x.pow(2).mean(0).sqrt()
            else:
                scores[role] = (weight * linear.weight.grad).abs()
        channel = scores["gate"].sum(1) + scores["up"].sum(1) + scores["down"].sum(0)
        expected = sorted(channel.argsort(descending=True)[:channel.numel() // 2].tolist())
        assert base.index_maps.ffn_rows(i).tolist() == expected, (importance, i)


def test_per_layer_schedule_needs_the_cpet_loader(tmp_path):
    loaded = tiny_model("llama")
    config = PruneConfig(layer_schedule={0: 0.5, 1: 0.25}, importance="magnitude")
    base = compress(loaded.model, [config], progress=False)
    assert base.index_maps.widths()[0]["ffn"] == 64 and base.index_maps.widths()[1]["ffn"] == 96
    assert not base.manifest.uniform
    base.save(tmp_path / "b")
    again = CompressedBase.load(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again.model(IDS).logits, base.model(IDS).logits)


def test_valid_head_ratios_listing():
    assert valid_head_ratios(9, 3, HeadMode.QUERY) == [0.0, 0.333333, 0.666667]
    assert valid_head_ratios(8, 4, HeadMode.KV_GROUP) == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("family, kwargs, calibrated, message", [
    ("llama", dict(head_ratio=0.25), True, r"head_ratio 0.25 does not fit 4 query heads in 2 KV groups.*\[0.0, 0.5\]"),
    ("opt", dict(head_ratio=0.5), True, "cannot be pruned"),
    ("llama", dict(ffn_ratio=0.25, importance="taylor"), False, "needs calibration batches"),
    ("llama", dict(ffn_ratio=0.25, importance="activation"), False, "needs calibration batches"),
    ("llama", dict(layer_schedule={5: 0.5}, importance="magnitude"), False, r"layers \[5\]"),
    ("llama", dict(ffn_ratio=0.5, round_to=256, importance="magnitude"), False,
     "round_to 256 keeps all 128 FFN channels of layer 0.*prune nothing"),
])
def test_bad_prune_input_fails_before_work(family, kwargs, calibrated, message, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("scoring started before the input was checked")

    monkeypatch.setattr(prune_module, "element_scores", no_work)
    loaded = tiny_model(family)
    with pytest.raises(ValueError, match=message):
        compress(loaded.model, [PruneConfig(**kwargs)], calibration=calib(loaded.tokenizer) if calibrated else None,
                 progress=False)


def test_a_second_head_pruning_is_checked_against_the_heads_the_first_leaves(monkeypatch):
    loaded = tiny_model("llama")  # 4 query heads in 2 KV groups: 0.5 leaves 2 heads, one per group
    done = []
    real = prune_module.element_scores
    monkeypatch.setattr(prune_module, "element_scores", lambda *a, **k: done.append(1) or real(*a, **k))
    halves = [PruneConfig(head_ratio=0.5, importance="magnitude")] * 2
    with pytest.raises(ValueError, match=r"head_ratio 0.5 does not fit 2 query heads in 2 KV groups.*\[0.0\]"):
        compress(loaded.model, halves, progress=False)
    assert done == []  # refused before the first stage ran
    base = compress(loaded.model, halves[:1] + [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    assert base.model.config.num_attention_heads == 2


def test_an_already_compressed_input_is_named_as_such():
    from cpet.config import QuantizeConfig

    quantized = compress(tiny_model("llama").model, [QuantizeConfig("nf4")], progress=False).model
    for stage in (PruneConfig(ffn_ratio=0.5, importance="magnitude"), QuantizeConfig("nf4")):
        with pytest.raises(ValueError, match="the input model is already quantized: compress takes the full-preci"):
            compress(quantized, [stage], progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ffn_ratio=1.0), r"ffn_ratio must be in \[0, 1\)"),
    (dict(ffn_ratio=-0.1), r"ffn_ratio must be in \[0, 1\)"),
    (dict(head_ratio=1.5), r"head_ratio must be in \[0, 1\)"),
    (dict(), "prunes nothing"),
    (dict(layer_schedule={0: 0.0}), "prunes nothing"),  # was accepted, scored and traced, and changed nothing
    (dict(ffn_ratio=0.2, importance="random"), "'random' is not a valid Importance"),
])
def test_bad_prune_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


def test_family_map_used_by_pruning_covers_every_family():
    for family in ("llama", "qwen2", "gemma", "mistral", "opt"):
        assert family_of(tiny_model(family).model).name == family


def test_taylor_importance_takes_gradients_of_the_mapped_linears_only_and_leaves_none_behind():
    from cpet.compress.prune import element_scores

    model = tiny_model("llama").model
    model.requires_grad_(True)  # as a freshly loaded model is: everything trainable
    model.model.norm.weight.requires_grad_(False)  # and one flag that must come back as it was
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    seen = {}
    hook = model.model.embed_tokens.weight.register_hook(lambda grad: seen.setdefault("embedding", grad))
    calibration = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = element_scores(model, PruneConfig(ffn_ratio=0.5, importance="taylor").importance, calibration)
    hook.remove()
    assert float(scores["model.layers.0.mlp.up_proj"].sum()) > 0
    assert "embedding" not in seen  # no embedding gradient computed (on SmolLM2: 113 MB per batch)
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_taylor_importance_sums_the_batches_gradients_in_fp32_on_a_bf16_model():
    """Autograd accumulates .grad in the weight's dtype: on a bf16 model every added batch was rounded to 8 bits of
    mantissa. The scores must be |W * sum of the batches' gradients| with the sum taken in fp32."""
    from cpet.compress.prune import element_scores

    model = tiny_model("llama").model.to(torch.bfloat16)
    calibration = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    name, linear = "model.layers.0.mlp.up_proj", model.model.layers[0].mlp.up_proj
    expected = torch.zeros_like(linear.weight, dtype=torch.float32)
    for batch in calibration.split(1):  # each batch's own bf16 gradient, summed in fp32 in the same order
        model(input_ids=batch, labels=batch).loss.backward()
        expected += linear.weight.grad
        model.zero_grad(set_to_none=True)
    expected = (linear.weight.detach().float() * expected).abs()
    scores = element_scores(model, PruneConfig(ffn_ratio=0.5, importance="taylor").importance, calibration,
                            batch_size=1)
    assert scores[name].dtype == torch.float32
    assert torch.equal(scores[name], expected)


def test_pruning_does_not_warn_about_the_norm_weights_it_never_prunes():
    """torch-pruning listed every RMSNorm weight ("Unwrapped parameters detected") on every compress and demo run;
    CPET never prunes the hidden size those weights follow."""
    import warnings

    loaded = tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress(loaded.model, [PruneConfig(ffn_ratio=0.25, importance="magnitude")], progress=False)
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]


def test_activation_statistics_do_not_depend_on_the_models_training_flag():
    """A model left in train mode (from_config starts there) gave dropout-noised activation statistics: two runs
    kept other channels than each other and than the model in eval mode."""
    from cpet.models import tiny_config

    config = tiny_config("opt", dropout=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.training
    calibration = torch.randint(0, config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    stages = [PruneConfig(ffn_ratio=0.5, importance="activation")]
    ids = []
    for seed in (0, 1):  # other dropout draws, if dropout were on
        torch.manual_seed(seed)
        ids.append(compress(model, stages, calibration=calibration, progress=False).base_id)
    assert model.training  # the caller's flag is left as it was
    model.eval()
    assert ids == [compress(model, stages, calibration=calibration, progress=False).base_id] * 2


def _head_scores(model, index):
    linears = layer_linears(model, index)
    q, o, k, v = (linears[r].weight.detach().abs() for r in ("q", "o", "k", "v"))
    per_query = torch.stack([q[h * 16:(h + 1) * 16].sum() + o[:, h * 16:(h + 1) * 16].sum() for h in range(4)])
    per_group = torch.stack([per_query[2 * g:2 * g + 2].sum() + k[g * 16:(g + 1) * 16].sum()
                             + v[g * 16:(g + 1) * 16].sum() for g in range(2)])
    return per_query, per_group


def test_query_head_importance_is_its_q_rows_plus_its_o_columns():
    """The tests above scale a head's q rows and o columns together, so a score of either half alone (or of o's
    columns grouped on the wrong axis) ranked heads the same. Here the halves disagree."""
    loaded = tiny_model("llama")  # 4 query heads of 16 in 2 KV groups: heads {0, 1} and {2, 3}
    with torch.no_grad():
        linears = layer_linears(loaded.model, 0)
        linears["q"].weight[0:16].mul_(3.0)  # head 0: larger q rows
        linears["o"].weight[:, 16:32].mul_(6.0)  # head 1: much larger o columns
        linears["q"].weight[32:48].mul_(3.0)  # same in group 1: head 2 q, head 3 o
        linears["o"].weight[:, 48:64].mul_(6.0)
    per_query, _ = _head_scores(loaded.model, 0)
    expected = [int(per_query[:2].argmax()), 2 + int(per_query[2:].argmax())]
    assert expected == [1, 3]  # q + o picks the o-heavy heads; q alone would pick [0, 2]
    base = compress(loaded.model, [PruneConfig(head_ratio=0.5, importance="magnitude")], progress=False)
    assert base.index_maps.layers[0].q_heads.tolist() == expected
    per_query, _ = _head_scores(loaded.model, 1)  # the untouched layer: the formula by hand, too
    assert base.index_maps.layers[1].q_heads.tolist() == [int(per_query[:2].argmax()), 2 + int(per_query[2:].argmax())]


def test_kv_group_importance_adds_its_query_heads_to_its_kv_rows():
    """The test above lets k/v decide alone, so scoring a group by its k/v rows only passed it."""
    loaded = tiny_model("llama")
    with torch.no_grad():
        linears = layer_linears(loaded.model, 0)
        for role in ("k", "v"):
            linears[role].weight[0:16].mul_(3.0)  # group 0: larger k/v rows
        linears["q"].weight[32:64].mul_(4.0)  # group 1: much larger query heads 2, 3
        linears["o"].weight[:, 32:64].mul_(4.0)
    _, per_group = _head_scores(loaded.model, 0)
    assert int(per_group.argmax()) == 1
    k, v = (linears[r].weight.detach().abs() for r in ("k", "v"))
    assert k[0:16].sum() + v[0:16].sum() > k[16:32].sum() + v[16:32].sum()  # k/v alone would keep group 0
    base = compress(loaded.model, [PruneConfig(head_ratio=0.5, head_mode="kv_group", importance="magnitude")],
                    progress=False)
    assert base.index_maps.layers[0].kv_heads.tolist() == [1]
    assert base.index_maps.layers[1].kv_heads.tolist() == [int(_head_scores(loaded.model, 1)[1].argmax())]


def test_bf16_importance_is_summed_in_fp32_so_near_ties_keep_the_larger_channel():
    """On a bf16 model (CPET's default on CUDA) the per-channel sums were taken in bf16: 256 + 1 and 256 + 0.5 both
    round to 256 there (8 bits of mantissa), so the tie went to the lower index and pruning kept the channel its
    importance ranks lower. Here channel 64 (257) must be kept over channel 63 (256.5)."""
    loaded = tiny_model("llama")
    model = loaded.model.to(torch.bfloat16)
    with torch.no_grad():
        linears = layer_linears(model, 0)
        gate, up, down = linears["gate"].weight, linears["up"].weight, linears["down"].weight
        for w in (gate, up, down):
            w.mul_(1e-3)  # every channel unimportant ...
        gate[:63].fill_(8.0)  # ... but 63 clear winners (512 each)
        for channel, extra in ((63, 0.5), (64, 1.0)):  # and two near-tied candidates for the last place
            gate[channel].fill_(4.0)  # row sum 256, exact in bf16
            up[channel].zero_()
            up[channel, 0] = extra
            down[:, channel].zero_()
    base = compress(model, [PruneConfig(ffn_ratio=0.5, importance="magnitude")], progress=False)
    kept = base.index_maps.ffn_rows(0).tolist()
    assert kept == list(range(63)) + [64]


def test_taylor_importance_refuses_one_token_windows_before_work(monkeypatch):
    """Windows of one token give the LM loss nothing to predict (NaN loss, NaN gradients): every channel scored NaN
    and pruning silently kept the lowest indices (channels 0..63 of 128), whatever the weights. compress accepts
    [n, 1] windows (activation importance can use them), so Taylor must refuse them itself, before any work."""
    def no_work(*args, **kwargs):
        raise AssertionError("scoring started before the input was checked")

    monkeypatch.setattr(prune_module, "element_scores", no_work)
    loaded = tiny_model("llama")
    one_token = torch.randint(0, 250, (4, 1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="taylor importance needs calibration windows of at least 2 tokens"):
        compress(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="taylor")], calibration=one_token,
                 progress=False)
    from cpet.compress import validate_stages  # the zero-row placeholder CPET.check_stages passes is still accepted
    validate_stages(loaded.model, [PruneConfig(ffn_ratio=0.5, importance="taylor")],
                    calibration=torch.empty((0, 1), dtype=torch.long))


def test_a_ratio_too_small_to_remove_a_channel_is_named_as_such_not_blamed_on_round_to():
    """A ratio that removes under half a channel keeps the whole layer at any round_to: the refusal said "round_to 1
    keeps all 128 FFN channels ... use a smaller round_to", a fix that does not exist."""
    loaded = tiny_model("llama")
    for config, layer in ((PruneConfig(ffn_ratio=0.003, importance="magnitude"), 0),
                          (PruneConfig(ffn_ratio=0.5, layer_schedule={1: 0.002}, importance="magnitude"), 1)):
        with pytest.raises(ValueError, match=rf"ratio 0.00\d removes no channel of the 128 of layer {layer} "
                                             r"\(it rounds to 0\): use a ratio of at least 0.00781") as caught:
            compress(loaded.model, [config], progress=False)
        assert "round_to" not in str(caught.value)
