"""How much of a dense FFN's output can expert-granular choice keep? Oracle error by partition.

    python scripts/bench_moe_partition.py                    # SmolLM2-135M, layers 2 10 18 26 (~3 min on 2 cores)
    python scripts/bench_moe_partition.py --layers 5 --share 0.25

For each layer, the FFN's intermediate activations ``h`` on Brown held-out tokens (the partitions are built on
Brown training windows) and the relative output error ``||y - y_kept|| / ||y||`` per token (mean over tokens)
when only ``--share`` of the neurons are kept per token, chosen by an **oracle** (the true output norms, no
router): this bounds what any router can reach with that partition. Rows:

- ``neurons``: the largest per-neuron contributions ``|h_i| * ||W_down[:, i]||`` per token (what per-neuron
  thresholds such as TEAL/CATS approximate);
- ``E experts: <clustering>``: the neurons split into E equal experts (random, or CPET's balanced k-means on
  weights or co-activation), the experts with the largest output norms chosen per token;
- ``E experts: a quarter of the neurons shared``: the quarter of neurons with the largest mean contribution
  always kept, the rest split by co-activation into experts of the same width (3E/4 of them), the largest
  chosen per token up to the same share (a layout CPET does not build; measured to see whether always-on
  neurons would close the gap).

Writes ``docs/bench_moe_partition.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchtools import git_commit, write_report  # noqa: E402
from cpet.compress import calibration_ids  # noqa: E402
from cpet.compress.moefy import _neuron_vectors  # noqa: E402  (the vectors the stage clusters)
from cpet.data import load_corpus  # noqa: E402
from cpet.models import decoder_layers, geometry, load_base  # noqa: E402
from cpet.moe.clustering import balanced_kmeans  # noqa: E402
from cpet.sparsity import FFNActivations, collect_ffn_activations  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def relative_error(y: torch.Tensor, kept: torch.Tensor) -> float:
    return float(((y - kept).norm(dim=-1) / y.norm(dim=-1).clamp(min=1e-12)).mean())


def neuron_oracle(hidden: torch.Tensor, down: torch.Tensor, share: float) -> float:
    contributions = hidden.abs() * down.norm(dim=0)
    keep = torch.zeros_like(hidden).scatter_(1, contributions.topk(round(share * hidden.shape[1]), 1).indices, 1.0)
    return relative_error(hidden @ down.T, (hidden * keep) @ down.T)


def expert_oracle(hidden: torch.Tensor, down: torch.Tensor, groups: list[torch.Tensor], k: int,
                  always: torch.Tensor | None = None) -> float:
    """Keep, per token, the ``k`` groups with the largest output norms (plus the ``always`` neurons)."""
    outputs = torch.stack([hidden[:, g] @ down[:, g].T for g in groups], dim=1)  # [T, E, d]
    top = outputs.norm(dim=-1).topk(k, dim=1).indices
    kept = torch.gather(outputs, 1, top[..., None].expand(-1, -1, outputs.shape[-1])).sum(1)
    if always is not None:
        kept = kept + hidden[:, always] @ down[:, always].T
    return relative_error(hidden @ down.T, kept)


def partition(vectors: torch.Tensor, experts: int, seed: int) -> list[torch.Tensor]:
    assignment, _ = balanced_kmeans(vectors, experts, seed=seed)
    return [(assignment == e).nonzero().flatten() for e in range(experts)]


def layer_rows(model, index: int, train: FFNActivations, test: FFNActivations, args) -> dict:
    """The oracle errors of layer ``index`` on ``test``, partitions built from ``train`` (or the weights)."""
    train_h, test_h, down = train.acts[index], test.acts[index], test.down[index]
    width = train_h.shape[1]
    rows = {"neurons": neuron_oracle(test_h, down, args.share)}
    generator = torch.Generator().manual_seed(index)
    weight_vectors = _neuron_vectors(model, index, tokens=None, clustering="weights")
    for experts in args.experts:
        k = round(args.share * experts)
        rows[f"{experts} experts: random"] = expert_oracle(
            test_h, down, list(torch.randperm(width, generator=generator).view(experts, -1)), k)
        rows[f"{experts} experts: weights"] = expert_oracle(
            test_h, down, partition(weight_vectors, experts, index), k)
        rows[f"{experts} experts: coactivation"] = expert_oracle(
            test_h, down, partition(train_h.abs().T, experts, index), k)
    # a quarter of the neurons always on, the rest routed, to the same share in all
    order = train.contributions(index).mean(0).argsort(descending=True)
    always, rest = order[: width // 4], order[width // 4:]
    for experts in args.experts:  # experts as wide as in the rows above: 3/4 of E of them over the other neurons
        routed = round((args.share - 0.25) * experts)
        if experts % 4 or routed < 0:
            continue
        groups = [rest[g] for g in partition(train_h[:, rest].abs().T, experts * 3 // 4, index)]
        name = f"{experts} experts: a quarter of the neurons shared"
        rows[name] = expert_oracle(test_h, down, groups, routed, always)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 18, 26])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--share", type=float, default=0.5, help="share of neurons kept per token")
    parser.add_argument("--calibration-samples", type=int, default=16, help="Brown training windows of 128 tokens")
    parser.add_argument("--test-samples", type=int, default=4, help="Brown held-out windows of 128 tokens")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_moe_partition.json"))
    args = parser.parse_args(argv)
    if not 0 < args.share <= 1:
        raise SystemExit(f"--share must be in (0, 1], got {args.share}")
    uneven = [e for e in args.experts if abs(args.share * e - round(args.share * e)) > 1e-9]
    if uneven:  # rounded to whole experts, the expert rows would keep another share than the neuron row
        raise SystemExit(f"--share {args.share} is not a whole number of experts of {uneven}: choose a share that is")
    started, commit = time.perf_counter(), git_commit()
    loaded = load_base(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    layers = len(decoder_layers(model))
    bad = [i for i in args.layers if not 0 <= i < layers]
    if bad:
        raise SystemExit(f"--layers {bad} are outside 0..{layers - 1}")
    # the expert rows split the FFN's neurons into equal experts: checked before the activations are collected
    # (an expert count that does not divide the width failed in the first layer's random partition)
    width = geometry(model).intermediate_size
    uneven = [e for e in args.experts if e < 1 or width % e]
    if uneven:
        raise SystemExit(f"--experts {uneven} do not split the {width} FFN neurons into equal experts")
    train = calibration_ids(tokenizer, load_corpus("brown", split="train"), args.calibration_samples, 128)
    test = calibration_ids(tokenizer, load_corpus("brown", split="heldout"), args.test_samples, 128, seed=1)
    train_acts, test_acts = collect_ffn_activations(model, train), collect_ffn_activations(model, test)
    per_layer = {}
    for index in args.layers:
        print(f"[bench] layer {index}", flush=True)
        per_layer[str(index)] = layer_rows(model, index, train_acts, test_acts, args)
    report = {"model": args.model, "share": args.share, "layers": per_layer, "tokens": test_acts.tokens,
              "command": " ".join(["python scripts/bench_moe_partition.py", *(sys.argv[1:] if argv is None else argv)]),
              "commit": commit, "seconds": time.perf_counter() - started}
    write_report(args.out, report, markdown)
    return 0


def markdown(report: dict) -> str:
    layers = list(report["layers"])
    rows = list(report["layers"][layers[0]])
    lines = [f"Relative FFN output error `||y - y_kept|| / ||y||` (mean over {report['tokens']} Brown held-out "
             f"tokens) of {report['model']} when {report['share']:.0%} of the neurons are kept per token, chosen by "
             "an oracle (true output norms), by partition; code commit "
             f"{report['commit']}.", "",
             "| kept by | " + " | ".join(f"layer {i}" for i in layers) + " | mean |",
             "|---|" + "---|" * (len(layers) + 1)]
    for row in rows:
        values = [report["layers"][i][row] for i in layers]
        lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values) / len(values):.3f} |")
    lines += ["", f"Command: `{report['command']}` ({report['seconds'] / 60:.0f} min)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
