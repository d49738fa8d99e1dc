"""Adapter directories: the model card, the portable base reference, loading outside a pipeline."""

from __future__ import annotations

import json

import pytest

from cpet.adapters import check_adapter_base, load_standalone, model_card, resolve_base_reference

META = {"task": "vader-movie", "task_source": "vader-movie", "labels": ["negative", "positive"],
        "label_words": {"negative": " bad", "positive": " good"}, "template": "Review: {text}\nSentiment:",
        "max_prompt_tokens": 128, "base_id": "ab" * 32, "source_name": "smollm2-135m",
        "source_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "source_fingerprint": "cd" * 32,
        "on": "compressed", "init": "random", "recovery": "none", "inherited_task": None,
        "compression": {"stages": [{"stage": "prune", "ffn_ratio": 0.25}, {"stage": "quantize", "method": "nf4"}],
                        "uniform": True},
        "tune_config": {"rank": 8, "alpha": 16, "steps": 200, "batch_size": 8, "lr": 1e-3, "seed": 0},
        "metrics": {"val_accuracy": 0.8125, "step": 150}}


@pytest.mark.parametrize("changes, present, absent", [
    ({}, ["../../../base", "PeftModel.from_pretrained", "keep_4bit_layout", "prune(ffn_ratio=0.25)",
          "quantize(method='nf4')", "0.8125 (best checkpoint, step 150)", "not measured yet", "`\" good\"`",
          "`\"Review: {text}\\nSentiment:\"`", "| recovery | none |"],
     ["base_model:", "cpet eval PIPELINE --adapter vader-cpet"]),
    ({"on": "original", "base_id": "original", "compression": None},
     ["base_model: HuggingFaceTB/SmolLM2-135M-Instruct", 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")',
      'cpet.load_base("smollm2-135m")', "the original model"],
     ["compression", "keep_4bit_layout"]),
    ({"compression": {"stages": [{"stage": "prune", "layer_schedule": {"0": 0.5}}], "uniform": False}},
     ["CompressedBase.load", "per-layer FFN widths"], ["AutoModelForCausalLM"]),
    ({"recovery": "both", "shared_recovery": {"config": {"rank": 16, "activation": "identity"}, "distill_steps": 100},
      "per_task_recovery": {"rank": 8, "activation": "gelu"}, "init": "inherit", "inherited_task": "vader-tweets",
      "inherited_from_other_task": True, "metrics": {"val_accuracy": 0.9, "step": 10, "test_accuracy": 0.875,
                                                     "test_n": 200, "test_split": "test"}},
     ["cpet eval PIPELINE --adapter vader-cpet", 'pipeline.model_for("vader-cpet")',
      "shared (rank 16 identity bypasses, distilled 100 steps", "per-task (rank 8 gelu",
      "inherit (from an adapter for task `vader-tweets`) — another task", "0.8750 on 200 examples (split test)"],
     ["PeftModel.from_pretrained", "not measured yet"]),
])
def test_model_card_says_what_the_adapter_is_and_how_to_load_it(changes, present, absent):
    meta = {**META, **changes}
    card = model_card(meta, "HuggingFaceTB/SmolLM2-135M-Instruct" if meta["on"] == "original" else "../../../base",
                      "vader-cpet")
    assert card.startswith("---\nlibrary_name: peft\n") and "# vader-cpet" in card
    for key in ("`vader-movie`", "`negative` → `\" bad\"`", "smollm2-135m", "cdcdcdcdcdcdcdcd"):
        assert key in card
    assert all(line.count("|") == 3 for line in card.splitlines() if line.startswith("| ") and "→" in line)
    for text in present:
        assert text in card, text
    for text in absent:
        assert text not in card, text


def write_config(directory, **fields):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **fields}))
    return directory


def test_base_reference_resolves_against_the_adapter_directory(tmp_path, monkeypatch):
    adapter = write_config(tmp_path / "p" / "adapters" / "a" / "adapter", base_model_name_or_path="../../../base")
    (tmp_path / "p" / "base").mkdir()
    monkeypatch.chdir(tmp_path / "p" / "adapters")  # where "../../../base" means something else
    assert resolve_base_reference(adapter.relative_to(tmp_path / "p" / "adapters")) == str(tmp_path / "p" / "base")
    hub = write_config(tmp_path / "hub", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_base_reference(hub) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    absolute = write_config(tmp_path / "abs", base_model_name_or_path="/models/x")
    assert resolve_base_reference(absolute) == "/models/x"
    assert resolve_base_reference(write_config(tmp_path / "none", base_model_name_or_path=None)) is None


@pytest.mark.parametrize("recovery", ["shared", "per_task", "both"])
def test_standalone_loading_refuses_adapters_that_need_recovery(tmp_path, recovery):
    adapter = write_config(tmp_path / "adapters" / "cpet" / "adapter", base_model_name_or_path="../../../base")
    (adapter / "cpet.json").write_text(json.dumps({"recovery": recovery, "base_id": "x"}))
    with pytest.raises(ValueError, match=rf"{recovery} recovery modules, which live in its pipeline: use "
                                         r"CPET.load\(PIPELINE\).model_for\('cpet'\)"):
        load_standalone(adapter)
    bare = write_config(tmp_path / "bare")
    with pytest.raises(ValueError, match="does not name its base model"):
        load_standalone(bare)


BASE_X, BASE_Y = "1a2b3c4d5e6f" + "0" * 52, "abcdef012345" + "9" * 52  # two compressed bases' 64-hex ids


@pytest.mark.parametrize("made, this, inheriting, message", [
    (BASE_X, "original", True,
     r"`--inherit-from` needs an adapter tuned with `--on original` \(adapter runs/a was tuned on compressed base "
     r"1a2b3c4d5e6f\); tune one with `cpet tune PIPELINE --on original --task T`"),
    ("original", BASE_Y, False,
     r"adapter runs/a was made for the original model, and this is compressed base abcdef012345: .* must be "
     r"re-tuned on this base \(`cpet tune PIPELINE --task T`\), or inherited: `--init inherit --inherit-from runs/a`"),
    (BASE_X, BASE_Y, False,
     r"was made for compressed base 1a2b3c4d5e6f, and this is compressed base abcdef012345: .* re-tuned on this "
     r"base .* `--init inherit --inherit-from DIR` with DIR an adapter tuned with `--on original`"),
    (BASE_X, "original", False,
     r"was made for compressed base 1a2b3c4d5e6f, and this is the original model: use it on the base it was made "
     r"for .* `cpet tune PIPELINE --on original --task T`"),
])
def test_an_adapter_for_another_base_is_refused_saying_what_to_do(made, this, inheriting, message):
    with pytest.raises(ValueError, match=message) as refused:
        check_adapter_base({**META, "base_id": made}, base_id=this, directory="runs/a", inheriting=inheriting)
    assert BASE_X not in str(refused.value) and BASE_Y not in str(refused.value)  # ids shown as 12 hex
    check_adapter_base({**META, "base_id": made}, base_id=made, directory="runs/a", inheriting=inheriting)


def test_bases_that_differ_only_past_the_shown_prefix_are_different_bases():
    """Messages show 12 hex of an id; the check compares all 64 (every pair above differs within the 12)."""
    made, this = "1a2b3c4d5e6f" + "0" * 52, "1a2b3c4d5e6f" + "f" * 52
    with pytest.raises(ValueError, match="was made for compressed base 1a2b3c4d5e6f, and this is compressed base "
                                         "1a2b3c4d5e6f"):
        check_adapter_base({**META, "base_id": made}, base_id=this, directory="runs/a")


def test_scoring_an_adapter_whose_metadata_records_no_labels_is_refused_by_name(tmp_path):
    """A cpet.json without a list of labels was a KeyError traceback from `cpet eval --peft`."""
    from types import SimpleNamespace

    from cpet.adapters import check_scoring, read_adapter_meta

    task = SimpleNamespace(name="toy", labels=("neg", "pos"))
    with pytest.raises(ValueError, match=r"records no list of labels in its cpet.json \(labels: None\)"):
        check_scoring({"template": "{text}"}, task, None)
    assert check_scoring({"labels": ["neg", "pos"], "max_prompt_tokens": 64}, task, None) == 64
    for damaged in ("64", 0, True):  # was a TypeError deep in prompt fitting (or a prompt cut to nothing)
        with pytest.raises(ValueError, match=rf"records max_prompt_tokens {damaged!r} .*metadata is damaged"):
            check_scoring({"labels": ["neg", "pos"], "max_prompt_tokens": damaged}, task, None)
    assert check_scoring({"labels": ["neg", "pos"], "tune_config": {"max_prompt_tokens": 32}}, task, None) == 32
    (tmp_path / "cpet.json").write_text('["labels"]')
    with pytest.raises(ValueError, match=r"cpet.json holds a JSON list, not an object; .*tune the adapter again"):
        read_adapter_meta(tmp_path)


def test_damaged_recovery_and_fingerprint_fields_of_cpet_json_are_named_not_tracebacks():
    """`shared_recovery: "abc"` raised AttributeError, `sha256: 5` and `source_fingerprint: 123` a TypeError."""
    from cpet.adapters import check_adapter_base
    from cpet.recovery import stale_recovery

    assert "metadata is damaged" in stale_recovery({"shared_recovery": {"sha256": 5}}, "d", "f" * 64)
    assert "trained with shared recovery abc" in stale_recovery({"shared_recovery": "abc"}, "d", "f" * 64)
    assert stale_recovery({"shared_recovery": {"sha256": "f" * 64}}, "d", "f" * 64) is None
    with pytest.raises(ValueError, match=r"records source_fingerprint 123 in its cpet.json, not a string: its "
                                         r"metadata is damaged"):
        check_adapter_base({"source_fingerprint": 123}, source_fingerprint="a" * 64, directory="d")


def test_standalone_loading_refuses_a_plain_peft_lora_on_a_moefied_bases_reordered_neurons(tmp_path):
    """A plain PEFT LoRA (no cpet.json, so no base_id to check) whose base_model_name_or_path names a MoEfied base
    was loaded onto its expert banks as is: its factors act on the source's neuron order, the banks hold the
    neurons permuted into experts (logits 4 off the original model + LoRA with every expert chosen, where they are
    equal). The engine refuses such an adapter (assembly.load_factors); loading it standalone must too."""
    import copy

    import torch

    from cpet.adapters import add_lora
    from cpet.compress import compress
    from cpet.compress.moefy import MoEfyConfig
    from cpet.models import tiny_model

    loaded = tiny_model("llama")
    calibration = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    compress(loaded.model, [MoEfyConfig(num_experts=4, top_k=4)], calibration=calibration,
             progress=False).save(tmp_path / "base")
    for targets in (["gate_proj", "q_proj"], ["q_proj", "v_proj"]):
        lora = add_lora(copy.deepcopy(loaded.model), rank=4, alpha=8, dropout=0.0, target_modules=targets)
        lora.save_pretrained(str(tmp_path / targets[0]))
        config = json.loads((tmp_path / targets[0] / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "base")
        (tmp_path / targets[0] / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"plain PEFT adapter with a LoRA on model\.layers\.0\.mlp\.gate_proj, "
                                         r"whose neurons this base keeps in another order"):
        load_standalone(tmp_path / "gate_proj")
    model, _ = load_standalone(tmp_path / "q_proj")  # attention is not reordered: it loads as before
    assert type(model).__name__ == "PeftModelForCausalLM"
