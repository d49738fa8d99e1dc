"""The comparison grid: per task, compression setting, method row and seed, one tuning run = one cell.

Cells are run in an order that fills the table evenly (seed-major), each cell's result is written
atomically to ``<cells>/<cell>.json`` (tracked in git: small JSON files) and finished cells are skipped, so
the grid can be killed and resumed at any time, across sessions. The compressed base and the shared
recovery modules of each setting are built once and reused (``<out>/<setting>/``, not tracked).

    python experiments/grid.py                                   # everything (long: run in background)
    python experiments/grid.py --settings ffn25-nf4 --seeds 0    # a slice
    python experiments/table.py                                  # the table + plots from finished cells
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpet.assets import write_text_atomic  # noqa: E402
from cpet.config import PruneConfig, QuantizeConfig  # noqa: E402
from cpet.pipeline import CPET  # noqa: E402
from cpet.train import DistillConfig, TuneConfig  # noqa: E402

CELLS_DIR = Path(__file__).resolve().parent / "results" / "cells"
TASKS = ("vader-movie", "vader-product", "vader-news", "vader-tweets")

SETTINGS = {
    "nf4": lambda: [QuantizeConfig(method="nf4")],
    "ffn25-nf4": lambda: [PruneConfig(ffn_ratio=0.25, importance="taylor"), QuantizeConfig(method="nf4")],
    "ffn50-nf4": lambda: [PruneConfig(ffn_ratio=0.5, importance="taylor"), QuantizeConfig(method="nf4")],
}

# row name -> tune() arguments; "original" runs on the uncompressed model (the upper reference)
ROWS = {
    "original": dict(on="original", init="random", recovery="none"),
    "vanilla": dict(init="random", recovery="none"),
    "svd-init": dict(init="svd", recovery="none"),
    "inherit": dict(init="inherit", recovery="none"),
    "per-task-rec": dict(init="random", recovery="per_task"),
    "shared-rec": dict(init="random", recovery="shared"),
    "cpet": dict(init="inherit", recovery="per_task"),
    "cpet-shared": dict(init="inherit", recovery="shared"),
}

# what each row is, for the results legend
ROW_MEANING = {
    "original": "LoRA on the uncompressed model (the upper reference)",
    "vanilla": "LoRA from the usual init (B = 0) on the compressed base (QLoRA-style)",
    "svd-init": "LoRA set to the truncated SVD of each layer's compression residual (LoftQ-style)",
    "inherit": "LoRA initialised from the original-model LoRA of the same task and seed, through the index maps",
    "per-task-rec": "usual-init LoRA + per-task recovery bypasses (GELU, rank 8) trained with it, distilled "
                    "from the original model + its LoRA",
    "shared-rec": "usual-init LoRA on the base + the frozen shared recovery modules (distilled on Brown)",
    "cpet": "inherited LoRA + per-task recovery (CA-LoRA: inheritance and recovery together)",
    "cpet-shared": "inherited LoRA on the base + the frozen shared recovery modules (what `make demo` runs)",
}


def budget(args) -> TuneConfig:
    """The same training budget for every row."""
    return TuneConfig(rank=8, alpha=16, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      eval_every=args.eval_every, eval_limit=args.eval_limit, max_prompt_tokens=64,
                      target_roles=None)


def task_key(task: str) -> str:
    """A file-name-safe key for a task name or a path to a task file."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(task).stem if Path(task).suffix else task)


def cell_name(setting: str, task: str, row: str, seed: int) -> str:
    return f"{setting}__{task_key(task)}__{row}__s{seed}"


def original_adapter(original: CPET, task: str, seed: int, args) -> Path:
    """The original-model adapter that inheritance and per-task recovery start from.

    Work directories are not tracked, so on a fresh machine the 'original' cell may be finished while its
    adapter is gone: it is then tuned again with the same seed and budget (training is seeded, so this is
    the adapter the finished cell measured, up to floating-point nondeterminism).
    """
    config = budget(args)
    config.seed = seed
    run_dir = original.work_dir / "adapters" / f"{task_key(task)}-s{seed}"
    state = run_dir / "resume" / "state.json"
    if not state.exists() or json.loads(state.read_text())["step"] < config.steps:
        print(f"[grid] tuning the original adapter for {task_key(task)} s{seed} (missing or unfinished)",
              flush=True)
        original.tune(task, name=f"{task_key(task)}-s{seed}", config=config, progress=args.progress,
                      **ROWS["original"])
    return run_dir / "adapter"


def run_cell(pipelines: dict, original: CPET, setting: str, task: str, row: str, seed: int, args) -> dict:
    config = budget(args)
    config.seed = seed
    start = time.perf_counter()
    if row == "original":
        adapter = original.tune(task, name=f"{task_key(task)}-s{seed}", config=config, progress=args.progress,
                                **ROWS[row])
        result = original.evaluate(adapter, task, limit=args.test_limit)
    else:
        pipeline = pipelines[setting]
        needs_original = ROWS[row]["init"] == "inherit" or ROWS[row]["recovery"] == "per_task"
        inherit_from = original_adapter(original, task, seed, args) if needs_original else None
        adapter = pipeline.tune(task, name=f"{task_key(task)}-{row}-s{seed}", config=config, progress=args.progress,
                                inherit_from=inherit_from if needs_original else None, **ROWS[row])
        result = pipeline.evaluate(adapter, task, limit=args.test_limit)
    return {"setting": setting, "task": task_key(task), "row": row, "seed": seed, "test_accuracy": result["accuracy"],
            "test_n": result["n"], "best_val_accuracy": adapter.meta["metrics"]["val_accuracy"],
            "best_step": adapter.meta["metrics"]["step"], "history": adapter.meta["metrics"]["history"],
            "budget": config.to_dict(), "seconds": time.perf_counter() - start}


def prepare_setting(setting: str, out: Path, args) -> CPET:
    """The compressed base (+ shared recovery) of one setting, built once; its sizes go to the results."""
    pipeline = CPET.from_pretrained(args.model, work_dir=out / setting)
    if not pipeline.has_base:
        pipeline.compress(SETTINGS[setting](), progress=args.progress)
    if not (pipeline.recovery_dir / "recovery.json").exists():
        pipeline.recover(distill=DistillConfig(steps=args.recovery_steps, batch_size=4, seq_len=128),
                         progress=args.progress)
    summaries_dir = Path(args.cells).parent / "settings"
    write_text_atomic(summaries_dir / f"{setting}.json", json.dumps(setting_summary(pipeline.work_dir), indent=2))
    return pipeline


def setting_summary(work_dir: Path) -> dict:
    """Sizes of one setting's compressed base and shared recovery, read from the saved files (no model load).

    Bytes are in-memory sizes recorded by ``compress`` in the manifest (dense = before the first stage);
    the shared recovery is counted by its file size (fp32 tensors, so the same as in memory).
    """
    stages = json.loads((work_dir / "base" / "manifest.json").read_text())["stages"]
    summary = {"dense_bytes": stages[0]["bytes_before"], "dense_params": stages[0]["params_before"],
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
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    out = Path(args.out)
    cells_dir = Path(args.cells)
    cells_dir.mkdir(parents=True, exist_ok=True)
    original = CPET.from_pretrained(args.model, work_dir=out / "original")
    pipelines: dict[str, CPET] = {}
    rows = [r for r in ROWS if r in args.rows]
    for seed in args.seeds:
        for setting in args.settings:
            for task in args.tasks:
                for row in rows:
                    key = "original" if row == "original" else setting
                    path = cells_dir / f"{cell_name(key, task, row, seed)}.json"
                    if path.exists():
                        continue
                    if row != "original" and setting not in pipelines:
                        pipelines[setting] = prepare_setting(setting, out, args)
                    print(f"[grid] {path.stem}", flush=True)
                    result = run_cell(pipelines, original, key, task, row, seed, args)
                    write_text_atomic(path, json.dumps(result, indent=2))
                    print(f"[grid] {path.stem}: test accuracy {result['test_accuracy']:.3f} "
                          f"({result['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
