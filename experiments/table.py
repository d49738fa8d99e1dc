"""The comparison table and plots from the grid's finished cells.

    python experiments/table.py --doc docs/results.md

Per compression setting and method row: test accuracy per task and averaged (mean ± standard deviation
over the seeds that finished, with the seed count), the cells still missing, and a plot of validation
accuracy against training steps per setting (does inheritance get there in fewer steps?).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.grid import CELLS_DIR, ROW_MEANING, ROWS, SETTINGS, TASKS  # noqa: E402

from cpet.assets import write_text_atomic  # noqa: E402

# the rows that combine inheritance with recovery: each is compared with the original and vanilla
CPET_ROWS = tuple(row for row, how in ROWS.items() if how["init"] == "inherit" and how["recovery"] != "none")


def load_cells(cells_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f} ({len(values)})"


def load_setting_summaries(settings_dir: Path) -> dict[str, dict]:
    """``{setting: sizes}`` as written by the grid's ``setting_summary`` (missing directory: none)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(settings_dir.glob("*.json"))}


def size_line(summary: dict) -> str:
    """One sentence: the compressed base against the dense model, and the shared recovery modules."""
    line = (f"Compressed base: {summary['base_bytes'] / 1e6:.1f} MB in memory "
            f"({summary['base_bytes'] / summary['dense_bytes']:.2f}x of the dense "
            f"{summary['dense_bytes'] / 1e6:.1f} MB), {summary['base_params'] / 1e6:.1f} M parameters")
    if "shared_recovery_bytes" in summary:
        line += f"; shared recovery modules: {summary['shared_recovery_bytes'] / 1e6:.1f} MB"
    return line + "."


def table(cells: list[dict], settings, tasks, rows, seeds, summaries: dict[str, dict] | None = None) -> str:
    by_key = defaultdict(dict)  # (setting, task, row) -> {seed: accuracy}
    for cell in cells:
        by_key[(cell["setting"], cell["task"], cell["row"])][cell["seed"]] = cell["test_accuracy"]
    lines = []
    for setting in settings:
        lines.append(f"\n### {setting}\n")
        if setting in (summaries or {}):
            lines.append(size_line(summaries[setting]) + "\n")
        lines += ["| method | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
        for row in rows:
            key_setting = "original" if row == "original" else setting
            per_task = [by_key[(key_setting, task, row)] for task in tasks]
            # the average is taken per seed over tasks, for the seeds every task has finished
            shared = set.intersection(*(set(v) for v in per_task)) if per_task else set()
            averages = [statistics.mean(v[seed] for v in per_task) for seed in sorted(shared)]
            cells_txt = [mean_std(list(v.values())) for v in per_task]
            avg = mean_std(averages)
            lines.append(f"| {row} | " + " | ".join(cells_txt) + f" | {avg} |")
        for cpet_row in (r for r in CPET_ROWS if r in rows):
            lines.append("\n" + matched_deltas(by_key, setting, tasks, seeds, cpet_row))
    lines.append("\n" + progress_line(by_key, settings, tasks, rows, seeds) +
                 " Entries are test accuracy in %, mean ± sd over seeds, seed count in parentheses.")
    return "\n".join(lines)


def progress_line(by_key, settings, tasks, rows, seeds) -> str:
    """How many of the selected cells finished, and which rows are not complete yet."""
    done_total = want_total = 0
    unfinished = []
    for row in rows:
        keys = ["original"] if row == "original" else settings
        want = len(keys) * len(tasks) * len(seeds)
        done = sum(seed in by_key[(key, task, row)] for key in keys for task in tasks for seed in seeds)
        done_total, want_total = done_total + done, want_total + want
        if done < want:
            unfinished.append(f"{row} {done} of {want}")
    status = f"unfinished rows: {', '.join(unfinished)}" if unfinished else "the grid is complete"
    return f"Cells finished: {done_total} of {want_total} ({status})."


def matched_deltas(by_key, setting: str, tasks, seeds, cpet_row: str = "cpet") -> str:
    """A CPET row against the original-model LoRA and the vanilla compressed LoRA, on the same (task, seed) pairs.

    Only pairs where all three cells finished count, so a partly run grid gives a fair (if small) comparison.
    """
    label = "CPET" if cpet_row == "cpet" else f"CPET ({cpet_row})"
    pairs = [(task, seed) for task in tasks for seed in seeds
             if all(seed in by_key[(key, task, row)] for key, row in
                    (("original", "original"), (setting, "vanilla"), (setting, cpet_row)))]
    if not pairs:
        return f"{label} vs original / vanilla: no (task, seed) pair with all three cells finished yet."
    cpet = [by_key[(setting, t, cpet_row)][s] for t, s in pairs]
    deltas = {name: [c - by_key[(key, t, name)][s] for c, (t, s) in zip(cpet, pairs)]
              for key, name in (("original", "original"), (setting, "vanilla"))}
    return (f"On {len(pairs)} matched (task, seed) pairs: {label} − original LoRA = "
            f"{100 * statistics.mean(deltas['original']):+.1f} points, {label} − vanilla = "
            f"{100 * statistics.mean(deltas['vanilla']):+.1f} points (test accuracy).")


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
            lines.append("\nLeft out until they finish on the same pairs: " +
                         ", ".join(f"{row} ({count} of {n} pairs so far)" for row, count in left_out.items()) + ".")
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
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=str(CELLS_DIR))
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="task keys (file stem for task files)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    cells = [c for c in load_cells(Path(args.cells)) if c["task"] in args.tasks]
    settings, rows = args.settings, list(ROWS)
    summaries = load_setting_summaries(Path(args.cells).parent / "settings")
    text = table(cells, settings, args.tasks, rows, args.seeds, summaries)
    plot = Path(args.doc).with_name("results_curves.png")
    if cells:
        plot_curves(cells, settings, plot)
    legend = "\n".join(f"- `{row}`: {ROW_MEANING[row]}" for row in rows)
    header = ("# CPET comparison table\n\nGenerated by `python experiments/table.py` from the cells of "
              f"`python experiments/grid.py`. Rows, all with the same training budget:\n\n{legend}\n")
    curves = (curve_table(cells, settings) + f"\n\n![curves]({plot.name})\n") if cells else "\n"
    write_text_atomic(Path(args.doc), header + text + "\n" + curves)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
