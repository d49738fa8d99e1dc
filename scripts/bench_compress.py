"""Benchmark compression stages side by side on one model, in one run: size, perplexity, speed.

    python scripts/bench_compress.py                       # SmolLM2-135M, all variants (~10 min on 2 cores)
    python scripts/bench_compress.py --variants dense nf4 --max-tokens 1024

Writes ``docs/bench_compress.json`` and ``docs/bench_compress.md`` (a markdown table with ratios to the
dense model). Every variant is compressed from the same original, measured alone, in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchtools import add_threads_option, git_commit, paused, refuse_sizes_below_one, set_threads  # noqa: E402
from cpet.assets import write_text_atomic  # noqa: E402
from cpet.compress import calibration_ids, compress  # noqa: E402
from cpet.config import PruneConfig, QuantizeConfig  # noqa: E402
from cpet.data import load_corpus  # noqa: E402
from cpet.evaluate import count_parameters, disk_bytes, memory_bytes, perplexity, throughput  # noqa: E402
from cpet.models import load_base  # noqa: E402
from cpet.runtime import describe_machine  # noqa: E402

VARIANTS = {
    "dense": [],
    "int8": [QuantizeConfig(method="int8")],
    "nf4": [QuantizeConfig(method="nf4")],
    "fp4": [QuantizeConfig(method="fp4")],
    **{f"ffn{int(r * 100)}-{imp}": [PruneConfig(ffn_ratio=r, importance=imp)]
       for r in (0.25, 0.5) for imp in ("magnitude", "taylor", "activation")},
    "ffn25-taylor+nf4": [PruneConfig(ffn_ratio=0.25, importance="taylor"), QuantizeConfig(method="nf4")],
    "int8+emb": [QuantizeConfig(method="int8", embeddings=True)],
    "nf4+emb": [QuantizeConfig(method="nf4", embeddings=True)],
    "ffn25-taylor+nf4+emb": [PruneConfig(ffn_ratio=0.25, importance="taylor"),
                             QuantizeConfig(method="nf4", embeddings=True)],
}


def measure(model, tokenizer, text: str, args) -> dict:
    ppl = perplexity(model, tokenizer, text, max_length=256, stride=256, max_tokens=args.max_tokens)
    with paused(args.pause):
        speed = throughput(model, batch_size=args.batch_size, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        on_disk = disk_bytes(tmp)
    return {"params": count_parameters(model), "memory_bytes": memory_bytes(model), "disk_bytes": on_disk,
            "ppl": ppl.ppl, "ppl_tokens": ppl.tokens, "prefill_tok_s": speed.prefill_tokens_per_s,
            "decode_tok_s": speed.decode_tokens_per_s}


def markdown(results: dict, meta: dict) -> str:
    dense = results.get("dense")
    header = ["variant", "params (M)", "memory (MB)", "vs dense bf16", "disk (MB)", "Brown ppl", "prefill tok/s",
              "decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        def cell(key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
            value = fmt.format(r[key] / scale)
            if dense and name != "dense":
                value += f" ({r[key] / dense[key]:.2f}x)"
            return value

        bf16 = f"{r['memory_bytes'] / (2 * dense['params']):.2f}x" if dense else "-"
        lines.append(f"| {name} | {cell('params', 1e6)} | {cell('memory_bytes', 1e6)} | {bf16} | "
                     f"{cell('disk_bytes', 1e6)} | "
                     f"{cell('ppl', 1, '{:.2f}')} | {cell('prefill_tok_s')} | {cell('decode_tok_s')} |")
    notes = (f"\nModel {meta['model']}, {meta['ppl_tokens']} Brown held-out tokens (windows of 256), prefill "
             f"batch {meta['batch_size']} x {meta['prompt_len']} tokens, decode {meta['new_tokens']} greedy "
             f"steps with KV cache, best of {meta['repeats']}; {meta['machine']}. Ratios are to dense (fp32); \"vs dense bf16\" divides memory by 2 bytes per "
             "parameter of the dense model.\n")
    return "\n".join(lines) + "\n" + notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pause", type=int, nargs="*", default=[], help="PIDs to stop while speed is timed")
    parser.add_argument("--out", default="docs/bench_compress")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    # before any work: 0 repeats timed nothing (throughput() reports 0 tok/s) and the table's speed ratios then
    # divided by the dense model's 0, after every variant was compressed and measured
    sizes = {"--max-tokens": args.max_tokens, "--calibration-samples": args.calibration_samples,
             "--batch-size": args.batch_size, "--prompt-len": args.prompt_len, "--new-tokens": args.new_tokens,
             "--repeats": args.repeats}
    refuse_sizes_below_one(parser, sizes)
    set_threads(args.threads)

    commit = git_commit()  # the code as it was imported, before the long work
    loaded = load_base(args.model)
    text = load_corpus("brown", split="heldout")
    calibration = calibration_ids(loaded.tokenizer, load_corpus("brown", split="train"), args.calibration_samples, 128)
    results = {}
    for name in args.variants:
        start = time.perf_counter()
        if VARIANTS[name]:
            model = compress(loaded.model, VARIANTS[name], calibration=calibration, progress=False).model
        else:
            model = loaded.model
        seconds = time.perf_counter() - start
        results[name] = {**measure(model, loaded.tokenizer, text, args), "compress_seconds": seconds}
        print(f"{name}: {json.dumps({k: round(v, 2) for k, v in results[name].items()})}", flush=True)
        del model
    meta = {"model": args.model, "ppl_tokens": args.max_tokens, "batch_size": args.batch_size,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "machine": describe_machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit,
            "command": "python scripts/bench_compress.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_text_atomic(Path(args.out + ".json"), json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, meta)
    write_text_atomic(Path(args.out + ".md"), f"# Compression benchmark\n\nCommand: `{meta['command']}` (code commit "
                      f"{commit})\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
