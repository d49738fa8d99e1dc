"""``cpet info``, ``cpet eval`` and ``cpet list``: what a model, an adapter or a pipeline is and scores."""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import emit, human_bytes, print_table


REBUILD_BASE = "the compressed base's manifest is damaged: compress the pipeline again (`cpet compress`)"

# `cpet eval`'s defaults of the flags that belong to one kind of scoring: the parser's defaults are None, so that
# such a flag given without its kind of scoring is refused (:func:`refuse_flags_that_do_not_apply`), not dropped
EVAL_DEFAULTS = {"split": "test", "max_tokens": 8192, "max_length": 256, "batch_size": 16}
ONLY_WITH_CORPUS = "only with --corpus"
ONLY_WITH_TASKS = "only when a task is scored: --task, --adapter, or a CPET --peft adapter's own"


def load_model(args: argparse.Namespace):
    """``args.model`` loaded on the command's device and dtype (``--device``, ``--dtype``)."""
    from ..models import load_base

    return load_base(args.model, dtype=args.runtime.dtype, device=args.runtime.device)


def model_info(loaded) -> dict:
    """Architecture, sizes and costs of a loaded base; ``module_map`` says where its q/k/v/o and FFN map came
    from: ``"table"`` (CPET's fixed family table) or ``"derived"`` (read from the model's structure)."""
    from ..evaluate import count_parameters, flops_per_token, memory_bytes
    from ..models import geometry

    geo = geometry(loaded.model)
    return {
        "model": loaded.name,
        "family": loaded.family.name,
        "module_map": "derived" if loaded.family.derived else "table",
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
    info = model_info(load_model(args))
    emit(info, args.json, lambda r: print_table(["field", "value"], [[k, _readable(k, v)] for k, v in r.items()]))
    return 0


def _readable(field: str, value) -> str:
    """A model-info value in human units (``--json`` keeps the raw numbers)."""
    if field == "parameters":
        return f"{value / 1e6:.1f} M"
    if field == "memory_bytes":
        return human_bytes(value)
    if field.startswith("flops"):
        return f"{value / 1e6:.1f} MFLOPs"
    if field == "load_seconds":
        return ", ".join(f"{step} {seconds:.2f} s" for step, seconds in value.items()) or "–"
    return str(value)


def evaluate_task(loaded, task, *, split: str, limit: int | None, batch_size: int, max_prompt_tokens: int | None,
                  meta: dict | None = None, progress: bool = True) -> dict:
    """Zero-shot (or adapted) accuracy of a loaded model on one split of a loaded task.

    ``meta``: the ``cpet.json`` of a CPET adapter on the model, which is scored as it was trained: with its
    template, label words, prompt length and cut (:func:`cpet.adapters.check_scoring` refuses a task or length
    it cannot be scored on; call it before loading the model). Without it: the task's prompts, prompts cut to
    ``max_prompt_tokens`` (None: :data:`cpet.evaluate.DEFAULT_MAX_PROMPT_TOKENS`) by today's cut.
    """
    from ..adapters import check_scoring
    from ..data.prompts import scoring_cut, scoring_prompts
    from ..data.tasks import examples_sha256
    from ..evaluate import DEFAULT_MAX_PROMPT_TOKENS, classification_accuracy

    if meta:
        max_prompt_tokens = check_scoring(meta, task, max_prompt_tokens)
    template, verbalizer = scoring_prompts(task, meta)
    max_prompt_tokens = max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS
    examples = task.split(split)[:limit] if limit else task.split(split)
    result = classification_accuracy(
        loaded.model, loaded.tokenizer, [e.text for e in examples], [e.label for e in examples],
        template=template, verbalizer=verbalizer, labels=task.labels, batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens, prompt_cut=scoring_cut(meta), progress=progress)
    counts = {label: sum(e.label == label for e in examples) for label in task.labels}
    majority = max(counts.values()) / len(examples)
    # predictions, gold labels and the examples' hash serve the intervals (cmd_eval removes them before output)
    return {"task": task.name, "split": split, **result.to_dict(), "max_prompt_tokens": max_prompt_tokens,
            "majority_baseline": majority, "predictions": list(result.predictions),
            "gold": [e.label for e in examples], "examples_sha256": examples_sha256(examples)}


def evaluate_corpus(loaded, corpus: str, *, max_tokens: int | None, max_length: int, progress: bool = True
                    ) -> dict:
    from ..data import load_corpus
    from ..evaluate import perplexity

    text = load_corpus(corpus, split="heldout")
    result = perplexity(loaded.model, loaded.tokenizer, text, max_length=max_length, stride=max_length,
                        max_tokens=max_tokens, progress=progress)
    return {"corpus": corpus, "split": "heldout", **result.to_dict()}


def _eval_target(args: argparse.Namespace) -> str:
    """What ``cpet eval`` scores: ``"pipeline"`` (its adapters or compressed base), ``"peft"`` or ``"model"``."""
    from ..models import EMBEDDED_DEFAULT

    if args.pipeline is None and args.model and (Path(args.model) / "pipeline.json").exists():
        args.pipeline, args.model = args.model, None  # `--model runs/demo`: the user meant the pipeline
    if args.pipeline is None:
        args.model = args.model or EMBEDDED_DEFAULT
    if args.pipeline is not None:
        if args.peft:
            raise ValueError("--peft DIR runs a PEFT adapter on a plain model (--model BASE --peft DIR); an adapter of "
                             "the pipeline is named with --adapter NAME")
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


def _peft_meta(args: argparse.Namespace) -> dict:
    """``--peft DIR``'s ``cpet.json`` ({} for a plain PEFT adapter), refused when plain peft cannot run it as it
    was trained: with recovery modules, or on another base than ``--model`` (read from its ``manifest.json``: the
    uncompressed original without one). Needs no model: called before one loads."""
    from pathlib import Path

    from ..adapters import check_adapter_base, is_cpet_adapter, read_adapter_meta
    from ..assembly import ADAPTER_WEIGHTS, require_file
    from ..assets import read_json_object

    if not (Path(args.peft) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{args.peft} is not a PEFT adapter directory (no adapter_config.json)")
    # what peft would trip over once the model has loaded: a damaged config, or weights only as a pickled .bin
    # (CPET reads safetensors only; peft would unpickle it, if with weights_only)
    read_json_object(Path(args.peft) / "adapter_config.json", "is it the right directory?")
    require_file(Path(args.peft) / ADAPTER_WEIGHTS)
    meta = read_adapter_meta(args.peft) if is_cpet_adapter(args.peft) else {}
    if meta.get("recovery", "none") != "none":
        raise ValueError(f"adapter {args.peft} was trained with {meta['recovery']} recovery modules, which plain "
                         "peft does not load: evaluate it in its pipeline, `cpet eval PIPELINE --adapter NAME`")
    if meta:  # same LoRA shapes do not make the same base: an nf4-only base has the original's shapes
        check_adapter_base(meta, base_id=_base_id_of(args.model), directory=args.peft)
    return meta


def _base_id_of(model: str) -> str:
    """The ``base_id`` of ``--model``: a compressed base's (its ``manifest.json``), else the original's."""
    from pathlib import Path

    from ..assets import read_json_object
    from ..compress.manifest import ORIGINAL_BASE_ID

    manifest = Path(model) / "manifest.json"
    recorded = read_json_object(manifest, REBUILD_BASE).get("base_id") if manifest.is_file() else None
    return recorded or ORIGINAL_BASE_ID  # no CPET manifest: a plain model, which CPET calls the original


def _peft_on_base(args: argparse.Namespace, meta: dict):
    """``--model BASE --peft DIR``: the adapter on the base with plain peft (``meta``: its :func:`_peft_meta`)."""
    from peft import PeftModel

    from ..adapters import check_adapter_base
    from ..compress.manifest import ORIGINAL_BASE_ID

    loaded = load_model(args)
    if meta and _base_id_of(args.model) == ORIGINAL_BASE_ID:  # the original of another model is refused too
        check_adapter_base(meta, source_fingerprint=loaded.content_fingerprint(), directory=args.peft)
    try:
        loaded.model = PeftModel.from_pretrained(loaded.model, str(args.peft)).eval()
    except RuntimeError as err:  # peft's load_state_dict: the adapter's shapes are another model's
        if "size mismatch" not in str(err):
            raise
        trained_on = f" (it was trained on base {meta['base_id'][:16]}…)" if meta.get("base_id") else ""
        raise ValueError(f"adapter {args.peft} does not fit model {args.model}: its LoRA shapes are another "
                         f"model's{trained_on}; an adapter of a compressed base runs in its pipeline, "
                         "`cpet eval PIPELINE --adapter NAME`, or on that pipeline's `cpet export` output") from err
    return loaded


def paired_comparisons(scored: list[dict]) -> list[dict]:
    """Paired differences of accuracy between adapters scored on the same examples, each with a 95% interval.

    ``scored``: result dicts with ``adapter``, ``task``, ``split``, ``predictions``, ``gold`` and
    ``examples_sha256`` (of the scored examples; entries without predictions are skipped). Adapters pair only where they
    scored the very same examples (same task name, split and hash); every pair in the order given, A − B. One
    run per adapter, so the interval covers the test-set noise of those runs (:func:`cpet.stats.paired_bootstrap`),
    resampling a built-in task's dependent test units together (:mod:`cpet.data.units`: reviews, documents,
    email groups) when the scored examples are that built-in's test split (or its start), and examples otherwise.
    """
    from ..stats import paired_bootstrap

    groups: dict[tuple, list[dict]] = {}
    for entry in scored:
        if "predictions" in entry:
            groups.setdefault((entry["task"], entry["split"], entry.get("examples_sha256")), []).append(entry)
    comparisons = []
    for (task, split, digest), entries in groups.items():
        if len(entries) < 2:
            continue
        marks = [_correctness(e) for e in entries]
        clusters = _clusters_of(task, split, len(marks[0]), digest)
        for i in range(len(entries)):
            for j in range(i + 1, len(entries)):
                delta, low, high = paired_bootstrap([marks[i]], [marks[j]], tasks=[task], clusters=clusters)
                comparisons.append({"task": task, "split": split, "a": entries[i]["adapter"],
                                    "b": entries[j]["adapter"], "difference": delta, "interval_95": [low, high],
                                    "units": DEPENDENT_UNITS if clusters else "examples"})
    return comparisons


DEPENDENT_UNITS = "dependent units (documents, reviews, email groups)"


def _correctness(entry: dict) -> str:
    """``"1"`` / ``"0"`` per scored example: the prediction is the gold label."""
    return "".join("1" if p == g else "0" for p, g in zip(entry["predictions"], entry["gold"]))


def _clusters_of(task: str, split: str, count: int, digest: str | None) -> dict | None:
    """``{task: units}`` for :func:`cpet.stats.paired_bootstrap` when the scored examples are the start of a
    built-in task's test split that comes in dependent units; None (examples resampled one by one) otherwise."""
    units = _builtin_test_units(task, count, digest) if split == "test" else None
    return {task: units} if units is not None else None


def _builtin_test_units(task: str, count: int, digest: str | None) -> list | None:
    """The test units of the first ``count`` test examples of built-in task ``task`` when ``digest`` (the
    :func:`~cpet.data.tasks.examples_sha256` of the scored examples) says they are exactly those examples; None
    otherwise: a task without dependent units, or a user task that shares a built-in's name (its texts differ
    even where its labels agree)."""
    from ..data.units import UNITS_OF_TASK, split_units

    if task not in UNITS_OF_TASK or digest is None:
        return None
    split = split_units(task)
    if count > len(split.units) or split.prefix_sha256(count) != digest:
        return None
    return list(split.units[:count])


def with_accuracy_intervals(results: dict) -> dict:
    """Each task result gets ``accuracy_interval_95`` (test-set noise of this one run) and
    ``accuracy_interval_units``, what it takes as independent.

    Where the scored examples are a built-in task's test split that comes in dependent units (Brown documents,
    reviews, editorials, email groups), the interval resamples a unit at a time, as the paired differences do
    (:func:`cpet.stats.paired_bootstrap` of the accuracy against an all-wrong run): examples of one document
    are not independent, and a Wilson interval over them was up to four times too narrow (brown-genre). Other
    examples get the Wilson interval.
    """
    from ..stats import paired_bootstrap, wilson_interval

    for entry in results.get("tasks", []):
        clusters = None
        if "predictions" in entry:
            clusters = _clusters_of(entry["task"], entry["split"], entry["n"], entry.get("examples_sha256"))
        if clusters is not None:
            marks = _correctness(entry)
            _, low, high = paired_bootstrap([marks], ["0" * len(marks)], tasks=[entry["task"]], clusters=clusters)
            entry["accuracy_interval_95"] = [max(low, 0.0), min(high, 1.0)]
            entry["accuracy_interval_units"] = DEPENDENT_UNITS
        else:
            entry["accuracy_interval_95"] = list(wilson_interval(round(entry["accuracy"] * entry["n"]), entry["n"]))
            entry["accuracy_interval_units"] = "examples (Wilson)"
    return results


def without_predictions(results: dict) -> dict:
    """Drop what served the intervals and the pairing (predictions, gold labels, the examples' hash) from the
    task results that are printed or written as JSON."""
    for entry in results.get("tasks", []):
        for key in ("predictions", "gold", "examples_sha256"):
            entry.pop(key, None)
    return results


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import load_task

    target = _eval_target(args)
    if not args.task and not args.corpus and not args.adapter and not args.peft:
        raise ValueError("give --task T (accuracy) and/or --corpus C (perplexity), or --adapter NAME "
                         "with a pipeline")
    if target == "peft" and not args.task and not args.corpus:
        _check_adapter_names_its_task(args.peft)
    repeated = next((task for task in args.task or [] if args.task.count(task) > 1), None)
    if repeated is not None:  # scored twice, then paired with itself (an adapter given twice is: a zero check)
        raise ValueError(f"--task {repeated} is given more than once: give each once")
    tasks = [load_task(name) for name in args.task or []]  # every name checked before any model work
    names = [task.name for task in tasks]
    same = next((name for name in names if names.count(name) > 1), None)
    if same is not None:  # results are keyed by task name: two tasks of one name cannot be told apart
        given = [given for given, name in zip(args.task, names) if name == same]
        sources = {str(Path(g).resolve()) if Path(g).exists() else g for g in given}
        what = "are the same task" if len(sources) == 1 else "are two tasks of one name"
        raise ValueError(f"--task {given[0]} and --task {given[1]} {what} ({same}): "
                         + ("give it once" if len(sources) == 1 else "rename one of the files"))
    meta = _peft_meta(args) if target == "peft" else {}  # needs no model
    refuse_flags_that_do_not_apply(args, target, scores_tasks=bool(tasks or args.adapter or meta.get("task")))
    for dest, value in EVAL_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    for task in tasks:
        task.require(args.split)
    if args.corpus:  # so is the corpus (scored after the model has loaded)
        from ..data import load_corpus

        load_corpus(args.corpus, split="heldout")
    if target == "pipeline":
        results = _eval_pipeline(args, tasks)
    else:
        results = _eval_model(args, tasks, target, meta)
    with_accuracy_intervals(results)
    comparisons = paired_comparisons(results.get("tasks", []))
    if comparisons:
        results["comparisons"] = comparisons
    without_predictions(results)

    def render(r: dict) -> None:
        if "perplexity" in r:
            p = r["perplexity"]
            note = (f" of {p['read_tokens']} read: the first token of each {args.max_length}-token window has no "
                    "context" if p["read_tokens"] != p["tokens"] else "")
            of = f" of {p['adapter']}" if "adapter" in p else ""
            print(f"perplexity{of} on {p['corpus']} ({p['split']}, {p['tokens']} tokens scored{note}): {p['ppl']:.3f}")
        if "tasks" in r:
            print_table(["adapter", "task", "split", "n", "accuracy", "95% CI", "resampled", "majority"],
                         [[t.get("adapter", "–"), t["task"], t["split"], t["n"], t["accuracy"],
                           "{:.3f}..{:.3f}".format(*t["accuracy_interval_95"]), t["accuracy_interval_units"],
                           t["majority_baseline"]]
                          for t in r["tasks"]])
        if r.get("comparisons"):
            print("\npaired differences (A − B, the same test examples; one run each, so the interval covers "
                  "test-set noise only):")
            print_table(["task", "split", "A", "B", "difference", "95% CI", "resampled"],
                        [[c["task"], c["split"], c["a"], c["b"], f"{c['difference']:+.4f}",
                          "{:+.4f}..{:+.4f}".format(*c["interval_95"]), c["units"]] for c in r["comparisons"]])

    emit(results, args.json, render)
    return 0


def refuse_flags_that_do_not_apply(args: argparse.Namespace, target: str, *, scores_tasks: bool) -> None:
    """Refuse the ``cpet eval`` flags given (on the command line or in a ``--config`` file) for a kind of scoring
    the run does not do: perplexity's without ``--corpus``, accuracy's without a task to score (``scores_tasks``).
    They used to be dropped without a word. Their parser defaults are None, so that only a given flag counts."""
    groups = (
        (("--max-tokens", "max_tokens"), ("--max-length", "max_length")),
        (("--split", "split"), ("--limit", "limit"), ("--max-prompt-tokens", "max_prompt_tokens"),
         ("--batch-size", "batch_size")))
    corpus_flags, task_flags = ([flag for flag, dest in group if getattr(args, dest) is not None] for group in groups)
    problems = []
    if corpus_flags and not args.corpus:
        problems.append((corpus_flags, "without --corpus C (perplexity)", "give --corpus C"))
    if task_flags and not scores_tasks:
        if target == "pipeline":
            how = "give --task T (the compressed base, zero-shot) or --adapter NAME (scored on its own task)"
        elif target == "peft":
            how = f"give --task T (the PEFT adapter {args.peft} names no task: only a CPET adapter's cpet.json does)"
        else:
            how = "give --task T"
        problems.append((task_flags, "when no task is scored (accuracy)", how))
    if problems:
        where = f" (a flag set in --config {args.config} counts as given)" if args.config else ""
        raise ValueError("; ".join(
            f"{_listed(flags)} {'does' if len(flags) == 1 else 'do'} not apply {why}: {how}, or leave "
            f"{'it' if len(flags) == 1 else 'them'} out" for flags, why, how in problems) + where)


def _listed(flags: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"


def _check_adapter_names_its_task(adapter: str) -> None:
    """Refuse ``--peft DIR`` with nothing to score: only a CPET adapter's ``cpet.json`` names its task."""
    from ..adapters import is_cpet_adapter, read_adapter_meta

    if not is_cpet_adapter(adapter) or not read_adapter_meta(adapter).get("task"):
        raise ValueError(f"{adapter} is a plain PEFT adapter (no cpet.json names its task), so there is nothing to "
                         "score by default: give --task T (accuracy) and/or --corpus C (perplexity)")


def _eval_model(args: argparse.Namespace, tasks: list, target: str, meta: dict) -> dict:
    """A bare model (zero-shot), or a PEFT adapter on it (``--peft``; a CPET adapter scored as it was trained;
    ``meta``: its :func:`_peft_meta`, {} for a bare model)."""
    from ..adapters import check_scoring
    from ..data.prompts import scoring_prompts

    if not tasks and meta.get("task"):
        tasks = [_trained_task(meta, str(args.peft))]
        tasks[0].require(args.split)  # as --task's are in cmd_eval: a bad --split failed after the model loaded
    for task in tasks:  # before the model loads: the adapter can score the task, the task's label words differ
        if meta:
            check_scoring(meta, task, args.max_prompt_tokens, where=f"adapter {args.peft}")
        scoring_prompts(task, meta)
    loaded = _peft_on_base(args, meta) if target == "peft" else load_model(args)
    results: dict = {"model": args.model, **({"peft": str(args.peft)} if args.peft else {})}
    if args.corpus:
        results["perplexity"] = evaluate_corpus(loaded, args.corpus, max_tokens=args.max_tokens,
                                                max_length=args.max_length, progress=not args.json)
    if tasks:
        results["tasks"] = [evaluate_task(loaded, t, split=args.split, limit=args.limit, batch_size=args.batch_size,
                                          max_prompt_tokens=args.max_prompt_tokens, meta=meta,
                                          progress=not args.json)
                            for t in tasks]
    return results


def _trained_task(meta: dict, name: str):
    """The task an adapter was trained for, loaded again from where ``cpet.json`` says it came from."""
    from ..data import load_task

    source = meta.get("task_source") or meta.get("task")
    try:
        return load_task(source)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"adapter {name} was trained for task {meta.get('task')!r} ({source}), which cannot be "
                         f"loaded here ({exc}): name the task with --task") from exc


def _eval_pipeline(args: argparse.Namespace, tasks: list) -> dict:
    """Adapters of a pipeline with the recovery they were trained with, or its compressed base zero-shot."""
    from ..adapters import check_scoring, read_adapter_meta
    from ..data import load_corpus
    from ..data.prompts import scoring_prompts
    from ..evaluate import perplexity
    from ..pipeline import CPET

    if args.corpus and len(args.adapter or []) > 1:
        raise ValueError("--corpus scores one model: give one --adapter with it (or none, for the compressed base), "
                         "and run the command again for each other adapter")
    for task in tasks if not args.adapter else ():  # the compressed base scores the tasks' own label words
        scoring_prompts(task, None)
    pipeline = CPET.load(args.pipeline, original=args.model)  # --model: where the recorded source now is
    plan = []  # (adapter name, directory, task): every adapter's task loaded and checked before any scoring
    for name in args.adapter or []:
        directory = pipeline.resolve_adapter(name)
        meta = read_adapter_meta(directory)
        for task in tasks or [_trained_task(meta, name)]:
            task.require(args.split)  # an adapter's own task too: a bad --split failed after the base loaded
            check_scoring(meta, task, args.max_prompt_tokens, where=f"adapter {name}")
            scoring_prompts(task, meta)
            plan.append((name, directory, task))
    results: dict = {"pipeline": str(args.pipeline), "tasks": []}
    for name, directory, task in plan:
        result = pipeline.evaluate(directory, task, split=args.split, limit=args.limit, batch_size=args.batch_size,
                                   max_prompt_tokens=args.max_prompt_tokens, with_predictions=True)
        results["tasks"].append({"adapter": name, **result})
    if not args.adapter:
        for task in tasks:
            result = pipeline.evaluate(None, task, split=args.split, limit=args.limit, batch_size=args.batch_size,
                                       max_prompt_tokens=args.max_prompt_tokens, with_predictions=True)
            results["tasks"].append({"adapter": "compressed base (zero-shot)", **result})
    if args.corpus:
        text = load_corpus(args.corpus, split="heldout")
        adapter = args.adapter[0] if args.adapter else None
        with pipeline.running(pipeline.resolve_adapter(adapter) if adapter else None) as model:
            ppl = perplexity(model, pipeline.tokenizer, text, max_length=args.max_length,
                             stride=args.max_length, max_tokens=args.max_tokens, progress=not args.json)
        results["perplexity"] = {"corpus": args.corpus, "split": "heldout",
                                 "adapter": adapter or "compressed base", **ppl.to_dict()}
    return results


def cmd_list(args: argparse.Namespace) -> int:
    """Base, stages, recovery and adapters (task, metrics) of a pipeline, read from its files (no model load)."""
    from pathlib import Path

    from ..adapters import read_adapter_meta
    from ..assets import read_json_object
    from ..compress.manifest import ORIGINAL_BASE_ID
    from ..pipeline import read_pipeline_record

    root = Path(args.pipeline)
    if not root.exists():
        raise ValueError(f"{root} does not exist: give a CPET pipeline directory")
    if not (root / "pipeline.json").exists():
        raise ValueError(f"{root} is not a CPET pipeline directory (no pipeline.json)")
    record = read_pipeline_record(root)
    result: dict = {"pipeline": str(root), "source": record.get("source"), "base": None, "recovery": None,
                    "adapters": []}
    manifest_path = root / "base" / "manifest.json"
    if manifest_path.exists():
        manifest = read_json_object(manifest_path, REBUILD_BASE)
        stages = manifest.get("stages", [])
        result["base"] = {"base_id": manifest.get("base_id"),
                          "stages": [s.get("config", {}).get("stage", "?") for s in stages],
                          "configs": [s.get("config") for s in stages],
                          "bytes": stages[-1].get("bytes_after") if stages else None,
                          "dense_bytes": stages[0].get("bytes_before") if stages else None}
    recovery_meta = root / "recovery" / "recovery.json"
    if recovery_meta.exists():
        meta = read_json_object(recovery_meta, "the recovery modules are damaged: run `cpet recover` again")
        config, distill = meta.get("config") or {}, meta.get("distill") or {}
        result["recovery"] = {"rank": config.get("rank"), "targets": len(meta.get("targets") or []),
                              "distill_steps": distill.get("steps")}
    current_base = result["base"]["base_id"] if result["base"] else None
    from ..recovery import RECOVERY_FILE, recovery_sha256, stale_recovery

    # the shared recovery at hand: an adapter trained with another set (`cpet recover` run again) no longer runs
    recovery_sha = recovery_sha256(root / "recovery") if (root / "recovery" / RECOVERY_FILE).exists() else None
    for directory in sorted((root / "adapters").glob("*/adapter")):
        entry = {"name": directory.parent.name}
        try:
            meta = read_adapter_meta(directory) if (directory / "cpet.json").exists() else {}
        except ValueError as err:  # one damaged adapter: say so in its row, list the others
            result["adapters"].append({**entry, "error": str(err)})
            continue
        metrics = meta.get("metrics", {})
        # an adapter of a base that a later `cpet compress` replaced no longer loads here
        stale = meta.get("base_id") not in (None, ORIGINAL_BASE_ID, current_base)
        needs_shared = meta.get("recovery") in ("shared", "both")
        fits_recovery = not needs_shared or (recovery_sha is not None
                                             and stale_recovery(meta, directory, recovery_sha) is None)
        result["adapters"].append({**entry, "task": meta.get("task"), "on": meta.get("on"),
                                   "init": meta.get("init"), "recovery": meta.get("recovery"),
                                   "val_accuracy": metrics.get("val_accuracy"),
                                   "test_accuracy": metrics.get("test_accuracy"), "fits_base": not stale,
                                   "fits_recovery": fits_recovery})

    def render(r: dict) -> None:
        print(f"pipeline {r['pipeline']} (source model {r['source']})")
        base = r["base"]
        if base is None:
            print("base: none yet (cpet compress)")
        else:
            size = (f", {human_bytes(base['bytes'])} ({base['bytes'] / base['dense_bytes']:.2f}x of dense)"
                    if base["bytes"] and base["dense_bytes"] else "")
            print(f"base: {base['base_id'][:16]}…, stages {' -> '.join(map(str, base['stages']))}{size}")
        rec = r["recovery"]
        print("shared recovery: " + (f"rank {rec['rank']} on {rec['targets']} linears, {rec['distill_steps']} "
                                     "distillation steps" if rec else "none (cpet recover)"))
        listed = [a for a in r["adapters"] if "error" not in a]
        if listed:
            print_table(["adapter", "task", "on", "init", "recovery", "val acc", "test acc"],
                         [[a["name"], a["task"], a["on"] if a["fits_base"] else f"{a['on']} (a replaced base)",
                           a["init"], a["recovery"] if a["fits_recovery"] else f"{a['recovery']} (replaced)",
                           "–" if a["val_accuracy"] is None else a["val_accuracy"],
                           "–" if a["test_accuracy"] is None else a["test_accuracy"]] for a in listed])
            if not all(a["fits_base"] for a in listed):
                print("adapters of a replaced base were tuned on a base that a later `cpet compress` overwrote: "
                      "they no longer load here; tune them again")
            if not all(a["fits_recovery"] for a in listed):
                print("adapters marked 'replaced' were trained with shared recovery that is no longer here (`cpet "
                      "recover` run again since): they no longer run; tune them again")
        for a in r["adapters"]:
            if "error" in a:
                print(f"adapter {a['name']}: {a['error']}")
        if not r["adapters"]:
            print("adapters: none yet (cpet tune)")

    emit(result, args.json, render)
    return 0
