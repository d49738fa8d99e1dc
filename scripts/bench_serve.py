"""Benchmark serving many adapters on one compressed base, side by side in one run.

    python scripts/bench_serve.py --pipeline runs/p           # a pipeline with a base and trained adapters

Measured on the pipeline's compressed base (SmolLM2-135M in the README), with its trained adapters plus
copies whose weights are perturbed (same shapes) to reach the counts below:

- throughput of a batch of 8 rows (prefill 8 x 128 tokens, then 32 decode steps with the KV cache): the bare
  base, all rows on one adapter, 8 distinct adapters (CPET's engine), and the same 8 adapters through peft's
  own mixed batches (``adapter_names``);
- with 1, 10 and 100 adapters loaded: the 8-adapter batch's throughput, the adapters' memory, and the time
  to hot-load one more adapter;
- a load test: concurrent clients on loopback against ``cpet serve``'s application, each sending completion
  requests; p50 / p99 latency, tokens/s and errors.

``--pause PID ...`` stops those processes while timing (see scripts/benchtools.py). Writes
``docs/bench_serve.json`` and ``docs/bench_serve.md``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchtools import (add_threads_option, git_commit, paused, refuse_sizes_below_one, set_threads,  # noqa: E402
                        write_report)
from cpet.evaluate import throughput  # noqa: E402
from cpet.models import unwrap  # noqa: E402
from cpet.runtime import describe_machine  # noqa: E402
from cpet.serve import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def perturbed_copy(source: Path, target: Path, seed: int) -> Path:
    """A copy of adapter ``source`` with every LoRA tensor perturbed (same shapes, another adapter's weights)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    noisy = {k: (v + 0.01 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in tensors.items()}
    save_file(noisy, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    return target


def speed(model, args) -> dict:
    """Best-of-``--repeats`` prefill and decode tokens/s of ``model`` (:func:`cpet.evaluate.throughput`)."""
    result = throughput(model, batch_size=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        repeats=args.repeats)
    return {"prefill_tok_s": result.prefill_tokens_per_s, "decode_tok_s": result.decode_tokens_per_s}


class PeftMixed(torch.nn.Module):
    """peft's own mixed batches as a model: batch row ``i`` runs adapter ``names[i]`` (``adapter_names``)."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    @property
    def causal_lm(self):
        return unwrap(self.model)

    @property
    def config(self):
        return self.model.config

    def forward(self, **inputs):
        return self.model(adapter_names=self.names, **inputs)


def load_test(app, prompts: int, clients: int, max_tokens: int, adapters: list[str]) -> dict:
    import httpx

    from cpet.serve.server import serve_in_thread

    url, stop = serve_in_thread(app)
    latencies, tokens, failures = [], [0], [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=120) as http:
            for j in range(prompts):
                start = time.perf_counter()
                try:
                    response = http.post(f"{url}/v1/completions", json={
                        "model": adapters[(index + j) % len(adapters)], "max_tokens": max_tokens,
                        "prompt": f"Request {index}-{j}: the news today is"})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if ok:
                        tokens[0] += response.json()["usage"]["completion_tokens"]
                    else:
                        failures[0] += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    stop()
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": failures[0], "seconds": seconds,
            "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "tokens_per_s": tokens[0] / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="runs/p", help="pipeline directory with a base and adapters")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--pause", type=int, nargs="*", default=[])
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_serve.json"))
    add_threads_option(parser)
    args = parser.parse_args(argv)
    # before any work: 0 repeats timed nothing (throughput() reports 0 tok/s), 0 adapters loaded divided by zero
    # after the throughput part, and 0 clients or requests failed the load test's median at the very end
    sizes = {"--batch": args.batch, "--prompt-len": args.prompt_len, "--new-tokens": args.new_tokens,
             "--repeats": args.repeats, "--counts": min(args.counts), "--clients": args.clients,
             "--requests-per-client": args.requests_per_client, "--max-tokens": args.max_tokens}
    refuse_sizes_below_one(parser, sizes)
    set_threads(args.threads)

    from peft import PeftModel

    from cpet.adapters import read_adapter_meta
    from cpet.compress import CompressedBase
    from cpet.pipeline import CPET
    from cpet.serve.server import ServerLimits, create_app

    started = time.perf_counter()
    pipeline = CPET.load(args.pipeline)
    trained = {n: p for n, p in pipeline.adapters().items() if read_adapter_meta(p).get("on") != "original"}
    plain = [p for p in trained.values() if read_adapter_meta(p).get("recovery", "none") == "none"]
    if not plain:
        raise SystemExit(f"{args.pipeline} has no adapter tuned on its base without recovery (peft's comparison "
                         "needs plain LoRA adapters): tune one with `cpet tune PIPELINE --task T`")
    engine = Engine.from_pipeline(args.pipeline, capacity=max(args.counts) + 16)
    report = {"pipeline": args.pipeline, "base_id": engine.base_id, "trained_adapters": sorted(trained),
              "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "counts": args.counts, "clients": args.clients,
              "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
              "paused": bool(args.pause),
              "machine": describe_machine(),
              "command": "python scripts/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": git_commit()}
    with tempfile.TemporaryDirectory(prefix="cpet-bench-serve-") as tmp:
        copies = [perturbed_copy(plain[i % len(plain)], Path(tmp) / f"copy{i}", seed=i)
                  for i in range(max(max(args.counts), args.batch))]
        names = [f"copy{i}" for i in range(args.batch)]
        for name, path in zip(names, copies):
            engine.registry.load(name, path)
        print("[bench] throughput", flush=True)
        base = CompressedBase.load(Path(args.pipeline) / "base")
        model = PeftModel.from_pretrained(base.model, str(copies[0]), adapter_name=names[0]).eval()
        for name, path in zip(names[1:], copies[1:args.batch]):
            model.load_adapter(str(path), adapter_name=name)
        models = {"bare base": engine.view(None), "one adapter": engine.view(names[0]),
                  f"{args.batch} adapters (CPET)": engine.view(names),
                  f"{args.batch} adapters (peft adapter_names)": PeftMixed(model, names)}
        rows = {}
        with paused(args.pause):
            for _ in range(2):  # two rounds, best of both: no configuration pays the others' warm-up
                for label, each in models.items():
                    result = speed(each, args)
                    best = rows.get(label, {"prefill_tok_s": 0.0, "decode_tok_s": 0.0})
                    rows[label] = {k: max(best[k], result[k]) for k in result}
        del model, base
        report["throughput"] = rows

        print("[bench] adapters loaded", flush=True)
        scaling = []
        for count in args.counts:
            for name in engine.registry.names():
                engine.registry.unload(name)
            with paused(args.pause):  # every timing of this count, loads included, with the paused processes stopped
                loads = []
                for i in range(count):
                    start = time.perf_counter()
                    engine.registry.load(f"copy{i}", copies[i])
                    loads.append(time.perf_counter() - start)
                hot_loads = []
                for _ in range(args.repeats):  # one more, with `count` already loaded; the median of repeats
                    start = time.perf_counter()
                    engine.registry.load("extra", copies[0])
                    hot_loads.append(time.perf_counter() - start)
                    engine.registry.unload("extra")
                hot_load = statistics.median(hot_loads)
                mixed = [f"copy{i % count}" for i in range(args.batch)]
                mixed_speed = speed(engine.view(mixed), args)
            adapter_bytes = sum(engine.registry.get(n).nbytes for n in engine.registry.names())
            scaling.append({"loaded": count, "hot_load_ms": hot_load * 1000,
                            "mean_load_ms": 1000 * sum(loads) / len(loads), "adapter_mb": adapter_bytes / 1e6,
                            **mixed_speed})
        report["scaling"] = scaling

        print("[bench] load test", flush=True)
        for name in engine.registry.names():
            engine.registry.unload(name)
        for name, path in zip(names, copies):
            engine.registry.load(name, path)
        app = create_app(engine, limits=ServerLimits(max_queue=4 * args.clients, max_batch=args.batch))
        with paused(args.pause):
            report["load_test"] = load_test(app, args.requests_per_client, args.clients, args.max_tokens, names)
        app.state.scheduler.close()
    report["seconds"] = time.perf_counter() - started
    write_report(args.out, report, markdown)
    return 0


def markdown(report: dict) -> str:
    rows = report["throughput"]
    single = rows["one adapter"]
    lines = [f"Batch of {report['batch']} rows on the compressed base of `{report['pipeline']}` "
             f"(prefill {report['batch']} x {report['prompt_len']} tokens, {report['new_tokens']} decode steps, best "
             f"of repeats; {report['machine']}):", "",
             "| batch | prefill tok/s | vs one adapter | decode tok/s | vs one adapter |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / single['prefill_tok_s']:.2f}x | "
                     f"{r['decode_tok_s']:.0f} | {r['decode_tok_s'] / single['decode_tok_s']:.2f}x |")
    batch = report["batch"]
    hot = f"median of {report['repeats']}" if "repeats" in report else "one load"  # older reports: one load
    lines += ["", f"| adapters loaded | hot-load one more (ms, {hot}) | mean load (ms) | adapter memory (MB) | "
              f"distinct adapters in a batch of {batch} | prefill tok/s | decode tok/s |",
              "|---|---|---|---|---|---|---|"]
    for r in report["scaling"]:  # the batch's rows cycle through the loaded adapters: min(loaded, batch) differ
        lines.append(f"| {r['loaded']} | {r['hot_load_ms']:.1f} | {r['mean_load_ms']:.1f} | {r['adapter_mb']:.1f} | "
                     f"{min(r['loaded'], batch)} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} |")
    load = report["load_test"]
    lines += ["", f"Load test: {load['clients']} concurrent clients, {load['requests']} completion requests on "
              f"loopback: p50 {load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s, {load['tokens_per_s']:.1f} "
              f"generated tokens/s, {load['errors']} errors.", "",
              f"Command: `{report['command']}` ({report['seconds'] / 60:.0f} min, code commit "
              f"{report.get('commit', 'not recorded')})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
