"""The grid's bookkeeping and the table script, on synthetic cells (the real grid runs for hours)."""

from __future__ import annotations

import json

from experiments.grid import ROWS, cell_name, setting_summary, task_key
from experiments.table import main as table_main
from experiments.table import curve_table, load_setting_summaries, table


def cell(setting, task, row, seed, accuracy):
    return {"setting": setting, "task": task, "row": row, "seed": seed, "test_accuracy": accuracy,
            "history": [{"step": 0, "val_accuracy": accuracy - 0.1}, {"step": 20, "val_accuracy": accuracy}]}


def test_task_keys_are_file_name_safe():
    assert task_key("vader-movie") == "vader-movie"
    assert task_key("/data/my task.jsonl") == "my_task"
    assert cell_name("nf4", "/x/y.csv", "cpet", 2) == "nf4__y__cpet__s2"


def test_table_means_spreads_and_missing_cells():
    cells = [cell("original", "a", "original", 0, 0.9), cell("original", "a", "original", 1, 0.8),
             cell("original", "b", "original", 0, 0.7), cell("original", "b", "original", 1, 0.6),
             cell("nf4", "a", "vanilla", 0, 0.5)]
    text = table(cells, ["nf4"], ["a", "b"], ["original", "vanilla"], [0, 1])
    assert "| original | – | 85.0 ± 7.1 (2) | 65.0 ± 7.1 (2) | 75.0 ± 7.1 (2) |" in text
    assert "| vanilla | – | 50.0 ± 0.0 (1) | – | – |" in text
    assert "Cells finished: 5 of 8 (unfinished rows: vanilla 1 of 4)." in text
    complete = cells + [cell("nf4", t, "vanilla", seed, 0.5) for t, seed in (("a", 1), ("b", 0), ("b", 1))]
    assert "Cells finished: 8 of 8 (the grid is complete)." in table(complete, ["nf4"], ["a", "b"],
                                                                     ["original", "vanilla"], [0, 1])


def test_table_script_writes_markdown_and_plot(tmp_path):
    cells_dir = tmp_path / "cells"
    cells_dir.mkdir()
    for i, c in enumerate([cell("original", "a", "original", 0, 0.9), cell("nf4", "a", "cpet", 0, 0.8)]):
        (cells_dir / f"{i}.json").write_text(json.dumps(c))
    doc = tmp_path / "docs" / "results.md"
    table_main(["--cells", str(cells_dir), "--doc", str(doc), "--tasks", "a", "--settings", "nf4", "--seeds", "0"])
    text = doc.read_text()
    assert "| cpet | – | 80.0 ± 0.0 (1) | 80.0 ± 0.0 (1) |" in text
    assert "- `cpet`: inherited LoRA + per-task recovery" in text  # every row is explained
    assert (doc.parent / "results_curves.png").stat().st_size > 1000


def test_cpet_deltas_use_only_matched_task_seed_pairs():
    cells = [cell("original", "a", "original", 0, 0.80), cell("nf4", "a", "vanilla", 0, 0.70),
             cell("nf4", "a", "cpet", 0, 0.85),
             # seed 1 lacks its vanilla cell: it must not enter the comparison
             cell("original", "a", "original", 1, 0.50), cell("nf4", "a", "cpet", 1, 0.95)]
    text = table(cells, ["nf4"], ["a"], ["original", "vanilla", "cpet"], [0, 1])
    assert "CPET − original = +5.0 points (1 pairs); − vanilla = +15.0 points (1 pairs)" in text
    assert "no (task, seed) pair" in table(cells[3:], ["nf4"], ["a"], ["original", "vanilla", "cpet"], [0, 1])
    shared = cells + [cell("nf4", "a", "cpet-shared", 0, 0.90)]
    assert "CPET (cpet-shared) − original = +10.0 points (1 pairs); − vanilla = +20.0 points (1 pairs)" in table(
        shared, ["nf4"], ["a"], ["original", "vanilla", "cpet", "cpet-shared"], [0, 1])


def test_curve_table_averages_matched_runs_per_step():
    accuracy = {row: 0.5 + 0.05 * i for i, row in enumerate(ROWS)}
    cells = [cell("original" if row == "original" else "nf4", task, row, 0, accuracy[row] + shift)
             for task, shift in (("a", 0.0), ("b", 0.1)) for row in ROWS]
    cells.append(cell("nf4", "a", "cpet", 1, 0.2))  # seed 1 has no other row: it must not enter the means
    text = curve_table(cells, ["nf4"])
    assert "### nf4 (2 task-seed runs)" in text
    assert "| method | step 0 | step 20 |" in text
    cpet = accuracy["cpet"] + 0.05  # mean over tasks a and b
    assert f"| cpet | {100 * (cpet - 0.1):.1f} | {100 * cpet:.1f} |" in text
    # a row never run, or still running, does not shrink the others' average: it is left out, and said so
    without_row = curve_table([c for c in cells if c["row"] != "cpet-shared"], ["nf4"])
    assert "### nf4 (2 task-seed runs)" in without_row and "Left out" not in without_row
    partly = curve_table([c for c in cells if not (c["row"] == "cpet-shared" and c["task"] == "b")], ["nf4"])
    assert "### nf4 (2 task-seed runs)" in partly
    assert "| cpet-shared |" not in partly
    assert "Left out until they finish on the same pairs: cpet-shared (1 of 2" in partly
    disjoint = [cell("original", "a", "original", 0, 0.9), cell("nf4", "b", "vanilla", 0, 0.5)]
    assert "no (task, seed) pair" in curve_table(disjoint, ["nf4"])


def test_setting_sizes_come_from_the_saved_base_and_show_in_the_table(tmp_path):
    work_dir = tmp_path / "ffn50-nf4"
    (work_dir / "base").mkdir(parents=True)
    stages = [{"bytes_before": 538_000_000, "bytes_after": 378_000_000, "params_before": 134_500_000,
               "params_after": 94_700_000},
              {"bytes_before": 378_000_000, "bytes_after": 148_000_000, "params_before": 94_700_000,
               "params_after": 94_700_000}]
    (work_dir / "base" / "manifest.json").write_text(json.dumps({"stages": stages}))
    assert setting_summary(work_dir) == {"dense_bytes": 538_000_000, "dense_params": 134_500_000,
                                         "base_bytes": 148_000_000, "base_params": 94_700_000}
    (work_dir / "recovery").mkdir()
    (work_dir / "recovery" / "recovery.safetensors").write_bytes(b"x" * 2_500_000)
    summaries_dir = tmp_path / "settings"
    summaries_dir.mkdir()
    (summaries_dir / "ffn50-nf4.json").write_text(json.dumps(setting_summary(work_dir)))
    summaries = load_setting_summaries(summaries_dir)
    assert summaries["ffn50-nf4"]["shared_recovery_bytes"] == 2_500_000
    text = table([], ["ffn50-nf4", "nf4"], ["a"], ["vanilla"], [0], summaries)
    assert ("Compressed base: 148.0 MB in memory (0.28x of the dense 538.0 MB), 94.7 M parameters; "
            "shared recovery modules: 2.5 MB.") in text
    assert text.count("Compressed base:") == 1  # nf4 has no summary: no line


def test_cumulative_task_steps_count_the_original_adapter():
    from experiments.grid import cumulative_task_steps

    steps = {row: cumulative_task_steps(row, 40) for row in ROWS}
    assert steps == {"original": 40, "original-2x": 80, "vanilla": 40, "vanilla-2x": 80, "svd-init": 40,
                     "inherit": 80, "per-task-rec": 80, "shared-rec": 40, "cpet": 80, "cpet-shared": 80}


def test_table_refuses_to_mix_code_commits(tmp_path):
    import pytest

    from experiments.table import load_cells

    for i, commit in enumerate(["aaa111", "aaa111", "bbb222"]):
        (tmp_path / f"{i}.json").write_text(json.dumps({**cell("nf4", "a", "vanilla", i, 0.5), "commit": commit}))
    with pytest.raises(SystemExit, match=r"cells of 2 code commits \(aaa111 \(2 cells\), bbb222 \(1 cells\)\)"):
        load_cells(tmp_path)
    assert [c["seed"] for c in load_cells(tmp_path, "aaa")] == [0, 1]


def test_paired_bootstrap_interval():
    from experiments.table import paired_bootstrap

    assert paired_bootstrap(["1100"], ["1100"]) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(["1111"], ["0000"]) == (1.0, 1.0, 1.0)
    # 100 examples: A right on 80, B on 60, A ⊇ B; two (task, seed) pairs of the same kind
    a, b = "1" * 80 + "0" * 20, "1" * 60 + "0" * 40
    delta, low, high = paired_bootstrap([a, a], [b, b], replicates=4000)
    assert abs(delta - 0.2) < 1e-12 and low < 0.2 < high
    # pairing: the differing examples are 20 of 100 per pair (sd of the mean over 200 draws ~ 0.028)
    assert 0.13 < low < 0.17 and 0.23 < high < 0.27
    # B right exactly where A is wrong: unpaired noise would be the same, paired differences are larger
    wide = paired_bootstrap(["1" * 50 + "0" * 50], ["0" * 50 + "1" * 50], replicates=4000)
    assert wide[0] == 0.0 and wide[1] < -0.15 and wide[2] > 0.15


def test_bootstrap_intervals_and_equal_budget_rows_in_the_table():
    a, b = "1" * 9 + "0", "1" * 5 + "0" * 5
    cells = [{**cell("original", "t", "original", 0, 0.9), "test_correct": a},
             {**cell("original", "t", "original-2x", 0, 0.9), "test_correct": a},
             {**cell("nf4", "t", "vanilla", 0, 0.5), "test_correct": b},
             {**cell("nf4", "t", "cpet", 0, 0.9), "test_correct": a, "cumulative_task_steps": 80}]
    text = table(cells, ["nf4"], ["t"], ["original", "original-2x", "vanilla", "cpet"], [0])
    # equal-budget controls are compared on the same pairs as the rest
    assert "CPET − original = +0.0 points [95% CI +0.0, +0.0] (1 pairs); − original-2x = +0.0 points" in text
    assert "− vanilla = +40.0 points [95% CI +10.0, +70.0] (1 pairs)" in text
    assert "| cpet | 80 | 90.0 ± 0.0 (1) |" in text


def test_cells_store_the_adapters_effective_config_and_predictions(tmp_path):
    """A per-task recovery row trains with distill_weight 1.0; its cell must say so (not the grid's 0.0)."""
    from types import SimpleNamespace

    from cpet.config import QuantizeConfig
    from cpet.models import tiny_model
    from cpet.pipeline import CPET
    from experiments.grid import run_cell

    rows = [{"text": f"it was {'good' if i % 2 else 'bad'} {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(80)]
    task = tmp_path / "toy.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = tmp_path / "c.txt"
    corpus.write_text("plain words for calibration. " * 100)
    original = CPET(tiny_model("llama"), tmp_path / "original")
    compressed = CPET(tiny_model("llama"), tmp_path / "nf4")
    compressed.compress([QuantizeConfig("nf4")], calibration=str(corpus), calibration_samples=2, seq_len=16,
                        progress=False)
    args = SimpleNamespace(steps=2, batch_size=8, lr=1e-3, eval_every=2, eval_limit=4, max_prompt_tokens=32,
                           test_limit=None, progress=False, commit="abc123")
    result = run_cell({"nf4": compressed}, original, "nf4", str(task), "per-task-rec", 0, args)
    assert result["tune_config"]["distill_weight"] == 1.0 and result["commit"] == "abc123"
    assert result["cumulative_task_steps"] == 4  # its teacher is the 2-step original adapter
    assert len(result["test_correct"]) == result["test_n"] == len(result["test_predictions"]) == 8
    assert result["test_accuracy"] == result["test_correct"].count("1") / 8
    inherit = run_cell({"nf4": compressed}, original, "nf4", str(task), "inherit", 0, args)
    vanilla = run_cell({"nf4": compressed}, original, "nf4", str(task), "vanilla", 0, args)
    from cpet.assets import sha256_of

    source = sha256_of(original.work_dir / "adapters" / "toy-s0" / "adapter" / "adapter_model.safetensors")
    assert inherit["inherited_sha256"] == result["inherited_sha256"] == source
    assert vanilla["inherited_sha256"] is None and vanilla["cumulative_task_steps"] == 2


def test_recovery_budget_report_tabulates_perplexity_and_accuracy(tmp_path):
    from experiments.recovery_budget import report

    (tmp_path / "ppl.json").write_text(json.dumps({"ffn25-nf4@step0": 148.9, "ffn25-nf4@step40": 91.7,
                                                   "ffn25-nf4@step360": 82.5}))
    for seed, acc in ((0, 0.90), (1, 0.92)):
        (tmp_path / f"ffn25-nf4@step40__t__cpet-shared__s{seed}.json").write_text(
            json.dumps(cell("ffn25-nf4@step40", "t", "cpet-shared", seed, acc)))
    lines = report(tmp_path).splitlines()
    assert lines[2] == "| ffn25-nf4 | 0 | 148.90 | – | – |"
    assert lines[3] == "| ffn25-nf4 | 40 | 91.70 | 91.0 ± 1.4 (2) | 91.0 |"
    assert lines[4] == "| ffn25-nf4 | 360 | 82.50 | – | – |"  # steps sort as numbers, not text


def test_a_cell_of_other_code_is_redone_not_skipped(tmp_path):
    from experiments.grid import is_done

    path = tmp_path / "cell.json"
    assert not is_done(path, "aaa111")
    path.write_text(json.dumps({**cell("nf4", "a", "vanilla", 0, 0.5), "commit": "aaa111"}))
    assert is_done(path, "aaa111") and not is_done(path, "bbb222")
