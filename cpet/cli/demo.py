"""``cpet demo``: the whole pipeline on the embedded default for one task, with a table at the end."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config_file import save_run_config
from .evaluation import load_model
from .output import emit, print_table


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the whole CPET pipeline on the embedded default, for one task.

    Original model (perplexity, zero-shot, + LoRA) -> compressed base (perplexity, zero-shot, vanilla LoRA)
    -> shared recovery -> CPET adapter (inherited LoRA on the recovered base), with a table at the end.
    """
    from ..config import PruneConfig, QuantizeConfig
    from ..data import load_corpus, load_task, tuning_prompts
    from ..evaluate import perplexity
    from ..pipeline import CPET, check_work_dir, task_key
    from ..recovery import RecoveryConfig
    from ..train import DistillConfig, TuneConfig

    start = time.perf_counter()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    tuning_prompts(load_task(args.task), "train", "validation", "test")  # a bad --task fails before the model loads
    tune = TuneConfig(rank=8, alpha=16, steps=args.steps, batch_size=8, lr=args.lr, seed=args.seed,
                      eval_every=max(args.steps // 2, 1), eval_limit=args.val_limit,
                      max_prompt_tokens=args.max_prompt_tokens)  # so do bad tuning flags
    check_work_dir(args.out)  # and an --out that cannot be made
    names = {row: f"{task_key(args.task)}-{row}" for row in ("original", "vanilla", "cpet")}  # one set per task
    distill = DistillConfig(steps=args.recovery_steps, batch_size=4, seq_len=128, seed=args.seed)
    check_demo_resumes(Path(args.out), names, tune, distill)  # and a re-run with flags its adapters clash with
    pipeline = CPET(load_model(args), args.out)
    save_run_config(args, args.out)
    text = load_corpus("brown", split="heldout")
    rows = []

    def row(name: str, adapter=None, on: str = "compressed") -> None:
        with pipeline.running(adapter, on=on) as model:  # the base read once; nothing copied per row
            ppl = perplexity(model, pipeline.tokenizer, text, max_tokens=args.max_tokens).ppl
            memory = model.nbytes
        acc = pipeline.evaluate(adapter, args.task, limit=args.limit, on=on,
                                max_prompt_tokens=args.max_prompt_tokens)["accuracy"]
        rows.append({"model": name, "memory_mb": memory / 1e6, "brown_ppl": ppl, "accuracy": acc,
                     "minutes": (time.perf_counter() - start) / 60})
        say(f"[{rows[-1]['minutes']:.1f} min] {name}: Brown ppl {ppl:.2f}, {args.task} accuracy {acc:.4f}")

    say(f"1/5 original {args.model}")
    row("original, zero-shot", on="original")
    original = pipeline.tune(args.task, on="original", config=tune, name=names["original"], progress=not args.json)
    row("original + LoRA", original)
    say("2/5 compress: 25% FFN channels (Taylor) + nf4")
    # --seed draws the Taylor calibration windows too, as `cpet compress --seed` does (they were seed 0 whatever it was)
    pipeline.compress([PruneConfig(ffn_ratio=0.25, importance="taylor"), QuantizeConfig(method="nf4")],
                      calibration_seed=args.seed, progress=not args.json)
    row("compressed, zero-shot")
    say("3/5 vanilla LoRA on the compressed base (random init)")
    vanilla = pipeline.tune(args.task, config=tune, name=names["vanilla"], progress=not args.json)
    row("compressed + LoRA (vanilla)", vanilla)
    say("4/5 shared recovery: residual-SVD init, distilled on Brown")
    pipeline.recover(RecoveryConfig(rank=16, alpha=16.0, activation="identity", init="svd"), distill,
                     progress=not args.json)
    say("5/5 CPET: inherited LoRA on the recovered base")
    cpet = pipeline.tune(args.task, init="inherit", inherit_from=original, recovery="shared", config=tune,
                         name=names["cpet"], progress=not args.json)
    row("compressed + recovery + inherited LoRA (CPET)", cpet)
    results = {"model": args.model, "task": args.task, "test_examples": args.limit, "rows": rows,
               "work_dir": str(pipeline.work_dir), "minutes": (time.perf_counter() - start) / 60}

    def render(r: dict) -> None:
        print(f"\nCPET on {r['model']}, task {r['task']} (test accuracy on {r['test_examples']} examples, Brown "
              f"held-out perplexity on {args.max_tokens} tokens)\n")
        print_table(["model", "memory (MB)", "Brown ppl", "accuracy"],
                     [[x["model"], x["memory_mb"], x["brown_ppl"], x["accuracy"]] for x in r["rows"]])
        print(f"\nartifacts in {r['work_dir']}; total {r['minutes']:.1f} min")

    emit(results, args.json, render)
    return 0


def check_demo_resumes(out: Path, names: dict[str, str], tune, distill) -> None:
    """Refuse, before the model loads, a demo re-run in ``out`` whose flags its finished or cut-off adapters
    clash with.

    Every step of the demo runs again on a re-run (compression and recovery are recomputed, adapters resume),
    and each adapter compares its run with its resume state only when it is reached: a changed ``--lr`` was
    refused after the first rows had been measured, and a changed ``--recovery-steps`` or ``--seed`` only at the
    last step, after the shared recovery that the CPET adapter was trained with had been replaced.
    """
    from dataclasses import asdict

    from ..recovery import RECOVERY_META, read_recovery_meta
    from ..train import check_resume_plan

    fix = f"use a new --out, or delete {out} to start over"
    for name in names.values():
        state = out / "adapters" / name / "resume"
        if (state / "state.json").exists():
            try:
                check_resume_plan(state, tune)
            except ValueError as exc:
                raise ValueError(f"{exc} (this demo re-run in {out}: {fix})") from None
    cpet_adapter = out / "adapters" / names["cpet"]
    if cpet_adapter.exists() and (out / "recovery" / RECOVERY_META).exists():
        saved = read_recovery_meta(out / "recovery").get("distill") or {}
        planned = asdict(distill)
        changed = sorted(key for key in planned if key in saved and saved[key] != planned[key])
        if changed:
            detail = ", ".join(f"{key} {saved[key]!r} -> {planned[key]!r}" for key in changed)
            raise ValueError(f"{cpet_adapter} was trained with the shared recovery in {out / 'recovery'}, and this "
                             f"run would distill another ({detail}; --recovery-steps and --seed set them): {fix}")
