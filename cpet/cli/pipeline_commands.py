"""``cpet compress``, ``cpet recover`` and ``cpet tune``: the steps of a pipeline directory, one per command."""

from __future__ import annotations

import argparse
import sys

from .config_file import directories_to_be_made, discard_run_config, save_run_config
from .output import emit, print_table


def stages_from_args(args: argparse.Namespace) -> list:
    """PruneConfig / MoEfyConfig / QuantizeConfig objects from ``cpet compress`` flags (validated on construction)."""
    from ..compress.moefy import MoEfyConfig
    from ..config import PruneConfig, QuantizeConfig

    pruning, moefying = bool(args.prune_ffn or args.prune_heads), args.moefy_experts is not None
    four_bit = args.quantize in ("nf4", "fp4")  # int8 has no double quantization and computes in its own kernels
    # (flag, given, its stage asked for, the flag that asks for it): a stage's flag without the stage would be
    # dropped without a word
    orphans = [f"{flag} is read only with {needs}" for flag, given, asked, needs in (
        ("--importance", args.importance != "taylor", pruning, "--prune-ffn or --prune-heads"),
        ("--round-to", args.round_to != 1, bool(args.prune_ffn), "--prune-ffn"),
        ("--head-mode", args.head_mode != "query", bool(args.prune_heads), "--prune-heads"),
        ("--moefy-clustering", args.moefy_clustering != "coactivation", moefying, "--moefy-experts"),
        ("--moefy-router-inputs", args.moefy_router_inputs != "dense", moefying, "--moefy-experts"),
        ("--no-double-quant", args.no_double_quant, four_bit, "--quantize nf4 or fp4"),
        ("--compute-dtype", args.compute_dtype != "float32", four_bit, "--quantize nf4 or fp4")) if given and not asked]
    if orphans:
        raise ValueError("; ".join(orphans) + ": give the stage they belong to, or leave them out")
    stages = []
    if args.prune_ffn or args.prune_heads:
        stages.append(PruneConfig(ffn_ratio=args.prune_ffn, head_ratio=args.prune_heads,
                                  importance=args.importance, head_mode=args.head_mode, round_to=args.round_to))
    if args.moefy_experts is not None:
        stages.append(MoEfyConfig(num_experts=args.moefy_experts, top_k=args.moefy_top_k, tau=args.moefy_tau,
                                  clustering=args.moefy_clustering, router_inputs=args.moefy_router_inputs,
                                  seed=getattr(args, "seed", 0)))
    elif args.moefy_top_k is not None or args.moefy_tau is not None:
        raise ValueError("--moefy-top-k and --moefy-tau need --moefy-experts (the number of experts per FFN)")
    if args.quantize != "none":
        stages.append(QuantizeConfig(method=args.quantize, double_quant=not args.no_double_quant,
                                     compute_dtype=args.compute_dtype, embeddings=args.quantize_embeddings))
    elif args.quantize_embeddings:
        raise ValueError("--quantize-embeddings needs --quantize (int8, nf4 or fp4: the format of the embeddings)")
    if not stages:
        raise ValueError("nothing to do: give --prune-ffn, --prune-heads, --moefy-experts and/or --quantize")
    return stages


def open_pipeline(directory: str, model: str | None, *, may_create: bool, first_step: str, runtime=None,
                  writes: bool = True):
    """The pipeline in ``directory``; a new one on ``model`` when ``may_create`` and there is none yet.

    ``writes``: the command writes into the pipeline, so a directory it cannot write to is refused before any
    work (compressing or distilling for minutes, then failing at the save).

    Any step may come first where it can (compress, or tuning on the original model); otherwise the error
    names the command that starts the directory.
    """
    from pathlib import Path

    from ..assets import check_output_dir
    from ..models import EMBEDDED_DEFAULT, load_base
    from ..pipeline import CPET, check_work_dir

    # --dtype / --device place the original for a saved pipeline as for a new one (a saved one loaded it in fp32
    # on the CPU whatever they said, so one command ran two ways depending on whether --out existed yet)
    placement = {"dtype": runtime.dtype, "device": runtime.device} if runtime is not None else {}
    if (Path(directory) / "pipeline.json").exists():
        if writes:
            check_output_dir(Path(directory))
        return CPET.load(directory, original=model, **placement)
    if may_create:
        check_work_dir(directory)  # a file in the way or no write access: refused before the model loads
        return CPET(load_base(model or EMBEDDED_DEFAULT, **placement), directory)
    model = model or EMBEDDED_DEFAULT
    raise ValueError(f"{directory} is not a CPET pipeline yet, and {first_step} needs a compressed base: start it "
                     f"with `cpet compress --model {model} --out {directory} --prune-ffn 0.25 --quantize nf4` "
                     f"(or `cpet tune {directory} --on original --model {model} --task T` for the inheritance "
                     "source first)")


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress into a pipeline directory and report size, perplexity and speed after every stage."""
    from ..data import load_corpus
    from ..evaluate import count_parameters, memory_bytes, perplexity, throughput

    stages = stages_from_args(args)  # bad flags fail here, before the model is loaded
    pipeline = open_pipeline(args.out, args.model, may_create=True, first_step="compress", runtime=args.runtime)
    # stages that do not fit this model (expert counts, head ratios) fail before the original is measured
    pipeline.check_stages(stages)
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
    pipeline.compress(stages, calibration_samples=args.calibration_samples, calibration_seed=args.seed,
                      progress=not args.json, after_stage=lambda i, model: measure(f"+ {names[i]}", model))
    save_run_config(args, args.out)
    result = {"out": str(pipeline.base_dir), "base_id": pipeline.base_id, "stages": rows}

    def render(r: dict) -> None:
        print_table(["after", "params (M)", "memory (MB)", "Brown ppl", "prefill tok/s"],
                     [[x["stage"], x["params"] / 1e6, x["memory_bytes"] / 1e6, x["brown_ppl"], x["prefill_tok_s"]]
                      for x in r["stages"]])
        print(f"\ncompressed base {r['base_id'][:16]}… written to {r['out']}")

    emit(result, args.json, render)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from ..recovery import RecoveryConfig
    from ..train import DistillConfig

    pipeline = open_pipeline(args.pipeline, args.model, may_create=False, first_step="recover",
                             runtime=args.runtime)
    pipeline.recover(RecoveryConfig(rank=args.rank, alpha=float(args.rank), activation="identity", init="svd"),
                     DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                   seed=args.seed),
                     progress=not args.json)
    save_run_config(args, args.pipeline)
    result = pipeline.log[-1]
    emit(result, args.json, lambda r: print(f"shared recovery written to {pipeline.recovery_dir}: distillation "
                                             f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}"))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ..data import load_task, tuning_prompts
    from ..adapters import check_adapter_name
    from ..pipeline import check_tune_options
    from ..train import TuneConfig

    check_tune_options(args.on, args.init, args.recovery, args.inherit_from)  # before a model loads
    if args.name is not None:
        check_adapter_name(args.name)
    tuning_prompts(load_task(args.task), "train", "validation", "test")  # so is the task (test: scored at the end)
    defaults = TuneConfig()
    config = TuneConfig(rank=args.rank or defaults.rank, alpha=defaults.alpha if args.alpha is None else args.alpha,
                        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_ratio=args.warmup_ratio, eval_every=args.eval_every, eval_limit=args.val_limit,
                        max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    pipeline = open_pipeline(args.pipeline, args.model, may_create=args.on == "original",
                             first_step="tuning on the compressed model", runtime=args.runtime)
    if args.init == "inherit":
        check_inherited_shape(args, pipeline)
    made = directories_to_be_made(args.pipeline)
    saved = save_run_config(args, args.pipeline)  # before training: a killed run can be replayed from it
    try:
        adapter = pipeline.tune(args.task, on=args.on, init=args.init, inherit_from=args.inherit_from,
                                recovery=args.recovery, config=config, name=args.name, progress=not args.json,
                                keep_optimizer_state=args.keep_optimizer_state)
    except (ValueError, OSError):  # refused (bad option, missing task file ...): nothing ran, nothing to replay
        discard_run_config(saved, made)
        raise
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
    emit(result, args.json, lambda r: print(
        f"adapter {r['adapter']}: validation {r['best_val_accuracy']:.4f} (step {r['best_step']}), "
        f"test {r['test']['accuracy']:.4f} on {r['test']['n']} examples (the {args.on} model zero-shot: "
        f"{r['zero_shot_test_accuracy']:.4f}; majority class: {r['majority_baseline']:.4f})"))
    return 0


def check_inherited_shape(args: argparse.Namespace, pipeline) -> None:
    """Refuse a --rank / --alpha that inheritance would override: the inherited factors fix the LoRA's shape, and
    a flag dropped without a word would leave the user believing the adapter has the rank they asked for."""
    from ..lora_init import lora_shape_of

    shape = lora_shape_of(pipeline.resolve_adapter(args.inherit_from))
    for flag, given, inherited in (("--rank", args.rank, shape["rank"]), ("--alpha", args.alpha, shape["alpha"])):
        if given is not None and given != inherited:
            raise ValueError(f"{flag} {given:g} with --init inherit: the inherited adapter {args.inherit_from} has "
                             f"{flag[2:]} {inherited:g}, which the inherited factors fix; leave {flag} out (or give "
                             f"{inherited:g})")


def cmd_export(args: argparse.Namespace) -> int:
    """Base + plain PEFT adapters (shared recovery folded in) for standard engines, checked against CPET."""
    from ..export import export_pipeline

    pipeline = open_pipeline(args.pipeline, None, may_create=False, first_step="export", writes=False)
    report = export_pipeline(pipeline, args.out, args.adapter or None, check=not args.no_check)

    def render(result: dict) -> None:
        print(f"exported {args.pipeline} to {result['out']}: the base in base/, adapters in adapters/")
        rows = [(name, a["recovery"], a["rank"], a["modules"], a.get("max_abs_diff", "not checked"))
                for name, a in result["adapters"].items()]
        if rows:
            print_table(["adapter", "recovery", "rank", "modules", "max |logit diff| vs CPET"], rows)
        for name, why in result["skipped"].items():
            print(f"skipped {name}: {why}")

    emit(report.to_dict(), args.json, render)
    return 0
