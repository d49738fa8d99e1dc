"""The `cpet` command on a tiny model saved to disk (the real model is exercised by the demo)."""

from __future__ import annotations

import json
import random
import re

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


def test_eval_task_and_corpus(capsys, model_dir, task_file, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus of plain words. " * 30)
    result = run_json(capsys, "eval", "--model", str(model_dir), "--task", str(task_file), "--corpus", str(corpus),
                      "--limit", "5")
    assert result["tasks"][0]["n"] == 5 and 0 <= result["tasks"][0]["accuracy"] <= 1
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


@pytest.mark.parametrize("argv, message", [
    (["compress", "--prune-ffn", "1.2", "--out", "x"], r"ffn_ratio must be in \[0, 1\)"),
    (["compress", "--out", "x"], "nothing to do"),
    (["eval", "--model", "no-such-model", "--corpus", "brown"], "unknown model 'no-such-model'"),
    (["eval"], None),
])
def test_bad_input_exits_with_a_message(capsys, argv, message):
    if message is None:
        with pytest.raises(SystemExit, match="give --task"):
            main(argv)
        return
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
