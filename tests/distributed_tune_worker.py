"""Worker for ``test_train.py::test_two_processes_take_the_same_steps_as_one`` (run under torchrun;
``OUT [plain|uneven]``).

Tunes a LoRA on the tiny Llama with the synthetic task of ``test_train.py`` and writes, per process, its
result and its flattened LoRA weights to ``OUT/rank<k>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState

from cpet.adapters import add_lora, save_adapter
from cpet.models import byte_tokenizer, tiny_model
from cpet.train import TuneConfig, TuneResult, train_classifier
from tests.test_train import LABELS, TEMPLATE, VERBALIZER, synthetic_examples

CONFIG = TuneConfig(steps=4, batch_size=16, lr=2e-2, eval_every=2, warmup_steps=1, dropout=0.0)


def tiny_lora():
    """The tiny Llama with a fresh LoRA, the same (seeded) weights on every call."""
    return add_lora(tiny_model("llama").model, rank=8, alpha=32, dropout=CONFIG.dropout,
                    target_roles=("q", "v", "o", "up", "down"))


def flat_lora(model) -> torch.Tensor:
    """All LoRA weights of ``model`` flattened in name order."""
    return torch.cat([p.detach().flatten() for n, p in sorted(model.named_parameters()) if "lora_" in n])


# "uneven": label words of other lengths (4 and 5 byte tokens) and a distillation term over prompts of other
# lengths, so that the two processes' shares of a batch hold different numbers of tokens
UNEVEN_VERBALIZER = SimpleNamespace(label_words={"positive": " yes", "negative": " nope"})


def tune_tiny(out_dir: Path, variant: str = "plain") -> tuple[TuneResult, torch.Tensor]:
    """The run both sides of the test make: ``(result, flat_lora of the tuned model)``."""
    model = tiny_lora()
    uneven = variant == "uneven"
    config = TuneConfig(**{**CONFIG.to_dict(), "distill_weight": 1.0}) if uneven else CONFIG
    result = train_classifier(model, byte_tokenizer(), synthetic_examples(96, 0),
                              synthetic_examples(32, 1), labels=LABELS, template=TEMPLATE,
                              verbalizer=UNEVEN_VERBALIZER if uneven else VERBALIZER, config=config,
                              out_dir=out_dir, progress=False, teacher=tiny_model("llama").model if uneven else None,
                              save_best=lambda d, m: save_adapter(model, d, {"metrics": m}))
    return result, flat_lora(model)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    state = PartialState(cpu=not torch.cuda.is_available())  # as train_classifier: MULTI_CPU on gloo
    result, lora = tune_tiny(out / "run", sys.argv[2] if len(sys.argv) > 2 else "plain")
    (out / f"rank{state.process_index}.json").write_text(json.dumps({
        "processes": state.num_processes, "best_accuracy": result.best_accuracy, "best_step": result.best_step,
        "train_losses": [entry["train_loss"] for entry in result.history], "lora": lora.tolist()}))
