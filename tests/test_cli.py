"""The `cpet` command on a tiny model saved to disk (the real model is exercised by the demo)."""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil

import pytest

from cpet.cli import main
from cpet.models import tiny_model
from tests.conftest import real_asset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    loaded = tiny_model("qwen2")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    rng = random.Random(0)
    rows = [{"text": f"sample {i} {rng.choice(['good', 'bad'])}", "label": rng.choice(["x", "y"])} for i in range(80)]
    path = tmp_path_factory.mktemp("task") / "toy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info(capsys, model_dir):
    info = run_json(capsys, "info", str(model_dir))
    assert (info["family"], info["layers"], info["hidden_size"], info["kv_heads"]) == ("qwen2", 2, 64, 2)
    assert info["memory_bytes"] == 4 * info["parameters"]


def test_info_says_where_the_module_map_came_from(capsys, model_dir, tmp_path):
    assert run_json(capsys, "info", str(model_dir))["module_map"] == "table"  # qwen2: in the family table
    loaded = tiny_model("olmo")  # outside the table: its map is read from its structure
    loaded.model.save_pretrained(tmp_path / "olmo")
    loaded.tokenizer.save_pretrained(tmp_path / "olmo")
    info = run_json(capsys, "info", str(tmp_path / "olmo"))
    assert (info["family"], info["module_map"]) == ("olmo", "derived")


def test_eval_task_and_corpus(capsys, model_dir, task_file, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus of plain words. " * 30)
    result = run_json(capsys, "eval", "--model", str(model_dir), "--task", str(task_file), "--corpus", str(corpus),
                      "--limit", "5")
    assert result["tasks"][0]["n"] == 5 and 0 <= result["tasks"][0]["accuracy"] <= 1
    # the same figures as the API's zero-shot scoring and the library's perplexity on that text
    from cpet.evaluate import perplexity
    from cpet.models import load_base
    from cpet.pipeline import CPET

    api = CPET(load_base(str(model_dir)), tmp_path / "api").evaluate(None, str(task_file), on="original", limit=5)
    assert result["tasks"][0]["accuracy"] == api["accuracy"]
    loaded = load_base(str(model_dir))
    direct = perplexity(loaded.model, loaded.tokenizer, corpus.read_text(), max_length=256, stride=256).ppl
    assert result["perplexity"]["ppl"] == pytest.approx(direct, rel=1e-6)
    # 930 byte tokens in 4 disjoint windows of 256: each window's first token has no context
    assert result["perplexity"]["tokens"] == 930 - 4
    assert result["perplexity"]["ppl"] > 1


def test_compress_then_tune(capsys, model_dir, task_file, tmp_path):
    real_asset("brown-npm")  # the report measures Brown perplexity
    work = tmp_path / "work"
    report = run_json(capsys, "compress", "--model", str(model_dir), "--prune-ffn", "0.5", "--importance",
                      "magnitude", "--quantize", "nf4", "--eval-tokens", "256", "--out", str(work))
    assert [s["stage"] for s in report["stages"]] == ["original", "+ PruneConfig", "+ QuantizeConfig"]
    sizes = [s["memory_bytes"] for s in report["stages"]]
    assert sizes[0] > sizes[1] > sizes[2]
    assert (work / "base" / "manifest.json").exists()
    tuned = run_json(capsys, "tune", str(work), "--task", str(task_file), "--steps", "2", "--eval-every", "1",
                     "--limit", "4")
    assert tuned["test"]["n"] == 4 and (work / "adapters").exists()


def test_export_folds_shared_recovery_and_matches_cpet(capsys, model_dir, task_file, tmp_path):
    real_asset("brown-npm")
    work = tmp_path / "work"
    run_json(capsys, "compress", "--model", str(model_dir), "--prune-ffn", "0.5", "--importance", "magnitude",
             "--quantize", "nf4", "--eval-tokens", "256", "--out", str(work))
    run_json(capsys, "recover", str(work), "--steps", "2", "--seq-len", "32", "--rank", "4")
    run_json(capsys, "tune", str(work), "--task", str(task_file), "--steps", "2", "--eval-every", "1",
             "--limit", "4", "--recovery", "shared", "--name", "with-recovery")
    report = run_json(capsys, "export", str(work), "--out", str(tmp_path / "out"))
    entry = report["adapters"]["with-recovery"]
    assert entry["recovery"] == "shared" and entry["max_abs_diff"] < 1e-4
    written = tmp_path / "out" / "adapters" / "with-recovery" / "adapter_model.safetensors"
    unchecked = run_json(capsys, "export", str(work), "--out", str(tmp_path / "fast"), "--no-check")
    assert "max_abs_diff" not in unchecked["adapters"]["with-recovery"]  # not reloaded to compare
    assert (tmp_path / "fast" / "adapters" / "with-recovery" / "adapter_model.safetensors").read_bytes() == \
        written.read_bytes()
    (tmp_path / "mine").mkdir()
    assert main(["export", str(work), "--out", str(tmp_path / "mine")]) == 2  # never over a non-export directory
    assert "is not a CPET export" in capsys.readouterr().err


def test_recover_and_eval_take_model_where_the_recorded_source_has_moved(capsys, model_dir, task_file, tmp_path):
    real_asset("brown-npm")
    import shutil

    source, work = tmp_path / "src", tmp_path / "work"
    shutil.copytree(model_dir, source)
    run_json(capsys, "compress", "--model", str(source), "--prune-ffn", "0.5", "--importance", "magnitude",
             "--quantize", "nf4", "--eval-tokens", "256", "--out", str(work))
    run_json(capsys, "tune", str(work), "--on", "original", "--task", str(task_file), "--steps", "2",
             "--eval-every", "1", "--limit", "4", "--name", "o")
    source.rename(tmp_path / "moved")
    moved = str(tmp_path / "moved")
    assert main(["eval", str(work), "--adapter", "o", "--limit", "4"]) == 2  # an original-model adapter needs it
    assert re.search(r"pipeline.json\): give the model where it is now with --model", capsys.readouterr().err)
    scored = run_json(capsys, "eval", str(work), "--adapter", "o", "--limit", "4", "--model", moved)
    assert scored["tasks"][0]["n"] == 4
    assert main(["recover", str(work), "--steps", "1", "--seq-len", "32", "--rank", "4"]) == 2  # the teacher
    assert "give the model where it is now with --model" in capsys.readouterr().err
    recovered = run_json(capsys, "recover", str(work), "--model", moved, "--steps", "1", "--seq-len", "32",
                         "--rank", "4")
    assert recovered["loss_first"] > 0
    assert json.loads((work / "pipeline.json").read_text())["source"] == moved  # a step records where it is now


def test_compress_reads_the_recorded_source_and_takes_the_seed(capsys, model_dir, task_file, tmp_path):
    real_asset("brown-npm")
    work = tmp_path / "work"
    run_json(capsys, "tune", str(work), "--on", "original", "--model", str(model_dir), "--task", str(task_file),
             "--steps", "2", "--eval-every", "1", "--limit", "4", "--name", "o")
    # no --model: the source this directory recorded (not the embedded default, which it would refuse)
    run_json(capsys, "compress", "--out", str(work), "--moefy-experts", "4", "--moefy-top-k", "2", "--seed", "3",
             "--calibration-samples", "2", "--eval-tokens", "256")
    manifest = json.loads((work / "base" / "manifest.json").read_text())
    assert manifest["stages"][0]["config"]["seed"] == 3 and manifest["calibration"]["seed"] == 3


def test_compress_moefy_and_quantized_embeddings_then_tune(capsys, model_dir, task_file, tmp_path):
    real_asset("brown-npm")
    work = tmp_path / "work"
    report = run_json(capsys, "compress", "--model", str(model_dir), "--moefy-experts", "4", "--moefy-top-k", "2",
                      "--quantize", "nf4", "--quantize-embeddings", "--calibration-samples", "2",
                      "--eval-tokens", "256", "--out", str(work))
    assert [s["stage"] for s in report["stages"]] == ["original", "+ MoEfyConfig", "+ QuantizeConfig"]
    manifest = json.loads((work / "base" / "manifest.json").read_text())
    assert [s["config"]["stage"] for s in manifest["stages"]] == ["moefy", "quantize"]
    assert manifest["stages"][1]["config"]["embeddings"] is True and manifest["uniform"] is False
    tuned = run_json(capsys, "tune", str(work), "--task", str(task_file), "--steps", "2", "--eval-every", "1",
                     "--limit", "4")
    assert tuned["test"]["n"] == 4


@pytest.mark.parametrize("argv, message", [
    (["compress", "--prune-ffn", "1.2", "--out", "x"], r"ffn_ratio must be in \[0, 1\), got 1.2 \(CLI: --prune-ffn\)"),
    (["compress", "--out", "x"], "nothing to do"),
    (["compress", "--moefy-experts", "1", "--out", "x"], "num_experts must be >= 2"),
    (["compress", "--moefy-top-k", "4", "--out", "x"], "need --moefy-experts"),
    (["compress", "--prune-ffn", "0.25", "--quantize-embeddings", "--out", "x"], "needs --quantize"),
    # a stage's flag without its stage was dropped without a word
    (["compress", "--prune-ffn", "0.25", "--moefy-clustering", "weights", "--out", "x"],
     r"--moefy-clustering is read only with --moefy-experts: give the stage"),
    (["compress", "--prune-ffn", "0.25", "--moefy-router-inputs", "moefied", "--out", "x"],
     r"--moefy-router-inputs is read only with --moefy-experts: give the stage"),
    (["compress", "--prune-ffn", "0.25", "--no-double-quant", "--compute-dtype", "bfloat16", "--out", "x"],
     r"--no-double-quant is read only with --quantize nf4 or fp4; --compute-dtype is read only with --quantize nf4"),
    # int8 reads neither (they only changed the base_id of the same int8 base)
    (["compress", "--quantize", "int8", "--no-double-quant", "--out", "x"],
     r"--no-double-quant is read only with --quantize nf4 or fp4: give the stage"),
    (["compress", "--quantize", "int8", "--compute-dtype", "bfloat16", "--out", "x"],
     r"--compute-dtype is read only with --quantize nf4 or fp4"),
    (["compress", "--prune-ffn", "0.25", "--head-mode", "kv_group", "--out", "x"],
     r"--head-mode is read only with --prune-heads"),
    (["compress", "--quantize", "nf4", "--importance", "magnitude", "--out", "x"],
     r"--importance is read only with --prune-ffn or --prune-heads"),
    (["compress", "--prune-heads", "0.5", "--round-to", "8", "--out", "x"], r"--round-to is read only with --prune-ffn"),
    (["eval", "--model", "no-such-model", "--corpus", "brown"], "unknown model 'no-such-model'"),
    (["eval"], r"^cpet eval: error: give --task T"),
    (["fetch", "nosuch"], r"^cpet fetch: error: unknown asset 'nosuch'; choose from all"),
    (["fetch", "--from", "x.tar.gz"], r"^cpet fetch: error: --from takes exactly one asset name \(the file's\), "
                                      r"got all"),
    (["fetch", "vader", "--from", "no-such.tar.gz"], r"^cpet fetch: error: --from no-such.tar.gz: no such file"),
    (["fetch", "nosuch", "--from", "x.tar.gz"], r"^cpet fetch: error: unknown asset 'nosuch'"),
])
def test_bad_input_exits_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_fetch_json_lists_every_asset(capsys):
    real_asset("vader-sdist")
    result = run_json(capsys, "fetch", "vader")
    assert list(result) == ["vader-sdist"] and result["vader-sdist"]["path"].endswith("vaderSentiment-3.3.2.tar.gz")


@pytest.mark.parametrize("argv", [["eval", "--task", "x.jsonl", "--limit", "0"],
                                  ["tune", "p", "--task", "t", "--steps", "0"]])
def test_zero_counts_are_refused_not_read_as_all(capsys, argv):
    with pytest.raises(SystemExit):
        main(argv)
    assert "must be >= 1" in capsys.readouterr().err


def test_help_shows_the_library_defaults(capsys):
    from cpet.train import TuneConfig

    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = TuneConfig()
    assert f"AdamW learning rate (peak) (default: {defaults.lr})" in text
    assert f"(default: {defaults.warmup_ratio})" in text and f"(default: {defaults.eval_limit})" in text


def test_tune_prints_the_baselines_beside_the_result(capsys, model_dir, task_file, tmp_path):
    work = tmp_path / "w"
    tuned = run_json(capsys, "tune", str(work), "--task", str(task_file), "--on", "original", "--steps", "2",
                     "--eval-every", "1", "--val-limit", "3", "--max-prompt-tokens", "16", "--limit", "6")
    meta = json.loads((work / "adapters" / tuned["adapter"].split("/")[-2] / "adapter" / "cpet.json").read_text())
    assert meta["tune_config"]["eval_limit"] == 3 and meta["max_prompt_tokens"] == 16
    assert [h["step"] for h in meta["metrics"]["history"]] == [0, 1, 2]
    from collections import Counter

    from cpet.data.tasks import as_task
    from cpet.pipeline import CPET

    gold = [e.label for e in as_task(str(task_file)).split("test")[:6]]
    assert tuned["majority_baseline"] == max(Counter(gold).values()) / 6
    # the bare source model (the default one: tune was given no --model), scored the same way
    bare = CPET.load(work).evaluate(None, str(task_file), limit=6, on="original", max_prompt_tokens=16)
    assert tuned["zero_shot_test_accuracy"] == bare["accuracy"]


def test_an_empty_directory_says_which_command_starts_it(capsys, task_file, tmp_path):
    assert main(["tune", str(tmp_path / "new"), "--task", str(task_file)]) == 2
    err = capsys.readouterr().err
    assert "is not a CPET pipeline yet" in err and f"cpet compress --model smollm2-135m --out {tmp_path / 'new'}" in err
    assert main(["recover", str(tmp_path / "new")]) == 2
    assert "cpet compress" in capsys.readouterr().err


def test_eval_checks_every_task_before_any_work(capsys, model_dir, task_file):
    assert main(["eval", "--model", str(model_dir), "--task", str(task_file), "--task", "no-such-task"]) == 2
    captured = capsys.readouterr()
    assert "unknown task 'no-such-task'" in captured.err and captured.out == ""


def test_corrupt_safetensors_is_an_error_line_not_a_traceback(capsys, model_dir, task_file, tmp_path):
    work = tmp_path / "w"
    argv = ["tune", str(work), "--task", str(task_file), "--on", "original", "--steps", "1", "--eval-every", "1",
            "--val-limit", "2", "--limit", "2", "--name", "broken"]
    run_json(capsys, *argv)
    weights = work / "adapters" / "broken" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    assert main(argv) == 2  # the finished run is reopened and its (now corrupt) adapter scored
    err = capsys.readouterr().err
    assert f"cpet tune: error: {weights} is not a readable safetensors file" in err and "Traceback" not in err


def test_no_unactionable_third_party_messages():
    """bitsandbytes' kernel-download line and peft's FutureWarning are silenced (only those)."""
    import subprocess
    import sys

    code = ("import cpet, bitsandbytes;"
            "from cpet.adapters import add_lora; from cpet.models import tiny_model;"
            "add_lora(tiny_model('llama').model, rank=2, alpha=4, dropout=0.0)")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "kernels-community" not in err and "is_gradient_checkpointing" not in err


def test_int8_cast_message_is_shown_once_not_on_every_forward():
    import subprocess
    import sys

    code = ("import torch, cpet; from cpet.compress import compress; from cpet.config import QuantizeConfig;"
            "from cpet.models import tiny_model;"
            "model = compress(tiny_model('llama').model, [QuantizeConfig('int8')], progress=False).model;"
            "[model(input_ids=torch.tensor([[1, 2, 3]])) for _ in range(3)]")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("MatMul8bitLt: inputs will be cast") == 1  # dozens of int8 matmuls ran


@pytest.fixture(scope="module")
def tuned_pipeline(tmp_path_factory, model_dir, task_file):
    """A pipeline made by the CLI alone, in the demo's order: original adapter, compress, CPET adapter."""
    work = tmp_path_factory.mktemp("flow") / "p"
    common = ["--steps", "2", "--eval-every", "1", "--val-limit", "4", "--limit", "6", "--json"]
    assert main(["tune", str(work), "--model", str(model_dir), "--task", str(task_file), "--on", "original",
                 "--name", "toy-original", *common]) == 0
    assert main(["compress", "--model", str(model_dir), "--prune-ffn", "0.5", "--importance", "magnitude",
                 "--quantize", "nf4", "--eval-tokens", "64", "--out", str(work), "--json"]) == 0
    assert main(["tune", str(work), "--task", str(task_file), "--init", "inherit", "--inherit-from", "toy-original",
                 "--name", "toy-cpet", *common]) == 0
    return work


def test_an_adapters_own_task_is_checked_for_the_split_before_any_model_work(capsys, tuned_pipeline, model_dir,
                                                                             monkeypatch):
    """`--split bogus` with an adapter's own task (no --task) failed only when scoring, after the model had loaded."""
    import cpet.cli.evaluation
    from cpet.pipeline import CPET

    def loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the split was checked")

    monkeypatch.setattr(CPET, "evaluate", loads)
    monkeypatch.setattr(cpet.cli.evaluation, "_peft_on_base", loads)
    capsys.readouterr()
    assert main(["eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--split", "bogus"]) == 2
    assert "has no split 'bogus'" in capsys.readouterr().err
    adapter = tuned_pipeline / "adapters" / "toy-original" / "adapter"
    assert main(["eval", "--model", str(model_dir), "--peft", str(adapter), "--split", "bogus"]) == 2
    assert "has no split 'bogus'" in capsys.readouterr().err


def test_cli_alone_follows_the_demo_order_and_evaluates_adapters(capsys, tuned_pipeline, task_file):
    capsys.readouterr()
    listed = run_json(capsys, "list", str(tuned_pipeline))
    assert listed["base"]["stages"] == ["prune", "quantize"]
    by_name = {a["name"]: a for a in listed["adapters"]}
    assert set(by_name) == {"toy-original", "toy-cpet"}
    assert by_name["toy-cpet"]["init"] == "inherit" and by_name["toy-cpet"]["test_accuracy"] is not None
    evaluated = run_json(capsys, "eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--limit", "6")
    (row,) = evaluated["tasks"]
    assert row["adapter"] == "toy-cpet" and row["task"] == "toy" and row["n"] == 6
    assert row["accuracy"] == by_name["toy-cpet"]["test_accuracy"]  # the same scoring as tune printed
    # `--model PIPELINE` means the pipeline; an adapter path one level too high is pointed one level down
    again = run_json(capsys, "eval", "--model", str(tuned_pipeline), "--adapter", "toy-cpet", "--limit", "6")
    assert again["tasks"][0]["accuracy"] == row["accuracy"]
    from cpet.pipeline import CPET

    validation = run_json(capsys, "eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--split", "validation",
                          "--limit", "6")["tasks"][0]
    pipeline = CPET.load(tuned_pipeline)
    expected = pipeline.evaluate("toy-cpet", str(task_file), split="validation", limit=6, with_predictions=True)
    assert validation["split"] == "validation" and validation["accuracy"] == expected["accuracy"]
    test_split = pipeline.evaluate("toy-cpet", str(task_file), limit=6, with_predictions=True)
    assert expected["gold"] != test_split["gold"]  # other examples were scored
    assert main(["eval", str(tuned_pipeline), "--adapter", str(tuned_pipeline / "adapters" / "toy-cpet")]) == 2
    assert "use " + str(tuned_pipeline / "adapters" / "toy-cpet" / "adapter") in capsys.readouterr().err
    assert main(["eval", str(tuned_pipeline), "--adapter", "nope"]) == 2
    assert "toy-cpet, toy-original" in capsys.readouterr().err
    # perplexity is of one model, named: the adapter's with its recovery, or the compressed base's
    corpus = tuned_pipeline.parent / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    common = ["--corpus", str(corpus), "--max-tokens", "64", "--max-length", "32"]
    from tests.test_assembly import give_weight

    noisy = tuned_pipeline / "adapters" / "toy-noisy"  # toy-cpet's best step is 0 (B = 0): one that changes logits
    shutil.copytree(tuned_pipeline / "adapters" / "toy-cpet", noisy)
    give_weight(noisy / "adapter")
    with_adapter = run_json(capsys, "eval", str(tuned_pipeline), "--adapter", "toy-noisy", *common)["perplexity"]
    bare = run_json(capsys, "eval", str(tuned_pipeline), *common)["perplexity"]
    assert with_adapter["adapter"] == "toy-noisy" and bare["adapter"] == "compressed base"
    from cpet.evaluate import perplexity

    with CPET.load(tuned_pipeline).running(noisy / "adapter") as model:
        expected = perplexity(model, pipeline.tokenizer, corpus.read_text(), max_length=32, stride=32, max_tokens=64)
    assert with_adapter["ppl"] == pytest.approx(expected.ppl, rel=1e-6) and with_adapter["ppl"] != bare["ppl"]
    shutil.rmtree(noisy)  # the other tests of this module list the pipeline's adapters
    assert main(["eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--adapter", "toy-original", *common]) == 2
    assert "--corpus scores one model: give one --adapter" in capsys.readouterr().err
    assert main(["eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--max-prompt-tokens", "7", "--limit", "2"]) == 2
    assert "trained on prompts cut to" in capsys.readouterr().err


def test_eval_a_peft_directory_on_a_plain_model(capsys, tmp_path, tuned_pipeline, model_dir, task_file, monkeypatch):
    original = tuned_pipeline / "adapters" / "toy-original" / "adapter"
    plain = run_json(capsys, "eval", "--model", str(model_dir), "--peft", str(original), "--limit", "6")
    inside = run_json(capsys, "eval", str(tuned_pipeline), "--adapter", "toy-original", "--limit", "6")
    assert plain["tasks"][0]["accuracy"] == inside["tasks"][0]["accuracy"]
    # prompts are cut as the adapter was trained: from the left for one whose cpet.json predates the record
    import cpet.evaluate

    legacy = tmp_path / "legacy"
    shutil.copytree(original, legacy)
    meta = json.loads((legacy / "cpet.json").read_text())
    del meta["prompt_cut"]
    (legacy / "cpet.json").write_text(json.dumps(meta))
    cuts, fit = [], cpet.evaluate.fit_prompt
    monkeypatch.setattr(cpet.evaluate, "fit_prompt", lambda *args: cuts.append(args[4]) or fit(*args))
    for adapter in (original, legacy):
        run_json(capsys, "eval", "--model", str(model_dir), "--peft", str(adapter), "--limit", "2")
    assert cuts == ["text_end"] * 2 + ["left"] * 2
    monkeypatch.undo()
    assert main(["eval", "--model", str(original)]) == 2
    assert "is an adapter, not a model" in capsys.readouterr().err
    assert main(["eval", str(tuned_pipeline), "--peft", str(original)]) == 2  # not silently ignored
    assert "an adapter of the pipeline is named with --adapter NAME" in capsys.readouterr().err
    # a plain PEFT directory (no cpet.json) names no task: an error, not a run that scores nothing
    plain_peft = tmp_path / "plain-peft"
    shutil.copytree(original, plain_peft)
    (plain_peft / "cpet.json").unlink()
    assert main(["eval", "--model", str(model_dir), "--peft", str(plain_peft)]) == 2
    assert "plain PEFT adapter (no cpet.json names its task)" in capsys.readouterr().err
    with_task = run_json(capsys, "eval", "--model", str(model_dir), "--peft", str(plain_peft), "--task",
                         str(task_file), "--limit", "6")
    assert with_task["tasks"][0]["n"] == 6
    # an adapter of the compressed base is refused on the original by the base its cpet.json names, before the
    # model loads (an nf4-only base has the original's shapes: shapes alone would let it run on the wrong model)
    pruned = tuned_pipeline / "adapters" / "toy-cpet" / "adapter"
    assert main(["eval", "--model", str(model_dir), "--peft", str(pruned), "--task", str(task_file)]) == 2
    assert re.search(r"was made for .*, and this is the original model: .*cpet eval PIPELINE --adapter NAME",
                     capsys.readouterr().err)
    # without a cpet.json only its shapes tell: an error line, not peft's traceback
    plain_pruned = tmp_path / "plain-pruned"
    shutil.copytree(pruned, plain_pruned)
    (plain_pruned / "cpet.json").unlink()
    assert main(["eval", "--model", str(model_dir), "--peft", str(plain_pruned), "--task", str(task_file)]) == 2
    assert re.search(r"does not fit model .*its LoRA shapes are another model's.*cpet eval PIPELINE --adapter NAME",
                     capsys.readouterr().err)


def test_eval_peft_scores_a_cpet_adapter_as_it_was_trained(capsys, tmp_path, tuned_pipeline, model_dir, task_file,
                                                           monkeypatch):
    """Its template and label words, its prompt length (another one refused), its source model only."""
    import cpet.evaluate

    original = tuned_pipeline / "adapters" / "toy-original" / "adapter"
    retemplated = tmp_path / "retemplated"
    shutil.copytree(original, retemplated)
    meta = json.loads((retemplated / "cpet.json").read_text())
    meta.update(template="Review: {text}\nVerdict:", label_words={label: f" {label}x" for label in meta["labels"]})
    (retemplated / "cpet.json").write_text(json.dumps(meta))
    scored, accuracy = [], cpet.evaluate.classification_accuracy
    monkeypatch.setattr(cpet.evaluate, "classification_accuracy",
                        lambda *args, **kwargs: scored.append(kwargs) or accuracy(*args, **kwargs))
    run_json(capsys, "eval", "--model", str(model_dir), "--peft", str(retemplated), "--task", str(task_file),
             "--limit", "2")
    (kwargs,) = scored
    assert kwargs["template"].template == "Review: {text}\nVerdict:"
    assert kwargs["verbalizer"].label_words == {label: f" {label}x" for label in meta["labels"]}
    assert kwargs["max_prompt_tokens"] == meta["max_prompt_tokens"]
    monkeypatch.undo()
    recorded = meta["max_prompt_tokens"]
    assert main(["eval", "--model", str(model_dir), "--peft", str(original), "--max-prompt-tokens",
                 str(recorded + 1)]) == 2
    assert f"trained on prompts cut to {recorded} tokens" in capsys.readouterr().err
    same = run_json(capsys, "eval", "--model", str(model_dir), "--peft", str(original), "--max-prompt-tokens",
                    str(recorded), "--limit", "2")
    assert same["tasks"][0]["n"] == 2
    other_labels = tmp_path / "other.jsonl"
    other_labels.write_text("\n".join(json.dumps({"text": f"row {i}", "label": "yes" if i % 2 else "no"})
                                      for i in range(40)))
    assert main(["eval", "--model", str(model_dir), "--peft", str(original), "--task", str(other_labels)]) == 2
    assert "that adapter " + str(original) + " does not know" in capsys.readouterr().err
    another_source = tmp_path / "another-source"
    shutil.copytree(original, another_source)
    meta = json.loads((another_source / "cpet.json").read_text())
    (another_source / "cpet.json").write_text(json.dumps({**meta, "source_fingerprint": "f" * 64}))
    assert main(["eval", "--model", str(model_dir), "--peft", str(another_source), "--limit", "2"]) == 2
    assert "not on this source model" in capsys.readouterr().err


def test_version_names_the_libraries(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("cpet 0.") and "transformers" in out and "peft" in out


def test_runtime_flags_and_a_config_file_that_flags_override(capsys, model_dir, task_file, tmp_path):
    import torch

    config = tmp_path / "run.yaml"
    config.write_text(f"task: [{task_file}]\nlimit: 3\nmax-prompt-tokens: 9\nthreads: 1\nseed: 4\n")
    result = run_json(capsys, "eval", "--model", str(model_dir), "--config", str(config), "--limit", "5")
    assert result["tasks"][0]["n"] == 5  # the flag wins over the file's 3
    assert result["tasks"][0]["max_prompt_tokens"] == 9  # and the file's other flags take effect
    assert torch.get_num_threads() == 1
    (tmp_path / "bad.json").write_text(json.dumps({"limt": 3}))
    assert main(["eval", "--model", str(model_dir), "--config", str(tmp_path / "bad.json")]) == 2
    assert "cpet eval has no flag limt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["info", str(model_dir), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    half = run_json(capsys, "info", str(model_dir), "--dtype", "bfloat16")
    assert half["memory_bytes"] == 2 * half["parameters"]


def test_pipeline_commands_save_the_config_they_ran_with(capsys, model_dir, task_file, tmp_path):
    work = tmp_path / "w"
    run_json(capsys, "tune", str(work), "--model", str(model_dir), "--task", str(task_file), "--on", "original",
             "--steps", "1", "--eval-every", "1", "--val-limit", "2", "--limit", "2", "--seed", "3")
    (saved,) = (work / "configs").glob("tune-*.json")
    values = json.loads(saved.read_text())
    assert values["seed"] == 3 and values["steps"] == 1 and values["on"] == "original"
    # the saved file runs the same command again (a resume of the finished run: same result)
    again = run_json(capsys, "tune", str(work), "--config", str(saved))
    assert again["test"]["n"] == 2


def test_source_fingerprint_does_not_depend_on_dtype(model_dir):
    import torch

    from cpet.models import load_base, model_fingerprint

    fp32 = load_base(str(model_dir))
    bf16 = load_base(str(model_dir), dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.content_fingerprint() == fp32.content_fingerprint() == model_fingerprint(fp32.model)
    assert model_fingerprint(bf16.model) != fp32.content_fingerprint()  # what a naive hash would see


def test_info_in_human_units_and_per_task_spelled_either_way(capsys, model_dir):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| parameters +\| \d+\.\d M", out) and re.search(r"\| memory_bytes +\| \d+\.\d (kB|MB)", out)
    from cpet.cli import build_parser

    args = build_parser().parse_args(["tune", "p", "--task", "t", "--recovery", "per-task"])
    assert args.recovery == "per_task"


def test_scoring_progress_counts_examples(monkeypatch):
    import cpet.evaluate
    from cpet.evaluate import label_logprobs

    totals, updates = [], []

    class Bar:
        def __init__(self, total, **kwargs):
            totals.append(total)

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(cpet.evaluate, "tqdm", Bar)
    loaded = tiny_model("llama")
    label_logprobs(loaded.model, loaded.tokenizer, ["a b", "c d e", "f"], [" x y", " z"], batch_size=4)
    assert totals == [3] and sum(updates) == 3  # 6 (prompt, label) sequences, 3 examples


def test_perplexity_says_why_fewer_tokens_were_scored(capsys, model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus of plain words. " * 30)  # 930 byte tokens
    assert main(["eval", "--model", str(model_dir), "--corpus", str(corpus), "--max-tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "510 tokens scored of 512 read: the first token of each 256-token window has no context" in out


def test_sparsity_writes_a_json_report_and_a_png(capsys, model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A plain sentence about the weather and the sea, told once more. " * 60)
    out = tmp_path / "sparsity"
    report = run_json(capsys, "sparsity", "--model", str(model_dir), "--corpus", str(corpus), "--calibration-samples",
                      "2", "--seq-len", "32", "--max-tokens", "256", "--ppl-p", "5", "--out", str(out))
    assert json.loads((out / "sparsity.json").read_text()) == report
    assert (out / "sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert len(report["layers"]) == 2 and report["tokens"] == 64 and report["ppl_p"]["p"] == 5.0
    assert report["baseline"]["ppl"] > 0


@pytest.mark.parametrize("argv, message", [(["--cett", "1.5"], r"--cett .* in \[0, 1\]"),
                                           (["--ppl-p", "-1"], r"--ppl-p .* \(a finite number > 0\), got -1"),
                                           (["--ppl-p", "nan"], r"--ppl-p .* \(a finite number > 0\), got nan"),
                                           (["--seq-len", "1"], r"--seq-len: .*>= 2"),
                                           # refused after the activations and the bisections
                                           (["--max-tokens", "1"], r"--max-tokens must be >= 2")])
def test_sparsity_refuses_bad_targets_before_loading(capsys, argv, message):
    with pytest.raises(SystemExit) if argv[0] == "--seq-len" else contextlib.nullcontext():  # argparse's own
        assert main(["sparsity", "--model", "no-such-model", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_sparsity_refuses_an_output_or_corpus_it_cannot_use_before_loading(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    # an unknown model would fail later, at loading: these fail first
    assert main(["sparsity", "--model", "no-such-model", "--out", str(a_file / "sub")]) == 2
    assert f"output directory {a_file / 'sub'} cannot be made: {a_file} is a file" in capsys.readouterr().err
    assert main(["sparsity", "--model", "no-such-model", "--corpus", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "unknown model" not in err


def test_sparsity_without_matplotlib_says_how_to_install_it_before_any_work(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["sparsity", "--model", "no-such-model"]) == 2  # an unknown model would fail later, at loading
    assert "pip install 'cpet[plots]'" in capsys.readouterr().err


def test_stages_that_do_not_fit_the_model_fail_before_it_is_measured(capsys, model_dir, tmp_path, monkeypatch):
    import cpet.evaluate

    measured = []
    monkeypatch.setattr(cpet.evaluate, "perplexity", lambda *a, **k: measured.append(a))
    out = tmp_path / "moe"
    # the tiny qwen2 FFN has 128 neurons: 7 experts cannot split it into equal parts
    assert main(["compress", "--model", str(model_dir), "--moefy-experts", "7", "--out", str(out)]) == 2
    assert re.search(r"FFN widths \[128\] do not split into 7 equal experts", capsys.readouterr().err)
    assert measured == [] and not out.exists()  # refused before any measurement, and no empty directory left


def test_os_errors_are_error_lines_not_tracebacks(capsys, model_dir, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["compress", "--model", str(model_dir), "--prune-ffn", "0.5", "--importance", "magnitude",
                 "--out", str(a_file)]) == 2
    assert f"work directory {a_file} is a file" in capsys.readouterr().err
    assert main(["export", str(a_file / "sub"), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpet export: error:") and "Traceback" not in err


def test_a_refused_tune_saves_no_config_and_names_stay_inside_the_pipeline(capsys, model_dir, task_file, tmp_path):
    work = tmp_path / "w"
    assert main(["tune", str(work), "--model", str(model_dir), "--task", str(task_file), "--on", "original",
                 "--steps", "1", "--name", "../escape"]) == 2
    assert "must be one directory name" in capsys.readouterr().err
    assert not list(work.glob("configs/*.json")) and not (tmp_path / "escape").exists()


@pytest.mark.parametrize("text, message", [
    ("keep-optimizer-state: 'false'\n", r"keep-optimizer-state is a switch and takes true or false, got 'false'"),
    ("steps: [1, 2]\n", r"steps takes one value, got the list \[1, 2\]"),
    ("steps: 2\non: original\n", r"a key was read as True .*quote it, e\.g\. \"on\": original"),
    ("3: 4\n", r"the key 3 is not a flag name"),
    # YAML null: was passed on as the string "None" (an adapter silently named None)
    ("name:\n", r"name has no value \(null\); give one, or remove the key"),
    ("task: [vader-movie, null]\n", r"task has no value \(null\)"),
    # YAML's booleans and numbers: were passed on as --name False / --name 1.1, a run under another name
    ("name: off\n", r"name was read as the boolean False .* is not a switch: quote it"),
    ("steps: yes\n", r"steps was read as the boolean True"),
    ("name: 1.10\n", r"name takes text, and YAML read 1\.1 \(float\) .*quote it"),
    ("name: 010\n", r"name takes text, and YAML read 8 \(int\)"),
    ("task: 1.0\n", r"task takes text, and YAML read 1\.0 \(float\)"),
    # YAML 1.1 numbers of a number flag: `steps: 010` trained 8 steps (octal), where --steps 010 trains 10
    ("steps: 010\n", r"steps: YAML read 010 as 8 .*write it in decimal"),
    ("eval-every: 0x10\n", r"eval-every: YAML read 0x10 as 16"),
    ("steps: 1:30\n", r"steps: YAML read 1:30 as 90"),
    # two spellings of one flag: both were passed on, and the later one won without a word
    ("max-prompt-tokens: 9\nmax_prompt_tokens: 10\n", r"max-prompt-tokens and max_prompt_tokens are one flag"),
])
def test_config_file_values_of_the_wrong_kind_are_refused(capsys, tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert main(["tune", str(tmp_path / "w"), "--config", str(config)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_config_file_values_starting_with_a_dash_stay_the_flags_values(tmp_path):
    """`split: -x` was injected as `--split -x`, which argparse reads as a second flag: "expected one argument"."""
    from cpet.cli import COMMANDS, build_parser, config_file_args

    parser = build_parser()
    config = tmp_path / "run.yaml"
    config.write_text("split: -held\ntask: [-a.jsonl, b.jsonl]\n")
    args = parser.parse_args(config_file_args(["eval", "--config", str(config)], COMMANDS))
    assert (args.split, args.task) == ("-held", ["-a.jsonl", "b.jsonl"])
    config.write_text("lr: -1e-4\n")  # YAML reads it as text, which --lr (a float) takes
    args = parser.parse_args(config_file_args(["tune", "w", "--task", "t", "--config", str(config)], COMMANDS))
    assert args.lr == -1e-4


def test_an_upper_case_gguf_suffix_is_a_gguf_file(capsys, tmp_path):
    """`model.GGUF` was refused as "a file but not a .gguf" (the suffix compared case-sensitively): it is read as a
    GGUF (here: refused for what it holds, which is not one)."""
    model = tmp_path / "model.GGUF"
    model.write_bytes(b"nope, no GGUF")
    assert main(["info", str(model)]) == 2
    assert "is not a GGUF file (its first bytes are b'nope'" in capsys.readouterr().err


def test_a_second_config_file_is_refused(capsys, tmp_path):
    """Only the first --config was read, while argparse kept the last: the second file was dropped without a word."""
    (tmp_path / "a.yaml").write_text("limit: 3\n")
    (tmp_path / "b.yaml").write_text("limit: 7\n")
    assert main(["eval", "--config", str(tmp_path / "a.yaml"), f"--config={tmp_path / 'b.yaml'}"]) == 2
    assert "--config is given twice" in capsys.readouterr().err
    # a command without --config says so, not that the file is missing (and reads no file)
    with pytest.raises(SystemExit):
        main(["list", str(tmp_path), "--config", str(tmp_path / "missing.yaml")])
    assert "unrecognized arguments: --config" in capsys.readouterr().err


def test_abbreviated_flags_are_refused(capsys):
    """--config merges a file's list into a repeatable flag unless the command line names that flag: an abbreviation
    (--adapt for --adapter) would hide it, so flags are taken by their full names only."""
    with pytest.raises(SystemExit):
        main(["eval", "runs/p", "--adapt", "x"])
    assert "unrecognized arguments: --adapt x" in capsys.readouterr().err


def test_limit_hint_only_on_limit_flags(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "w", "--rank", "0"])
    err = capsys.readouterr().err
    assert "must be >= 1, got 0" in err and "leave the flag out" not in err
    with pytest.raises(SystemExit):
        main(["eval", "--limit", "0"])
    assert "leave the flag out for all" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--max-length", "1"])
    assert "must be >= 2, got 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--rank", "4", "--rank 4 with --init inherit: the inherited adapter "
                                                                  "toy-original has rank 8"),
                                                  ("--alpha", "32", "--alpha 32 with --init inherit: .* has alpha 16")])
def test_a_rank_or_alpha_that_inheritance_would_override_is_refused(capsys, tuned_pipeline, task_file, flag, value,
                                                                    message):
    """They were dropped without a word: the adapter had the inherited rank, the saved run config the one asked."""
    before = sorted(p.name for p in (tuned_pipeline / "configs").iterdir())
    assert main(["tune", str(tuned_pipeline), "--task", str(task_file), "--init", "inherit", "--inherit-from",
                 "toy-original", flag, value, "--name", "refused", "--steps", "1"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tuned_pipeline / "adapters" / "refused").exists()
    assert sorted(p.name for p in (tuned_pipeline / "configs").iterdir()) == before  # refused before any work


def test_list_marks_adapters_of_a_replaced_base_and_damaged_ones(capsys, tuned_pipeline, tmp_path):
    import shutil

    copy = tmp_path / "p"
    shutil.copytree(tuned_pipeline, copy)
    meta_path = copy / "adapters" / "toy-cpet" / "adapter" / "cpet.json"
    meta = json.loads(meta_path.read_text())
    meta["base_id"] = "0" * 64  # as if a later `cpet compress` had replaced the base it was tuned on
    meta_path.write_text(json.dumps(meta))
    by_name = {a["name"]: a for a in run_json(capsys, "list", str(copy))["adapters"]}
    assert by_name["toy-cpet"]["fits_base"] is False and by_name["toy-original"]["fits_base"] is True
    assert main(["list", str(copy)]) == 0
    assert "compressed (a replaced base)" in capsys.readouterr().out
    meta_path.write_text("{")
    listed = run_json(capsys, "list", str(copy))["adapters"]
    assert [a["name"] for a in listed] == ["toy-cpet", "toy-original"]
    assert "cpet.json is not valid JSON" in listed[0]["error"]
    meta_path.write_text("[1, 2]")  # valid JSON, not an object: was an AttributeError traceback
    listed = run_json(capsys, "list", str(copy))["adapters"]
    assert "cpet.json holds a JSON list, not an object" in listed[0]["error"]
    assert main(["list", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a damaged manifest or recovery record is named (was a bare JSON message, or a traceback for '[]')
    manifest = copy / "base" / "manifest.json"
    manifest.write_text("[]")
    assert main(["list", str(copy)]) == 2
    assert re.search(r"base/manifest.json holds a JSON list, not an object; .*cpet compress", capsys.readouterr().err)


def test_demo_refuses_an_unknown_task_before_loading_the_model(capsys, tmp_path, monkeypatch):
    import cpet.cli.demo

    monkeypatch.setattr(cpet.cli.demo, "load_model", lambda args: pytest.fail("the model was loaded"))
    assert main(["demo", "--task", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_demo_re_run_that_its_adapters_clash_with_is_refused_before_the_model_loads(capsys, tmp_path, model_dir,
                                                                                    task_file, monkeypatch):
    """A changed --lr was refused after the first rows had been measured; a changed --recovery-steps only at the
    last step, after the shared recovery that the CPET adapter was trained with had been replaced."""
    import cpet.cli.demo

    out = tmp_path / "demo"
    flags = ["--model", str(model_dir), "--task", str(task_file), "--steps", "2", "--recovery-steps", "2", "--limit",
             "8", "--val-limit", "8", "--max-tokens", "128", "--max-prompt-tokens", "32", "--out", str(out), "--json"]
    assert main(["demo", *flags]) == 0
    capsys.readouterr()
    recovery = (out / "recovery" / "recovery.safetensors").read_bytes()
    monkeypatch.setattr(cpet.cli.demo, "load_model", lambda args: pytest.fail("the model was loaded"))

    def changed(flag: str, value: str) -> list[str]:
        if flag not in flags:
            return [*flags, flag, value]
        at = flags.index(flag)
        return flags[:at + 1] + [value] + flags[at + 2:]

    assert main(["demo", *changed("--recovery-steps", "3")]) == 2
    assert re.search(r"toy-cpet was trained with the shared recovery in .*recovery, and this run would distill "
                     r"another \(steps 2 -> 3; --recovery-steps and --seed set them\): use a new --out",
                     capsys.readouterr().err)
    assert main(["demo", *changed("--lr", "0.01")]) == 2
    assert re.search(r"toy-original/resume was written with other settings \(lr 0.001 -> 0.01\).*this demo re-run",
                     capsys.readouterr().err)
    assert main(["demo", *changed("--steps", "1")]) == 2
    assert "has already trained 2 steps, more than the 1 asked for" in capsys.readouterr().err
    assert (out / "recovery" / "recovery.safetensors").read_bytes() == recovery  # nothing was redone


def test_the_demo_seed_draws_the_compression_calibration(tmp_path, model_dir, task_file, monkeypatch):
    """--seed "seeds everything random in the command", but the demo drew its Taylor calibration windows with seed
    0 whatever it was (`cpet compress --seed` passes it on)."""
    from cpet.pipeline import CPET

    class Stop(Exception):
        pass

    seen = {}

    def compress(self, stages, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(CPET, "compress", compress)
    with pytest.raises(Stop):
        main(["demo", "--model", str(model_dir), "--task", str(task_file), "--steps", "1", "--limit", "4",
              "--val-limit", "4", "--max-tokens", "64", "--max-prompt-tokens", "32", "--out", str(tmp_path / "d"),
              "--seed", "5", "--json"])
    assert seen.get("calibration_seed") == 5


def test_help_shows_no_none_defaults(capsys):
    from cpet.cli import COMMANDS, build_parser

    build_parser()
    for name, parser in COMMANDS.items():
        assert "(default: None)" not in parser.format_help(), name
    assert "(default: compressed)" in COMMANDS["tune"].format_help()


def test_help_says_what_leaving_out_a_flag_without_default_means():
    """README: `--help` shows every flag with its default, and flags without one say what leaving them out means."""
    from cpet.cli import COMMANDS, build_parser

    build_parser()
    silent = []
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            if not action.option_strings or action.required or action.nargs == 0:  # positionals, switches, --help
                continue
            text = (action.help or "").lower()
            if action.default is None and "none" not in text and "default" not in text:
                silent.append(f"{name} {action.option_strings[0]}")
    assert silent == []


def test_help_prints_a_percent_sign_in_the_listing_and_in_the_description(capsys):
    from cpet.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert "PPL-p% sparsity" in listing and "{'" not in listing  # "% s" once formatted argparse's dict in
    assert "PPL-p% sparsity," in " ".join(COMMANDS["sparsity"].format_help().split())


def test_every_compress_flag_reaches_its_stage_config():
    from cpet.cli import build_parser
    from cpet.cli.pipeline_commands import stages_from_args
    from cpet.compress.moefy import MoEfyConfig
    from cpet.config import PruneConfig, QuantizeConfig

    args = build_parser().parse_args([
        "compress", "--out", "x", "--prune-ffn", "0.25", "--prune-heads", "0.5", "--importance", "activation",
        "--head-mode", "kv_group", "--moefy-experts", "8", "--moefy-top-k", "3", "--moefy-tau", "0.7",
        "--moefy-clustering", "weights", "--moefy-router-inputs", "moefied", "--quantize", "fp4", "--no-double-quant",
        "--compute-dtype", "bfloat16", "--quantize-embeddings"])
    assert stages_from_args(args) == [
        PruneConfig(ffn_ratio=0.25, head_ratio=0.5, importance="activation", head_mode="kv_group"),
        MoEfyConfig(num_experts=8, top_k=3, tau=0.7, clustering="weights", router_inputs="moefied"),
        QuantizeConfig(method="fp4", double_quant=False, compute_dtype="bfloat16", embeddings=True)]
    defaults = stages_from_args(build_parser().parse_args(["compress", "--out", "x", "--prune-ffn", "0.5",
                                                           "--moefy-experts", "4", "--quantize", "int8"]))
    assert defaults == [PruneConfig(ffn_ratio=0.5, importance="taylor", head_mode="query"),
                        MoEfyConfig(num_experts=4, clustering="coactivation"),
                        QuantizeConfig(method="int8", double_quant=True, compute_dtype="float32", embeddings=False)]


def test_round_to_reaches_the_pruning_stage_so_that_a_pruned_ffn_splits_into_equal_experts():
    """The MoEfication refusal of widths that do not split suggested round_to, which the command line lacked."""
    from cpet.cli import build_parser
    from cpet.cli.pipeline_commands import stages_from_args
    from cpet.config import PruneConfig

    args = build_parser().parse_args(["compress", "--out", "x", "--prune-ffn", "0.3", "--round-to", "8",
                                      "--moefy-experts", "8"])
    assert stages_from_args(args)[0] == PruneConfig(ffn_ratio=0.3, round_to=8)


@pytest.mark.parametrize("argv, message", [
    (["compress", "--out", "{file}/p", "--prune-ffn", "0.25"], r"output directory .* cannot be made: .* is a file"),
    (["tune", "{tmp}/new", "--on", "original", "--init", "inherit", "--task", "{task}"],
     r"tuning on the original model takes init='random'"),
    (["tune", "{tmp}/new", "--on", "original", "--lr", "inf", "--task", "{task}"], r"lr must be a finite number"),
    (["demo", "--out", "{tmp}/demo", "--lr", "0", "--task", "{task}"], r"lr must be a finite number > 0, got 0"),
    (["demo", "--out", "{file}/demo", "--task", "{task}"], r"output directory .* cannot be made: .* is a file"),
    (["tune", "{tmp}/new", "--on", "original", "--task", "{small}"], r"task 'small': the validation split is empty"),
    (["eval", "--model", "m", "--task", "{small}", "--split", "validation"], r"the validation split is empty"),
    (["tune", "{tmp}/new", "--on", "original", "--task", "{task}", "--name", "a/b"], r"adapter name 'a/b'"),
    (["tune", "{tmp}/new", "--on", "original", "--task", "{task}", "--inherit-from", "x"],
     r"inherit_from \(x\) is read only by init='inherit'"),
    (["tune", "{tmp}/new", "--init", "inherit", "--task", "{task}"], r"init='inherit' and per-task recovery need"),
    # a directory of other files (it holds a-file and small.jsonl): a pipeline's base/ and adapters/ would replace
    # any directories of those names there
    (["compress", "--out", "{tmp}", "--prune-ffn", "0.25"], r"holds files and is not a CPET pipeline .*a-file"),
    (["tune", "{tmp}", "--on", "original", "--task", "{task}"], r"holds files and is not a CPET pipeline"),
    (["demo", "--out", "{tmp}", "--task", "{task}"], r"holds files and is not a CPET pipeline"),
    # entries named as a pipeline's that are not: compress replaced the model directory base/ with its base
    (["compress", "--out", "{tmp}/lookalike", "--prune-ffn", "0.25"], r"no pipeline.json; it holds base, recovery\)"),
    # labels whose default words coincide ('very_good' and 'very good'): refused once the model had loaded
    (["tune", "{tmp}/new", "--on", "original", "--task", "{twins}"], r"maps two labels to the same word"),
    (["demo", "--out", "{tmp}/demo", "--task", "{twins}"], r"maps two labels to the same word"),
    (["eval", "--model", "m", "--task", "{twins}"], r"labels \['very good', 'very_good'\] all map to ' very good'"),
    # what peft would trip over after the model loaded
    (["eval", "--model", "m", "--peft", "{tmp}/bin-peft", "--task", "{task}"],
     r"has no adapter_model.safetensors \(CPET reads safetensors adapters only"),
    (["eval", "--model", "m", "--peft", "{tmp}/bad-peft", "--task", "{task}"],
     r"adapter_config.json is not valid JSON .*is it the right directory"),
])
def test_bad_flags_are_refused_before_a_model_loads(capsys, monkeypatch, tmp_path, task_file, argv, message):
    import cpet.models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(cpet.models, "load_base", no_load)
    a_file = tmp_path / "a-file"
    a_file.write_text("in the way")
    small = tmp_path / "small.jsonl"  # 5 examples per label: the seeded split leaves validation empty
    small.write_text("\n".join(json.dumps({"text": f"item {i}", "label": "ab"[i % 2]}) for i in range(10)))
    for name, config in (("bin-peft", "{}"), ("bad-peft", "{")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(config)
        weights = "adapter_model.bin" if name == "bin-peft" else "adapter_model.safetensors"
        (tmp_path / name / weights).write_bytes(b"x")
    for entry in ("base", "recovery"):
        (tmp_path / "lookalike" / entry).mkdir(parents=True)
        (tmp_path / "lookalike" / entry / "config.json").write_text("{}")
    twins = tmp_path / "twins.jsonl"
    twins.write_text("\n".join(json.dumps({"text": f"item {i}", "label": ["very_good", "very good"][i % 2]})
                               for i in range(60)))
    filled = [a.format(file=a_file, tmp=tmp_path, task=task_file, small=small, twins=twins) for a in argv]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not list(tmp_path.glob("**/configs"))  # nothing saved for a refused command, not even its directory


def test_a_tune_refused_by_the_pipeline_removes_what_it_made_and_nothing_else(capsys, model_dir, task_file,
                                                                               tmp_path, monkeypatch):
    from cpet.pipeline import CPET

    def refuse(*args, **kwargs):
        raise ValueError("refused inside tune")

    monkeypatch.setattr(CPET, "tune", refuse)
    argv = ["--model", str(model_dir), "--task", str(task_file), "--on", "original", "--steps", "1"]
    assert main(["tune", str(tmp_path / "new"), *argv]) == 2
    assert "refused inside tune" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # its configs/ and the directory itself were made by this run
    mine = tmp_path / "mine"
    mine.mkdir()  # the user's own, empty: it stays
    assert main(["tune", str(mine), *argv]) == 2
    assert mine.is_dir() and not any(mine.iterdir())


def test_a_tune_of_a_missing_task_file_saves_no_config(capsys, model_dir, tmp_path):
    work = tmp_path / "w"
    assert main(["tune", str(work), "--model", str(model_dir), "--task", str(tmp_path / "missing.jsonl"), "--on",
                 "original", "--steps", "1"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not list(work.glob("configs/*.json"))


@pytest.mark.parametrize("seed, message", [("99999999999999999999999", "must be below 2\\*\\*32"),
                                           ("-1", "must be >= 0, got -1")])
def test_a_seed_out_of_range_is_refused_naming_the_flag(capsys, seed, message):
    """A huge seed failed inside torch ('Overflow when unpacking long long') without naming --seed."""
    with pytest.raises(SystemExit):
        main(["tune", "runs/p", "--task", "vader-movie", "--seed", seed])
    assert re.search(r"argument --seed: " + message, capsys.readouterr().err)


def test_writing_commands_refuse_a_pipeline_they_cannot_write_to_before_any_work(capsys, tuned_pipeline,
                                                                                monkeypatch):
    """compress and recover on a read-only pipeline ran all their work and failed at the save (root bypasses
    permissions, so the check is shown with os.access answering as it would for another user)."""
    import os

    import cpet.assets
    import cpet.pipeline

    def read_only(path, mode):
        return not (mode & os.W_OK and os.path.realpath(path) == os.path.realpath(tuned_pipeline))

    monkeypatch.setattr(cpet.assets.os, "access", read_only)
    monkeypatch.setattr(cpet.pipeline.CPET, "load", lambda *a, **k: pytest.fail("the pipeline was opened"))
    assert main(["recover", str(tuned_pipeline), "--steps", "1"]) == 2
    assert re.search(r"output directory .* cannot be made: .* is not writable", capsys.readouterr().err)
    assert main(["compress", "--out", str(tuned_pipeline), "--prune-ffn", "0.25"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_eval_of_two_adapters_reports_accuracy_intervals_and_their_paired_difference(capsys, tuned_pipeline,
                                                                                     task_file):
    """Two adapters scored on the same examples: each accuracy with its Wilson interval, and A − B with a paired
    interval over the same test examples (one run each: test-set noise only)."""
    from cpet.pipeline import CPET
    from cpet.stats import paired_bootstrap, wilson_interval

    capsys.readouterr()
    scored = run_json(capsys, "eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--adapter", "toy-original",
                      "--limit", "6")
    rows = {row["adapter"]: row for row in scored["tasks"]}
    assert set(rows) == {"toy-cpet", "toy-original"} and "predictions" not in rows["toy-cpet"]
    for row in rows.values():
        assert row["accuracy_interval_95"] == list(wilson_interval(round(row["accuracy"] * 6), 6))
    (comparison,) = scored["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["units"]) == ("toy-cpet", "toy-original", "examples")
    assert comparison["difference"] == pytest.approx(rows["toy-cpet"]["accuracy"] - rows["toy-original"]["accuracy"])
    # the interval is the paired one over these very examples
    pipeline = CPET.load(tuned_pipeline)
    marks = []
    for name in ("toy-cpet", "toy-original"):
        result = pipeline.evaluate(name, str(task_file), limit=6, with_predictions=True)
        marks.append("".join("1" if p == g else "0" for p, g in zip(result["predictions"], result["gold"])))
    _, low, high = paired_bootstrap(marks[:1], marks[1:], tasks=["toy"])
    assert comparison["interval_95"] == pytest.approx([low, high])
    # the same adapter against itself: no difference, and an interval of zero width
    same = run_json(capsys, "eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--adapter", "toy-cpet",
                    "--limit", "6")["comparisons"][0]
    assert same["difference"] == 0.0 and same["interval_95"] == [0.0, 0.0]
    # the table names the comparison and says what the interval covers
    assert main(["eval", str(tuned_pipeline), "--adapter", "toy-cpet", "--adapter", "toy-original",
                 "--limit", "6"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\| toy-cpet +\| toy +\| test +\| 6 +\|", text) and "paired differences (A − B" in text
    assert "test-set noise only" in text and re.search(r"\| toy +\| test +\| toy-cpet +\| toy-original +\|", text)


def test_paired_comparisons_resample_a_built_in_tasks_units_and_only_its_own():
    """vader-product's test sentences come in reviews: a comparison on its test split resamples reviews; a user
    task that happens to share the name is resampled by examples, even where its labels are the built-in's; and
    adapters pair only where they scored the same examples."""
    from cpet.cli.evaluation import paired_comparisons, without_predictions
    from cpet.data import load_task
    from cpet.data.tasks import Example, examples_sha256
    from cpet.data.units import test_split_units
    from cpet.stats import paired_bootstrap

    examples = load_task("vader-product").split("test")[:120]
    gold = [e.label for e in examples]
    flipped = ["negative" if g == "positive" else "positive" for g in gold]
    a = gold[:60] + flipped[60:]           # right on the first 60
    b = flipped[:30] + gold[30:]           # right on the last 90

    def scored(digest, labels=gold, names=("a", "b")):
        return [{"adapter": n, "task": "vader-product", "split": "test", "predictions": p, "gold": labels,
                 "examples_sha256": digest} for n, p in zip(names, (a, b))]

    entries = scored(examples_sha256(examples))
    (comparison,) = paired_comparisons(entries)
    assert comparison["difference"] == pytest.approx((60 - 90) / 120)
    assert comparison["units"].startswith("dependent units")
    without_predictions({"tasks": entries})  # what served the pairing is not printed
    assert "predictions" not in entries[0] and "examples_sha256" not in entries[0]
    marks = ["".join("1" if p == g else "0" for p, g in zip(x, gold)) for x in (a, b)]
    units = test_split_units("vader-product")[:120]
    _, low, high = paired_bootstrap(marks[:1], marks[1:], tasks=["vader-product"], clusters={"vader-product": units})
    assert comparison["interval_95"] == pytest.approx([low, high])
    _, low_examples, high_examples = paired_bootstrap(marks[:1], marks[1:], tasks=["vader-product"])
    assert high - low > high_examples - low_examples  # the reviews make it wider than independent sentences would
    # a user task named vader-product: other labels, or the built-in's labels on other texts: no units of the built-in
    relabelled = [Example(e.text, label) for e, label in zip(examples, flipped)]
    assert paired_comparisons(scored(examples_sha256(relabelled), labels=flipped))[0]["units"] == "examples"
    mine = [Example(f"my sentence {i}", e.label) for i, e in enumerate(examples)]
    (other,) = paired_comparisons(scored(examples_sha256(mine)))
    assert other["units"] == "examples"
    assert other["interval_95"] == pytest.approx([low_examples, high_examples])
    # two adapters scored on different examples under one task name are not paired
    (on_builtin, _), (on_mine, _) = scored(examples_sha256(examples)), scored(examples_sha256(mine))
    assert paired_comparisons([on_builtin, {**on_mine, "adapter": "b"}]) == []


def test_an_accuracy_on_a_built_in_test_split_in_units_resamples_its_units():
    """brown-genre's passages come 27 documents to the test split: a Wilson interval over the passages took them as
    independent and was about four times too narrow; an accuracy of other examples keeps the Wilson interval."""
    from cpet.cli.evaluation import with_accuracy_intervals
    from cpet.data import load_task
    from cpet.data.tasks import Example, examples_sha256
    from cpet.data.units import test_split_units
    from cpet.stats import paired_bootstrap, wilson_interval

    examples = load_task("brown-genre").split("test")
    gold = [e.label for e in examples]
    other = sorted(set(gold))
    units = test_split_units("brown-genre")
    wrong_documents = sorted(set(units))[::4]  # errors come by document, as a genre's hard texts would
    predictions = [next(x for x in other if x != g) if u in wrong_documents else g for g, u in zip(gold, units)]
    entry = {"task": "brown-genre", "split": "test", "n": len(gold), "accuracy": 0.0, "predictions": predictions,
             "gold": gold, "examples_sha256": examples_sha256(examples)}
    entry["accuracy"] = sum(p == g for p, g in zip(predictions, gold)) / len(gold)
    (scored,) = with_accuracy_intervals({"tasks": [dict(entry)]})["tasks"]
    marks = "".join("1" if p == g else "0" for p, g in zip(predictions, gold))
    _, low, high = paired_bootstrap([marks], ["0" * len(marks)], tasks=["brown-genre"],
                                    clusters={"brown-genre": units})
    assert scored["accuracy_interval_units"].startswith("dependent units")
    assert scored["accuracy_interval_95"] == pytest.approx([max(low, 0.0), min(high, 1.0)])
    wilson = wilson_interval(round(entry["accuracy"] * entry["n"]), entry["n"])
    assert low < entry["accuracy"] < high and high - low > 2 * (wilson[1] - wilson[0])  # 27 documents, not 748
    mine = [Example(f"my passage {i}", g) for i, g in enumerate(gold)]  # same labels, other texts: no units
    (plain,) = with_accuracy_intervals({"tasks": [{**entry, "examples_sha256": examples_sha256(mine)}]})["tasks"]
    assert plain["accuracy_interval_95"] == list(wilson) and plain["accuracy_interval_units"] == "examples (Wilson)"


def test_eval_refuses_a_task_given_twice_before_any_work(capsys, model_dir, task_file, tuned_pipeline):
    """A task given twice was scored twice and then crashed comparing the two (KeyError: 'adapter'), after all the
    scoring and with nothing on stdout; with a pipeline, the zero-shot base was compared with itself."""
    same_file = f"{task_file.parent}/./{task_file.name}"  # another spelling of the same file
    for argv, message in (
            (["--model", str(model_dir), "--task", str(task_file), "--task", str(task_file)],
             f"--task {task_file} is given more than once: give each once"),
            (["--model", str(model_dir), "--task", str(task_file), "--task", str(same_file)],
             f"--task {task_file} and --task {same_file} are the same task"),
            ([str(tuned_pipeline), "--task", str(task_file), "--task", str(task_file)],
             f"--task {task_file} is given more than once")):
        assert main(["eval", *argv]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == "", argv


@pytest.mark.parametrize("argv", [["eval", "--model", "no-such-model", "--corpus", "brown", "--max-tokens", "1"],
                                  ["compress", "--model", "no-such-model", "--quantize", "nf4", "--eval-tokens", "1"],
                                  ["demo", "--max-tokens", "1"]])
def test_perplexity_token_counts_below_two_are_refused_by_argparse(capsys, argv):
    """``--max-tokens 1`` got past the parser and, after the model loaded, failed as "the corpus has 1 token(s)"."""
    with pytest.raises(SystemExit):
        main(argv)
    assert "must be >= 2, got 1 (perplexity scores each token after the first" in capsys.readouterr().err


def test_list_marks_adapters_whose_shared_recovery_was_replaced(capsys, tuned_pipeline, tmp_path):
    """`cpet recover` run again replaces the set an adapter was trained with: eval, serve and export refuse it, and
    list showed it as usable."""
    import hashlib
    import shutil

    copy = tmp_path / "p"
    shutil.copytree(tuned_pipeline, copy)
    (copy / "recovery").mkdir()
    (copy / "recovery" / "recovery.safetensors").write_bytes(b"the set at hand")
    meta_path = copy / "adapters" / "toy-cpet" / "adapter" / "cpet.json"
    meta = json.loads(meta_path.read_text())
    for trained_with, fits in ((b"an earlier set", False), (b"the set at hand", True)):
        meta_path.write_text(json.dumps({**meta, "recovery": "shared",
                                         "shared_recovery": {"sha256": hashlib.sha256(trained_with).hexdigest()}}))
        by_name = {a["name"]: a for a in run_json(capsys, "list", str(copy))["adapters"]}
        assert (by_name["toy-cpet"]["fits_recovery"], by_name["toy-original"]["fits_recovery"]) == (fits, True)
    meta_path.write_text(json.dumps({**meta, "recovery": "shared", "shared_recovery": {"sha256": "0" * 64}}))
    assert main(["list", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "shared (replaced)" in out and "no longer run; tune them again" in out
    shutil.rmtree(copy / "recovery")  # no shared recovery at all: nothing it was trained with is here
    assert {a["name"]: a for a in run_json(capsys, "list", str(copy))["adapters"]}["toy-cpet"]["fits_recovery"] is False


def test_an_adapter_of_a_relative_model_path_records_it_absolute(capsys, model_dir, task_file, tmp_path, monkeypatch):
    """pipeline.json kept the source absolute, but the adapter's base_model_name_or_path, cpet.json and card kept
    the relative path: load_standalone and the card's snippet failed from any other directory."""
    from cpet.adapters import load_standalone

    monkeypatch.chdir(model_dir.parent)
    run_json(capsys, "tune", str(tmp_path / "w"), "--on", "original", "--model", model_dir.name, "--task",
             str(task_file), "--steps", "1", "--eval-every", "1", "--limit", "2", "--name", "orig")
    adapter = tmp_path / "w" / "adapters" / "orig" / "adapter"
    for recorded in (json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"],
                     json.loads((adapter / "cpet.json").read_text())["source_name"]):
        assert recorded == str(model_dir.resolve())
    assert f'from_pretrained("{model_dir.resolve()}")' in (adapter / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    model, _ = load_standalone(adapter)  # from another directory
    assert model.peft_config["default"].base_model_name_or_path == str(model_dir.resolve())


def test_two_task_files_of_one_name_are_told_to_be_renamed_not_called_the_same(capsys, model_dir, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "reviews.jsonl").write_text(
            "\n".join(json.dumps({"text": f"{folder} {i}", "label": "xy"[i % 2]}) for i in range(30)))
    assert main(["eval", "--model", str(model_dir), "--task", str(tmp_path / "a" / "reviews.jsonl"), "--task",
                 str(tmp_path / "b" / "reviews.jsonl")]) == 2
    assert "are two tasks of one name (reviews): rename one of the files" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--task", "{task}", "--max-tokens", "512"],
     r"^cpet eval: error: --max-tokens does not apply without --corpus C \(perplexity\): give --corpus C, or leave it "
     r"out$"),
    # the defaults' own values, given, count as given too
    (["--task", "{task}", "--max-length", "256", "--max-tokens", "8192"],
     r"--max-tokens and --max-length do not apply without --corpus C .*leave them out$"),
    (["--corpus", "{corpus}", "--limit", "5"],
     r"^cpet eval: error: --limit does not apply when no task is scored \(accuracy\): give --task T, or leave it out$"),
    (["--corpus", "{corpus}", "--split", "test", "--max-prompt-tokens", "9", "--batch-size", "4"],
     r"--split, --max-prompt-tokens and --batch-size do not apply when no task is scored"),
    # both kinds at once: each named, with what would make it apply
    (["--peft", "{peft}", "--task", "{task}", "--max-length", "64"], r"--max-length does not apply without --corpus"),
    (["--peft", "{peft}", "--corpus", "{corpus}", "--limit", "3"],
     r"--limit does not apply .*give --task T \(the PEFT adapter .*plain-peft names no task"),
    (["{pipeline}", "--corpus", "{corpus}", "--split", "validation"],
     r"--split does not apply .*give --task T \(the compressed base, zero-shot\) or --adapter NAME"),
    # a --config file's flags are given flags
    (["--corpus", "{corpus}", "--config", "{config}"],
     r"--max-prompt-tokens does not apply when no task is scored .*\(a flag set in --config .*run.yaml counts as "
     r"given\)$"),
    (["--task", "{task}", "--config", "{config}"], r"--max-tokens does not apply without --corpus"),
])
def test_eval_refuses_flags_of_scoring_it_does_not_do_before_any_model_work(capsys, model_dir, task_file, tmp_path,
                                                                            monkeypatch, argv, message):
    """`--max-tokens` / `--max-length` without --corpus, and `--split`, `--limit`, `--max-prompt-tokens` and
    `--batch-size` with no task to score, were dropped without a word."""
    import cpet.cli.evaluation
    from cpet.pipeline import CPET

    def loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(cpet.cli.evaluation, "load_model", loads)
    monkeypatch.setattr(cpet.cli.evaluation, "_peft_on_base", loads)
    monkeypatch.setattr(CPET, "load", loads)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus of plain words. " * 30)
    peft = tmp_path / "plain-peft"  # a plain PEFT directory: no cpet.json names a task
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"")
    pipeline = tmp_path / "p"
    pipeline.mkdir()
    (pipeline / "pipeline.json").write_text("{}")
    config = tmp_path / "run.yaml"
    config.write_text("max-prompt-tokens: 9\nmax-tokens: 64\n" if "{corpus}" not in argv else "max-prompt-tokens: 9\n")
    values = {"{task}": str(task_file), "{corpus}": str(corpus), "{peft}": str(peft), "{pipeline}": str(pipeline),
              "{config}": str(config)}
    argv = [values.get(a, a) for a in argv]
    model = [] if str(pipeline) in argv else ["--model", str(model_dir)]
    assert main(["eval", *model, *argv]) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err.strip()) and captured.out == "", captured.err


def test_eval_fills_in_the_defaults_of_the_flags_left_out(capsys, model_dir, task_file, tmp_path, monkeypatch):
    """The flags of one kind of scoring default to None in the parser (so that a given one can be told apart): the
    run still gets their defaults, and the help still names them."""
    import cpet.cli.evaluation

    seen = []
    monkeypatch.setattr(cpet.cli.evaluation, "_eval_model",
                        lambda args, *rest: seen.append(vars(args).copy()) or {"model": args.model})
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus of plain words. " * 30)
    assert main(["eval", "--model", str(model_dir), "--task", str(task_file), "--corpus", str(corpus)]) == 0
    (args,) = seen
    assert (args["split"], args["limit"], args["max_prompt_tokens"], args["batch_size"], args["max_tokens"],
            args["max_length"]) == ("test", None, None, 16, 8192, 256)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("task split to score (default: test;", "perplexity tokens (>= 2; default: 8192; only with --corpus)",
                  "default: 256; only with --corpus)", "examples per forward pass (default: 16;",
                  "score only the first N examples (default: all;"):
        assert shown in text
