"""The comparison grid: per task, compression setting, method row and seed, one tuning run = one cell.

Cells are run in an order that fills the table evenly (seed-major), each cell's result is written
atomically to ``<cells>/<cell>.json`` (tracked in git: small JSON files) and finished cells are skipped, so
the grid can be killed and resumed at any time, across sessions. The compressed base and the shared
recovery modules of each setting are built once and reused (``<out>/<setting>/``, not tracked).

Every cell records the git commit of the code that ran it (run the grid from a pinned checkout, e.g. a
``git worktree`` at one commit, so later work cannot change what it measures mid-run; uncommitted changes
to the package or the experiments are refused), its effective tuning config (read back from the adapter),
the hash of the adapter it inherited, and every test prediction (for paired bootstrap intervals). A cell of
other code is redone, in a work directory of its own: ``--out`` serves one commit (``grid-commit.json``).
Workers run in parallel only on disjoint cells (split them by seed: the grid has no locks).

    python experiments/grid.py                                   # everything (long: run in background)
    python experiments/grid.py --settings ffn25-nf4 --seeds 0    # a slice
    python experiments/table.py                                  # the table + plots from finished cells
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpet.assets import sha256_of, write_text_atomic  # noqa: E402
from cpet.compress.moefy import MoEfyConfig  # noqa: E402
from cpet.config import PruneConfig, QuantizeConfig  # noqa: E402
from cpet.data.tasks import as_task, examples_sha256  # noqa: E402
from cpet.pipeline import CPET, task_key  # noqa: E402,F401  (task_key: part of this script's API)
from cpet.runtime import machine_record  # noqa: E402
from cpet.train import DistillConfig, TuneConfig  # noqa: E402

CELLS_DIR = Path(__file__).resolve().parent / "results" / "cells"
TASKS = ("vader-movie", "vader-product", "vader-news", "vader-tweets")
REPO = Path(__file__).resolve().parent.parent

SETTINGS = {
    "nf4": lambda: [QuantizeConfig(method="nf4")],
    "ffn25-nf4": lambda: [PruneConfig(ffn_ratio=0.25, importance="taylor"), QuantizeConfig(method="nf4")],
    "ffn50-nf4": lambda: [PruneConfig(ffn_ratio=0.5, importance="taylor"), QuantizeConfig(method="nf4")],
    # MoEfied: 25% of the FFN channels pruned, the remaining 1,152 split into 16 experts of which 8 run per token
    "ffn25-moe50-nf4": lambda: [PruneConfig(ffn_ratio=0.25, importance="taylor"),
                                MoEfyConfig(num_experts=16, top_k=8), QuantizeConfig(method="nf4")],
}
# what a run without --settings covers (the MoEfied setting is run on its own: see the README)
DEFAULT_SETTINGS = ("nf4", "ffn25-nf4", "ffn50-nf4")

# row name -> tune() arguments and a step multiplier; "original" rows run on the uncompressed model
ROWS = {
    "original": dict(on="original", init="random", recovery="none"),
    "original-2x": dict(on="original", init="random", recovery="none", steps_factor=2),
    "vanilla": dict(init="random", recovery="none"),
    "vanilla-2x": dict(init="random", recovery="none", steps_factor=2),
    "svd-init": dict(init="svd", recovery="none"),
    "inherit": dict(init="inherit", recovery="none"),
    "per-task-rec": dict(init="random", recovery="per_task"),
    "shared-rec": dict(init="random", recovery="shared"),
    "cpet": dict(init="inherit", recovery="per_task"),
    "cpet-shared": dict(init="inherit", recovery="shared"),
}
ORIGINAL_ROWS = tuple(row for row, how in ROWS.items() if how.get("on") == "original")

# what each row is, for the results legend
ROW_MEANING = {
    "original": "LoRA on the uncompressed model (the upper reference)",
    "original-2x": "the same at twice the steps (equal-budget control for the rows that start from `original`)",
    "vanilla": "LoRA from the usual init (B = 0) on the compressed base (QLoRA-style)",
    "vanilla-2x": "the same at twice the steps (equal-budget control: as many task steps as inherit + tune)",
    "svd-init": "LoRA set to the truncated SVD of each layer's compression residual (LoftQ-style)",
    "inherit": "LoRA initialised from the original-model LoRA of the same task and seed, through the index maps",
    "per-task-rec": "usual-init LoRA + per-task recovery bypasses (GELU, rank 8) trained with it, distilled "
                    "from the original model + its LoRA",
    "shared-rec": "usual-init LoRA on the base + the frozen shared recovery modules (distilled on Brown)",
    "cpet": "inherited LoRA + per-task recovery (CA-LoRA: inheritance and recovery together)",
    "cpet-shared": "inherited LoRA on the base + the frozen shared recovery modules (what `make demo` runs)",
}


def uses_original_adapter(row: str) -> bool:
    """Rows that start from (inherit) or distil from (per-task recovery) the original-model adapter."""
    return ROWS[row]["init"] == "inherit" or ROWS[row]["recovery"] == "per_task"


def cumulative_task_steps(row: str, steps: int) -> int:
    """Optimizer steps on task data behind a row's adapter, counting the original adapter it builds on."""
    own = steps * ROWS[row].get("steps_factor", 1)
    return own + (steps if uses_original_adapter(row) else 0)


def tune_args(row: str) -> dict:
    return {key: value for key, value in ROWS[row].items() if key != "steps_factor"}


def budget(args, row: str = "vanilla") -> TuneConfig:
    """The training budget of a row: the same for every row, times its ``steps_factor``."""
    return TuneConfig(rank=8, alpha=16, steps=args.steps * ROWS[row].get("steps_factor", 1),
                      batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, eval_limit=args.eval_limit,
                      max_prompt_tokens=args.max_prompt_tokens, target_roles=None)


def cell_name(setting: str, task: str, row: str, seed: int) -> str:
    return f"{setting}__{task_key(task)}__{row}__s{seed}"


def is_done(path: Path, commit: str) -> bool:
    """Whether the cell at ``path`` was measured by the code at ``commit`` (a cell of other code is redone)."""
    return path.exists() and json.loads(path.read_text()).get("commit") == commit


BUDGET_KEYS = ("steps", "batch_size", "lr", "eval_every", "eval_limit", "max_prompt_tokens")


def grid_settings(args) -> dict:
    """What a cell measured that its adapter's tune_config does not record (cells store it as ``grid_args``)."""
    return {key: getattr(args, key, None) for key in ("model", "test_limit", "recovery_steps")}


def budget_clash(cell: dict, args, row: str) -> list[str]:
    """How the budget ``args`` asks of ``row`` differs from the one the finished ``cell`` was measured with
    (``"lr 0.001 -> 0.0003"``, ...): its adapter's tune_config, and the grid settings new cells record."""
    wanted, recorded = budget(args, row).to_dict(), cell.get("tune_config") or {}
    diffs = [f"{key} {recorded[key]} -> {wanted[key]}" for key in BUDGET_KEYS
             if key in recorded and recorded[key] != wanted[key]]
    stored = cell.get("grid_args") or {}
    # --recovery-steps makes the shared recovery, which only rows tuned with it read: another one is no clash for
    # the others (it refused a run whose original or vanilla cells it would not have changed)
    unread = () if ROWS[row].get("recovery") in ("shared", "both") else ("recovery_steps",)
    return diffs + [f"{key} {stored[key]} -> {value}" for key, value in grid_settings(args).items()
                    if key in stored and stored[key] != value and key not in unread]


def planned_cells(args, cells_dir: Path):
    """``(setting, task, row, seed, key, path)`` of every cell the run asks for, in the order it runs them (``key``:
    the setting, or ``"original"`` for the rows tuned on the uncompressed model)."""
    rows = [r for r in ROWS if r in args.rows]
    for seed in args.seeds:
        for setting in args.settings:
            for task in args.tasks:
                for row in rows:
                    key = "original" if row in ORIGINAL_ROWS else setting
                    yield setting, task, row, seed, key, cells_dir / f"{cell_name(key, task, row, seed)}.json"


def check_options(args) -> None:
    """Refuse, before anything is built or loaded, a budget that ``TuneConfig``, ``DistillConfig`` or ``evaluate``
    refuse: they saw it only when the first cell ran, after its setting's base and shared recovery were built (and a
    ``--test-limit`` below 1 only after that cell's tuning; check_run read a negative one as "all but the last")."""
    try:
        for row in args.rows:
            budget(args, row)
        DistillConfig(steps=args.recovery_steps, batch_size=4, seq_len=128)
    except ValueError as exc:
        raise SystemExit(f"grid: {exc}") from None
    if args.test_limit is not None and args.test_limit < 1:
        raise SystemExit(f"grid: --test-limit must be >= 1 (or left out: every test example), got {args.test_limit}")


def check_run(args, cells_dir: Path) -> None:
    """Refuse, before any base is built, a task that cannot be tuned (name, file, splits, label words) and
    finished cells of this commit measured with another budget: they would be skipped as done, and the table
    would report the old budget as the new one."""
    from cpet.data import load_task, tuning_prompts

    test_sha256 = {}
    for task in args.tasks:
        try:
            loaded = load_task(task)
            tuning_prompts(loaded, "train", "validation", "test")
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"grid: task {task!r}: {exc}") from None
        test_sha256[task] = examples_sha256(loaded.split("test")[:args.test_limit])
    clashes, other_data = [], []
    for _, task, row, _, _, path in planned_cells(args, cells_dir):
        if is_done(path, args.commit):
            cell = json.loads(path.read_text())
            diffs = budget_clash(cell, args, row)
            if diffs:  # another --test-limit gives another test hash too: the budget is what differs
                clashes.append(f"{path.stem} ({', '.join(diffs)})")
            elif cell.get("test_sha256") not in (None, test_sha256[task]):
                # cells are named by the task's key alone: an edited task file, or another file of the same name
                # (or a file named like a built-in task), would find the old cell done and report it as its own
                other_data.append((path.stem, task))
    if clashes:
        raise SystemExit(f"grid: {len(clashes)} finished cells of this commit were measured with another budget, "
                         f"e.g. {clashes[0]}: give this budget its own --cells directory (and --out), or remove them")
    if other_data:
        name, task = other_data[0]
        raise SystemExit(f"grid: {len(other_data)} finished cells of this commit were measured on another test split "
                         f"than task {task!r} has now, e.g. {name} (the file changed, or another task shares its "
                         f"name {task_key(task)!r}): give this data its own --cells directory (and --out), or remove "
                         "those cells")


def code_commit(repo: Path = REPO, allow_dirty: bool = False,
                measured: tuple[str, ...] = ("cpet", "experiments/grid.py")) -> str:
    """The commit the grid runs from; refuses uncommitted changes to what it measures (the ``measured`` paths)
    unless allowed, and then says ``+dirty``. Raises ``subprocess.CalledProcessError`` outside a git checkout."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", *measured],
                           capture_output=True, text=True, check=True).stdout.strip()
    if dirty and not allow_dirty:
        raise SystemExit(f"grid: uncommitted changes to the code it measures ({dirty.splitlines()[0]} ...): commit "
                         "them, or run from a pinned worktree (git worktree add ../grid-run HEAD)")
    return head + ("+dirty" if dirty else "")


WORK_COMMIT_FILE = "grid-commit.json"


def claim_work_dir(out: Path, commit: str) -> None:
    """Tie the work directory ``out`` (bases, recovery, adapters) to the code commit that builds in it.

    A cell of other code is redone (:func:`is_done`), but in a work directory of that other code its tuning
    would resume the old finished adapter on the old base and only re-score it, under the new commit. So a
    work directory serves one commit: a new one needs a new ``--out``.

    Raises:
        SystemExit: ``out`` was built by another commit, or holds work that no commit claimed.
    """
    marker = out / WORK_COMMIT_FILE
    if marker.exists():
        built_by = json.loads(marker.read_text()).get("commit")
        if built_by != commit:
            raise SystemExit(f"grid: {out} holds bases and adapters built by commit {built_by}, not by this code "
                             f"({commit}); its cells would re-score that code's adapters: use a new --out")
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"grid: {out} already holds work that no commit claimed ({WORK_COMMIT_FILE} missing): "
                         "use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps({"commit": commit}))


def original_adapter(original: CPET, task: str, seed: int, args) -> Path:
    """The original-model adapter that inheritance and per-task recovery start from.

    Work directories are not tracked, so on a fresh machine the 'original' cell may be finished while its
    adapter is gone: it is then tuned again with the same seed and budget. Tuning is seeded before any
    random draw, so on the same machine this gives the same adapter; on another CPU float rounding can give
    other weights (README), which is why every cell that uses it records its weights' hash.
    """
    config = budget(args, "original")
    config.seed = seed
    run_dir = original.work_dir / "adapters" / f"{task_key(task)}-s{seed}"
    state = run_dir / "resume" / "state.json"
    if state.exists():  # a work directory used with another budget or settings must not lend its adapter
        from cpet.train import check_resume_plan

        check_resume_plan(run_dir / "resume", config)
    if not state.exists() or json.loads(state.read_text())["step"] < config.steps:
        print(f"[grid] tuning the original adapter for {task_key(task)} s{seed} (missing or unfinished)",
              flush=True)
        original.tune(task, name=f"{task_key(task)}-s{seed}", config=config, progress=args.progress,
                      **tune_args("original"))
    return run_dir / "adapter"


def run_cell(pipelines: dict, original: CPET, setting: str, task: str, row: str, seed: int, args) -> dict:
    config = budget(args, row)
    config.seed = seed
    start = time.perf_counter()
    if row in ORIGINAL_ROWS:
        pipeline = original
        name = f"{task_key(task)}-s{seed}" if row == "original" else f"{task_key(task)}-{row}-s{seed}"
        adapter = original.tune(task, name=name, config=config, progress=args.progress, **tune_args(row))
    else:
        pipeline = pipelines[setting]
        inherit_from = original_adapter(original, task, seed, args) if uses_original_adapter(row) else None
        adapter = pipeline.tune(task, name=f"{task_key(task)}-{row}-s{seed}", config=config, progress=args.progress,
                                inherit_from=inherit_from, **tune_args(row))
    result = pipeline.evaluate(adapter, task, limit=args.test_limit, with_predictions=True)
    meta = adapter.meta
    return {"setting": setting, "task": task_key(task), "row": row, "seed": seed, "commit": args.commit,
            "test_accuracy": result["accuracy"], "test_n": result["n"],
            "test_correct": "".join("1" if p == g else "0" for p, g in zip(result["predictions"], result["gold"])),
            "test_predictions": result["predictions"], "majority_baseline": result["majority_baseline"],
            # which test examples, in which order: paired comparisons are only valid on one test set
            "test_sha256": examples_sha256(as_task(task).split("test")[:args.test_limit]),
            "best_val_accuracy": meta["metrics"]["val_accuracy"], "best_step": meta["metrics"]["step"],
            "history": meta["metrics"]["history"], "cumulative_task_steps": cumulative_task_steps(row, args.steps),
            "tune_config": meta["tune_config"], "inherited_sha256": meta.get("inherited_sha256"),
            # the adapter this cell scored: an original cell's adapter can then be matched with the cells that
            # inherit it (re-tuned on another CPU after its work directory was lost, it can have other weights)
            "adapter_sha256": sha256_of(adapter.directory / "adapter_model.safetensors"),
            "base_id": meta["base_id"], "grid_args": grid_settings(args), "machine": machine_record(),
            "seconds": time.perf_counter() - start}


def prepare_setting(setting: str, out: Path, args) -> CPET:
    """The compressed base (+ shared recovery) of one setting, built once; its sizes go to the results."""
    pipeline = CPET.from_pretrained(args.model, work_dir=out / setting)
    if not pipeline.has_base:
        pipeline.compress(SETTINGS[setting](), progress=args.progress)
    distill = DistillConfig(steps=args.recovery_steps, batch_size=4, seq_len=128)
    recovery_meta = pipeline.recovery_dir / "recovery.json"
    if recovery_meta.exists():  # reused: its cells must not record another budget than the one it was made with
        made_with = json.loads(recovery_meta.read_text()).get("distill")
        wanted = json.loads(json.dumps(asdict(distill)))
        if made_with != wanted:
            changed = ", ".join(f"{key} {made_with.get(key) if isinstance(made_with, dict) else None} -> {value}"
                                for key, value in wanted.items()
                                if not isinstance(made_with, dict) or made_with.get(key) != value)
            raise SystemExit(f"grid: the shared recovery in {pipeline.recovery_dir} was distilled with other settings "
                             f"than this run's ({changed}; --recovery-steps): use another --out, or remove "
                             "that recovery/ to distil it again")
    else:
        pipeline.recover(distill=distill, progress=args.progress)
    summaries_dir = Path(args.cells).parent / "settings"
    write_text_atomic(summaries_dir / f"{setting}.json", json.dumps(setting_summary(pipeline.work_dir), indent=2))
    return pipeline


def setting_summary(work_dir: Path) -> dict:
    """Sizes of one setting's compressed base and shared recovery, read from the saved files (no model load).

    Bytes are in-memory sizes recorded by ``compress`` in the manifest (dense = before the first stage);
    the shared recovery is counted by its file size (fp32 tensors, so the same as in memory).
    """
    manifest = json.loads((work_dir / "base" / "manifest.json").read_text())
    stages = manifest["stages"]
    # base_id: the table prints these sizes only beside cells tuned on this very base (a later run of other code
    # rewrites the file)
    summary = {"base_id": manifest.get("base_id"),
               "dense_bytes": stages[0]["bytes_before"], "dense_params": stages[0]["params_before"],
               "base_bytes": stages[-1]["bytes_after"], "base_params": stages[-1]["params_after"]}
    recovery = work_dir / "recovery" / "recovery.safetensors"
    if recovery.exists():
        summary["shared_recovery_bytes"] = recovery.stat().st_size
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/grid", help="work directories (bases, adapters)")
    parser.add_argument("--cells", default=str(CELLS_DIR), help="finished cells (JSON)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=None, help="test examples scored (default: all)")
    parser.add_argument("--max-prompt-tokens", type=int, default=128, help="prompt cut, training and scoring")
    parser.add_argument("--recovery-steps", type=int, default=120,
                        help="shared recovery distillation steps "
                             "(docs/recovery_budget.md: 120 beat 40 at 50%% pruning)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--allow-dirty", action="store_true", help="run uncommitted code (cells say so)")
    args = parser.parse_args(argv)
    args.commit = code_commit(allow_dirty=args.allow_dirty)

    out, cells_dir = Path(args.out), Path(args.cells)
    check_options(args)
    check_run(args, cells_dir)  # before anything is written
    claim_work_dir(out, args.commit)
    cells_dir.mkdir(parents=True, exist_ok=True)
    pending = [cell for cell in planned_cells(args, cells_dir) if not is_done(cell[-1], args.commit)]
    if not pending:  # nothing to measure: the model is not loaded
        print(f"[grid] every planned cell is finished in {cells_dir}", flush=True)
        return 0
    original = CPET.from_pretrained(args.model, work_dir=out / "original")
    pipelines: dict[str, CPET] = {}
    for setting, task, row, seed, key, path in pending:
        if is_done(path, args.commit):  # finished meanwhile by another run sharing --cells
            continue
        if key != "original" and setting not in pipelines:
            pipelines[setting] = prepare_setting(setting, out, args)
        print(f"[grid] {path.stem}", flush=True)
        result = run_cell(pipelines, original, key, task, row, seed, args)
        write_text_atomic(path, json.dumps(result, indent=2))
        print(f"[grid] {path.stem}: test accuracy {result['test_accuracy']:.3f} ({result['seconds']:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
