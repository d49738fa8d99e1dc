"""One assembly step for evaluation, serving and export: adapters read once, nothing copied per adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from cpet.assembly import AdapterError, AdapterSource, load_factors
from cpet.data import template_for, verbalizer_for
from cpet.data.tasks import as_task
from cpet.evaluate import classification_accuracy, label_logprobs
from cpet.pipeline import CPET
from cpet.train import TuneConfig
from tests.test_pipeline import recovered_pipeline

TUNE = TuneConfig(steps=4, batch_size=8, lr=2e-2, eval_every=2, rank=4, alpha=8, dropout=0.0)
ROWS = ("orig", "plain", "shared", "both")


def pipeline_with_every_assembly(root) -> tuple[CPET, str]:
    """A recovered tiny pipeline in ``root/work`` with one adapter per kind of assembly: ``orig`` (on the
    original), ``plain`` (LoRA alone), ``shared`` (with shared recovery), ``both`` (inherited, shared and
    per-task recovery). Returns it with its task file."""
    pipeline, task = recovered_pipeline(root, importance="magnitude", distill_steps=3)
    original = pipeline.tune(task, on="original", config=TUNE, progress=False, name="orig")
    pipeline.tune(task, config=TUNE, progress=False, name="plain")
    pipeline.tune(task, recovery="shared", config=TUNE, progress=False, name="shared")
    pipeline.tune(task, init="inherit", inherit_from=original, recovery="both", config=TUNE, progress=False,
                  name="both")
    for name in ("plain", "shared", "both"):
        give_weight(pipeline.adapters()[name])
    return pipeline, task


def give_weight(adapter_dir, seed: int = 0) -> None:
    """Random B in an adapter's saved LoRA and per-task recovery: its best checkpoint may be step 0, where every B
    is zero and a wrong scale, module or activation of those factors would go unseen by any comparison."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    for file in (Path(adapter_dir) / "adapter_model.safetensors",
                 Path(adapter_dir) / "per_task_recovery" / "recovery.safetensors"):
        if not file.exists():
            continue
        tensors = load_file(str(file))
        b_keys = [key for key in tensors if "lora_B" in key or ".B." in key]
        assert b_keys, file  # the factors are named as this expects
        for key in b_keys:
            tensors[key] = torch.randn(tensors[key].shape, generator=generator, dtype=tensors[key].dtype) * 0.05
        save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("assembly")
    return (*pipeline_with_every_assembly(root), root)


@pytest.mark.parametrize("name", ROWS)
def test_evaluation_scores_what_the_peft_model_of_the_adapter_scores(tuned, name):
    pipeline, task, _ = tuned
    task = as_task(task)
    result = pipeline.evaluate(name, task, with_predictions=True)
    peft_model = pipeline.model_for(name)  # the independent path: a copy with peft and recovery modules attached
    expected = classification_accuracy(peft_model, pipeline.tokenizer, [e.text for e in task.split("test")],
                                       [e.label for e in task.split("test")], template=template_for(task),
                                       verbalizer=verbalizer_for(task), labels=task.labels)
    assert result["predictions"] == list(expected.predictions)
    prompts = [template_for(task).format(e.text) for e in task.split("test")[:6]]
    words = [verbalizer_for(task).label_words[label] for label in task.labels]
    with pipeline.engine("original" if name == "orig" else "compressed") as engine:
        engine.load(name, pipeline.adapters()[name])
        ours = label_logprobs(engine.view(name), pipeline.tokenizer, prompts, words)
    assert torch.allclose(ours, label_logprobs(peft_model, pipeline.tokenizer, prompts, words), atol=1e-4)


def test_evaluation_reads_the_base_once_copies_nothing_and_leaves_it_untouched(tuned, monkeypatch):
    pipeline, task, root = tuned
    again = CPET.load(root / "work", original=pipeline.original)
    loads, copies = [], []
    real_load, real_deepcopy = again.load_compressed, copy.deepcopy
    monkeypatch.setattr(again, "load_compressed", lambda: loads.append(1) or real_load())
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a, **k: (
        copies.append(type(obj).__name__) if isinstance(obj, torch.nn.Module) else None) or real_deepcopy(obj, *a, **k))
    def hooks(model) -> int:
        return sum(len(m._forward_hooks) for m in model.modules())

    hooks_before = hooks(again.original.model)
    accuracies = {name: again.evaluate(name, task)["accuracy"] for name in ROWS}
    again.evaluate(None, task)
    assert loads == [1] and copies == []  # one read of base/ for every adapter, no model copied
    assert accuracies == {name: pipeline.evaluate(name, task)["accuracy"] for name in ROWS}
    assert not again._served_base[1].training and not again.original.model.training
    assert hooks(again.original.model) == hooks_before  # the engine's hooks are gone
    assert hooks(again._served_base[1]) == hooks(again.load_compressed().model)


def test_the_bare_base_scores_what_a_copy_of_it_scores(tuned):
    pipeline, task, _ = tuned
    task = as_task(task)
    test = task.split("test")
    expected = classification_accuracy(pipeline.model_for(None), pipeline.tokenizer, [e.text for e in test],
                                       [e.label for e in test], template=template_for(task),
                                       verbalizer=verbalizer_for(task), labels=task.labels)
    assert pipeline.evaluate(None, task, with_predictions=True)["predictions"] == list(expected.predictions)


def test_an_assembly_holds_shared_recovery_only_for_adapters_trained_with_it(tuned):
    pipeline, _, _ = tuned
    with pipeline.engine() as engine:
        for name in ("plain", "shared", "both"):
            engine.load(name, pipeline.adapters()[name])
        assert engine.shared and not engine.assembly("plain").shared
        assert engine.assembly("shared").shared.keys() == engine.shared.keys()
        module = next(iter(engine.assembly("both").adapter.per_task))
        kinds = [term.gelu for term in engine.assembly("both").terms(module)]
        assert kinds[-1] is True  # per-task recovery (GELU) comes last, after shared recovery and the LoRA
        assert engine.assembly(None).terms(module) == []


def test_an_inheritance_source_is_read_once_per_tuning_run(tuned, monkeypatch):
    """Checks, LoRA structure, inherited weights, hash, facts and the teacher all use one read of the source
    (peft's own loader, building the teacher's layers, reads the weights once more by itself)."""
    import pathlib

    import cpet.assembly
    import cpet.inherit

    pipeline, task, _ = tuned
    directory = pipeline.adapters()["orig"]
    reads = []
    for module in (cpet.assembly, cpet.inherit):
        real = module.load_file
        monkeypatch.setattr(module, "load_file",
                            lambda path, *a, real=real, **k: reads.append(str(path)) or real(path, *a, **k))
    real_read_text = pathlib.Path.read_text
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda self, *a, **k: reads.append(str(self)) or real_read_text(self, *a, **k))
    adapter = pipeline.tune(task, init="inherit", inherit_from="orig", recovery="per_task", config=TUNE,
                            progress=False, name="inherit-once")
    for file in ("adapter_model.safetensors", "cpet.json", "adapter_config.json"):
        assert reads.count(str(directory / file)) == 1, file
    assert adapter.meta["inherited_sha256"] == AdapterSource(directory).weights_sha256


def test_adapter_sources_name_what_is_wrong(tmp_path):
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        AdapterSource(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        AdapterSource(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    source = AdapterSource(tmp_path)
    assert not source.is_cpet and source.recovery == "none" and source.scale("q", 2) == 2.0
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        source.tensors
    for config, message in (('{"peft_type": "IA3"}', "is a IA3 adapter; only LoRA adapters run here: train a LoRA"),
                            ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}',
                             "is a DoRA adapter.*train it again with use_dora=False")):
        (tmp_path / "adapter_config.json").write_text(config)
        with pytest.raises(AdapterError, match=message):  # refused before its weights are read
            load_factors("x", tmp_path, {}, base_id="b", shared_available=False)
    # not a plain delta on every token of the base (peft reproduces them; read as one, logits were 2.5-6 off)
    for extra, message in (('"init_lora_weights": "pissa"', "init_lora_weights='pissa' and not converted"),
                           ('"init_lora_weights": "olora"', "init_lora_weights='olora' and not converted"),
                           ('"init_lora_weights": "lora_ga"', "init_lora_weights='lora_ga' and not converted"),
                           ('"alora_invocation_tokens": [5, 6]', "is an activated LoRA"),
                           ('"layer_replication": [[0, 2]]', "is a LoRA on a rebuilt layer stack")):
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, %s}' % extra)
        with pytest.raises(AdapterError, match=message):
            load_factors("x", tmp_path, {}, base_id="b", shared_available=False)
    # peft's defaults, not the factors': alpha 8 where the config states none (the engine took alpha = rank)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 16}')
    assert AdapterSource(tmp_path).scale("q", 16) == 0.5


def test_factors_of_another_rank_than_the_config_states_are_refused(tmp_path):
    """peft refuses such a directory (size mismatch); the engine served it at alpha / (the factors' rank)."""
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, '
                                                  '"rank_pattern": {"k_proj": 2}}')
    prefix = "base_model.model.model.layers.0.self_attn"
    save_file({f"{prefix}.q_proj.lora_A.weight": torch.zeros(4, 16),
               f"{prefix}.q_proj.lora_B.weight": torch.zeros(16, 4)}, str(tmp_path / "adapter_model.safetensors"))
    shapes = {"model.layers.0.self_attn.q_proj": (16, 16)}
    with pytest.raises(AdapterError, match=r"q_proj has rank-4 factors, but adapter_config.json says rank 8"):
        load_factors("x", tmp_path, shapes, base_id="b", shared_available=False)
    assert AdapterSource(tmp_path).rank("model.layers.0.self_attn.k_proj") == 2  # rank_pattern honoured


def test_a_closed_engine_refuses_to_run_and_recovery_of_another_base_is_refused(tuned, tmp_path):
    import json
    import shutil

    from cpet.serve import Engine

    pipeline, _, _ = tuned
    with pipeline.engine() as engine:
        view = engine.view(None)
    with pytest.raises(RuntimeError, match="closed"):
        view(input_ids=torch.tensor([[1, 2, 3]]))
    foreign = tmp_path / "recovery"
    shutil.copytree(pipeline.recovery_dir, foreign)
    meta = json.loads((foreign / "recovery.json").read_text())
    (foreign / "recovery.json").write_text(json.dumps({**meta, "base_id": "ab" * 32}))
    with pytest.raises(AdapterError, match="were made for base abababababab, not for this base"):
        Engine(pipeline.load_compressed().model, pipeline.base_id, shared_recovery=foreign)


@pytest.mark.parametrize("name", ROWS)
def test_a_running_adapter_holds_what_its_standalone_copy_holds(tuned, name):
    from cpet.evaluate import memory_bytes

    pipeline, _, _ = tuned
    with pipeline.running(name) as model:
        held = model.nbytes
    assert held == memory_bytes(pipeline.model_for(name))  # base + LoRA + the recovery it was trained with
    with pipeline.running(None) as bare:
        assert bare.nbytes < held
