from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cpet.train
from cpet.adapters import add_lora, load_adapter, read_adapter_meta, save_adapter
from cpet.evaluate import classification_accuracy
from cpet.models import tiny_model
from cpet.train import (DistillConfig, TuneConfig, batch_indices, collate, encode_example, label_token_loss,
                        train_classifier)

LABELS = ["positive", "negative"]
TEMPLATE = SimpleNamespace(format=lambda text: f"{text} ->")
VERBALIZER = SimpleNamespace(label_words={"positive": " P", "negative": " N"})


def synthetic_examples(n: int, seed: int):
    """A separable toy task: the sentiment word decides the label."""
    rng = random.Random(seed)
    words = {"positive": ["good", "great", "nice"], "negative": ["bad", "awful", "poor"]}
    out = []
    for _ in range(n):
        label = rng.choice(LABELS)
        out.append(SimpleNamespace(text=f"it was {rng.choice(words[label])} {rng.randint(0, 99)}", label=label))
    return out


def run(model, tokenizer, out_dir, config, save_best=None):
    save_best = save_best or (lambda directory, metrics: save_adapter(model, directory, {"metrics": metrics}))
    return train_classifier(model, tokenizer, synthetic_examples(96, 0), synthetic_examples(32, 1),
                            labels=LABELS, template=TEMPLATE, verbalizer=VERBALIZER, config=config,
                            out_dir=out_dir, save_best=save_best, progress=False)


def test_encode_example_masks_the_prompt():
    tokenizer = tiny_model("llama").tokenizer
    ids, labels = encode_example(tokenizer, "ab ->", " P", max_prompt_tokens=3)
    assert ids == tokenizer(" ->", add_special_tokens=False)["input_ids"] + tokenizer(" P")["input_ids"]
    assert labels[:3] == [-100] * 3 and labels[3:] == ids[3:]
    batch = collate([(ids, labels), ([1, 2], [-100, 2])], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 2, -100, -100, -100]


@pytest.mark.parametrize("word", ["b", "ba"])  # label words of one and of two tokens
def test_the_label_loss_is_transformers_loss_with_the_head_at_the_label_positions(tiny, word):
    torch.manual_seed(0)
    model, tokenizer = tiny.model, tiny.tokenizer
    batch = collate([encode_example(tokenizer, prompt, word, 64) for prompt in
                     ["x", "a much longer prompt than the others", "mid size"]], pad_id=0)
    head_positions = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_positions.append(args[0].shape[1]))
    loss, _ = label_token_loss(model, batch)
    hook.remove()
    grads = torch.autograd.grad(loss, [model.get_input_embeddings().weight])[0]
    reference = model(**batch).loss  # every position through the head, then the shifted labels' mean
    expected = torch.autograd.grad(reference, [model.get_input_embeddings().weight])[0]
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(grads, expected, atol=1e-6)
    label_tokens = int((batch["labels"] != -100).sum())
    assert head_positions == [label_tokens] and label_tokens < batch["input_ids"].shape[1]


def test_the_label_loss_keeps_the_head_at_the_label_positions_inside_a_data_parallel_wrapper():
    """accelerate wraps the model in DistributedDataParallel for multi-process training; its forward takes
    **kwargs, so the check for logits_to_keep must look inside it (DataParallel here: one process, no GPU)."""
    from cpet.evaluate import takes_logits_to_keep

    loaded = tiny_model("llama")
    wrapped = torch.nn.DataParallel(loaded.model)
    assert takes_logits_to_keep(wrapped)
    batch = collate([encode_example(loaded.tokenizer, prompt, "b", 64) for prompt in ["x", "a longer prompt"]], 0)
    head_positions = []
    hook = loaded.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_positions.append(args[0].shape[1]))
    loss, _ = label_token_loss(wrapped, batch)
    hook.remove()
    assert head_positions == [2] and loss.item() == pytest.approx(loaded.model(**batch).loss.item(), rel=1e-5)


def test_batch_indices_cover_each_epoch_and_depend_only_on_seed_and_step():
    first_epoch = [i for step in range(5) for i in batch_indices(20, 4, step, seed=3)]
    assert sorted(first_epoch) == list(range(20))
    assert batch_indices(20, 4, 7, seed=3) == batch_indices(20, 4, 7, seed=3) != batch_indices(20, 4, 7, seed=4)


def test_tuning_learns_the_task_and_writes_a_peft_directory(tmp_path):
    loaded = tiny_model("llama")
    model = add_lora(loaded.model, rank=8, alpha=32, dropout=0.0, target_roles=("q", "v", "o", "up", "down"))
    config = TuneConfig(steps=60, batch_size=16, lr=2e-2, eval_every=20, warmup_steps=5)
    val = synthetic_examples(32, 1)
    before = classification_accuracy(model, loaded.tokenizer, [e.text for e in val], [e.label for e in val],
                                     template=TEMPLATE, verbalizer=VERBALIZER, labels=LABELS)
    result = run(model, loaded.tokenizer, tmp_path, config)
    assert before.accuracy < 0.75  # the random tiny model (LoRA B = 0) is near chance
    assert result.best_accuracy >= 0.9
    assert [h["step"] for h in result.history] == [0, 20, 40, 60]
    assert result.history[0]["val_accuracy"] == before.accuracy
    assert read_adapter_meta(tmp_path / "adapter")["metrics"]["val_accuracy"] == result.best_accuracy

    # plain peft loads the directory, and the loaded adapter reproduces the trained one's outputs
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="best")
    model.set_adapter("best")
    fresh = load_adapter(tiny_model("llama").model, tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-6)


def kill_at_step(monkeypatch, step: int) -> None:
    """The training process "killed" (KeyboardInterrupt) when it builds the batch of 0-based ``step``."""
    calls = []

    def collate_that_dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == step + 1:
            raise KeyboardInterrupt("killed")
        return collate(*args, **kwargs)

    monkeypatch.setattr(cpet.train, "collate", collate_that_dies)


def test_resume_after_kill_continues_from_saved_step(tmp_path, monkeypatch):
    config = TuneConfig(steps=30, batch_size=8, lr=1e-2, eval_every=10, dropout=0.1)

    def lora_state(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    straight = add_lora(tiny_model("llama").model, rank=4, alpha=8, dropout=0.1, target_roles=("q", "v"))
    run(straight, tiny_model("llama").tokenizer, tmp_path / "straight", config)

    killed = add_lora(tiny_model("llama").model, rank=4, alpha=8, dropout=0.1, target_roles=("q", "v"))
    kill_at_step(monkeypatch, 25)  # mid-interval
    with pytest.raises(KeyboardInterrupt):
        run(killed, tiny_model("llama").tokenizer, tmp_path / "killed", config)
    monkeypatch.undo()
    assert json.loads((tmp_path / "killed" / "resume" / "state.json").read_text())["step"] == 20

    base = tiny_model("llama").model
    torch.manual_seed(1234)  # a different LoRA init: the resumed values must come from the checkpoint
    resumed = add_lora(base, rank=4, alpha=8, dropout=0.1, target_roles=("q", "v"))
    result = run(resumed, tiny_model("llama").tokenizer, tmp_path / "killed", config)
    assert [h["step"] for h in result.history] == [0, 10, 20, 30]
    expected, got = lora_state(straight), lora_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_a_resumed_run_reports_the_losses_a_straight_run_reports(tmp_path, monkeypatch):
    """The last evaluation off the eval_every grid (step 25 of eval_every 10) averages losses from before the save."""
    config = TuneConfig(steps=25, batch_size=8, lr=1e-2, eval_every=10, dropout=0.0)
    tokenizer = tiny_model("llama").tokenizer
    straight = run(add_lora(tiny_model("llama").model, rank=4, alpha=8, dropout=0.0, target_roles=("q", "v")),
                   tokenizer, tmp_path / "straight", config)
    kill_at_step(monkeypatch, 22)
    with pytest.raises(KeyboardInterrupt):
        run(add_lora(tiny_model("llama").model, rank=4, alpha=8, dropout=0.0, target_roles=("q", "v")), tokenizer,
            tmp_path / "killed", config)
    monkeypatch.undo()
    resumed = run(add_lora(tiny_model("llama").model, rank=4, alpha=8, dropout=0.0, target_roles=("q", "v")),
                  tokenizer, tmp_path / "killed", config)
    assert [h["step"] for h in resumed.history] == [0, 10, 20, 25]
    for ours, theirs in zip(resumed.history[1:], straight.history[1:]):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-6), ours["step"]


def test_resuming_with_other_settings_or_shapes_is_refused(tmp_path):
    def lora(rank):
        return add_lora(tiny_model("llama").model, rank=rank, alpha=8, dropout=0.0, target_roles=("q",))

    tokenizer = tiny_model("llama").tokenizer
    config = TuneConfig(steps=10, batch_size=8, lr=1e-2, eval_every=10)
    run(lora(4), tokenizer, tmp_path, config)
    with pytest.raises(ValueError, match=r"written with other settings \(lr 0.01 -> 0.02\)"):
        run(lora(4), tokenizer, tmp_path, TuneConfig(steps=10, batch_size=8, lr=2e-2, eval_every=10))
    with pytest.raises(ValueError, match=r"different setup \(.*q_proj.*saved \(4, 64\), now \(8, 64\)\)"):
        run(lora(8), tokenizer, tmp_path, config)
    longer = run(lora(4), tokenizer, tmp_path, TuneConfig(steps=20, batch_size=8, lr=1e-2, eval_every=10))
    assert [h["step"] for h in longer.history] == [0, 10, 20]  # more steps continue the same run


@pytest.mark.parametrize("train, val, message", [
    ([], [SimpleNamespace(text="a", label="positive")], "training split is empty"),
    ([SimpleNamespace(text="a", label="positive")], [], "validation split is empty"),
    ([SimpleNamespace(text="a", label="neutral")], [SimpleNamespace(text="a", label="positive")],
     "not among the task labels"),
])
def test_bad_training_input(tmp_path, train, val, message):
    loaded = tiny_model("llama")
    model = add_lora(loaded.model, rank=2, alpha=2, dropout=0.0, target_roles=("q",))
    with pytest.raises(ValueError, match=message):
        train_classifier(model, loaded.tokenizer, train, val, labels=LABELS, template=TEMPLATE,
                         verbalizer=VERBALIZER, config=TuneConfig(steps=1), out_dir=tmp_path / "x",
                         save_best=lambda d, m: None, progress=False)
    assert not (tmp_path / "x" / "adapter").exists()


@pytest.mark.parametrize("variant", ["plain", "uneven"])
def test_two_processes_take_the_same_steps_as_one(tmp_path, variant):
    """Under torchrun each process trains on its half of every batch; with gradients averaged, two
    processes must take the same optimizer steps as one process on the whole batch, agree on the result,
    and leave one adapter and one resume state behind (written by the main process only). "uneven": label words
    of other token counts and a distillation term over prompts of other lengths (each share's own mean weighed
    the share with fewer tokens up: the LoRA weights came out 0.047 off one process's)."""
    from tests.distributed_tune_worker import CONFIG, flat_lora, tiny_lora, tune_tiny

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(repo / "tests" / "distributed_tune_worker.py"),
                           str(tmp_path), variant], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert ranks[0]["lora"] == ranks[1]["lora"]  # gradients synchronised: bit-identical weights
    assert (ranks[0]["best_accuracy"], ranks[0]["best_step"]) == (ranks[1]["best_accuracy"], ranks[1]["best_step"])
    assert json.loads((tmp_path / "run" / "resume" / "state.json").read_text())["step"] == CONFIG.steps
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()

    single, single_lora = tune_tiny(tmp_path / "single", variant)
    two_lora = torch.tensor(ranks[0]["lora"])
    moved = (single_lora - flat_lora(tiny_lora())).abs().max()
    assert moved > 1e-2  # the steps changed the weights, so agreement below is not trivial
    assert torch.allclose(two_lora, single_lora, atol=1e-4)
    assert ranks[0]["best_accuracy"] == single.best_accuracy
    # the logged loss is the whole batch's (averaged over processes), not each process's half
    assert ranks[0]["train_losses"] == ranks[1]["train_losses"]
    single_losses = [entry["train_loss"] for entry in single.history]
    assert [loss is None for loss in single_losses] == [loss is None for loss in ranks[0]["train_losses"]]
    assert all(abs(a - b) < 1e-4 for a, b in zip(ranks[0]["train_losses"], single_losses) if a is not None)


@pytest.mark.parametrize("make, message", [
    (lambda: TuneConfig(alpha=-4), r"alpha must be a finite number > 0 \(the LoRA scale is alpha / rank\), got -4"),
    (lambda: TuneConfig(alpha=float("inf")), r"alpha must be a finite number > 0 .*got inf"),
    (lambda: TuneConfig(lr=0), "lr must be a finite number > 0, got 0"),
    (lambda: TuneConfig(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (lambda: DistillConfig(lr=-1), "lr must be a finite number > 0, got -1"),
    (lambda: DistillConfig(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (lambda: DistillConfig(kl_weight=0, mse_weight=0), "must be >= 0 and not both 0"),
    (lambda: DistillConfig(mse_weight=-1), "must be >= 0 and not both 0"),
    (lambda: TuneConfig(steps=10, warmup_steps=11), "warmup_steps 11 is more than the 10 steps"),
    (lambda: TuneConfig(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (lambda: TuneConfig(dropout=float("nan")), r"dropout must be in \[0, 1\), got nan"),
    (lambda: TuneConfig(distill_weight=-0.5), "distill_weight must be a finite number >= 0, got -0.5"),
    (lambda: TuneConfig(distill_weight=float("nan")), "distill_weight must be a finite number >= 0, got nan"),
    (lambda: TuneConfig(weight_decay=float("inf")), "weight_decay must be a finite number >= 0, got inf"),
])
def test_bad_hyper_parameters_are_refused_on_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_prompts_past_the_context_are_refused_before_training(tmp_path):
    """A tiny model has 256 positions: 256 prompt tokens and a label word pass them."""
    loaded = tiny_model("llama")
    model = add_lora(loaded.model, rank=2, alpha=2, dropout=0.0, target_roles=("q",))
    examples = [SimpleNamespace(text="a", label="positive"), SimpleNamespace(text="b", label="negative")]
    # the byte tokenizer reads " P" as two tokens
    with pytest.raises(ValueError, match=r"max_prompt_tokens=256 followed by its longest label word \(2 tokens\) is "
                                         r"258 tokens.*at most 254"):
        train_classifier(model, loaded.tokenizer, examples, examples, labels=LABELS, template=TEMPLATE,
                         verbalizer=VERBALIZER, config=TuneConfig(steps=1, max_prompt_tokens=256),
                         out_dir=tmp_path / "x", save_best=lambda d, m: None, progress=False)
    assert not (tmp_path / "x").exists()


def test_distillation_windows_past_the_context_are_refused():
    from cpet.train import distill_on_text

    student, teacher = tiny_model("llama"), tiny_model("llama")
    before = [p.clone() for p in student.model.parameters()]
    with pytest.raises(ValueError, match=r"the distillation window \(seq_len\) is 300 tokens.*recover --seq-len"):
        distill_on_text(student.model, teacher.model, student.tokenizer, "word " * 2000,
                        DistillConfig(steps=1, seq_len=300), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, student.model.parameters()))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_toward_a_tenth():
    from cpet.train import DistillConfig, TuneConfig, lr_factor

    config = TuneConfig(steps=10, warmup_steps=4)
    factors = [lr_factor(s, config) for s in range(10)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # (s + 1) / warmup: the last warm-up step at 1.0
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(x > y for x, y in zip(factors[4:], factors[5:]))  # decays after the warm-up
    assert lr_factor(9, TuneConfig(steps=10)) == pytest.approx(0.127, abs=1e-3)  # the docstring's example
    assert [lr_factor(s, DistillConfig(steps=30)) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_the_last_step_updates_the_weights(tmp_path):
    """A one-step run takes its step: LoRA B starts at zero and must have moved, as must the saved resume state."""
    from safetensors.torch import load_file

    from cpet.adapters import add_lora, save_adapter
    from cpet.models import tiny_model
    from cpet.train import TuneConfig, train_classifier

    loaded = tiny_model("llama")
    model = add_lora(loaded.model, rank=4, alpha=8, dropout=0.0, target_roles=("q", "v"))
    examples = [SimpleNamespace(text=f"it was {w}", label=l) for w, l in
                (("good", "positive"), ("bad", "negative"), ("great", "positive"), ("awful", "negative"))]
    train_classifier(model, loaded.tokenizer, examples, examples, labels=["positive", "negative"],
                     template=SimpleNamespace(format=lambda text: f"{text} ->"),
                     verbalizer=SimpleNamespace(label_words={"positive": " P", "negative": " N"}),
                     config=TuneConfig(steps=1, batch_size=4, lr=1e-2, eval_every=1), out_dir=tmp_path,
                     save_best=lambda directory, metrics: save_adapter(model, directory, {"metrics": metrics}),
                     progress=False)
    b_weights = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b_weights and all(p.abs().max() > 0 for p in b_weights)
    saved = load_file(str(tmp_path / "resume" / "state.safetensors"))
    assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)


def test_distillation_loss_is_kl_of_teacher_to_student_plus_hidden_mse():
    """KL(teacher || student) at temperature 1, averaged over tokens, plus the hidden-state MSE: checked against the
    formula on distributions where the two KL directions differ."""
    from cpet.train import distillation_loss

    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(2, 3, 7) * 2, torch.randn(2, 3, 7) * 2
    s_hidden, t_hidden = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    student = SimpleNamespace(logits=s_logits, hidden_states=(s_hidden,))
    teacher = SimpleNamespace(logits=t_logits, hidden_states=(t_hidden,))
    p, q = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    forward_kl = (p * (p.log() - q.log())).sum(-1).mean()
    reverse_kl = (q * (q.log() - p.log())).sum(-1).mean()
    assert abs(forward_kl - reverse_kl) > 0.05  # the direction matters on these logits
    mse = ((s_hidden - t_hidden) ** 2).mean()
    assert distillation_loss(student, teacher, 1.0, 0.0).item() == pytest.approx(forward_kl.item(), rel=1e-5)
    assert distillation_loss(student, teacher, 0.0, 1.0).item() == pytest.approx(mse.item(), rel=1e-5)
    assert distillation_loss(student, teacher, 0.5, 2.0).item() == pytest.approx(
        0.5 * forward_kl.item() + 2 * mse.item(), rel=1e-5)


def test_tuning_leaves_the_callers_random_state_and_training_flag_as_it_found_them(tmp_path):
    """The loop seeds every step's dropout masks (torch.manual_seed) and switches the model to train mode; after it
    the caller's global random stream must go on where it was (not from a seed of the last step), and a model
    handed over in eval mode must come back in eval mode."""
    loaded = tiny_model("llama")
    model = add_lora(loaded.model, rank=2, alpha=4, dropout=0.1, target_roles=("q",))
    model.eval()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    run(model, loaded.tokenizer, tmp_path, TuneConfig(steps=2, batch_size=4, eval_every=1))
    assert torch.equal(torch.rand(4), expected)
    assert not model.training and not any(m.training for m in model.modules())


def test_a_validation_label_outside_the_task_is_refused_before_any_step(tmp_path, monkeypatch):
    """Without a step-0 evaluation the first validation comes after eval_every steps: a validation label the task
    does not have must be refused before training, not after the steps have been paid for."""
    loaded = tiny_model("llama")
    model = add_lora(loaded.model, rank=2, alpha=2, dropout=0.0, target_roles=("q",))
    steps = []
    monkeypatch.setattr(cpet.train, "collate", lambda *a, **k: steps.append(1) or collate(*a, **k))
    with pytest.raises(ValueError, match=r"validation labels \['neutral'\] are not among the task labels"):
        train_classifier(model, loaded.tokenizer, synthetic_examples(8, 0),
                         [SimpleNamespace(text="it was so-so", label="neutral")], labels=LABELS, template=TEMPLATE,
                         verbalizer=VERBALIZER, config=TuneConfig(steps=4, batch_size=2, eval_every=4,
                                                                  eval_at_start=False),
                         out_dir=tmp_path, save_best=lambda d, m: None, progress=False)
    assert not steps


@pytest.mark.parametrize("damage", ["truncated", "state.json"])
def test_a_damaged_resume_state_names_its_file(tmp_path, damage):
    """A truncated state.safetensors failed with safetensors' bare SafetensorError ("incomplete metadata ..."), naming
    no file (the CLI could only say that *a* file was damaged); a garbled state.json with a bare JSON error."""
    from cpet.train import check_resume_config, load_resume_state, save_resume_state

    model = add_lora(tiny_model("llama").model, rank=4, alpha=8, dropout=0.0, target_roles=("q", "v"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    config = TuneConfig(steps=2, eval_every=1)
    save_resume_state(tmp_path / "resume", model, optimizer, 1, {"config": config.to_dict()})
    damaged = tmp_path / "resume" / ("state.safetensors" if damage == "truncated" else "state.json")
    damaged.write_bytes(damaged.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"{re.escape(str(damaged))}.*delete .*resume"):
        if damage == "truncated":
            load_resume_state(tmp_path / "resume", model, optimizer)
        else:
            check_resume_config(tmp_path / "resume", config)
