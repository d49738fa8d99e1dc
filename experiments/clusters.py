"""The dependent units of a task's test examples, for the clustered bootstrap of :mod:`cpet.stats`.

Examples of one unit are not independent, so an interval must resample them together; which units each
built-in task has is :data:`cpet.data.units.UNITS_OF_TASK`.

The units come from the code of this checkout, the cells from the commit they were measured at; units are
used only for cells that scored the very test split they were built for (``test_sha256``; cells made before the
grid recorded it are checked label by label: a cell's correctness must match its predictions against the split's
gold labels, which catches a reordered or resized split though not, in principle, another split with the same
label sequence), so a changed split is refused instead of silently resampled by the wrong units.
"""

from __future__ import annotations

from cpet.data.units import UNITS_OF_TASK, SplitUnits, split_units  # noqa: F401  (re-exported)


def check_cell_fits(cell: dict, units: SplitUnits) -> None:
    """Refuse (SystemExit) a cell whose per-example correctness is not over the split ``units`` were built for
    (or over its first examples, for a cell scored with ``--test-limit``)."""
    where = f"{cell['setting']} / {cell['task']} / {cell['row']} / s{cell['seed']}"
    fix = ("run experiments/table.py from a checkout whose task data matches the cells' commit "
           f"({str(cell.get('commit', 'unrecorded'))[:12]}), re-run the cells, or pass --examples-as-units "
           f"{cell['task']} (its intervals then resample examples one at a time, and the table says so)")
    correct = cell.get("test_correct", "")
    if len(correct) > len(units.examples):
        raise SystemExit(f"table: cell {where} scored {len(correct)} test examples, more than the "
                         f"{len(units.examples)} of this checkout's {cell['task']} split: {fix}")
    if cell.get("test_sha256"):
        expected = units.prefix_sha256(len(correct))
        if cell["test_sha256"] != expected:
            raise SystemExit(f"table: cell {where} scored another {cell['task']} test split than this checkout builds "
                             f"(test_sha256 {cell['test_sha256'][:12]} against {expected[:12]}), so its examples "
                             f"cannot be matched to their units: {fix}")
        return
    predictions = cell.get("test_predictions")
    if predictions is None:
        raise SystemExit(f"table: cell {where} records neither test_sha256 nor test_predictions, so which "
                         f"{cell['task']} test examples it scored cannot be checked against their units: {fix}")
    # without the hash only the labels can be checked: each prediction must be right exactly where the cell says
    fits = len(predictions) == len(correct) and all(
        (prediction == gold) == (mark == "1") for prediction, gold, mark in zip(predictions, units.gold, correct))
    if not fits:
        raise SystemExit(f"table: cell {where}'s predictions do not match this checkout's {cell['task']} test split "
                         f"example by example, so its examples cannot be matched to their units: {fix}")


def clusters_for(cells: list[dict], tasks) -> dict:
    """``{task: unit of each scored test example}`` for the clustered tasks among ``tasks``, after checking every
    cell of them that stored its per-example correctness (:func:`check_cell_fits`). Cells of one task scored one
    test set (``table.check_one_test_set``), so their count of scored examples picks the units' prefix."""
    clusters = {}
    for task in tasks:
        if task not in UNITS_OF_TASK:
            continue
        units = split_units(task)
        scored = {len(cell["test_correct"]) for cell in cells if cell["task"] == task and "test_correct" in cell}
        for cell in cells:
            if cell["task"] == task and "test_correct" in cell:
                check_cell_fits(cell, units)
        if len(scored) > 1:
            raise SystemExit(f"table: the cells of {task} scored different numbers of test examples "
                             f"({sorted(scored)}); keep one run's cells per table")
        clusters[task] = units.units[:scored.pop()] if scored else units.units
    return clusters


__all__ = ["SplitUnits", "UNITS_OF_TASK", "check_cell_fits", "clusters_for", "split_units"]
