"""The grid's bookkeeping and the table script, on synthetic cells (the real grid runs for hours)."""

from __future__ import annotations

import json

from experiments.grid import cell_name, task_key
from experiments.table import main as table_main
from experiments.table import table


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
    assert "| original | 85.0 ± 7.1 (2) | 65.0 ± 7.1 (2) | 75.0 ± 7.1 (2) |" in text
    assert "| vanilla | 50.0 ± 0.0 (1) | – | – |" in text
    assert "Cells finished: 5 of 8" in text


def test_table_script_writes_markdown_and_plot(tmp_path):
    cells_dir = tmp_path / "cells"
    cells_dir.mkdir()
    for i, c in enumerate([cell("original", "a", "original", 0, 0.9), cell("nf4", "a", "cpet", 0, 0.8)]):
        (cells_dir / f"{i}.json").write_text(json.dumps(c))
    doc = tmp_path / "docs" / "results.md"
    table_main(["--cells", str(cells_dir), "--doc", str(doc), "--tasks", "a", "--settings", "nf4", "--seeds", "0"])
    assert "| cpet | 80.0 ± 0.0 (1) | 80.0 ± 0.0 (1) |" in doc.read_text()
    assert (doc.parent / "results_curves.png").stat().st_size > 1000


def test_cpet_deltas_use_only_matched_task_seed_pairs():
    cells = [cell("original", "a", "original", 0, 0.80), cell("nf4", "a", "vanilla", 0, 0.70),
             cell("nf4", "a", "cpet", 0, 0.85),
             # seed 1 lacks its vanilla cell: it must not enter the comparison
             cell("original", "a", "original", 1, 0.50), cell("nf4", "a", "cpet", 1, 0.95)]
    text = table(cells, ["nf4"], ["a"], ["original", "vanilla", "cpet"], [0, 1])
    assert "On 1 matched (task, seed) pairs: CPET − original LoRA = +5.0 points, CPET − vanilla = +15.0" in text
    assert "no (task, seed) pair" in table(cells[3:], ["nf4"], ["a"], ["original", "vanilla", "cpet"], [0, 1])
