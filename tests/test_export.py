"""Export: base + plain PEFT adapters with shared recovery folded in, reproducing CPET's logits outside CPET."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cpet.compress.moefy import MoEfyConfig
from cpet.export import export_pipeline, load_exported
from cpet.models import tiny_model
from cpet.pipeline import CPET
from cpet.recovery import RecoveryConfig
from cpet.train import TuneConfig
from tests.test_pipeline import recovered_pipeline

TUNE = TuneConfig(steps=4, batch_size=8, lr=2e-2, eval_every=2, rank=4, alpha=8, dropout=0.0,
                  target_roles=("q", "v"))
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 250]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    pipeline, task = recovered_pipeline(root, importance="magnitude", distill_steps=3)
    original = pipeline.tune(task, on="original", config=TUNE, progress=False, name="orig")
    pipeline.tune(task, recovery="shared", config=TUNE, progress=False, name="shared")
    pipeline.tune(task, recovery="none", config=TUNE, progress=False, name="plain")
    pipeline.tune(task, init="inherit", inherit_from=original, recovery="per_task", config=TUNE, progress=False,
                  name="per-task")
    pipeline.tune(task, init="inherit", inherit_from=original, recovery="per_task",
                  per_task_recovery=RecoveryConfig(rank=4, activation="identity"), config=TUNE, progress=False,
                  name="per-task-linear")
    report = export_pipeline(pipeline, root / "out", check_ids=IDS)
    return pipeline, report, root


def test_shared_recovery_is_folded_and_plain_peft_reproduces_cpet(exported):
    pipeline, report, root = exported
    assert set(report.adapters) == {"shared", "plain", "per-task-linear"}
    shared = report.adapters["shared"]
    # LoRA rank 4 on q/v + recovery rank 4 on every linear: one rank 8 on all 7 roles of both layers
    assert shared["rank"] == 8 and shared["modules"] == 14
    assert report.adapters["plain"]["rank"] == 4 and report.adapters["plain"]["modules"] == 4
    # identity per-task recovery is linear: folded like shared recovery (LoRA rank 4 on q/v + rank 4 everywhere)
    assert report.adapters["per-task-linear"]["rank"] == 8 and report.adapters["per-task-linear"]["modules"] == 14
    for name in ("shared", "plain", "per-task-linear"):
        assert report.adapters[name]["max_abs_diff"] < 1e-4
        plain = load_exported(root / "out" / "base", root / "out" / "adapters" / name)
        with torch.no_grad():
            reference = pipeline.model_for(name)(input_ids=IDS).logits
            assert torch.allclose(plain(input_ids=IDS).logits, reference, atol=1e-4)
    config = json.loads((root / "out" / "adapters" / "shared" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config.get("rank_pattern")


def test_without_folding_the_recovery_the_logits_differ(exported):
    pipeline, _, root = exported
    # the unfolded adapter on the exported base: what plain peft gave before export existed
    base = AutoModelForCausalLM.from_pretrained(str(root / "out" / "base"), dtype=torch.float32)
    from cpet.compress.quantize import keep_4bit_layout

    unfolded = PeftModel.from_pretrained(keep_4bit_layout(base), str(pipeline.adapters()["shared"])).eval()
    with torch.no_grad():
        reference = pipeline.model_for("shared")(input_ids=IDS).logits
        assert (unfolded(input_ids=IDS).logits - reference).abs().max() > 1e-3


def test_what_cannot_be_exported_is_skipped_or_refused_with_why(exported, tmp_path):
    pipeline, report, root = exported
    assert "GELU bypass" in report.skipped["per-task"]
    assert "orig" not in report.adapters and "orig" not in report.skipped  # original adapters: not exported
    meta = json.loads((root / "out" / "export.json").read_text())
    assert meta["skipped"]["per-task"] == report.skipped["per-task"]
    with pytest.raises(ValueError, match="per-task: trained with per-task recovery"):
        export_pipeline(pipeline, tmp_path / "x", ["per-task"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match=r"no adapter 'no-such-adapter'.*\(.*shared"):  # the known listed
        export_pipeline(pipeline, tmp_path / "y", ["no-such-adapter"])
    inside = pipeline.work_dir / "base" / "sub"  # copying base/ into itself never ended
    with pytest.raises(ValueError, match=r"is inside the pipeline's base directory"):
        export_pipeline(pipeline, inside, ["shared"])
    assert not inside.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=rf"output directory {a_file / 'sub'} cannot be made: {a_file} is a file"):
        export_pipeline(pipeline, a_file / "sub", ["shared"])  # was a bare "File exists" from the atomic write


def test_an_adapter_given_by_its_directory_is_exported_under_its_name_and_left_alone(exported, tmp_path):
    pipeline, _, _ = exported
    source = pipeline.adapters()["plain"]
    before = {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()}
    report = export_pipeline(pipeline, tmp_path / "out", [str(source.resolve())], check=False)
    assert set(report.adapters) == {"plain"}
    assert (tmp_path / "out" / "adapters" / "plain" / "adapter_model.safetensors").exists()
    assert {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()} == before  # the source untouched


def test_a_moefied_base_is_refused_by_name(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    pipeline = CPET(tiny_model("llama"), tmp_path / "work")
    pipeline.compress([MoEfyConfig(num_experts=4, top_k=2)], calibration=str(tmp_path / "corpus.txt"),
                      calibration_samples=4, seq_len=32, progress=False)
    with pytest.raises(ValueError, match="the base is MoEfied"):
        export_pipeline(pipeline, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folding_refuses_nonlinear_recovery():
    import torch

    from cpet.assembly import Assembly, LoadedAdapter, LowRank

    lora = {"q": LowRank(torch.randn(2, 4), torch.randn(3, 2), 0.5)}
    gelu_shared = {"q": LowRank(torch.randn(2, 4), torch.randn(3, 2), 1.0, gelu=True)}
    adapter = LoadedAdapter("a", None, lora, shared=True)
    with pytest.raises(ValueError, match="shared recovery on q has a GELU and is not linear"):
        Assembly.of("base", adapter, gelu_shared).folded_lora()
    per_task = LoadedAdapter("b", None, lora, per_task={"q": gelu_shared["q"]})
    with pytest.raises(ValueError, match="per-task recovery on q has a GELU"):
        Assembly.of("base", per_task, {}).folded_lora()


def test_folding_concatenates_linear_terms_exactly():
    import torch

    from cpet.assembly import Assembly, LoadedAdapter, LowRank

    torch.manual_seed(0)
    lora = {"q": LowRank(torch.randn(2, 4), torch.randn(3, 2), 0.5)}
    shared = {"q": LowRank(torch.randn(3, 4), torch.randn(3, 3), 2.0), "v": LowRank(torch.randn(1, 4),
                                                                                     torch.randn(5, 1), 1.0)}
    assembly = Assembly.of("base", LoadedAdapter("a", None, lora, shared=True), shared)
    folded, rank = assembly.folded_lora()
    assert rank == 5 and set(folded) == {"q", "v"}
    x = torch.randn(7, 4)
    for module, (A, B) in folded.items():
        expected = sum(term(x) for term in assembly.terms(module))
        assert A.shape == (5, 4) and torch.allclose(x @ A.T @ B.T, expected, atol=1e-5)
    # trained without shared recovery: the base's shared factors are not part of its assembly
    assert Assembly.of("base", LoadedAdapter("b", None, lora), shared).folded_lora()[0].keys() == {"q"}


def test_an_adapter_of_a_replaced_base_is_skipped_saying_why(tmp_path):
    from cpet.config import PruneConfig
    from tests.test_pipeline import write_task

    task = write_task(tmp_path / "task.jsonl")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    pipeline = CPET(tiny_model("llama"), tmp_path / "work")
    pipeline.compress([PruneConfig(ffn_ratio=0.25, importance="magnitude")], calibration=str(corpus),
                      calibration_samples=2, seq_len=32, progress=False)
    pipeline.tune(task, config=TUNE, progress=False, name="old-base")
    pipeline.compress([PruneConfig(ffn_ratio=0.5, importance="magnitude")], calibration=str(corpus),
                      calibration_samples=2, seq_len=32, progress=False)  # compress again: the adapter stays
    pipeline.tune(task, config=TUNE, progress=False, name="new-base")
    report = export_pipeline(pipeline, tmp_path / "out", check=False)
    assert set(report.adapters) == {"new-base"}
    assert "but the pipeline's base is now" in report.skipped["old-base"]
    with pytest.raises(ValueError, match="old-base: tuned on base [0-9a-f]{12}, but the pipeline's base is now"):
        export_pipeline(pipeline, tmp_path / "named", ["old-base"], check=False)


def test_nonlinear_shared_recovery_skips_its_adapters_and_exports_the_others(exported, tmp_path, monkeypatch):
    import cpet.export

    pipeline, _, _ = exported
    real = cpet.export.read_recovery_meta

    def gelu_meta(directory):
        meta = real(directory)
        return {**meta, "config": {**meta["config"], "activation": "gelu"}}

    monkeypatch.setattr(cpet.export, "read_recovery_meta", gelu_meta)
    report = export_pipeline(pipeline, tmp_path / "out", check=False)
    assert "GELU activation, which is not linear" in report.skipped["shared"]
    assert "plain" in report.adapters and "shared" not in report.adapters
    with pytest.raises(ValueError, match="shared: trained with shared recovery whose bypasses have a GELU"):
        export_pipeline(pipeline, tmp_path / "named", ["shared"], check=False)
    assert not (tmp_path / "named").exists()


def test_what_folding_refuses_is_skipped_by_name_not_a_failed_export(exported, tmp_path, monkeypatch):
    """The backstop: an adapter the up-front checks let through but folding refuses (here: GELU per-task
    recovery with the checks switched off) is skipped with folding's reason; named, it fails the export."""
    import cpet.export

    pipeline, _, _ = exported
    monkeypatch.setattr(cpet.export, "_adapter_refusal", lambda *args: None)
    report = export_pipeline(pipeline, tmp_path / "out", check=False)
    assert "has a GELU and is not linear" in report.skipped["per-task"]
    assert {"shared", "plain"} <= set(report.adapters)
    with pytest.raises(ValueError, match="cannot export per-task: per-task recovery on .* has a GELU"):
        export_pipeline(pipeline, tmp_path / "named", ["per-task"], check=False)
    assert not (tmp_path / "named").exists()


def test_an_export_that_does_not_reproduce_cpet_fails_and_writes_nothing(exported, tmp_path, monkeypatch):
    import cpet.export

    pipeline, _, _ = exported
    monkeypatch.setattr(cpet.export, "CHECK_TOLERANCE", 0.0)  # the folded shared adapter differs by ~1e-5
    with pytest.raises(ValueError, match="export of shared does not reproduce CPET's logits"):
        export_pipeline(pipeline, tmp_path / "out", ["shared"], check_ids=IDS)
    assert not (tmp_path / "out").exists()


def test_the_exported_card_says_how_the_adapter_reads_an_example(exported):
    pipeline, report, root = exported
    card = (root / "out" / "adapters" / "shared" / "README.md").read_text()
    meta = json.loads((pipeline.work_dir / "adapters" / "shared" / "adapter" / "cpet.json").read_text())
    assert f"Prompt: {json.dumps(meta['template'])}" in card
    assert f"over {meta['max_prompt_tokens']} tokens is cut (the text loses its end" in card
    assert all(f"`{label}` -> {json.dumps(word)}" in card for label, word in meta["label_words"].items())


def test_a_damaged_adapter_is_skipped_saying_why_and_the_others_export(exported, tmp_path):
    """One adapter's damaged cpet.json failed the whole export (`cpet list` shows it and goes on)."""
    import shutil

    pipeline, _, _ = exported
    copy = tmp_path / "work"
    shutil.copytree(pipeline.work_dir, copy)
    (copy / "adapters" / "plain" / "adapter" / "cpet.json").write_text("{not json")
    damaged = CPET.load(copy)
    report = export_pipeline(damaged, tmp_path / "out", check=False)
    assert "is not valid JSON" in report.skipped["plain"] and "tune the adapter again" in report.skipped["plain"]
    assert "shared" in report.adapters and "plain" not in report.adapters
    with pytest.raises(ValueError, match="cannot export plain: .*cpet.json is not valid JSON"):
        export_pipeline(damaged, tmp_path / "named", ["plain"], check=False)
    assert not (tmp_path / "named").exists()


def test_a_bf16_base_exports_and_reloads_in_bf16_with_cpets_logits(tmp_path):
    """On a bf16 base (the default on CUDA) the export reproduces evaluation and serving exactly: the engine
    rounded its LoRA delta to bf16 before adding it (0.05 off peft's logits here), so every bf16 export failed
    its check as a bug; and the check read the export in fp32, where CPET reads the saved dtype."""
    from cpet.config import PruneConfig
    from tests.test_pipeline import write_task

    task = write_task(tmp_path / "task.jsonl")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    loaded = tiny_model("llama")
    loaded.model.to(torch.bfloat16)
    pipeline = CPET(loaded, tmp_path / "work")
    pipeline.compress([PruneConfig(ffn_ratio=0.25, importance="magnitude")], calibration=str(corpus),
                      calibration_samples=2, seq_len=32, progress=False)
    pipeline.tune(task, recovery="none", config=TUNE, progress=False, name="plain")
    report = export_pipeline(pipeline, tmp_path / "out", check_ids=IDS)
    assert set(report.adapters) == {"plain"}
    plain = load_exported(tmp_path / "out" / "base", tmp_path / "out" / "adapters" / "plain")
    assert plain.get_base_model().lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad(), pipeline.engine() as engine:
        expected = pipeline.model_for("plain")(input_ids=IDS).logits  # evaluation's assembly (peft)
        assert torch.equal(plain(input_ids=IDS).logits, expected)
        engine.load("plain", pipeline.adapters()["plain"])  # serving adds the LoRA as peft does: once, in fp32
        assert torch.equal(engine.view("plain").eval()(input_ids=IDS).logits, expected)


@pytest.mark.parametrize("dtype, method", [(torch.bfloat16, "nf4"), (torch.float16, "int8")])
def test_a_half_precision_quantized_base_exports_with_cpets_logits_to_the_bit(tmp_path, dtype, method):
    """peft rounds a LoRA on a bitsandbytes linear to the output's dtype before adding it (on a plain linear it adds
    in fp32 and rounds once); the engine added in fp32 everywhere, so serving sat a bf16 step off an nf4 base's
    export (0.031) and 0.079 off an int8 fp16 one, and every such export failed its check as a bug."""
    from cpet.config import PruneConfig, QuantizeConfig
    from tests.test_pipeline import write_task

    task = write_task(tmp_path / "task.jsonl")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    loaded = tiny_model("llama")
    loaded.model.to(dtype)
    pipeline = CPET(loaded, tmp_path / "work")
    pipeline.compress([PruneConfig(ffn_ratio=0.25, importance="magnitude"), QuantizeConfig(method=method)],
                      calibration=str(corpus), calibration_samples=2, seq_len=32, progress=False)
    pipeline.tune(task, recovery="none", config=TUNE, progress=False, name="plain")
    report = export_pipeline(pipeline, tmp_path / "out", check_ids=IDS)
    assert report.adapters["plain"]["max_abs_diff"] == 0.0
    plain = load_exported(tmp_path / "out" / "base", tmp_path / "out" / "adapters" / "plain")
    with torch.no_grad(), pipeline.engine() as engine:
        expected = pipeline.model_for("plain")(input_ids=IDS).logits  # evaluation's assembly (peft)
        assert expected.dtype == dtype
        assert torch.equal(plain(input_ids=IDS).logits, expected)
        engine.load("plain", pipeline.adapters()["plain"])
        assert torch.equal(engine.view("plain").eval()(input_ids=IDS).logits, expected)
        engine.fast = False  # the per-factor reference path rounds the same way
        assert torch.equal(engine.view("plain").eval()(input_ids=IDS).logits, expected)


def test_the_export_check_refuses_a_two_percent_logit_error_at_its_default_tolerance(monkeypatch):
    """The check at its default tolerance (the test of a failing export sets it to 0, so a tolerance of 1.0 that
    accepts any export passed it)."""
    import cpet.export

    model = tiny_model("llama").model.eval()
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    off = copy.deepcopy(model)
    with torch.no_grad():
        off.lm_head.weight.mul_(1.02)  # every logit 2% off: a wrong export, far above float noise
    monkeypatch.setattr(cpet.export, "load_exported", lambda base, adapter: off)
    with pytest.raises(ValueError, match="does not reproduce CPET's logits"):
        cpet.export._check("x", None, None, model, ids)
    monkeypatch.setattr(cpet.export, "load_exported", lambda base, adapter: copy.deepcopy(model).eval())
    assert cpet.export._check("x", None, None, model, ids) == 0.0


def test_an_export_over_a_previous_export_that_holds_the_pipeline_is_refused(exported, tmp_path):
    """A previous export is replaced as a whole: one holding the pipeline's work directory (a pipeline kept inside
    its export) was replaced with it, deleting the pipeline being exported (CPET.save refuses the same)."""
    pipeline, _, _ = exported
    outer = tmp_path / "export"
    inner = CPET.load(pipeline.save(outer / "pipeline"), original=pipeline.original)
    (outer / "export.json").write_text("{}")  # a previous export there
    with pytest.raises(ValueError, match=r"export.* holds the pipeline's work directory .*pipeline.*: choose an --out "
                                         r"outside it"):
        export_pipeline(inner, outer, ["plain"], check=False)
    assert (outer / "pipeline" / "pipeline.json").exists() and (outer / "pipeline" / "base").is_dir()
