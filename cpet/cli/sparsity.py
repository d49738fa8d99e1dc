"""``cpet sparsity``: activation ratio, CETT and PPL-p% sparsity of a model's FFNs (:mod:`cpet.sparsity`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .output import emit, print_table


def cmd_sparsity(args: argparse.Namespace) -> int:
    from ..assets import check_output_dir, write_text_atomic
    from ..compress import calibration_ids
    from ..data import load_corpus
    from ..models import check_context_length
    from ..sparsity import check_report_options, plot_activation_ratios, require_matplotlib, sparsity_report
    from .evaluation import load_model

    try:
        require_matplotlib()  # the PNG is written at the end: fail before the measurement, not after it
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    # before the model is loaded
    check_report_options(cett=args.cett, ppl_p=args.ppl_p, search_tokens=512, max_tokens=args.max_tokens,
                         names={"cett": "--cett", "ppl_p": "--ppl-p", "max_tokens": "--max-tokens"})
    check_output_dir(Path(args.out))  # the report is written at the end: a bad --out fails now
    brown = args.corpus == "brown"  # thresholds from Brown's training documents, perplexity on held-out ones
    train_text = load_corpus(args.corpus, split="train" if brown else "all")  # a missing file fails here
    text = load_corpus(args.corpus, split="heldout" if brown else "all")
    loaded = load_model(args)
    check_context_length(loaded.model, args.seq_len, "the activation window (--seq-len)", "lower --seq-len")
    calibration = calibration_ids(loaded.tokenizer, train_text, args.calibration_samples, args.seq_len,
                                  seed=args.seed)
    report = sparsity_report(loaded.model, loaded.tokenizer, calibration, text, cett=args.cett, ppl_p=args.ppl_p,
                             max_tokens=args.max_tokens, progress=not args.json)
    report = {"model": loaded.name, "corpus": args.corpus, **report}
    out = Path(args.out)
    write_text_atomic(out / "sparsity.json", json.dumps(report, indent=2))
    plot_activation_ratios(report, out / "sparsity.png", title=f"{loaded.name}: FFN activation ratio per layer")
    emit(report, args.json, render)
    return 0


def render(report: dict) -> None:
    print_table(["layer", "non-zero", f"active at CETT {report['cett_target']:g}", "threshold"],
                [[e["layer"], e["nonzero_ratio"], e["activation_ratio"], e["threshold"]] for e in report["layers"]])
    overall = report["overall"]
    print(f"\noverall: {overall['nonzero_ratio']:.4f} non-zero, {overall['activation_ratio']:.4f} active at CETT "
          f"{report['cett_target']:g} ({report['tokens']} calibration tokens)")
    found = report["ppl_p"]
    if found:
        if not found["reached"]:
            print(f"warning: no probe raised perplexity by {found['p']:g}% within {found['tolerance']:g} points; "
                  f"the closest is shown (every probe is in the JSON report's ppl_p.points)", file=sys.stderr)
        print(f"PPL-{found['p']:g}% sparsity: {found['sparsity']:.4f} "
              f"(activation ratio {found['activation_ratio']:.4f} "
              f"at CETT {found['cett']:.4f}; perplexity {found['dense_ppl']:.2f} -> {found['ppl']:.2f}, "
              f"{found['rise_percent']:+.2f}%)")
        base = report["baseline"]
        if base is None:
            print("magnitude-threshold baseline: none (the closest probe keeps no activation, so there is no share "
                  "of neurons to match)")
        else:
            print(f"magnitude-threshold baseline at activation ratio {base['activation_ratio']:.4f} (aimed at "
                  f"{base['target_active_share']:.4f}): perplexity "
                  f"{base['ppl']:.2f} ({base['rise_percent']:+.2f}%)")
