"""Benchmark MoEfication side by side in one run: quality against the share of experts, router recall,
FLOPs and speed against the dense model and the pruned model of the same FFN FLOPs.

    python scripts/bench_moefy.py                          # SmolLM2-135M, 16 experts (78-116 min on 2 cores)
    python scripts/bench_moefy.py --top-k 4 8 --tau 0.8 --recovery-steps 20 --max-tokens 512 --limit 100

One MoEfied base (E experts, routers trained once) is measured at every expert choice: top-k for each
``--top-k`` and dynamic-k for each ``--tau``. For each: Brown held-out perplexity, zero-shot accuracy on the
vader-tweets test split, the share of experts used (measured), router recall (the share of the true FFN
output norm that the chosen experts carry, beside random and oracle choices of as many experts per token)
and FLOPs per token. Then one shared recovery set is distilled at ``--recovery-share`` of the experts and the
quality columns are measured again at every choice with it. Beside them, the training-free threshold
baseline (per-layer magnitude thresholds on the dense model's FFN activations, TEAL/CATS-style) at the share
of neurons each top-k row computes. Speed (prefill 8 x 128 with the LM head on every position and on the last
one only, decode 32 tokens) compares the dense model, the MoEfied model at ``--speed-share`` (for each
``--speed-experts`` count: granularity trades quality for speed) and the model with that share of FFN channels
pruned (same FFN FLOPs). ``--speed-only`` re-times speed alone and replaces the speed table of the existing
report (the quality part takes over an hour).

Beside the speed table, where one prefill's time goes (``torch.profiler``, self CPU time of each operator,
grouped into matrix products, attention, routing and gathers, and element-wise and the rest), so that the
MoEfied model's gap to the pruned one is measured rather than guessed.

``--pause PID ...`` stops those processes (SIGSTOP) while speed is timed and resumes them after (SIGCONT),
so that timings are taken alone on the machine while e.g. an experiment grid shares it otherwise.
Writes ``docs/bench_moefy.json`` and ``docs/bench_moefy.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchtools import add_threads_option, git_commit, paused, set_threads, write_report  # noqa: E402
from cpet.compress import calibration_ids, compress  # noqa: E402
from cpet.compress.moefy import MoEfyConfig, batch_expert_union, ffn_inputs, moe_blocks  # noqa: E402
from cpet.config import PruneConfig  # noqa: E402
from cpet.data import load_corpus, template_for, verbalizer_for  # noqa: E402
from cpet.data.tasks import as_task  # noqa: E402
from cpet.evaluate import classification_accuracy, flops_per_token, perplexity, throughput  # noqa: E402
from cpet.models import load_base  # noqa: E402
from cpet.moe import choose_experts  # noqa: E402
from cpet.recovery import SHARED, RecoveryConfig, RecoverySet  # noqa: E402
from cpet.runtime import describe_machine  # noqa: E402
from cpet.sparsity import MAGNITUDE, ActivationMask, collect_ffn_activations, magnitude_thresholds  # noqa: E402
from cpet.train import DistillConfig, distill_on_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def set_choice(blocks, top_k: int | None, tau: float | None) -> None:
    for block in blocks:
        block.top_k, block.tau = top_k, tau
        block.reset_counts()


def measured_share(blocks) -> float:
    chosen = sum(b.chosen_experts for b in blocks)
    routed = sum(b.routed_tokens * b.num_experts for b in blocks)
    return chosen / routed


@torch.no_grad()
def router_recall(blocks, inputs: list[torch.Tensor], seed: int = 0) -> dict:
    """Mean over layers of the share of the true expert-norm total carried by the router's choice, by a random
    choice of as many experts per token, and by the oracle choice (the largest true norms), same counts."""
    generator = torch.Generator().manual_seed(seed)
    sums = {"router": 0.0, "random": 0.0, "oracle": 0.0}
    for block, tokens in zip(blocks, inputs):
        norms = block.expert_norms(tokens)
        chosen = block.choose(tokens)
        counts = chosen.sum(1, keepdim=True)
        rank_random = torch.rand(norms.shape, generator=generator).argsort(1).argsort(1)
        rank_oracle = norms.argsort(1, descending=True).argsort(1)
        total = norms.sum(1)
        for name, mask in (("router", chosen), ("random", rank_random < counts), ("oracle", rank_oracle < counts)):
            sums[name] += float(((norms * mask).sum(1) / total).mean())
    return {name: value / len(blocks) for name, value in sums.items()}


def quality(model, tokenizer, text: str, task, examples, max_tokens: int) -> dict:
    ppl = perplexity(model, tokenizer, text, max_tokens=max_tokens).ppl
    accuracy = classification_accuracy(model, tokenizer, [e.text for e in examples], [e.label for e in examples],
                                       template=template_for(task), verbalizer=verbalizer_for(task),
                                       labels=task.labels, batch_size=16).accuracy
    return {"ppl": ppl, "accuracy": accuracy}


def choices(args) -> list[dict]:
    rows = [{"choice": f"top-{k}", "top_k": k, "tau": None} for k in args.top_k]
    rows += [{"choice": f"tau {t}", "top_k": None, "tau": t} for t in args.tau]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, nargs="*", default=[2, 4, 6, 8, 10])
    parser.add_argument("--tau", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--clustering", default="coactivation", choices=["coactivation", "weights"])
    parser.add_argument("--calibration-samples", type=int, default=16, help="Brown windows of 128 tokens")
    parser.add_argument("--max-tokens", type=int, default=2048, help="Brown held-out tokens for perplexity")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N tweets (default: all)")
    parser.add_argument("--recovery-steps", type=int, default=120)
    parser.add_argument("--recovery-rank", type=int, default=16)
    parser.add_argument("--recovery-share", type=float, default=0.5, help="share of experts recovery trains at")
    parser.add_argument("--speed-share", type=float, default=0.5)
    parser.add_argument("--speed-experts", type=int, nargs="+", default=None,
                        help="expert counts timed at --speed-share (default: --experts)")
    parser.add_argument("--speed-only", action="store_true",
                        help="time speed only and replace the speed table of the existing --out report")
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--pause", type=int, nargs="*", default=[], help="PIDs to stop while speed is timed")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_moefy.json"))
    add_threads_option(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    args.command = " ".join(["python scripts/bench_moefy.py", *(sys.argv[1:] if argv is None else argv)])
    args.commit = git_commit()  # read at the start: the quality part runs for an hour and more before speed
    args.speed_experts = args.speed_experts or [args.experts]
    # checked before the hour of quality work: throughput() over 0 repeats reports 0 tok/s and the report's speed
    # ratios then divide by the dense model's 0; a top-k or tau the MoE blocks do not take failed after MoEfying
    if args.speed_repeats < 1:
        raise SystemExit(f"--speed-repeats must be >= 1, got {args.speed_repeats}")
    try:
        for k in args.top_k:
            MoEfyConfig(num_experts=args.experts, top_k=k)
        for tau in args.tau:
            MoEfyConfig(num_experts=args.experts, tau=tau)
        for experts in args.speed_experts:
            MoEfyConfig(num_experts=experts)
    except ValueError as exc:
        raise SystemExit(f"--experts / --top-k / --tau / --speed-experts: {exc}") from None
    for share, counts in ((args.recovery_share, [args.experts]), (args.speed_share, args.speed_experts)):
        for experts in counts:
            # a share rounded to whole experts would be compared with the pruned model at the unrounded one
            if share > 1 or round(share * experts) < 1 or abs(share * experts - round(share * experts)) > 1e-9:
                raise SystemExit(f"share {share} of {experts} experts is not a whole number of experts >= 1")

    previous = None
    if args.speed_only:
        if not Path(args.out).is_file():
            raise SystemExit(f"--speed-only replaces the speed table of an existing report, and {args.out} does not "
                             "exist: run the whole benchmark first")
        previous = json.loads(Path(args.out).read_text())
        if previous.get("model") != args.model:
            raise SystemExit(f"{args.out} measured {previous.get('model')!r}, not {args.model!r}: pass --out")
        # the speed table names its models by expert counts only: MoEfied with another clustering, they would sit
        # under the report's heading of its own clustering (and their batch-8 expert union is the clustering's)
        if previous.get("clustering", args.clustering) != args.clustering:
            raise SystemExit(f"{args.out} measured {previous['clustering']} clustering, not {args.clustering}: pass "
                             f"--clustering {previous['clustering']}, or --out for a report of its own")

    started = time.perf_counter()
    original = load_base(args.model)
    model, tokenizer = original.model.eval(), original.tokenizer
    heldout, train_text = load_corpus("brown", split="heldout"), load_corpus("brown", split="train")
    task = as_task("vader-tweets")
    examples = task.split("test")[:args.limit] if args.limit else task.split("test")
    calibration = calibration_ids(tokenizer, train_text, args.calibration_samples, 128)
    recall_ids = calibration_ids(tokenizer, heldout, 4, 128, seed=1)

    if previous is not None:
        previous["speed"] = measure_speed(args, original.model.eval(), calibration, moefied={})
        write_report(args.out, previous, markdown)
        return 0

    report = {"model": args.model, "experts": args.experts, "clustering": args.clustering,
              "tweets_examples": len(examples), "max_tokens": args.max_tokens,
              "machine": describe_machine(),
              "command": args.command,
              "commit": args.commit}
    print("[bench] dense", flush=True)
    report["dense"] = {**quality(model, tokenizer, heldout, task, examples, args.max_tokens),
                       "flops_per_token": flops_per_token(model)}

    print("[bench] moefy", flush=True)
    start = time.perf_counter()
    base = compress(model, [MoEfyConfig(num_experts=args.experts, clustering=args.clustering)],
                    calibration=calibration, progress=False)
    report["moefy_seconds"] = time.perf_counter() - start
    blocks = moe_blocks(base.model)
    recall_inputs = ffn_inputs(model, recall_ids)

    rows = []
    for choice in choices(args):
        print(f"[bench] {choice['choice']}", flush=True)
        set_choice(blocks, choice["top_k"], choice["tau"])
        row = {**choice, **quality(base.model, tokenizer, heldout, task, examples, args.max_tokens)}
        row["expert_share"] = measured_share(blocks)
        row["flops_per_token"] = flops_per_token(base.model)
        row["recall"] = router_recall(blocks, recall_inputs)
        rows.append(row)

    print("[bench] threshold baseline", flush=True)
    activations = collect_ffn_activations(model, calibration)
    for row in rows:
        if row["tau"] is not None:
            continue
        mask = ActivationMask(model, magnitude_thresholds(activations, row["expert_share"]), MAGNITUDE)
        with mask:
            row["threshold"] = quality(model, tokenizer, heldout, task, examples, args.max_tokens)
        row["threshold"]["active_share"] = mask.active_share

    print("[bench] shared recovery", flush=True)
    set_choice(blocks, round(args.recovery_share * args.experts), None)
    recovery = RecoverySet(base.model, RecoveryConfig(rank=args.recovery_rank, alpha=float(args.recovery_rank),
                                                      activation="identity", init="zero"))
    recovery.attach(base.model, slot=SHARED, trainable=True)
    start = time.perf_counter()
    distill_on_text(base.model, model, tokenizer, train_text, DistillConfig(steps=args.recovery_steps), progress=False)
    recovery.requires_grad_(False)
    report["recovery"] = {"steps": args.recovery_steps, "rank": args.recovery_rank, "share": args.recovery_share,
                          "seconds": time.perf_counter() - start}
    for row in rows:
        set_choice(blocks, row["top_k"], row["tau"])
        row["recovered"] = quality(base.model, tokenizer, heldout, task, examples, args.max_tokens)
    recovery.detach()
    report["rows"] = rows

    report["speed"] = measure_speed(args, model, calibration, moefied={args.experts: base.model})
    report["seconds"] = time.perf_counter() - started
    write_report(args.out, report, markdown)
    return 0


# torch operator -> group of the prefill time breakdown; unlisted operators count as "elementwise and other".
OPERATOR_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention"),
    # what routing adds: choosing experts, grouping (token, expert) pairs, gathering inputs, scattering outputs
    "routing and gathers": ("aten::index_select", "aten::index_add_", "aten::scatter_add_", "aten::nonzero",
                            "aten::sort", "aten::argsort", "aten::topk", "aten::bincount", "aten::index",
                            "aten::scatter_", "aten::cumsum"),
}
BREAKDOWN_GROUPS = (*OPERATOR_GROUPS, "elementwise and other")


def prefill_breakdown(model, batch_size: int = 8, prompt_len: int = 128, seed: int = 0) -> dict:
    """Milliseconds of one prefill (``batch_size x prompt_len`` random ids, logits on every position) per operator
    group of :data:`OPERATOR_GROUPS`, from ``torch.profiler``'s self CPU times (their sum is the profiled time;
    the profiler's own overhead makes it somewhat longer than an untimed run). After one warm-up run."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator)
    groups = dict.fromkeys(BREAKDOWN_GROUPS, 0.0)
    group_of = {op: group for group, ops in OPERATOR_GROUPS.items() for op in ops}
    with torch.no_grad():
        model(input_ids=ids)
        for _ in range(2):  # the first profiled run also times the profiler's own start-up: keep the second
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                model(input_ids=ids)
    for event in profile.key_averages():
        groups[group_of.get(event.key, "elementwise and other")] += event.self_cpu_time_total / 1e3
    return groups


def measure_speed(args, model, calibration, moefied: dict) -> dict:
    """Time the dense model, the MoEfied model at ``--speed-share`` for each ``--speed-experts`` count (reusing
    ``moefied[E]`` where given, MoEfying otherwise) and the model with that share of FFN channels pruned.

    Prefill is timed twice: with logits for every position (as scoring and training run it) and for the last
    position only (as ``generate`` runs it), since the LM head (49k x 576 for SmolLM2) is a fixed cost that
    MoEfication does not touch. Decode is timed at batch 8 and at batch 1; for the MoEfied models the share of
    experts that any of 8 rows chooses at a position (8 Brown calibration windows) says how much of the FFN
    weights a batch-8 decode step reads, against the share per token that one row reads."""
    started, commit = time.perf_counter(), args.commit  # the code as the run started, before the long work
    candidates = {"dense": model}
    for experts in args.speed_experts:
        top_k = round(args.speed_share * experts)
        if experts not in moefied:
            print(f"[bench] moefy {experts} experts for speed", flush=True)
            config = MoEfyConfig(num_experts=experts, top_k=top_k, clustering=args.clustering)
            moefied[experts] = compress(model, [config], calibration=calibration, progress=False).model
        set_choice(moe_blocks(moefied[experts]), top_k, None)
        candidates[f"moefied, {top_k} of {experts} experts"] = moefied[experts]
    pruned = compress(model, [PruneConfig(ffn_ratio=1 - args.speed_share, importance="magnitude")], progress=False)
    candidates["pruned"] = pruned.model
    print("[bench] speed", flush=True)
    speed = {}
    with paused(args.pause):
        for name, candidate in candidates.items():
            timing = dict(batch_size=8, prompt_len=128, new_tokens=32, repeats=args.speed_repeats)
            every = throughput(candidate, **timing)
            last = throughput(candidate, **timing, last_logits_only=True)
            single = throughput(candidate, **{**timing, "batch_size": 1}, last_logits_only=True)
            speed[name] = {"prefill_tok_s": every.prefill_tokens_per_s,
                           "prefill_last_logits_tok_s": last.prefill_tokens_per_s,
                           "decode_tok_s": max(every.decode_tokens_per_s, last.decode_tokens_per_s),
                           "decode_batch1_tok_s": single.decode_tokens_per_s,
                           "flops_per_token": flops_per_token(candidate),
                           "prefill_breakdown_ms": prefill_breakdown(candidate)}
            blocks = moe_blocks(candidate)
            if blocks:
                speed[name]["expert_share"] = measured_share(blocks)
                speed[name]["batch8_expert_union"] = batch_expert_union(candidate, calibration[:8])
    return {"share": args.speed_share, "models": speed, "command": args.command, "commit": commit,
            "repeats": args.speed_repeats, "paused": bool(args.pause),
            "machine": describe_machine(), "seconds": time.perf_counter() - started}


def _timing_conditions(speed: dict) -> str:
    """How the speeds were timed, as the report recorded it (reports before these fields: best of repeats with
    the other processes paused, the only way they were made)."""
    # batch-8 decode is timed after both prefill kinds, so its speed is the best of twice the repeats
    repeats = (f"best of {speed['repeats']} repeats (batch-8 decode: of {2 * speed['repeats']})" if "repeats" in speed
               else "best of repeats")
    alone = speed.get("paused", True)
    return repeats + (", the processes given to --pause stopped" if alone else ", beside whatever else ran")


def markdown(report: dict) -> str:
    dense = report["dense"]
    lines = [f"MoEfication of {report['model']} into {report['experts']} experts per FFN ({report['clustering']} "
             f"clustering); Brown held-out perplexity on {report['max_tokens']} tokens, zero-shot accuracy on "
             f"{report['tweets_examples']} vader-tweets test examples. Dense: perplexity {dense['ppl']:.2f}, "
             f"accuracy {dense['accuracy']:.3f}. Recovery: one shared set (rank {report['recovery']['rank']}, "
             f"{report['recovery']['steps']} distillation steps at {report['recovery']['share']:.0%} of the experts) "
             "reused at every choice. Threshold baseline: the dense model with per-layer magnitude thresholds "
             "keeping the same share of FFN neurons.",
             "",
             "| choice | experts used | FLOPs/token vs dense | ppl | ppl + recovery | threshold ppl | accuracy | "
             "accuracy + recovery | threshold accuracy | recall router / random / oracle |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        threshold = row.get("threshold")
        flop_ratio = row["flops_per_token"] / dense["flops_per_token"]
        t_ppl = "-" if threshold is None else f"{threshold['ppl']:.1f}"
        t_acc = "-" if threshold is None else f"{threshold['accuracy']:.3f}"
        recall = row["recall"]
        lines.append(
            f"| {row['choice']} | {row['expert_share']:.1%} | {flop_ratio:.2f} | {row['ppl']:.1f} | "
            f"{row['recovered']['ppl']:.1f} | {t_ppl} | {row['accuracy']:.3f} | {row['recovered']['accuracy']:.3f} | "
            f"{t_acc} | {recall['router']:.3f} / {recall['random']:.3f} / {recall['oracle']:.3f} |")
    lines += ["", f"Command: `{report['command']}` ({report['seconds'] / 60:.0f} min, code commit "
              f"{report.get('commit', 'not recorded')})"]
    speed = report["speed"]
    lines += ["", f"Speed at {speed['share']:.0%} of the experts (pruned: the same share of FFN channels kept), "
              "batch 8 x 128 prefill (LM head on every position, and on the last one only as `generate` runs "
              f"it), 32 decode steps, {_timing_conditions(speed)} "
              f"({speed.get('machine', report['machine'])}), code commit {speed['commit']}:", "",
              "| model | FLOPs/token | FLOP ratio | prefill tok/s | ratio | prefill tok/s, last logits | ratio | "
              "decode tok/s | ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    base = speed["models"]["dense"]
    for name, s in speed["models"].items():
        flop_ratio = base["flops_per_token"] / s["flops_per_token"]
        lines.append(f"| {name} | {s['flops_per_token'] / 1e6:.0f} M | {flop_ratio:.2f}x | {s['prefill_tok_s']:.0f} | "
                     f"{s['prefill_tok_s'] / base['prefill_tok_s']:.2f}x | {s['prefill_last_logits_tok_s']:.0f} | "
                     f"{s['prefill_last_logits_tok_s'] / base['prefill_last_logits_tok_s']:.2f}x | "
                     f"{s['decode_tok_s']:.0f} | {s['decode_tok_s'] / base['decode_tok_s']:.2f}x |")
    lines += ["", f"Command: `{speed['command']}` ({speed['seconds'] / 60:.0f} min)", ""]
    if all("prefill_breakdown_ms" in s for s in speed["models"].values()):
        lines += breakdown_markdown(speed)
    if all("decode_batch1_tok_s" in s for s in speed["models"].values()):
        lines += decode_markdown(speed)
    return "\n".join(lines)


def breakdown_markdown(speed: dict) -> list[str]:
    """The prefill time breakdown table: ms per operator group and their total, one row per timed model."""
    lines = ["Where one prefill's time goes (batch 8 x 128, logits on every position; `torch.profiler` self CPU "
             "time per operator group, ms; the profiler's overhead makes totals longer than the timed runs):", "",
             "| model | " + " | ".join(BREAKDOWN_GROUPS) + " | total |",
             "|---|" + "---|" * (len(BREAKDOWN_GROUPS) + 1)]
    for name, s in speed["models"].items():
        ms = s["prefill_breakdown_ms"]
        lines.append(f"| {name} | " + " | ".join(f"{ms[g]:.0f}" for g in BREAKDOWN_GROUPS)
                     + f" | {sum(ms.values()):.0f} |")
    return lines + [""]


def decode_markdown(speed: dict) -> list[str]:
    """The decode table: tokens/s at batch 8 and 1 against dense, and the share of the FFN weights a step reads."""
    lines = ["Decode at batch 8 and batch 1 (32 steps after a 128-token prompt). An expert chosen by any row of a "
             "step is read whole, so a batch-8 step reads the experts that any of its 8 rows chooses (measured on 8 "
             "Brown windows, each position standing for one step), one row only its own:", "",
             "| model | decode tok/s, batch 8 | ratio | FFN weights read per step, batch 8 | decode tok/s, batch 1 "
             "| ratio | FFN weights read per step, batch 1 |",
             "|---|---|---|---|---|---|---|"]
    base = speed["models"]["dense"]
    for name, s in speed["models"].items():
        union = f"{s['batch8_expert_union']:.0%}" if "batch8_expert_union" in s else "100%"
        single = f"{s['expert_share']:.0%}" if "expert_share" in s else "100%"
        if name == "pruned":  # every step reads the kept channels, whatever the batch
            union = single = f"{speed['share']:.0%}"
        batch8, batch1 = s["decode_tok_s"], s["decode_batch1_tok_s"]
        lines.append(f"| {name} | {batch8:.0f} | {batch8 / base['decode_tok_s']:.2f}x | {union} | {batch1:.1f} | "
                     f"{batch1 / base['decode_batch1_tok_s']:.2f}x | {single} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
