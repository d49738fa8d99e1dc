"""How often the table's paired 95% intervals cover the true difference, on simulated grids.

    python scripts/interval_coverage.py --grids 600

Each simulated grid has tasks of n test examples with a number of seeds each; per example a difficulty p
(uniform 0.6-0.9) and a draw u decide right or wrong (right when u + jitter < p). Three kinds of noise:

- ``seed shift``: every seed of row A moves its accuracy by a normal shift of sd ``--shift-sd`` (B does not),
  with a small per-seed jitter shared by A and B (training noise dominates);
- ``per-example noise``: A and B each get an independent jitter of ``--jitter`` per seed and example (the seed x
  example interaction dominates);
- ``document effect``: the examples sit in 25 documents of unequal size (Dirichlet(0.7) shares) and A's accuracy
  moves by a per-document normal effect of sd ``--document-sd`` shared by its seeds, plus a seed shift: test
  examples of one document are dependent, which only resampling documents accounts for. Shown both ways.

The true difference is the expectation over the generating process (0 for per-example noise; for the shifts,
what clipping p + shift to [0, 1] leaves, by Monte Carlo). For each scenario: the share of grids whose interval
holds it, and the mean width. JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchtools import write_report  # noqa: E402
from experiments.grid import code_commit  # noqa: E402
from cpet.stats import paired_bootstrap  # noqa: E402


def _marks(right: np.ndarray) -> str:
    return "".join("1" if x else "0" for x in right)


def true_difference(kind: str, shift_sd: float, document_sd: float, draws: int = 2_000_000) -> float:
    """E[clip(p + shifts) - p] over the generating process (Monte Carlo, fixed seed); 0 for per-example noise."""
    if kind == "per-example noise":
        return 0.0
    rng = np.random.default_rng(12345)
    p = rng.uniform(0.6, 0.9, draws)
    shift = rng.normal(0.0, shift_sd, draws) + (rng.normal(0.0, document_sd, draws) if kind == "document effect"
                                                  else 0.0)
    return float(np.mean(np.clip(p + shift, 0.0, 1.0) - p))


def simulate(kind: str, seeds_per_task: tuple[int, ...], units: str, grids: int, examples: int, shift_sd: float,
             jitter: float, document_sd: float, replicates: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    truth = true_difference(kind, shift_sd, document_sd)
    covered, widths = 0, []
    for grid in range(grids):
        pairs_a, pairs_b, names, clusters = [], [], [], {}
        for task, seeds in enumerate(seeds_per_task):
            p, u = rng.uniform(0.6, 0.9, examples), rng.random(examples)
            effect = np.zeros(examples)
            if kind == "document effect":
                documents = rng.choice(25, size=examples, p=rng.dirichlet(np.full(25, 0.7)))
                effect = rng.normal(0.0, document_sd, 25)[documents]
                if units == "documents":
                    clusters[task] = list(documents)
            for _ in range(seeds):
                if kind == "per-example noise":
                    pairs_b.append(_marks(u + jitter * rng.random(examples) < p))
                    pairs_a.append(_marks(u + jitter * rng.random(examples) < p))
                else:
                    shift, shared = rng.normal(0.0, shift_sd), 0.05 * rng.random(examples)
                    pairs_b.append(_marks(u + shared < p))
                    pairs_a.append(_marks(u + shared < np.clip(p + effect + shift, 0.0, 1.0)))
                names.append(task)
        _, low, high = paired_bootstrap(pairs_a, pairs_b, tasks=names, replicates=replicates, seed=grid,
                                        clusters=clusters or None)
        covered += low <= truth <= high
        widths.append(high - low)
    return {"kind": kind, "seeds_per_task": list(seeds_per_task), "units": units, "examples": examples,
            "grids": grids, "true_difference_points": 100 * truth, "coverage": covered / grids,
            "mean_width_points": 100 * float(np.mean(widths))}


SCENARIOS = [  # (kind, seeds of each task, units resampled)
    ("seed shift", (3,), "examples"), ("seed shift", (3, 3, 3, 3), "examples"), ("seed shift", (2,), "examples"),
    ("seed shift", (3, 1, 1, 1), "examples"), ("seed shift", (3, 3, 1, 1), "examples"),
    ("per-example noise", (3,), "examples"), ("per-example noise", (3, 3, 3, 3), "examples"),
    ("per-example noise", (1, 1, 1, 1), "examples"), ("per-example noise", (2,), "examples"),
    ("document effect", (3,), "documents"), ("document effect", (3,), "examples"),
]


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = ["| noise | seeds per task | units resampled | true difference (points) | coverage | mean width (points) |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['kind']} | {' / '.join(map(str, r['seeds_per_task']))} | {r['units']} | "
                     f"{r['true_difference_points']:+.2f} | {100 * r['coverage']:.1f}% | {r['mean_width_points']:.1f} |")
    return (f"Coverage of the paired 95% interval on {settings['grids']} simulated grids per row "
            f"({settings['examples']} test examples per task, seed shift sd {settings['shift_sd']}, per-example "
            f"jitter {settings['jitter']}, document effect sd {settings['document_sd']}); code commit "
            f"{report['commit']}.\n\n" + "\n".join(lines) + f"\n\nCommand: `{report['command']}`\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", type=int, default=600, help="simulated grids per scenario")
    parser.add_argument("--examples", type=int, default=300, help="test examples per task")
    parser.add_argument("--shift-sd", type=float, default=0.03, help="sd of a seed's accuracy shift")
    parser.add_argument("--jitter", type=float, default=0.2, help="per-example noise amplitude")
    parser.add_argument("--document-sd", type=float, default=0.1, help="sd of a document's effect on A")
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap replicates per interval")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "docs" / "interval_coverage.json"))
    args = parser.parse_args(argv)
    if args.grids < 1 or args.examples < 2 or args.replicates < 2:
        parser.error("need --grids >= 1, --examples >= 2 and --replicates >= 2")
    results = [simulate(kind, seeds, units, args.grids, args.examples, args.shift_sd, args.jitter, args.document_sd,
                        args.replicates, args.seed) for kind, seeds, units in SCENARIOS]
    command = " ".join(["python scripts/interval_coverage.py", *(argv if argv is not None else sys.argv[1:])])
    # what it measures lives in cpet/stats.py (experiments/intervals.py re-exports it), so "dirty" looks there too
    commit = code_commit(ROOT, allow_dirty=True, measured=("cpet", "experiments", "scripts"))
    report = {"command": command, "commit": commit[:7] + commit[40:], "settings": vars(args), "results": results}
    write_report(args.out, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
