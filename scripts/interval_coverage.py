"""How often the table's paired 95% intervals cover the true difference, on simulated grids.

    python scripts/interval_coverage.py --grids 600

Each simulated grid has T tasks of n test examples and S seeds per task; per example a difficulty p (uniform
0.6-0.9) and a draw u decide right or wrong (right when u + jitter < p). Two kinds of noise, as tuned adapters
show them:

- ``seed shift``: every seed of row A moves its accuracy by a normal shift of sd ``--shift-sd`` (B does not),
  with a small per-seed jitter shared by A and B (training noise dominates; the true difference is 0 on average
  over seeds);
- ``per-example noise``: A and B each get an independent jitter of ``--jitter`` per seed and example (the seed x
  example interaction dominates; the true difference is 0), optionally with examples in 25 documents that share
  an offset (the clustered bootstrap).

For each scenario: the share of grids whose interval holds 0, and the mean width. JSON and a markdown table.
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
from experiments.intervals import paired_bootstrap  # noqa: E402


def _marks(right: np.ndarray) -> str:
    return "".join("1" if x else "0" for x in right)


def simulate(kind: str, grids: int, tasks: int, seeds: int, examples: int, shift_sd: float, jitter: float,
             clustered: bool, replicates: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    covered, widths = 0, []
    for grid in range(grids):
        pairs_a, pairs_b, names, clusters = [], [], [], {}
        for task in range(tasks):
            p, u = rng.uniform(0.6, 0.9, examples), rng.random(examples)
            if clustered:
                documents = rng.integers(0, 25, examples)
                u = np.clip(u + rng.normal(0.0, 0.2, 25)[documents], 0.0, 1.0)
                clusters[task] = list(documents)
            for _ in range(seeds):
                if kind == "seed shift":
                    shift, shared = rng.normal(0.0, shift_sd), 0.05 * rng.random(examples)
                    pairs_b.append(_marks(u + shared < p))
                    pairs_a.append(_marks(u + shared < np.clip(p + shift, 0.0, 1.0)))
                else:
                    pairs_b.append(_marks(u + jitter * rng.random(examples) < p))
                    pairs_a.append(_marks(u + jitter * rng.random(examples) < p))
                names.append(task)
        _, low, high = paired_bootstrap(pairs_a, pairs_b, tasks=names, replicates=replicates, seed=grid,
                                        clusters=clusters or None)
        covered += low <= 0.0 <= high
        widths.append(high - low)
    return {"kind": kind, "tasks": tasks, "seeds": seeds, "examples": examples, "clustered": clustered,
            "grids": grids, "coverage": covered / grids, "mean_width_points": 100 * float(np.mean(widths))}


SCENARIOS = [  # (kind, tasks, seeds, clustered)
    ("seed shift", 1, 3, False), ("seed shift", 4, 3, False), ("seed shift", 1, 2, False),
    ("per-example noise", 1, 3, False), ("per-example noise", 4, 3, False), ("per-example noise", 4, 1, False),
    ("per-example noise", 1, 2, False), ("per-example noise", 1, 3, True),
]


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = ["| noise | tasks x seeds | units | coverage of 0 | mean width (points) |", "|---|---|---|---|---|"]
    for r in report["results"]:
        units = "25 documents" if r["clustered"] else "examples"
        lines.append(f"| {r['kind']} | {r['tasks']} x {r['seeds']} | {units} | {100 * r['coverage']:.1f}% | "
                     f"{r['mean_width_points']:.1f} |")
    return (f"Coverage of the paired 95% interval on {settings['grids']} simulated grids per row "
            f"({settings['examples']} test examples per task, seed shift sd {settings['shift_sd']}, per-example "
            f"jitter {settings['jitter']}); code commit {report['commit']}.\n\n" + "\n".join(lines) +
            f"\n\nCommand: `{report['command']}`\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", type=int, default=600, help="simulated grids per scenario")
    parser.add_argument("--examples", type=int, default=300, help="test examples per task")
    parser.add_argument("--shift-sd", type=float, default=0.03, help="sd of a seed's accuracy shift")
    parser.add_argument("--jitter", type=float, default=0.2, help="per-example noise amplitude")
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap replicates per interval")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "docs" / "interval_coverage.json"))
    args = parser.parse_args(argv)
    if args.grids < 1 or args.examples < 2 or args.replicates < 2:
        parser.error("need --grids >= 1, --examples >= 2 and --replicates >= 2")
    results = [simulate(kind, args.grids, tasks, seeds, args.examples, args.shift_sd, args.jitter, clustered,
                        args.replicates, args.seed) for kind, tasks, seeds, clustered in SCENARIOS]
    command = " ".join(["python scripts/interval_coverage.py", *(argv if argv is not None else sys.argv[1:])])
    # what it measures lives in experiments/ (intervals.py), so that is what "dirty" looks at
    commit = code_commit(ROOT, allow_dirty=True, measured=("experiments", "scripts"))
    report = {"command": command, "commit": commit[:7] + commit[40:], "settings": vars(args), "results": results}
    write_report(args.out, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
