"""Activation sparsity tools (cpet.sparsity) on tiny models: CETT, thresholds, PPL-p%, the magnitude baseline."""

from __future__ import annotations

import json

import pytest
import torch

from cpet.models import tiny_model
from cpet.sparsity import (ActivationMask, collect_ffn_activations, magnitude_thresholds, plot_activation_ratios,
                           ppl_p_sparsity, sparsity_report)

TEXT = ("The quick brown fox jumps over the lazy dog while the sun sets slowly behind the hills. " * 40)


def calibration(vocab: int, n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "opt", "phi"])  # SiLU/GLU, ReLU and GELU FFNs
def measured(request):
    loaded = tiny_model(request.param)
    return loaded, collect_ffn_activations(loaded.model, calibration(loaded.model.config.vocab_size))


def test_activations_are_the_down_inputs_of_every_layer(measured):
    from cpet.models import iter_layer_linears

    loaded, acts = measured
    assert acts.num_layers == loaded.model.config.num_hidden_layers and acts.tokens == 4 * 32
    assert acts.acts[0].shape[1] == acts.down[0].shape[1]
    outputs = []  # what each down linear gives on the same tokens: it must be W_down a (+ bias) of the captured a
    hooks = [linears["down"].register_forward_hook(lambda m, i, o: outputs.append(o.reshape(-1, o.shape[-1])))
             for linears in iter_layer_linears(loaded.model)]
    with torch.no_grad():
        loaded.model(input_ids=calibration(loaded.model.config.vocab_size))
    for hook in hooks:
        hook.remove()
    for layer, linears in enumerate(iter_layer_linears(loaded.model)):
        bias = linears["down"].bias if linears["down"].bias is not None else 0
        assert torch.allclose(acts.acts[layer] @ acts.down[layer].T + bias, outputs[layer], atol=1e-5)
    if loaded.model.config.model_type == "opt":  # ReLU: many exact zeros; SiLU: none
        assert 0.2 < acts.activation_ratio(0, 0.0) < 0.8
    else:
        assert acts.activation_ratio(0, 0.0) > 0.99


def test_cett_is_zero_at_zero_and_one_above_the_largest_contribution(measured):
    _, acts = measured
    for layer in range(acts.num_layers):
        assert acts.cett(layer, 0.0) == pytest.approx(0.0, abs=1e-7)
        top = float(acts.contributions(layer).max())
        assert acts.cett(layer, top * 1.0001) == pytest.approx(1.0, abs=1e-6)
        assert acts.activation_ratio(layer, top * 1.0001) == 0.0
        # in between: the mean over tokens of ||sum of the contributions at or below eps|| / ||FFN output||,
        # computed here from the activations and W_down (a ratio of sums, or a sum of norms, would differ)
        a, w = acts.acts[layer].float(), acts.down[layer].float()
        contributions = a.abs() * w.norm(dim=0)
        for q in (0.3, 0.7, 0.95):
            eps = float(torch.quantile(contributions[contributions > 0], q))
            tail = ((a * (contributions <= eps)) @ w.T).norm(dim=1)
            output = (a @ w.T).norm(dim=1)
            assert acts.cett(layer, eps) == pytest.approx(float((tail / output).mean()), rel=1e-5)


def test_threshold_search_lands_on_the_target_cett_and_sparsifies(measured):
    _, acts = measured
    for target in (0.05, 0.2, 0.5):
        eps = acts.threshold_for_cett(0, target)
        assert acts.cett(0, eps) <= target + 1e-6
        assert acts.cett(0, eps) == pytest.approx(target, abs=0.03)  # 128 tokens x 128 neurons: fine steps
    assert acts.activation_ratio(0, acts.threshold_for_cett(0, 0.5)) < acts.activation_ratio(
        0, acts.threshold_for_cett(0, 0.05))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        acts.threshold_for_cett(0, 1.5)


def test_magnitude_thresholds_keep_the_asked_share_and_the_mask_applies_them(measured):
    loaded, acts = measured
    thresholds = magnitude_thresholds(acts, 0.3)
    ids = calibration(loaded.model.config.vocab_size)
    with torch.no_grad():
        dense = loaded.model(input_ids=ids).logits
        with ActivationMask(loaded.model, thresholds, "magnitude") as mask:
            sparse = loaded.model(input_ids=ids).logits
        again = loaded.model(input_ids=ids).logits
    assert mask.active_share == pytest.approx(0.3, abs=0.02)  # the calibration tokens themselves
    assert not torch.allclose(dense, sparse)
    # the activations it zeroes are exactly those it does not count: the down projection's input before the mask
    # (a hook registered first) against after it (a hook registered after the mask's)
    from cpet.models import iter_layer_linears

    down = next(iter(iter_layer_linears(loaded.model)))["down"]  # layer 0's
    raw, masked = [], []
    before = down.register_forward_pre_hook(lambda module, inputs: raw.append(inputs[0].clone()))
    with torch.no_grad(), ActivationMask(loaded.model, thresholds, "magnitude"):
        after = down.register_forward_pre_hook(lambda module, inputs: masked.append(inputs[0].clone()))
        loaded.model(input_ids=ids)
    before.remove(), after.remove()
    assert torch.equal(masked[0], raw[0] * (raw[0].abs() > thresholds[0]))
    assert torch.equal(dense, again)  # hooks removed on exit
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        magnitude_thresholds(acts, 0.0)
    with pytest.raises(ValueError, match="thresholds for"):
        ActivationMask(loaded.model, thresholds[:1])


def test_the_active_share_counts_tokens_not_padding(measured):
    from cpet.sparsity import _down_modules

    loaded, acts = measured
    thresholds = magnitude_thresholds(acts, 0.3)
    ids = calibration(loaded.model.config.vocab_size)[:2, :16]
    padded = ids.clone()
    padded[1, 6:] = 0  # the second row: 6 tokens of text, 10 of padding
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    with torch.no_grad():
        with ActivationMask(loaded.model, thresholds, "magnitude") as batch:
            loaded.model(input_ids=padded, attention_mask=attention)
        with ActivationMask(loaded.model, thresholds, "magnitude") as alone:  # the same text, unpadded
            loaded.model(input_ids=ids[:1])
            loaded.model(input_ids=ids[1:, :6])
    width = sum(down.in_features for down in _down_modules(loaded.model))
    assert batch.total == alone.total == 22 * width
    assert abs(batch.kept - alone.kept) <= 2  # the same positions (float noise may flip one at a threshold)


def trained_tiny_llama(steps: int = 80):
    """A tiny llama fitted to TEXT, so that dropping FFN neurons costs perplexity (a random one gains)."""
    loaded = tiny_model("llama")
    ids = torch.tensor(loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    optimizer = torch.optim.Adam(loaded.model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    loaded.model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 64, (8,), generator=generator)
        batch = torch.stack([ids[s:s + 64] for s in starts.tolist()])
        loaded.model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loaded.model.eval().requires_grad_(False)
    return loaded


def test_ppl_p_search_lands_within_half_a_point_of_its_target():
    loaded = trained_tiny_llama()
    acts = collect_ffn_activations(loaded.model, calibration(loaded.model.config.vocab_size, n=8))
    result = ppl_p_sparsity(loaded.model, loaded.tokenizer, acts, TEXT, p=5.0, max_tokens=512)
    assert abs(result.rise_percent - 5.0) <= 0.5 and result.reached, result.points
    assert 0.0 < result.activation_ratio < 1.0 and result.sparsity == pytest.approx(1 - result.activation_ratio)
    assert len(result.thresholds) == acts.num_layers and result.dense_ppl < result.ppl
    # the reported ratio is the share its thresholds keep on the evaluation text, at the perplexity reported
    from cpet.sparsity import _perplexity

    norms = [acts.column_norms(i) for i in range(acts.num_layers)]
    with ActivationMask(loaded.model, result.thresholds, column_norms=norms) as mask:
        ppl = _perplexity(loaded.model, loaded.tokenizer, TEXT, 512)
    assert ppl == pytest.approx(result.ppl, rel=1e-6)
    assert result.activation_ratio == pytest.approx(mask.active_share, abs=1e-9)


def test_report_is_json_with_a_baseline_at_the_same_share_and_plots(tmp_path):
    loaded = trained_tiny_llama()
    report = sparsity_report(loaded.model, loaded.tokenizer, calibration(loaded.model.config.vocab_size), TEXT,
                             cett=0.2, ppl_p=5.0, max_tokens=256)
    json.dumps(report)  # JSON-ready
    assert [e["layer"] for e in report["layers"]] == list(range(loaded.model.config.num_hidden_layers))
    assert all(e["cett"] <= 0.2 + 1e-6 and 0 < e["activation_ratio"] < 1 for e in report["layers"])
    baseline = report["baseline"]
    # matched on the evaluation text, where calibration quantiles alone land off
    assert baseline["activation_ratio"] == pytest.approx(report["ppl_p"]["activation_ratio"], abs=0.005), baseline
    assert baseline["target_active_share"] == report["ppl_p"]["activation_ratio"]
    dense = report["ppl_p"]["dense_ppl"]  # the baseline's perplexity is measured with its mask on
    assert abs(baseline["ppl"] - dense) > 1e-3 * dense
    assert baseline["rise_percent"] == pytest.approx(100 * (baseline["ppl"] / dense - 1))
    png = plot_activation_ratios(report, tmp_path / "ratios.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_moefied_base_is_refused_with_a_message_not_measured_as_empty():
    """The routed block calls its experts directly, so down-input hooks would see nothing (an empty ``torch.cat``,
    or a mask that masks nothing with an active share of nan): refused, and the message says what to measure."""
    from cpet.compress import compress
    from cpet.compress.moefy import MoEfyConfig

    loaded = tiny_model("llama")
    tokens = calibration(loaded.model.config.vocab_size)
    base = compress(loaded.model, [MoEfyConfig(num_experts=4, top_k=2)], calibration=tokens, progress=False)
    with pytest.raises(ValueError, match="MoEfied.*before the MoEfy stage"):
        collect_ffn_activations(base.model, tokens)
    with pytest.raises(ValueError, match="MoEfied"):
        ActivationMask(base.model, [0.0] * base.model.config.num_hidden_layers)


def test_an_unreachable_ppl_p_target_is_reported_as_not_reached():
    loaded = tiny_model("llama")  # untrained: dropping every neuron cannot raise perplexity a millionfold
    acts = collect_ffn_activations(loaded.model, calibration(loaded.model.config.vocab_size))
    result = ppl_p_sparsity(loaded.model, loaded.tokenizer, acts, TEXT, p=1e6, max_tokens=128, max_probes=3)
    assert not result.reached and abs(result.rise_percent - 1e6) > result.tolerance and len(result.points) == 3


@pytest.mark.parametrize("kwargs, message", [({"max_probes": 0}, "max_probes >= 1"),
                                             ({"search_tokens": 0}, "search_tokens is a number of tokens"),
                                             ({"search_tokens": 2.5}, "search_tokens is a number of tokens"),
                                             ({"tolerance": -1.0}, "tolerance is in percentage points")])
def test_bad_search_settings_are_refused_before_any_measurement(measured, kwargs, message):
    loaded, acts = measured
    with pytest.raises(ValueError, match=message):
        ppl_p_sparsity(loaded.model, loaded.tokenizer, acts, TEXT, p=1.0, **kwargs)


def test_bad_calibration_and_bisection_settings_are_refused(measured):
    loaded, acts = measured
    for tokens in (torch.zeros(0, 8, dtype=torch.long), torch.arange(8)):
        with pytest.raises(ValueError, match=r"calibration windows \[n, seq\]"):
            collect_ffn_activations(loaded.model, tokens)
    with pytest.raises(ValueError, match="iterations >= 1"):
        acts.threshold_for_cett(0, 0.2, iterations=0)


def test_an_activation_mask_applies_once(measured):
    loaded, acts = measured
    mask = ActivationMask(loaded.model, [0.0] * acts.num_layers)
    with mask:
        with pytest.raises(RuntimeError, match="applied already"):
            mask.__enter__()
    with pytest.raises(RuntimeError, match="applied already"):  # after it, too: its counts belong to one run
        with mask:
            pass


def test_the_matched_baseline_refuses_bad_settings_and_says_when_a_share_is_out_of_reach():
    from cpet.sparsity import matched_magnitude_baseline

    loaded = tiny_model("opt")  # ReLU: about half of the activations are exactly zero
    acts = collect_ffn_activations(loaded.model, calibration(loaded.model.config.vocab_size))
    for kwargs, message in (({"max_probes": 0}, "max_probes >= 1"), ({"tolerance": -0.1}, "tolerance is a share")):
        with pytest.raises(ValueError, match=message):
            matched_magnitude_baseline(loaded.model, loaded.tokenizer, acts, TEXT, 0.3, **kwargs)
    nonzero = sum(acts.activation_ratio(i) * acts.acts[i].shape[1] for i in range(acts.num_layers)) / sum(
        a.shape[1] for a in acts.acts)
    between = (nonzero + 1) / 2  # more than every non-zero activation, fewer than all of them
    out = matched_magnitude_baseline(loaded.model, loaded.tokenizer, acts, TEXT, between, max_tokens=128)
    assert not out["reached"] and len(out["probes"]) < 6  # it stopped going round in circles
    reachable = matched_magnitude_baseline(loaded.model, loaded.tokenizer, acts, TEXT, nonzero / 2, max_tokens=128)
    assert reachable["reached"] and abs(reachable["activation_ratio"] - nonzero / 2) <= 0.005


def test_windows_past_the_context_are_refused_before_any_forward():
    loaded = tiny_model("opt")  # learned positions: a 257th position was an IndexError inside the forward
    with pytest.raises(ValueError, match=r"an activation window is 257 tokens, more than the 256 positions"):
        collect_ffn_activations(loaded.model, calibration(loaded.model.config.vocab_size, n=1, seq=257))


@pytest.mark.parametrize("options, message", [({"search_tokens": 0}, r"search_tokens is a number of tokens >= 1"),
                                              ({"cett": 1.5}, r"cett is a share of the FFN output norm in \[0, 1\]"),
                                              ({"ppl_p": 0.0}, r"ppl_p is a perplexity rise in percent"),
                                              ({"max_tokens": 1}, r"max_tokens must be >= 2")])
def test_report_options_are_refused_before_the_activations(monkeypatch, options, message):
    """search_tokens=0 was a ZeroDivisionError; the others came after the activations (ppl_p after the bisections)."""
    import cpet.sparsity

    monkeypatch.setattr(cpet.sparsity, "collect_ffn_activations", lambda *a, **k: pytest.fail("activations ran"))
    loaded = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        sparsity_report(loaded.model, loaded.tokenizer, calibration(loaded.model.config.vocab_size), TEXT, **options)


def test_a_model_of_a_short_context_is_measured_in_windows_that_fit_it():
    """The perplexity window was a fixed 256 tokens: a model of 128 positions was refused after all the work."""
    loaded = tiny_model("llama", max_position_embeddings=128)
    report = sparsity_report(loaded.model, loaded.tokenizer, calibration(loaded.model.config.vocab_size), TEXT,
                             ppl_p=5.0, max_tokens=512)
    assert report["ppl_p"]["dense_ppl"] > 1 and report["baseline"]["ppl"] > 1


def test_a_down_projection_with_a_lora_is_refused_not_measured_without_it():
    """The contributions read W_down alone: with a LoRA on down_proj the captured activations times W_down were
    7.9 off the layer's real output (of size ~14), silently."""
    from cpet.adapters import add_lora

    loaded = tiny_model("llama")
    adapted = add_lora(loaded.model, rank=4, alpha=8, dropout=0.0)
    tokens = calibration(loaded.model.config.vocab_size)
    with pytest.raises(ValueError, match="down projection of layer 0 carries a peft adapter.*merge_and_unload"):
        collect_ffn_activations(adapted, tokens)
    with pytest.raises(ValueError, match="carries a peft adapter"):
        ActivationMask(adapted, [0.0] * loaded.model.config.num_hidden_layers)


def test_a_down_projection_with_an_enabled_recovery_bypass_is_refused_not_measured_without_it():
    """Recovery adds ``bypass(a)`` to the down linear's output by a forward hook, which the contributions
    ``|a_i| * ||W_down[:, i]||`` and ``||y||`` leave out: the measures described another function than the model
    runs (and the mask's perplexity ran with the bypass), without a word. A disabled set adds nothing: measured."""
    from cpet.recovery import RecoveryConfig, RecoverySet

    loaded = tiny_model("llama")
    tokens = calibration(loaded.model.config.vocab_size)
    dense = collect_ffn_activations(loaded.model, tokens)
    recovery = RecoverySet(loaded.model, RecoveryConfig(rank=2, activation="identity", target_roles=("down",)))
    recovery.attach(loaded.model)
    with torch.no_grad():
        for bypass in recovery.bypasses.values():
            bypass.B.weight.normal_()
    layers = loaded.model.config.num_hidden_layers
    with pytest.raises(ValueError, match="down projection of layer 0 carries a recovery bypass.*detach"):
        collect_ffn_activations(loaded.model, tokens)
    with pytest.raises(ValueError, match="carries a recovery bypass"):
        ActivationMask(loaded.model, [0.0] * layers)
    recovery.enabled = False
    off = collect_ffn_activations(loaded.model, tokens)
    assert all(torch.equal(a, b) for a, b in zip(off.acts, dense.acts))
    recovery.detach()


def test_the_magnitude_quantile_samples_every_neuron_past_the_quantile_limit():
    """Past 2**24 values the sample is of whole tokens: a stride of 2 over the flattened [tokens, 64] saw only
    the even neurons, and with the odd ones larger the share above the threshold was 0.75, not 0.5."""
    from cpet.sparsity import FFNActivations

    n = 64
    tokens = (1 << 24) // n + n  # just past the limit: a flat stride of 2
    acts = torch.rand(tokens, n, generator=torch.Generator().manual_seed(0))
    acts[:, 1::2] += 1.0
    threshold = magnitude_thresholds(FFNActivations([acts], [torch.ones(8, n)]), 0.5)[0]
    assert float((acts > threshold).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_a_bf16_mask_keeps_the_share_the_fp32_search_reports():
    """The mask scores |a| * ||W_down[:, i]|| in fp32, as the thresholds were searched: in bf16 it kept another
    set of neurons than activation_ratio counted (0.24622 against 0.24686 on this model)."""
    from cpet.sparsity import _down_modules

    loaded = tiny_model("llama")
    loaded.model.to(torch.bfloat16)
    ids = calibration(loaded.model.config.vocab_size, seq=64)
    acts = collect_ffn_activations(loaded.model, ids)
    thresholds = acts.thresholds_for_cett(0.2, search_tokens=None)
    downs = _down_modules(loaded.model)
    others = [float("inf")] * (len(downs) - 1)  # layer 0 masked, every later layer masks everything (not counted)
    with torch.no_grad(), ActivationMask(loaded.model, [thresholds[0]] + others,
                                         column_norms=[acts.column_norms(i) for i in range(acts.num_layers)]) as mask:
        loaded.model(input_ids=ids)
    assert mask.kept / mask.total * len(downs) == pytest.approx(acts.activation_ratio(0, thresholds[0]), abs=1e-9)


def test_bad_mask_thresholds_and_norms_are_refused():
    loaded = tiny_model("llama")
    layers = loaded.model.config.num_hidden_layers
    width = loaded.model.config.intermediate_size
    with pytest.raises(ValueError, match="threshold of layer 0 is nan: thresholds must be numbers"):
        ActivationMask(loaded.model, [float("nan")] * layers)
    with pytest.raises(ValueError, match=rf"column_norms must hold one \[n\] tensor per FFN layer, n = \[{width}"):
        ActivationMask(loaded.model, [0.0] * layers, column_norms=[torch.ones(3)] * layers)



def test_a_ppl_p_search_whose_closest_probe_keeps_nothing_reports_no_baseline():
    """With a p no probe reaches, the closest probe may keep no activation: the matched baseline was then asked for
    a share of 0 and the report failed after the whole search, writing nothing."""
    from cpet.sparsity import sparsity_report

    torch.manual_seed(0)
    loaded = tiny_model("llama")
    model, tokenizer = loaded.model, loaded.tokenizer
    text = "the quick brown fox jumps over the lazy dog. " * 6
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):  # fit the text, so that masking FFN activations raises perplexity a lot
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    report = sparsity_report(model, tokenizer, ids[:, :64].reshape(2, 32), text, cett=0.2, ppl_p=1e6, max_tokens=8,
                             progress=False)
    assert report["ppl_p"]["reached"] is False and report["ppl_p"]["activation_ratio"] == 0.0
    assert report["baseline"] is None
