"""How much shared-recovery distillation is enough? One long distillation per setting, measured at checkpoints.

Shared recovery is paid once per compressed base and serves every task, so its budget can be larger than a
task adapter's. Per setting, this runs one distillation of ``--steps`` steps (learning-rate schedule over the
whole run) and saves the recovery modules at each ``--checkpoints`` step. At each checkpoint it measures

- Brown held-out perplexity of the compressed base with those recovery modules (and without any, step 0);
- test accuracy of the ``cpet-shared`` row (inherited LoRA on the base + those frozen modules) on a few tasks
  x seeds, with the grid's own budget and cell format (``experiments/grid.py``).

    python experiments/recovery_budget.py --settings ffn25-nf4      # one worker per setting
    python experiments/recovery_budget.py --settings ffn50-nf4
    python experiments/recovery_budget.py --report-only     # the table (docs/recovery_budget.md holds it, with
                                                            # its reading: paste it there, --report would replace)

Results: ``<cells>/<setting>@step<N>__<task>__cpet-shared__s<seed>.json`` and ``<cells>/ppl.json``; the
report (``--report``) is a markdown table of everything finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpet.assets import write_text_atomic  # noqa: E402
from cpet.data import load_corpus  # noqa: E402
from cpet.evaluate import perplexity  # noqa: E402
from cpet.pipeline import CPET  # noqa: E402
from cpet.recovery import RecoverySet  # noqa: E402
from cpet.train import DistillConfig  # noqa: E402
from experiments.grid import SETTINGS, budget, cell_name, code_commit, run_cell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "recovery_budget"


def checkpoint_pipeline(setting_dir: Path, step: int, final_step: int, original) -> CPET:
    """A pipeline view whose shared recovery is the checkpoint after ``step`` steps (the base is shared)."""
    view = setting_dir / f"view-step{step}"
    view.mkdir(parents=True, exist_ok=True)
    source = setting_dir / ("recovery" if step == final_step else f"recovery-step{step}")
    for name, target in (("base", setting_dir / "base"), ("recovery", source)):
        link = view / name
        if not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
    return CPET(original, view)


def brown_ppl(pipeline: CPET, recovery_dir: Path | None, tokens: int) -> float:
    """Brown held-out perplexity of the compressed base, with the recovery modules in ``recovery_dir``."""
    base = pipeline.load_compressed()
    if recovery_dir is not None:
        RecoverySet.load(recovery_dir, base.model, expected_base_id=base.manifest.base_id).attach(base.model)
    text = load_corpus("brown", split="heldout")
    return perplexity(base.model, pipeline.original.tokenizer, text, max_tokens=tokens).ppl


def check_reused_recovery(setting_dir: Path, distill: DistillConfig, checkpoints: list[int]) -> None:
    """Refuse a finished distillation in ``setting_dir`` made with other settings than ``distill``, or without a
    checkpoint this run measures: it is reused as it is, and its final modules would be reported under this run's
    ``--steps`` (a 360-step recovery as "step 120"), a missing checkpoint failing only after hours of work."""
    final = setting_dir / "recovery" / "recovery.json"
    if not final.exists():  # distilled by this run, with these checkpoints
        return
    wanted = json.loads(json.dumps(asdict(distill)))
    for directory, steps_done in [(setting_dir / "recovery", None),
                                  *((setting_dir / f"recovery-step{step}", step) for step in checkpoints)]:
        meta_path = directory / "recovery.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is None or meta.get("distill") != wanted or (steps_done is not None
                                                             and meta.get("steps_done") != steps_done):
            found = "is missing" if meta is None else f"was made by a distillation with {meta.get('distill')}"
            raise SystemExit(f"recovery_budget: {directory} {found}, not by this run's {wanted} (--steps, "
                             "--checkpoints): use another --out, or remove its recovery directories to distil again")


def check_finished_cells(cells_dir: Path, commit: str, tune_steps: int, model: str) -> None:
    """Refuse finished cells in ``cells_dir`` of other code or another task budget: they are skipped as done, and
    the report would put them beside this run's as one measurement."""
    wanted = {"commit": commit, "--tune-steps": tune_steps, "--model": model}
    for path in sorted(cells_dir.glob("*__*.json")):
        cell = json.loads(path.read_text())
        made = {"commit": cell.get("commit"), "--tune-steps": (cell.get("tune_config") or {}).get("steps"),
                "--model": (cell.get("grid_args") or {}).get("model")}
        # what a cell does not record (cells older than the field) is not held against it; its commit always is
        diffs = [f"{key} {made[key]} -> {value}" for key, value in wanted.items()
                 if made[key] != value and (key == "commit" or made[key] is not None)]
        if diffs:
            raise SystemExit(f"recovery_budget: {path} was measured otherwise than this run ({', '.join(diffs)}): "
                             "give this run its own --cells (and --out)")


# ppl.json's entry that says what its perplexities were measured with (the other entries: "<setting>@step<N>")
MEASURED_WITH = "measured_with"


def check_perplexities(ppl_path: Path, measured_with: dict) -> None:
    """Refuse a ``ppl.json`` of perplexities measured otherwise than this run would (other code, --ppl-tokens or
    --model, or unrecorded): they are reused by their ``setting@step`` key alone, and the report would show them
    as this run's (its cells are checked by :func:`check_finished_cells`; a directory holding only the perplexities
    slipped past that)."""
    if not ppl_path.exists():
        return
    saved = json.loads(ppl_path.read_text())
    if any(key != MEASURED_WITH for key in saved) and saved.get(MEASURED_WITH) != measured_with:
        raise SystemExit(f"recovery_budget: {ppl_path} holds perplexities measured with "
                         f"{saved.get(MEASURED_WITH, 'unrecorded settings')}, not this run's {measured_with}: give "
                         "this run its own --cells")


def report(cells_dir: Path) -> str:
    """Markdown: per setting and checkpoint, Brown perplexity and cpet-shared accuracy per task (mean ± sd)."""
    saved = json.loads((cells_dir / "ppl.json").read_text()) if (cells_dir / "ppl.json").exists() else {}
    ppl = {key: value for key, value in saved.items() if key != MEASURED_WITH}
    cells = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*__*.json"))]
    commits = sorted({str(c.get("commit", "unrecorded")) for c in cells})
    if len(commits) > 1:  # one table measures one version of the code (as experiments/table.py)
        raise SystemExit(f"recovery_budget: {cells_dir} holds cells of {len(commits)} code commits "
                         f"({', '.join(commits)}): keep one commit's cells per --cells directory")
    tasks = sorted({c["task"] for c in cells})
    lines = ["| setting | distillation steps | Brown ppl | " + " | ".join(tasks) + " | average |",
             "|---|---|---|" + "---|" * (len(tasks) + 1)]
    for key in sorted(ppl, key=lambda k: (k.split("@")[0], int(k.split("@step")[1]))):
        setting, step = key.split("@step")
        per_task = []
        for task in tasks:
            accs = [c["test_accuracy"] for c in cells if c["setting"] == key and c["task"] == task]
            per_task.append(accs)
        shown = [f"{100 * statistics.mean(a):.1f} ± {100 * statistics.stdev(a):.1f} ({len(a)})" if len(a) > 1
                 else (f"{100 * a[0]:.1f} (1)" if a else "–") for a in per_task]
        seeds = min((len(a) for a in per_task), default=0)
        average = (f"{100 * statistics.mean(statistics.mean(a) for a in per_task):.1f}"
                   if seeds and all(len(a) == seeds for a in per_task) else "–")
        lines.append(f"| {setting} | {step} | {ppl[key]:.2f} | " + " | ".join(shown) + f" | {average} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["ffn25-nf4", "ffn50-nf4"], choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=360, help="distillation steps (one run per setting)")
    parser.add_argument("--checkpoints", nargs="+", type=int, default=[40, 120], help="steps measured too")
    parser.add_argument("--tasks", nargs="+", default=["vader-tweets", "vader-product"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="Brown held-out tokens for perplexity")
    parser.add_argument("--out", default="runs/recovery-budget", help="work directories (not tracked)")
    parser.add_argument("--cells", default=str(RESULTS))
    parser.add_argument("--report", help="also write the markdown table to this file")
    parser.add_argument("--report-only", action="store_true", help="only tabulate the finished cells (no runs)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--allow-dirty", action="store_true")
    # the grid's task budget (experiments/grid.py), so that these cells compare with the grid's
    parser.add_argument("--tune-steps", type=int, default=40)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        return write_report(Path(args.cells), args.report)
    # checked before any base is built: recover() refused these only after compression, and with a recovery
    # already there a checkpoint at --steps or beyond pointed at a directory that does not exist
    if any(not 0 < step < args.steps for step in args.checkpoints):
        parser.error(f"--checkpoints {args.checkpoints} must lie between 0 and --steps {args.steps} (the last step "
                     "is measured anyway)")
    grid_args = argparse.Namespace(steps=args.tune_steps, batch_size=8, lr=1e-3, eval_every=20, eval_limit=100,
                                   max_prompt_tokens=128, test_limit=None, progress=args.progress,
                                   commit=code_commit(allow_dirty=args.allow_dirty))
    cells_dir = Path(args.cells)
    steps = sorted(set(args.checkpoints)) + [args.steps]
    try:  # TuneConfig saw a bad --tune-steps only when the first cell ran, after the distillation
        budget(grid_args, "cpet-shared")
        distill = DistillConfig(steps=args.steps, batch_size=4, seq_len=128)
    except ValueError as exc:
        raise SystemExit(f"recovery_budget: {exc}") from None
    for setting in args.settings:  # every setting before the first one's hours of work
        check_reused_recovery(Path(args.out) / setting, distill, steps[:-1])
    measured_with = {"commit": grid_args.commit, "ppl_tokens": args.ppl_tokens, "model": args.model}
    if cells_dir.is_dir():
        check_finished_cells(cells_dir, grid_args.commit, args.tune_steps, args.model)
        check_perplexities(cells_dir / "ppl.json", measured_with)
    cells_dir.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        setting_dir = Path(args.out) / setting
        pipeline = CPET.from_pretrained(args.model, work_dir=setting_dir)
        if not pipeline.has_base:
            pipeline.compress(SETTINGS[setting](), progress=args.progress)
        if not (pipeline.recovery_dir / "recovery.json").exists():
            print(f"[budget] {setting}: distilling {args.steps} steps, checkpoints {steps[:-1]}", flush=True)
            pipeline.recover(distill=distill, checkpoints=steps[:-1], progress=args.progress)
        ppl_path = cells_dir / "ppl.json"
        for step in [0, *steps]:
            key = f"{setting}@step{step}"
            ppl = json.loads(ppl_path.read_text()) if ppl_path.exists() else {}
            if key not in ppl:
                recovery = None if step == 0 else checkpoint_pipeline(setting_dir, step, args.steps,
                                                                      pipeline.original).recovery_dir
                ppl[key] = brown_ppl(pipeline, recovery, args.ppl_tokens)
                print(f"[budget] {key}: Brown ppl {ppl[key]:.2f}", flush=True)
                fresh = json.loads(ppl_path.read_text()) if ppl_path.exists() else {}  # another worker's too
                write_text_atomic(ppl_path, json.dumps({**fresh, MEASURED_WITH: measured_with, key: ppl[key]},
                                                       indent=2, sort_keys=True))
        # each worker its own original adapters (seeded: identical across workers, as the cells' hashes show)
        original = CPET(pipeline.original, setting_dir / "original")
        for seed in args.seeds:
            for step in steps:
                view = checkpoint_pipeline(setting_dir, step, args.steps, pipeline.original)
                key = f"{setting}@step{step}"
                for task in args.tasks:
                    path = cells_dir / f"{cell_name(key, task, 'cpet-shared', seed)}.json"
                    if path.exists():
                        continue
                    # the cell's grid_args name the model and the distillation steps its recovery had
                    cell_args = argparse.Namespace(**vars(grid_args), model=args.model, recovery_steps=step)
                    result = run_cell({key: view}, original, key, task, "cpet-shared", seed, cell_args)
                    write_text_atomic(path, json.dumps(result, indent=2))
                    print(f"[budget] {path.stem}: test accuracy {result['test_accuracy']:.3f} "
                          f"({result['seconds']:.0f} s)", flush=True)
    return write_report(cells_dir, args.report)


def write_report(cells_dir: Path, path: str | None) -> int:
    """Print the markdown table of the finished cells and, given ``path``, write it there too."""
    table = report(cells_dir)
    print(table)
    if path:
        write_text_atomic(Path(path), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
