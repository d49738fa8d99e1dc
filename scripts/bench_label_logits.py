"""LM head at every position against the label positions only: tuning steps and scoring batches, side by side.

    python scripts/bench_label_logits.py                         # SmolLM2-135M + LoRA, vader-product (~4 min)
    python scripts/bench_label_logits.py --task vader-movie --max-prompt-tokens 128 --pause PIDS

Training reads the next-token distribution only where a label token is predicted, and scoring only at a
prompt's last position (one-token label words), yet a causal LM computes and normalises logits over the whole
vocabulary at every position. CPET runs the LM head at the needed positions only (:func:`cpet.evaluate.logits_at`,
transformers' ``logits_to_keep`` with a tensor of positions). This benchmark times, on the same batches of a
task's prompts and with a rank-8 LoRA as the grid tunes it:

- ``tuning step``: forward and backward of the label loss; *every position* is transformers' own loss
  (``model(**batch).loss``: logits at every position, shifted cross-entropy), *label positions*
  :func:`cpet.train.label_token_loss`, as :func:`cpet.train.train_classifier` runs it;
- ``scoring batch``: *every position* is the log-softmax of the logits at every position (as
  :func:`cpet.evaluate.label_logprobs` did before it read the scored positions only), *label positions*
  :func:`cpet.evaluate.label_logprobs` itself.

Both paths run in alternation, best of ``--repeats`` per batch, summed over ``--batches`` batches. Then every
example of ``--check-split`` is scored once three ways: batches in input order with every position's logits,
in input order at the label positions, and shortest first at the label positions (how
:func:`cpet.evaluate.label_logprobs` batches a list). The losses of the two training paths are compared on the
timed batches, and the label scores of the three scoring paths on the split (the largest difference, and how
many examples they label differently). Writes
``docs/bench_label_logits.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchtools import add_threads_option, git_commit, paused, set_threads, write_report  # noqa: E402
from cpet.adapters import add_lora  # noqa: E402
from cpet.data import load_task, tuning_prompts  # noqa: E402
from cpet.data.prompts import fit_prompt  # noqa: E402
from cpet.evaluate import label_logprobs, padded  # noqa: E402
from cpet.models import load_base  # noqa: E402
from cpet.runtime import machine_record  # noqa: E402
from cpet.train import collate, encode_example, label_token_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def best_time(run, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``run``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="vader-product")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="batches timed (different prompts each)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per batch and path; the best counts")
    parser.add_argument("--max-prompt-tokens", type=int, default=64,
                        help="prompt cut (default 64, as cpet demo tunes; the grid cuts at 128)")
    parser.add_argument("--check-split", default="test",
                        help="split whose every example both scoring paths label, to compare (default test)")
    add_threads_option(parser)
    parser.add_argument("--pause", type=int, nargs="*", default=[], metavar="PID",
                        help="processes to stop while timing (e.g. a grid run), continued afterwards")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_label_logits.json"))
    args = parser.parse_args()
    commit = git_commit()  # the code as it was imported, before the long work (as the other benchmarks read it)
    if args.batch_size < 1 or args.batches < 1 or args.repeats < 1:
        parser.error("--batch-size, --batches and --repeats must be >= 1")
    set_threads(args.threads)

    task = load_task(args.task)
    template, verbalizer = tuning_prompts(task, "train", args.check_split)
    loaded = load_base(args.model)
    tokenizer = loaded.tokenizer
    torch.manual_seed(0)
    model = add_lora(loaded.model, rank=8, alpha=16, dropout=0.0)
    examples = task.split("train")[:args.batch_size * args.batches]
    if len(examples) < args.batch_size * args.batches:
        parser.error(f"{args.task} has {len(examples)} training examples, fewer than --batch-size x --batches")
    prompts = [fit_prompt(template, e.text, tokenizer, args.max_prompt_tokens) for e in examples]
    words = [verbalizer.label_words[label] for label in task.labels]
    if any(len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1 for w in words):
        parser.error(f"{args.task}'s label words {words} are not one token each: the every-position reference here "
                     "scores a label by its first token (use a task with one-token label words)")
    batches = [collate([encode_example(tokenizer, prompts[i], verbalizer.label_words[examples[i].label],
                                       args.max_prompt_tokens) for i in range(b, b + args.batch_size)],
                       tokenizer.pad_token_id or 0)
               for b in range(0, len(examples), args.batch_size)]

    def step_every_position(batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    def step_label_positions(batch):
        model.zero_grad(set_to_none=True)
        loss, _ = label_token_loss(model, batch)
        loss.backward()
        return loss.detach()

    def score_every_position(chunk):
        """label_logprobs as it ran before the scored positions: every position's log-softmax, then one per row."""
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-args.max_prompt_tokens:] for p in chunk]
        input_ids, attention = padded(ids, tokenizer.pad_token_id or 0)
        label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
        return torch.stack([logp[row, len(row_ids) - 1, label_ids] for row, row_ids in enumerate(ids)])

    def score_label_positions(chunk):
        return label_logprobs(model, tokenizer, chunk, words, batch_size=args.batch_size,
                              max_prompt_tokens=args.max_prompt_tokens)

    model.train()
    loss_gap = max(abs(float(step_every_position(b)) - float(step_label_positions(b))) for b in batches)
    model.eval()
    checked = [fit_prompt(template, e.text, tokenizer, args.max_prompt_tokens) for e in task.split(args.check_split)]
    chunks = [prompts[b:b + args.batch_size] for b in range(0, len(prompts), args.batch_size)]
    times = {"train_all": 0.0, "train_label": 0.0, "score_all": 0.0, "score_label": 0.0}
    with paused(args.pause):
        model.train()
        for batch in batches:
            times["train_all"] += best_time(lambda: step_every_position(batch), args.repeats)
            times["train_label"] += best_time(lambda: step_label_positions(batch), args.repeats)
        model.eval()
        for chunk in chunks:
            times["score_all"] += best_time(lambda: score_every_position(chunk), args.repeats)
            times["score_label"] += best_time(lambda: score_label_positions(chunk), args.repeats)
        # a whole split, once each: batches in input order with every position's logits (CPET before 3167956),
        # in input order at the label positions (3167956), shortest first at the label positions (label_logprobs)
        split_parts: dict[str, list[torch.Tensor]] = {"all": [], "label": []}
        start = time.perf_counter()
        for b in range(0, len(checked), args.batch_size):
            split_parts["all"].append(score_every_position(checked[b:b + args.batch_size]))
        times["split_all_input_order"] = time.perf_counter() - start
        start = time.perf_counter()
        for b in range(0, len(checked), args.batch_size):
            split_parts["label"].append(score_label_positions(checked[b:b + args.batch_size]))
        times["split_label_input_order"] = time.perf_counter() - start
        start = time.perf_counter()
        by_length = score_label_positions(checked)
        times["split_label_by_length"] = time.perf_counter() - start
    every, label = torch.cat(split_parts["all"]), torch.cat(split_parts["label"])
    score_gap = max(float((every - label).abs().max()), float((every - by_length).abs().max()))
    disagreements = int((every.argmax(-1) != label.argmax(-1)).sum())
    disagreements_by_length = int((every.argmax(-1) != by_length.argmax(-1)).sum())
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    report = {
        "model": args.model, "task": args.task, "batch_size": args.batch_size, "batches": args.batches,
        "repeats": args.repeats, "max_prompt_tokens": args.max_prompt_tokens, "tokens": tokens,
        "mean_width": round(sum(b["input_ids"].shape[1] for b in batches) / len(batches), 1),
        "vocab": int(loaded.model.config.vocab_size), "seconds": {k: round(v, 3) for k, v in times.items()},
        "train_speedup": times["train_all"] / times["train_label"],
        "score_speedup": times["score_all"] / times["score_label"],
        "max_loss_difference": loss_gap, "max_score_difference": score_gap, "check_split": args.check_split,
        "checked_examples": len(checked), "label_disagreements": disagreements,
        "label_disagreements_by_length": disagreements_by_length,
        "split_speedup_label_positions": times["split_all_input_order"] / times["split_label_input_order"],
        "split_speedup_both": times["split_all_input_order"] / times["split_label_by_length"],
        # the CPU model and its vector level, not the bare architecture (both earlier reports say "x86_64")
        "machine": machine_record(),
        "commit": commit, "command": "python scripts/bench_label_logits.py " + " ".join(sys.argv[1:]),
    }
    write_report(args.out, report, markdown)


def markdown(r: dict) -> str:
    s = r["seconds"]
    lines = [
        f"LM head at every position vs at the label positions only: {r['model']} with a rank-8 LoRA, "
        f"{r['batches']} batches of {r['batch_size']} {r['task']} prompts (at most {r['max_prompt_tokens']} prompt "
        f"tokens, {r['mean_width']} positions per row on average; vocabulary {r['vocab']}), best of "
        f"{r['repeats']} per batch, {r['machine']['threads']} threads, torch {r['machine']['torch']}, code commit "
        f"{r['commit']}.",
        "",
        "| work | every position (s) | label positions (s) | speed-up |",
        "|---|---|---|---|",
        f"| tuning step (forward + backward) | {s['train_all']:.2f} | {s['train_label']:.2f} | "
        f"{r['train_speedup']:.2f}x |",
        f"| scoring batch | {s['score_all']:.2f} | {s['score_label']:.2f} | {r['score_speedup']:.2f}x |",
        "",
        f"Scoring all {r['checked_examples']} {r['check_split']} examples once, batches of {r['batch_size']}: "
        f"{s['split_all_input_order']:.1f} s in input order with every position's logits, "
        f"{s['split_label_input_order']:.1f} s in input order at the label positions "
        f"({r['split_speedup_label_positions']:.2f}x), {s['split_label_by_length']:.1f} s shortest first at the "
        f"label positions as `label_logprobs` batches them ({r['split_speedup_both']:.2f}x).",
        "",
        f"Largest difference between the paths: loss {r['max_loss_difference']:.2e} (timed batches); label "
        f"log-probability {r['max_score_difference']:.2e} over the {r['checked_examples']} {r['check_split']} "
        f"examples, which the label-position paths label differently from every-position scoring "
        f"{r['label_disagreements']} times (input order) and {r['label_disagreements_by_length']} times "
        f"(shortest first).",
        "",
        f"Command: `{r['command'].strip()}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
