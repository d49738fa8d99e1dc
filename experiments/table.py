"""The comparison table and plots from the grid's finished cells.

    python experiments/table.py --doc docs/results.md

Per compression setting and method row: the task steps behind each row's adapter, test accuracy per task
and averaged (mean ± standard deviation over the seeds that finished, with the seed count), the cells still
missing, the CPET rows against the original and vanilla rows (and their equal-budget 2x controls) with
paired 95% intervals (test-set and training noise, :mod:`cpet.stats`), and a plot of validation accuracy against training steps per setting.
Cells made by different code commits are never mixed in one table: pick one with ``--commit``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.grid import (  # noqa: E402
    CELLS_DIR, DEFAULT_SETTINGS, ORIGINAL_ROWS, ROW_MEANING, ROWS, SETTINGS, TASKS)

from experiments.clusters import UNITS_OF_TASK, clusters_for  # noqa: E402
from cpet.stats import paired_bootstrap, task_weighted_mean  # noqa: E402

from cpet.assets import atomic_path, write_text_atomic  # noqa: E402

# the rows that combine inheritance with recovery: each is compared with the original and vanilla
CPET_ROWS = tuple(row for row, how in ROWS.items() if how["init"] == "inherit" and how["recovery"] != "none")
# ablations (one ingredient of CPET at a time): the grid runs them on fewer seeds (README: seed 0), so the
# table expects their cells on --ablation-seeds only
ABLATION_ROWS = ("svd-init", "per-task-rec", "shared-rec")


def machines_line(cells: list[dict]) -> str:
    """Where the cells ran, with counts (cells of older grid code record no machine); '' when none records one.

    Float rounding differs across CPU types, so a reader comparing cells of two machines should know it."""
    kinds = defaultdict(int)
    for c in cells:
        machine = c.get("machine")
        kind = "not recorded" if machine is None else f"{machine['cpu']} ({machine['cpu_capability']})"
        if machine is not None and machine.get("accelerator"):
            kind += f" + {machine['accelerator']}"
        kinds[kind] += 1
    if set(kinds) <= {"not recorded"}:
        return ""
    listed = "; ".join(f"{kind}: {n} cell{'s' if n != 1 else ''}" for kind, n in sorted(kinds.items()))
    return f"Machines the cells ran on: {listed}.\n"


def load_cells(cells_dir: Path, commit: str | None = None, tasks: Sequence[str] | None = None) -> list[dict]:
    """Finished cells of one code commit (``commit``: the cells whose commit is exactly it, else those it is a
    prefix of, which must then be one commit; None: all of them, which must share one commit), of
    ``tasks`` only when given (the commit check applies to the cells of the table: tasks run from different
    pinned commits, e.g. after a task's data was fixed, each get a table of their own)."""
    if not cells_dir.is_dir():  # a mistyped --cells read as no cells: an empty table replaced the document
        raise SystemExit(f"table: {cells_dir} is not a directory of cells")
    cells = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]
    if tasks is not None:
        cells = [c for c in cells if c["task"] in tasks]
    if commit is not None:
        if not commit:
            raise SystemExit("table: --commit is empty; give a commit (a prefix is enough)")
        exact = [c for c in cells if str(c.get("commit", "unrecorded")) == commit]
        matched = exact or [c for c in cells if str(c.get("commit", "unrecorded")).startswith(commit)]
        if cells and not matched:  # a mistyped commit must pick one, not none (an empty table, said as a result)
            present = sorted({str(c.get("commit", "unrecorded")) for c in cells})
            raise SystemExit(f"table: no cell in {cells_dir} matches --commit {commit} (its cells' commits: "
                             f"{', '.join(present)})")
        cells = matched
    # checked after --commit too: a prefix can match several commits, and bb31270 matches bb31270...+dirty
    commits = defaultdict(int)
    for c in cells:
        commits[c.get("commit", "unrecorded")] += 1
    if len(commits) > 1:
        listed = ", ".join(f"{str(key).removesuffix('+dirty')[:12]}{'+dirty' if str(key).endswith('+dirty') else ''}"
                           f" ({n} cells)" for key, n in sorted(commits.items()))
        chosen = f" matching --commit {commit}" if commit is not None else ""
        raise SystemExit(f"table: {cells_dir} holds cells of {len(commits)} code commits{chosen} ({listed}); one "
                         "table measures one version of the code: pick one with --commit (the whole hash picks "
                         "exactly its cells; add +dirty for cells of uncommitted code)")
    check_one_cell_per_key(cells, cells_dir)
    check_one_test_set(cells)
    return cells


def check_one_cell_per_key(cells: list[dict], cells_dir: Path) -> None:
    """Refuse two cells of one (setting, task, row, seed), and a cell whose accuracy is not the share of its own
    correct answers: the table keys cells by the four, so a copied cell would silently replace its twin (and count
    its learning curve twice), and means read ``test_accuracy`` where the paired deltas read ``test_correct``."""
    seen: dict[tuple, int] = defaultdict(int)
    for cell in cells:
        seen[(cell["setting"], cell["task"], cell["row"], cell["seed"])] += 1
        correct = cell.get("test_correct")
        if correct and abs(correct.count("1") / len(correct) - cell["test_accuracy"]) > 1e-9:
            raise SystemExit(f"table: the cell {cell['setting']} / {cell['task']} / {cell['row']} / seed "
                             f"{cell['seed']} in {cells_dir} records test accuracy {cell['test_accuracy']} but "
                             f"{correct.count('1')} of its {len(correct)} answers correct: the file was altered; "
                             "run the cell again")
    twins = sorted(key for key, n in seen.items() if n > 1)
    if twins:
        listed = "; ".join(" / ".join(map(str, key)) for key in twins)
        raise SystemExit(f"table: {cells_dir} holds more than one cell of {listed}: keep one file per (setting, "
                         "task, row, seed)")


def check_one_test_set(cells: list[dict]) -> None:
    """Refuse cells of one task that scored different test sets: paired intervals compare example by example.
    Cells that record ``test_sha256`` must agree on it; every cell's test-set size ``test_n`` must agree too; and
    the predictions of all cells that store them must fit one gold label per example (the only check for cells
    made before the grid recorded the hash, which may sit beside newer ones)."""
    hashes, sizes = defaultdict(set), defaultdict(set)
    for cell in cells:
        if cell.get("test_sha256"):
            hashes[cell["task"]].add(cell["test_sha256"])
        if cell.get("test_n") is not None:
            sizes[cell["task"]].add(cell["test_n"])
    problems = {task: "test_sha256 differs" for task, seen in hashes.items() if len(seen) > 1}
    problems.update({task: "test_n differs" for task, seen in sizes.items() if len(seen) > 1 and task not in problems})
    for task in sorted({c["task"] for c in cells} - set(problems)):
        conflict = prediction_conflict(cells, task)
        if conflict:
            problems[task] = conflict
    if problems:
        listed = "; ".join(f"{task}: {why}" for task, why in sorted(problems.items()))
        raise SystemExit(f"table: the cells of {', '.join(sorted(problems))} scored different test sets ({listed}: the "
                         "task's data or --test-limit changed between runs); keep one run's cells per table")


def prediction_conflict(cells: list[dict], task: str) -> str | None:
    """Why the stored predictions of ``task``'s cells cannot all be over one test set, or None: per example, the
    cells marked right must agree on one label (the gold), and no cell marked wrong may predict it."""
    scored = [c for c in cells if c["task"] == task and c.get("test_predictions") is not None and "test_correct" in c]
    if not scored:
        return None
    if len({len(c["test_predictions"]) for c in scored} | {len(c["test_correct"]) for c in scored}) > 1:
        return "the cells stored different numbers of predictions"
    for i in range(len(scored[0]["test_predictions"])):
        right = {c["test_predictions"][i] for c in scored if c["test_correct"][i] == "1"}
        wrong = {c["test_predictions"][i] for c in scored if c["test_correct"][i] != "1"}
        if len(right) > 1:
            return f"test example {i}: cells right with different labels ({', '.join(sorted(map(str, right)))})"
        if right & wrong:
            return f"test example {i}: label {next(iter(right))!r} marked right in one cell and wrong in another"
    return None


def row_key(row: str, setting: str) -> str:
    """The setting a row's cells are filed under (rows on the original model are shared by all settings)."""
    return "original" if row in ORIGINAL_ROWS else setting


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:  # one seed: the spread is not measured (printing 0.0 would claim none)
        return f"{100 * values[0]:.1f} ± – (1)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} ({len(values)})"


def load_setting_summaries(settings_dir: Path) -> dict[str, dict]:
    """``{setting: sizes}`` as written by the grid's ``setting_summary`` (missing directory: none)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(settings_dir.glob("*.json"))}


def base_ids_of(cells: list[dict], setting: str) -> set[str]:
    """The compressed bases the cells of ``setting`` were tuned on (as recorded; one for a grid run)."""
    return {c["base_id"] for c in cells if c["setting"] == setting and c.get("base_id")}


def size_line(summary: dict, base_ids: set[str] | None = None) -> str:
    """One sentence: the compressed base against the dense model, and the shared recovery modules.

    ``base_ids``: the bases the setting's cells were tuned on. A summary that names another base (written by a
    later grid run of other code) is not shown as theirs; one from before summaries named their base is.
    """
    recorded = summary.get("base_id")
    if recorded and base_ids and base_ids != {recorded}:
        return (f"Compressed base: the sizes on record are of base {recorded[:12]}, not the one these cells were "
                f"tuned on ({', '.join(sorted(b[:12] for b in base_ids))}); run the grid's setting again to "
                "record its sizes.")
    line = (f"Compressed base: {summary['base_bytes'] / 1e6:.1f} MB in memory "
            f"({summary['base_bytes'] / summary['dense_bytes']:.2f}x of the dense "
            f"{summary['dense_bytes'] / 1e6:.1f} MB), {summary['base_params'] / 1e6:.1f} M parameters")
    if "shared_recovery_bytes" in summary:
        line += f"; shared recovery modules: {summary['shared_recovery_bytes'] / 1e6:.1f} MB"
    return line + "."


def majority_row(cells: list[dict], tasks) -> str:
    """The accuracy of always answering each task's most frequent test label (as the cells recorded it): the
    floor a row must clear before its accuracy means anything (spam-assassin: ~70% ham)."""
    baselines = {}
    for cell in cells:
        if cell.get("majority_baseline") is not None:
            baselines.setdefault(cell["task"], 100 * cell["majority_baseline"])
    shown = [f"{baselines[task]:.1f}" if task in baselines else "–" for task in tasks]
    average = f"{statistics.mean(baselines[t] for t in tasks):.1f}" if all(t in baselines for t in tasks) else "–"
    return "| majority class | – | " + " | ".join(shown) + f" | {average} |"


def table(cells: list[dict], settings, tasks, rows, seeds, summaries: dict[str, dict] | None = None,
          ablation_seeds=None, examples_as_units: Sequence[str] = ()) -> str:
    """The markdown tables of ``settings`` (one per setting), the CPET deltas and a progress line.

    ``examples_as_units``: tasks whose intervals resample test examples one at a time although their units are
    known (:mod:`experiments.clusters`; for cells of a split this checkout no longer builds); the text says so.

    ``ablation_seeds``: the seeds the :data:`ABLATION_ROWS` are planned on (None: all ``seeds``); only the
    progress line uses it, the means take whatever finished. Cells of seeds outside ``seeds`` are left out of
    every figure (means, intervals and counts alike).
    """
    cells = [c for c in cells if c["seed"] in seeds]
    by_key = defaultdict(dict)  # (setting, task, row) -> {seed: accuracy}
    for cell in cells:
        by_key[(cell["setting"], cell["task"], cell["row"])][cell["seed"]] = cell["test_accuracy"]
    lines = []
    for setting in settings:
        lines.append(f"\n### {setting}\n")
        if setting in (summaries or {}):
            lines.append(size_line(summaries[setting], base_ids_of(cells, setting)) + "\n")
        lines += ["| method | task steps | " + " | ".join(tasks) + " | average |",
                  "|---|---|" + "---|" * (len(tasks) + 1)]
        for row in rows:
            key_setting = row_key(row, setting)
            per_task = [by_key[(key_setting, task, row)] for task in tasks]
            # the average is taken per seed over tasks, for the seeds every task has finished
            shared = set.intersection(*(set(v) for v in per_task)) if per_task else set()
            averages = [statistics.mean(v[seed] for v in per_task) for seed in sorted(shared)]
            cells_txt = [mean_std(list(v.values())) for v in per_task]
            avg = mean_std(averages)
            lines.append(f"| {row} | {steps_of(cells, row)} | " + " | ".join(cells_txt) + f" | {avg} |")
        lines.append(majority_row(cells, tasks))
        for cpet_row in (r for r in CPET_ROWS if r in rows):
            lines.append("\n" + matched_deltas(cells, setting, tasks, seeds, cpet_row, examples_as_units))
        mismatched = inheritance_mismatches(cells, setting, tasks, seeds)
        if mismatched:
            lines.append("\n" + mismatched)
    lines.append("\n" + INTERVALS_NOTE + unclustered_note(tasks, examples_as_units))
    lines.append("\n" + progress_line(by_key, settings, tasks, rows, seeds, ablation_seeds) +
                 " Entries are test accuracy in %, mean ± sd over seeds, seed count in parentheses.")
    return "\n".join(lines)


def steps_of(cells: list[dict], row: str) -> str:
    """Cumulative task steps of a row as its cells recorded them (``–`` before any finished)."""
    steps = sorted({c["cumulative_task_steps"] for c in cells if c["row"] == row and "cumulative_task_steps" in c})
    return "/".join(str(x) for x in steps) or "–"


def progress_line(by_key, settings, tasks, rows, seeds, ablation_seeds=None) -> str:
    """How many of the planned cells finished, and which rows are not complete yet.

    Planned: every (setting, task, seed) of a row, on ``ablation_seeds`` only for the ablation rows.
    """
    done_total = want_total = 0
    unfinished = []
    for row in rows:
        keys = ["original"] if row in ORIGINAL_ROWS else settings
        row_seeds = [s for s in seeds if s in ablation_seeds] if row in ABLATION_ROWS and ablation_seeds else seeds
        want = len(keys) * len(tasks) * len(row_seeds)
        done = sum(seed in by_key[(key, task, row)] for key in keys for task in tasks for seed in row_seeds)
        done_total, want_total = done_total + done, want_total + want
        if done < want:
            unfinished.append(f"{row} {done} of {want}")
    status = f"unfinished rows: {', '.join(unfinished)}" if unfinished else "the grid is complete"
    return f"Cells finished: {done_total} of {want_total} ({status})."


REFERENCE_ROWS = ("original", "original-2x", "vanilla", "vanilla-2x")


INTERVALS_NOTE = ("Intervals: paired 95%, covering test-set noise (test examples resampled, a dependent unit at a "
                  "time where one is known: a Brown document, an email group, a review or editorial) and training "
                  "noise (the spread of the per-seed deltas, scaled by Student's t for the few seeds); a delta "
                  "over one seed per task covers the test-set noise of that one run only.")


def unclustered_note(tasks, examples_as_units: Sequence[str]) -> str:
    """The sentence saying which tasks' intervals treat dependent test examples as independent ('' if none)."""
    named = [t for t in tasks if t in examples_as_units and t in UNITS_OF_TASK]
    if not named:
        return ""
    return (f" The intervals of {', '.join(named)} resample test examples one at a time (`--examples-as-units`): "
            "their cells scored a split whose units this checkout cannot rebuild, so those intervals are too narrow "
            "by as much as the units' dependence.")


def matched_deltas(cells: list[dict], setting: str, tasks, seeds, cpet_row: str = "cpet",
                   examples_as_units: Sequence[str] = ()) -> str:
    """A CPET row against the original-model LoRA and the vanilla compressed LoRA (and their 2x controls).

    Only (task, seed) pairs where the CPET row, the original and the vanilla row all finished count (the 2x
    controls: those of them where the control finished too), so a partly run grid gives a fair (if small)
    comparison; where the cells stored their per-example correctness, the difference
    gets a paired 95% interval (:func:`cpet.stats.paired_bootstrap`: test-set and training noise).
    """
    by_cell = {(c["setting"], c["task"], c["row"], c["seed"]): c for c in cells}
    label = "CPET" if cpet_row == "cpet" else f"CPET ({cpet_row})"
    def done(row: str, task: str, seed: int) -> bool:
        return (row_key(row, setting), task, row, seed) in by_cell

    # the pairs where the CPET row, the original and vanilla all finished; the 2x controls within those
    core = [(t, s) for t in tasks for s in seeds if all(done(r, t, s) for r in (cpet_row, "original", "vanilla"))]
    parts = []
    for ref in REFERENCE_ROWS:
        pairs = [(t, s) for t, s in core if done(ref, t, s)]
        if not pairs:
            continue
        ours = [by_cell[(setting, t, cpet_row, s)] for t, s in pairs]
        theirs = [by_cell[(row_key(ref, setting), t, ref, s)] for t, s in pairs]
        if all("test_correct" in c for c in ours + theirs):
            clusters = clusters_for(ours + theirs, [t for t in tasks if t not in examples_as_units])
            delta, low, high = paired_bootstrap([c["test_correct"] for c in ours], [c["test_correct"] for c in theirs],
                                                tasks=[t for t, _ in pairs], clusters=clusters)
            single = max(Counter(t for t, _ in pairs).values()) == 1  # no task with two seeds: no training term
            parts.append(f"− {ref} = {100 * delta:+.1f} points [95% CI {100 * low:+.1f}, {100 * high:+.1f}] "
                         f"({len(pairs)} pairs{', one seed per task: test-set noise only' if single else ''})")
        else:
            delta = task_weighted_mean([a["test_accuracy"] - b["test_accuracy"] for a, b in zip(ours, theirs)],
                                       [t for t, _ in pairs])
            parts.append(f"− {ref} = {100 * delta:+.1f} points ({len(pairs)} pairs)")
    if not parts:
        return f"{label} vs original / vanilla: no (task, seed) pair with both cells finished yet."
    return f"Matched (task, seed) pairs, test accuracy: {label} " + "; ".join(parts) + "."


def inheritance_mismatches(cells: list[dict], setting: str, tasks, seeds) -> str:
    """A line naming the (task, seed) pairs of ``setting`` whose inheriting cells inherited another adapter than
    the one the ``original`` cell of that task and seed scored ('' when there are none, or nothing recorded).

    The grid re-tunes the original adapter (seeded) where its work directory lacks it, e.g. a run resumed on
    another machine; float rounding then differs and so do the weights. The CPET − original delta of such a
    pair compares the CPET row with the original cell's adapter, not with the one the CPET row started from.
    """
    originals = {(c["task"], c["seed"]): c.get("adapter_sha256") for c in cells if c["row"] == "original"}
    differing = defaultdict(list)
    for c in cells:
        scored = originals.get((c["task"], c["seed"]))
        inherited = c.get("inherited_sha256")
        if (c["setting"] == setting and c["task"] in tasks and c["seed"] in seeds and inherited and scored
                and inherited != scored):
            differing[(c["task"], c["seed"])].append(c["row"])
    if not differing:
        return ""
    listed = "; ".join(f"{task} seed {seed} ({', '.join(sorted(rows))})"
                       for (task, seed), rows in sorted(differing.items()))
    return (f"Inherited from another adapter than the `original` cell scored (the original adapter was tuned again, "
            f"seeded, where the worker's directory lacked it, and came out with other weights): {listed}. In those "
            "pairs the deltas against `original` compare with the adapter the original cell scored, not with the one "
            "the row started from.")


def matched_runs(cells: list[dict], setting: str) -> tuple[set, dict[str, int]]:
    """The (task, seed) pairs the curves of ``setting`` average over, and the rows left out of them.

    The pairs are those that every row kept (and the original row) finished. A row with fewer finished
    pairs than the typical (median) row (say, one added to the grid later and still running) is left out
    rather than shrinking everyone's average: ``left_out`` maps it to how many pairs it has.
    """
    have = defaultdict(set)
    for cell in cells:
        if cell["setting"] in (setting, "original"):
            have[cell["row"]].add((cell["task"], cell["seed"]))
    have = {row: pairs for row, pairs in have.items() if pairs}
    if not have:
        return set(), {}
    typical = statistics.median_low(len(pairs) for pairs in have.values())
    left_out = {row: len(pairs) for row, pairs in have.items() if len(pairs) < typical and row != "original"}
    pairs = set.intersection(*(p for row, p in have.items() if row not in left_out))
    return pairs, left_out


def mean_curves(cells: list[dict], setting: str) -> tuple[int, dict[str, dict[int, float]], dict[str, int]]:
    """Validation accuracy against training step per row: ``(pairs, {row: {step: mean}}, left_out)``.

    Averaged only over the matched (task, seed) pairs of :func:`matched_runs`, so the rows compare like
    with like; ``left_out`` are the rows not run on all of them yet.
    """
    pairs, left_out = matched_runs(cells, setting)
    points = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        if (cell["setting"] in (setting, "original") and cell["row"] not in left_out
                and (cell["task"], cell["seed"]) in pairs):
            for point in cell["history"]:
                points[cell["row"]][point["step"]].append(point["val_accuracy"])
    curves = {row: {step: statistics.mean(v) for step, v in sorted(by_step.items())} for row, by_step in points.items()}
    return len(pairs), curves, left_out


def curve_table(cells: list[dict], settings) -> str:
    """Markdown: per setting, mean validation accuracy (%) of each row at each evaluated step."""
    lines = ["\n## Validation accuracy against training steps\n",
             "Mean over the (task, seed) pairs where every row shown finished; step 0 is the "
             "initialisation (inheritance starts from the original adapter)."]
    for setting in settings:
        n, curves, left_out = mean_curves(cells, setting)
        if not curves:
            lines.append(f"\n{setting}: no (task, seed) pair with every row finished yet.")
            continue
        steps = sorted({step for curve in curves.values() for step in curve})
        lines += [f"\n### {setting} ({n} task-seed runs)\n",
                  "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for row in (r for r in ROWS if r in curves):
            lines.append(f"| {row} | " + " | ".join(
                f"{100 * curves[row][s]:.1f}" if s in curves[row] else "–" for s in steps) + " |")
        if left_out:
            lines.append("\nNot in these means, finished on fewer pairs (not yet, or by plan: the ablations run on "
                         "seed 0 only): " +
                         ", ".join(f"{row} ({count} of {n} pairs)" for row, count in left_out.items()) + ".")
    return "\n".join(lines)


def plot_curves(cells: list[dict], settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        n, curves, _ = mean_curves(cells, setting)
        for row, curve in curves.items():
            ax.plot(list(curve), list(curve.values()), marker="o", label=row)
        ax.set_title(f"{setting} ({n} task-seed runs)")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy (mean over tasks, seeds)")
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a killed run leaves the previous plot, not half of a new one
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=str(CELLS_DIR))
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="task keys (file stem for task files)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="method rows to show (default: all; a grid run with fewer --rows wants the same list)")
    parser.add_argument("--ablation-seeds", nargs="+", type=int, default=[0],
                        help=f"the seeds the ablation rows ({', '.join(ABLATION_ROWS)}) are planned on")
    parser.add_argument("--commit", help="use only cells made by this code commit (a prefix is enough)")
    parser.add_argument("--note-file", help="a markdown note to print above the table (why these cells are kept, "
                                            "what superseded them): it survives regenerating the document")
    parser.add_argument("--examples-as-units", nargs="+", default=[], metavar="TASK",
                        help="resample these tasks' test examples one at a time although their dependent units "
                             f"({', '.join(UNITS_OF_TASK)}) are known: for cells of a split this checkout no longer "
                             "builds (the table says so)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # a task or seed named twice is counted twice: its (task, seed) pairs enter the deltas twice (one seed reads as
    # two seeds of one task, with a training term of zero spread) and the task weighs double in the averages
    for option, values in (("--tasks", args.tasks), ("--seeds", args.seeds), ("--settings", args.settings)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            parser.error(f"{option}: {', '.join(twice)} named more than once")
    if args.note_file and not Path(args.note_file).is_file():
        parser.error(f"--note-file: {args.note_file} is not a file")
    unknown = [t for t in args.examples_as_units if t not in UNITS_OF_TASK]
    if unknown:
        parser.error(f"--examples-as-units: {', '.join(unknown)} has no known units (tasks with units: "
                     f"{', '.join(UNITS_OF_TASK)}); its test examples are resampled one at a time anyway")
    cells = load_cells(Path(args.cells), args.commit, args.tasks)
    settings, rows = args.settings, [row for row in ROWS if row in args.rows]
    cells = [c for c in cells if c["row"] in rows and c["seed"] in args.seeds]  # curves too, not only the means
    summaries = load_setting_summaries(Path(args.cells).parent / "settings")
    text = table(cells, settings, args.tasks, rows, args.seeds, summaries, args.ablation_seeds,
                 args.examples_as_units)
    # one plot per document: a second table (new tasks, the MoEfied setting) must not overwrite the first's
    plot = Path(args.doc).with_name(f"{Path(args.doc).stem}_curves.png")
    if cells:
        plot_curves(cells, settings, plot)
    legend = "\n".join(f"- `{row}`: {ROW_MEANING[row]}" for row in rows)
    commits = sorted({str(c.get("commit", "unrecorded")) for c in cells})
    command = " ".join(["python experiments/table.py", *map(shlex.quote, argv)])
    note = f"{Path(args.note_file).read_text(encoding='utf-8').strip()}\n\n" if args.note_file else ""
    header = (f"# CPET comparison table\n\n{note}Generated by `{command}` from the cells of "
              f"`python experiments/grid.py` (code commit {', '.join(commits) or '–'}). Rows (\"task steps\" counts "
              f"the optimizer steps on task data behind each adapter, the original adapter's included):\n\n"
              f"{legend}\n")
    machines = machines_line(cells)
    header += f"\n{machines}" if machines else ""
    curves = (curve_table(cells, settings) + f"\n\n![curves]({plot.name})\n") if cells else "\n"
    write_text_atomic(Path(args.doc), header + text + "\n" + curves)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
