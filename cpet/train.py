"""One explicit training loop for task adapters (LoRA via peft) and recovery modules.

Classification through a verbalizer: each example becomes ``prompt tokens + label-word tokens`` and the
loss is the causal-LM cross-entropy on the label-word tokens only. The loop

- evaluates validation accuracy every ``eval_every`` steps and keeps the best adapter (a standard PEFT
  directory plus ``cpet.json``), written atomically;
- is resumable: a kill at any point resumes from the last saved step with the same data order and the
  same random state (batch order and dropout masks are a pure function of ``(seed, step)``);
- runs under ``torchrun`` (or ``accelerate launch --multi_gpu``) on several processes (the model,
  optimizer and gradient sync go through ``Accelerator``): each process takes its share of every batch,
  gradients are averaged, every process returns the same result and only the main one writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .assembly import read_safetensors
from .assets import atomic_path, read_json_object
from .data.prompts import LEGACY_PROMPT_CUT, fit_prompt
from .evaluate import (DEFAULT_MAX_PROMPT_TOKENS, check_labelled_prompt_length, classification_accuracy,
                       encode_prompt_and_label, label_token_ids, logits_at, training_flags_kept)
from .models import check_context_length


@dataclass
class TuneConfig:
    """Hyper-parameters of one task-tuning run.

    Attributes:
        rank: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / rank).
        dropout: LoRA dropout.
        target_roles: module-map roles that get LoRA (None: every mapped linear of the family).
        steps: optimizer steps.
        batch_size: examples per step.
        lr: AdamW learning rate (linear warm-up, then cosine decay to 10%).
        warmup_ratio: warm-up length as a share of ``steps`` (at least one step), so that short runs
            reach the learning rate too.
        warmup_steps: an explicit warm-up length that replaces ``warmup_ratio`` (None: use the ratio).
        weight_decay: AdamW weight decay.
        eval_every: validate (and checkpoint) every N steps; also at the last step.
        eval_limit: validation examples used per evaluation (None = all).
        max_prompt_tokens: prompts are cut to this many tokens (the text loses its end, the template nothing:
            :func:`cpet.data.prompts.fit_prompt`), in training, validation and every later scoring of the
            adapter (recorded in its ``cpet.json``).
        seed: seeds LoRA init, data order and dropout.
        distill_weight: lambda of the hidden-state MSE against a teacher (0 = no distillation). With per-task
            recovery, ``CPET.tune`` uses 1.0 where this is 0: CA-LoRA's per-task recovery is distilled from the
            original model (the adapter's ``cpet.json`` records the weight used).
        eval_at_start: also validate the initial adapter (step 0), which can be the best one (inheritance).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_roles: tuple[str, ...] | None = None
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_limit: int | None = 200
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    seed: int = 0
    distill_weight: float = 0.0
    eval_at_start: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("steps, batch_size and eval_every must be >= 1")
        if not 0 < self.lr < math.inf:  # also refuses nan
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0 (the LoRA scale is alpha / rank), got {self.alpha}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 or None (warmup_ratio of the steps), got {self.warmup_steps}")
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} is more than the {self.steps} steps: the learning rate "
                             "would never reach lr; use at most steps warm-up steps")
        if not 0 <= self.dropout < 1:  # also refuses nan
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("distill_weight", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 or None (all validation examples), got {self.eval_limit}")
        if self.target_roles is not None:
            self.target_roles = tuple(self.target_roles)

    @property
    def warmup(self) -> int:
        """Warm-up steps actually used."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, round(self.warmup_ratio * self.steps))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneResult:
    """What a tuning run produced: the best validation accuracy, its step, and the learning curve."""

    best_accuracy: float
    best_step: int
    history: list[dict] = field(default_factory=list)
    adapter_dir: str | None = None


def encode_example(tokenizer, prompt: str, label_word: str, max_prompt_tokens: int
                   ) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with labels -100 on the prompt and the label-word ids after it."""
    prompt_ids, label_ids = encode_prompt_and_label(tokenizer, prompt, label_word, max_prompt_tokens)
    return prompt_ids + label_ids, [-100] * len(prompt_ids) + label_ids


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``(input_ids, labels)`` into ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def label_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, per: float | None = None,
                     **model_inputs) -> tuple[torch.Tensor, object]:
    """``(loss, outputs)``: the mean cross-entropy of the label tokens of a :func:`collate` batch (``labels`` -100
    elsewhere), as transformers' causal-LM loss computes it (position t predicts token t + 1), with the LM head run
    only at the positions that predict a label token (:func:`cpet.evaluate.logits_at`: the head over the whole
    vocabulary at every prompt position was 15% of a training step's time on SmolLM2-135M); ``outputs`` is the
    model's output (``model_inputs``: e.g. ``output_hidden_states``). ``per``: divide the summed cross-entropy by
    this count instead of the batch's own label tokens (a process's share of a batch split over processes)."""
    labels = batch["labels"]
    rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("the batch has no label token to train on (every label is -100)")
    listed = positions.tolist()  # one transfer, not a device sync per label token
    at = logits_at(model, listed, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   **model_inputs)
    kept = torch.tensor([at.where[p] for p in listed], device=rows.device)
    logits = at.logits[rows, kept].float()
    if per is None:
        return torch.nn.functional.cross_entropy(logits, labels[rows, positions + 1]), at.outputs
    return torch.nn.functional.cross_entropy(logits, labels[rows, positions + 1], reduction="sum") / per, at.outputs


def label_tokens(example: tuple[list[int], list[int]]) -> int:
    """The label tokens of one :func:`encode_example` that :func:`label_token_loss` scores (a label at position 0
    has no position to predict it)."""
    return sum(label != -100 for label in example[1][1:])


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: epochs of seeded permutations, a pure function."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(num_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    start = offset * batch_size
    return [order[(start + i) % num_examples] for i in range(batch_size)]


def lr_factor(step: int, config: TuneConfig) -> float:
    """Learning-rate multiplier of ``step`` (0-based): linear warm-up, then cosine decay toward 0.1.

    Step ``s < warmup`` runs at ``(s + 1) / warmup``, so the last warm-up step is at the full rate and
    ``warmup=1`` means no warm-up; from step ``warmup`` the factor follows a cosine from 1.0 that would reach 0.1
    at step ``steps``, so the last step (``steps - 1``) runs slightly above 0.1 (0.127 for 10 steps).
    """
    warmup = config.warmup
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(config.steps - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------------------------------
# Resumable state (no pickles: tensors in safetensors, the rest in JSON)
# --------------------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_resume_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                      extra: dict, *, with_optimizer: bool = True) -> None:
    """Trainable weights, AdamW moments and the loop position, written atomically.

    ``with_optimizer`` False leaves the moments out (``state.json`` says ``"optimizer_state": false``): a
    finished run keeps only what reporting it and extending its ``steps`` need, about a third of the bytes.
    """
    params = _trainable(model)
    index = {id(p): name for name, p in params.items()}
    tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    extra = {**extra, "optimizer_state": with_optimizer}
    for group in optimizer.param_groups if with_optimizer else []:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{index[id(p)]}/{key}"] = value.detach().cpu().contiguous().reshape(
                        value.shape if value.dim() else (1,))
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))


# Identity facts whose absence from a resume state says their value: a state from before CPET recorded
# "prompt_cut" was trained on left-cut prompts.
LEGACY_FACTS = {"prompt_cut": LEGACY_PROMPT_CUT}


def _recorded_as(saved: dict, key: str, recorded: dict) -> str:
    """How a fact reads in an error: its saved value, or, when the state predates it, the value its absence means."""
    return repr(saved[key]) if key in saved else f"not recorded (read as {recorded.get(key)!r})"


def _resume_remedy(directory: Path) -> str:
    """How to get past a damaged resume state: without it the run starts over (nothing else reads it)."""
    return f"delete {directory} (the resume state) and the run starts again from step 0"


def _read_state_json(directory: Path) -> dict:
    """``state.json`` of a resume state; a ValueError naming it when damaged (a bare JSON error named no file)."""
    return read_json_object(directory / "state.json", _resume_remedy(directory))


# what to do about a resume state written with other settings (every refusal of one ends with it)
RESUME_FIX = "delete it or use a new output directory (a new adapter name) to train with these"


def check_resume_config(directory: Path, config: TuneConfig, identity: dict | None = None) -> None:
    """Refuse to resume a run made with other hyper-parameters or for something else, naming each difference.

    ``config`` must match the saved one except ``steps`` (which may grow). ``identity`` says what the run is
    for (task and a hash of its training split, base, source model, init, recovery mode and modules,
    inheritance source, target modules: see ``CPET.tune``); every fact the state recorded must match (a fact
    added to CPET after the state was written is not compared), and a state written without an identity is
    refused when one is given, since nothing says what it was trained for.
    """
    state = _read_state_json(directory)
    saved = state.get("config")
    fix = RESUME_FIX
    if identity is not None:
        if state.get("identity") is None:
            raise ValueError(f"resume state in {directory} does not record what it was trained for (written by an "
                             f"older CPET): {fix}")
        now_id = json.loads(json.dumps(identity))
        # a fact the saved state does not record (written by a CPET that did not record it yet) is not compared,
        # unless its absence says what it was (LEGACY_FACTS)
        recorded = {**{k: v for k, v in LEGACY_FACTS.items() if k in now_id}, **state["identity"]}
        differs = sorted(k for k in recorded if recorded[k] != now_id.get(k))
        if differs:
            detail = ", ".join(f"{key} {_recorded_as(state['identity'], key, recorded)} -> {now_id.get(key)!r}"
                               for key in differs)
            raise ValueError(f"resume state in {directory} was trained for something else ({detail}): {fix}")
    _check_steps(directory, state, config)
    _check_settings(directory, saved, config, fix)


def check_resume_settings(directory: Path, config: TuneConfig) -> None:
    """The part of :func:`check_resume_config` that needs nothing built: ``config`` against the saved settings
    (``steps`` aside), so that a clash is refused before a base loads."""
    state = _read_state_json(directory)
    _check_settings(directory, state.get("config"), config, RESUME_FIX)


def check_resume_plan(directory: Path, config: TuneConfig) -> None:
    """:func:`check_resume_settings`, and ``config.steps`` not below what the state has already trained: all that
    can be checked of a planned run against its resume state with nothing built (a demo re-run, the grid lending
    an original adapter)."""
    check_resume_settings(directory, config)
    _check_steps(directory, _read_state_json(directory), config)


def check_resume_steps(directory: Path, config: TuneConfig) -> None:
    """``config.steps`` not below what the resume state in ``directory`` has already trained (needs nothing built;
    holds for an inherited LoRA too, whose other settings come from its source)."""
    _check_steps(directory, _read_state_json(directory), config)


def _check_steps(directory: Path, state: dict, config: TuneConfig) -> None:
    if state.get("step", 0) > config.steps:  # the loop would not run: the longer run would come back unchanged
        raise ValueError(f"resume state in {directory} has already trained {state['step']} steps, more than the "
                         f"{config.steps} asked for: ask for at least {state['step']} steps (steps may only grow), "
                         f"or {RESUME_FIX}")


def _check_settings(directory: Path, saved: dict | None, config: TuneConfig, fix: str) -> None:
    if saved is None:  # written before configs were recorded
        return
    changed = settings_changes(saved, config)
    if changed:
        raise ValueError(f"resume state in {directory} was written with other settings ({', '.join(changed)}): {fix}")


def settings_changes(saved: dict, config: TuneConfig, ignore: Sequence[str] = ("steps",)) -> list[str]:
    """``"key saved -> now"`` for every setting of ``config`` that differs from the ``saved`` dict (a recorded
    ``TuneConfig``), in key order, leaving out ``ignore`` (``steps`` may grow on a resume)."""
    now = json.loads(json.dumps(config.to_dict()))  # as it is recorded: tuples read back as lists
    return [f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if key not in ignore and saved.get(key) != now.get(key)]


def load_resume_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_resume_state` wrote; returns its JSON part (``step`` etc.).

    Extending a run (more ``steps`` than it was saved with) is never identical to having trained straight to the
    longer length: the warm-up and cosine schedule are laid out for the new length, so the learning rate jumps
    at the resumed step (e.g. from 0.127x at step 9 of 10 to 0.55x at step 10 of 200). A state saved without
    optimizer moments (a finished run, see ``keep_optimizer_state``) also restores the weights only: AdamW then
    starts its moments afresh.
    """
    # a truncated file (a full disk, a copy cut short) raised safetensors' bare error, which names no file
    tensors = read_safetensors(directory / "state.safetensors", _resume_remedy(directory), ValueError)
    params = _trainable(model)
    mismatched = []
    for name, p in params.items():
        saved = tensors.get(f"param/{name}")
        if saved is None:
            mismatched.append(f"{name}: not saved")
        elif saved.shape != p.shape:
            mismatched.append(f"{name}: saved {tuple(saved.shape)}, now {tuple(p.shape)}")
    if mismatched:
        raise ValueError(f"resume state in {directory} was written by a different setup ({mismatched[0]}): delete "
                         "it or use a new output directory")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    for name, p in params.items():
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            value = tensors.get(f"optim/{name}/{key}")
            if value is not None:
                state[key] = value.reshape(()) if key == "step" else value.to(p.device)
        if state:
            optimizer.state[p] = state
    return _read_state_json(directory)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
               per: float | None = None) -> torch.Tensor:
    """Mean squared error of last hidden states ``[B, T, d]`` over the positions where ``mask`` is 1; ``per``:
    divide by this many positions (times ``d``) instead of the batch's own (a process's share of a split batch)."""
    diff = (student_hidden.float() - teacher_hidden.float()) ** 2
    weights = mask.unsqueeze(-1).to(diff.dtype)
    positions = weights.sum() if per is None else torch.tensor(float(per), device=diff.device)
    return (diff * weights).sum() / (positions * diff.shape[-1]).clamp(min=1)


@contextlib.contextmanager
def callers_state_kept(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block, then restore the global torch random state (CPU, and ``device``'s when it is a GPU) and the
    training flag of every module of ``model``: a training loop reseeds and switches to train mode."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), training_flags_kept(model):
        yield


def train_classifier(model: nn.Module, tokenizer, train_examples, val_examples, *, labels: Sequence[str],
                     template, verbalizer, config: TuneConfig, out_dir: str | Path,
                     save_best: Callable[[Path, dict], None], teacher: nn.Module | None = None,
                     identity: dict | None = None, progress: bool = True,
                     keep_optimizer_state: bool = False) -> TuneResult:
    """Train the trainable parameters of ``model`` on a classification task.

    Trainable means ``requires_grad``: a peft LoRA model's adapters, and recovery modules when they are
    attached to the model (see :mod:`cpet.recovery`), so resume state covers both.

    Args:
        model: a causal LM whose trainable parameters (``requires_grad``) are the ones to train.
        train_examples / val_examples: sequences of objects with ``.text`` and ``.label``.
        labels: the task's label strings; ``verbalizer.label_words[label]`` is the word trained/scored.
        save_best: called as ``save_best(directory, metrics)`` to write the best model so far into a
            temporary directory that is then renamed to ``out_dir/adapter`` (atomic).
        teacher: if given with ``config.distill_weight > 0``, its last hidden states are the MSE target.
        identity: JSON-able facts of what this run is for; saved with the resume state, and a resume
            whose facts differ is refused (see :func:`check_resume_config`).
        keep_optimizer_state: keep the AdamW moments in ``out_dir/resume`` after the last step too. By
            default the finished run's state keeps the weights and the loop position only (the moments are
            twice the size of the weights), which still reports the run and lets ``steps`` grow later.
    Returns:
        :class:`TuneResult` with the best validation accuracy and the learning curve.
    Raises:
        ValueError: an empty training or validation split, labels without a verbalizer word, or training or
            validation labels outside ``labels``.
    """
    from accelerate import Accelerator

    if not train_examples:
        raise ValueError("the training split is empty: nothing to tune on")
    if not val_examples:
        raise ValueError("the validation split is empty: it is needed to select the best checkpoint")
    missing = [label for label in labels if label not in verbalizer.label_words]
    if missing:
        raise ValueError(f"labels {missing} have no verbalizer word")
    unknown = sorted({e.label for e in train_examples} - set(labels))
    if unknown:
        raise ValueError(f"training labels {unknown} are not among the task labels {list(labels)}")
    val = list(val_examples)[: config.eval_limit] if config.eval_limit else list(val_examples)
    # scoring refuses them too, but without a step-0 evaluation only after eval_every steps of training
    unknown = sorted({e.label for e in val} - set(labels))
    if unknown:
        raise ValueError(f"validation labels {unknown} are not among the task labels {list(labels)}")

    check_labelled_prompt_length(model, label_token_ids(tokenizer, [verbalizer.label_words[label] for label in labels]),
                                 config.max_prompt_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_dir = out_dir / "resume"
    if (resume_dir / "state.json").exists():
        check_resume_config(resume_dir, config, identity)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_example(tokenizer, fit_prompt(template, e.text, tokenizer, config.max_prompt_tokens),
                              verbalizer.label_words[e.label],
                              config.max_prompt_tokens) for e in train_examples]

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if config.batch_size % accelerator.num_processes:
        # gradients are averaged over processes with equal weight: unequal shares would weigh examples unequally
        raise ValueError(f"batch_size {config.batch_size} does not split evenly over the {accelerator.num_processes} "
                         "processes that share each batch: use a multiple of the process count")
    params = list(_trainable(model).values())
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()

    start_step, best, history, running = 0, {"accuracy": -1.0, "step": -1}, [], []
    if (resume_dir / "state.json").exists():
        state = load_resume_state(resume_dir, accelerator.unwrap_model(model), optimizer)
        start_step, best, history = state["step"], state["best"], state["history"]
        # the losses the next reported train_loss averages over began before the save (a last evaluation off the
        # eval_every grid reaches back past it); states from before they were saved report fewer
        running = list(state.get("recent_losses", []))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + start_step, config))

    def evaluate_now(step: int, loss: float | None) -> None:
        nonlocal best
        unwrapped = accelerator.unwrap_model(model)
        result = classification_accuracy(unwrapped, tokenizer, [e.text for e in val], [e.label for e in val],
                                         template=template, verbalizer=verbalizer, labels=labels,
                                         max_prompt_tokens=config.max_prompt_tokens)
        history.append({"step": step, "val_accuracy": result.accuracy, "train_loss": loss})
        if result.accuracy > best["accuracy"]:  # every process tracks it: each returns the same result
            best = {"accuracy": result.accuracy, "step": step}
            if accelerator.is_main_process:
                with atomic_path(out_dir / "adapter") as tmp:
                    save_best(tmp, {"val_accuracy": result.accuracy, "step": step, "history": history})
        accelerator.wait_for_everyone()  # no process reads a checkpoint the main one is still writing

    if start_step == 0 and config.eval_at_start:  # the initialisation itself may be the best (inheritance)
        evaluate_now(0, None)
    bar = tqdm(range(start_step, config.steps), desc="tune", disable=not progress, initial=start_step,
               total=config.steps)
    # the loop seeds every step's dropout masks and trains in train mode: the caller gets back its own random
    # stream and training flags (a model handed over in eval mode does not come back dropping out)
    with callers_state_kept(model, accelerator.device):
        model.train()
        for step in bar:
            torch.manual_seed(hash((config.seed, step)) % (2**31))  # dropout masks: a function of (seed, step)
            whole = batch_indices(len(encoded), config.batch_size, step, config.seed)
            idx = whole[accelerator.process_index::accelerator.num_processes]  # each GPU its share of the batch
            batch = {k: v.to(accelerator.device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
            # Split over processes, each share's sum is divided by the whole batch's count over the process count: DDP's
            # mean of the gradients is then the whole batch's token mean. (Each share's own mean weighed a share of
            # fewer label tokens or shorter prompts up, so two processes stepped otherwise than one.) One process:
            # the plain means.
            shares = accelerator.num_processes
            label_count = sum(label_tokens(encoded[i]) for i in whole) / shares if shares > 1 else None
            position_count = sum(len(encoded[i][0]) for i in whole) / shares if shares > 1 else None
            want_hidden = teacher is not None and config.distill_weight > 0
            loss, out = label_token_loss(model, batch, per=label_count, output_hidden_states=want_hidden)
            if want_hidden:
                with torch.no_grad():
                    target = teacher_outputs(teacher, input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).hidden_states[-1]
                loss = loss + config.distill_weight * hidden_mse(out.hidden_states[-1], target,
                                                                 batch["attention_mask"], per=position_count)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(accelerator.reduce(loss.detach(), "mean").item())  # the whole batch's loss, same everywhere
            bar.set_postfix(loss=f"{sum(running[-20:]) / len(running[-20:]):.3f}")
            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                evaluate_now(done, sum(running[-config.eval_every:]) / len(running[-config.eval_every:]))
                model.train()
                if accelerator.is_main_process:
                    save_resume_state(resume_dir, accelerator.unwrap_model(model), optimizer, done,
                                      {"best": best, "history": history, "config": config.to_dict(),
                                       "identity": identity, "recent_losses": running[-config.eval_every:]},
                                      with_optimizer=keep_optimizer_state or done < config.steps)
                accelerator.wait_for_everyone()
    return TuneResult(best["accuracy"], best["step"], history, str(out_dir / "adapter"))


# --------------------------------------------------------------------------------------------------
# Distillation on plain text (task-agnostic recovery)
# --------------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """Hyper-parameters of task-agnostic recovery distillation on calibration text.

    Attributes:
        steps: optimizer steps.
        batch_size: windows per step.
        seq_len: tokens per window.
        lr: AdamW learning rate (warm-up then cosine, as for tuning).
        kl_weight: weight of KL(teacher || student) on next-token distributions.
        mse_weight: weight of the last-hidden-state MSE.
        seed: seeds window sampling (the distillation windows, and those that weigh the SVD start by activation).
    """

    steps: int = 120
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    kl_weight: float = 1.0
    mse_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.seq_len) < 1:
            raise ValueError("steps, batch_size and seq_len must be >= 1")
        if not 0 < self.lr < math.inf:  # also refuses nan
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if min(self.kl_weight, self.mse_weight) < 0 or self.kl_weight + self.mse_weight == 0:
            raise ValueError(f"kl_weight and mse_weight must be >= 0 and not both 0, got {self.kl_weight} and "
                             f"{self.mse_weight}")

    # lr_factor reads these two
    @property
    def warmup(self) -> int:
        return max(self.steps // 10, 1)


def text_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of the tokenised text (raises if there is not one)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def teacher_outputs(teacher: nn.Module, **inputs: torch.Tensor):
    """The teacher's output (logits and hidden states) on ``inputs``, computed on the teacher's own device and
    returned on the inputs' device: the original model may sit on a GPU while the compressed student is read
    onto the CPU, or the other way round."""
    device = next(iter(inputs.values())).device
    teacher_device = next(teacher.parameters()).device
    out = teacher(**{k: v.to(teacher_device) for k, v in inputs.items()}, output_hidden_states=True)
    if teacher_device != device:
        out.logits = out.logits.to(device)
        out.hidden_states = tuple(h.to(device) for h in out.hidden_states)
    return out


def distillation_loss(student_out, teacher_out, kl_weight: float, mse_weight: float) -> torch.Tensor:
    """``kl_weight * KL(teacher || student)`` per token + ``mse_weight * MSE(last hidden states)``."""
    s_logp = torch.log_softmax(student_out.logits.float(), dim=-1)
    t_logp = torch.log_softmax(teacher_out.logits.float(), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    mse = torch.mean((student_out.hidden_states[-1].float() - teacher_out.hidden_states[-1].float()) ** 2)
    return kl_weight * kl + mse_weight * mse


def check_distill_window(model: nn.Module, config: DistillConfig) -> None:
    """Refuse distillation windows past the model's context (:func:`cpet.models.check_context_length`)."""
    check_context_length(model, config.seq_len, "the distillation window (seq_len)",
                         "lower seq_len (cpet recover --seq-len)")


def distill_on_text(student: nn.Module, teacher: nn.Module, tokenizer, text: str, config: DistillConfig, *,
                    progress: bool = True, after_step: Callable[[int], None] | None = None) -> list[float]:
    """Train the student's trainable parameters to match the teacher on windows of ``text``.

    Returns the loss of every step. The teacher runs without gradients. ``after_step(done)`` is called
    after each optimizer step with the number of steps done (e.g. to save checkpoints).
    """
    check_distill_window(student, config)
    windows = text_windows(tokenizer, text, config.seq_len)
    params = list(_trainable(student).values())
    if not params:
        raise ValueError("the student has no trainable parameters (attach recovery modules first)")
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    device = next(student.parameters()).device
    teacher.eval()
    student.train()
    losses = []
    for step in tqdm(range(config.steps), desc="distill", disable=not progress):
        idx = batch_indices(len(windows), config.batch_size, step, config.seed)
        batch = windows[idx].to(device)
        with torch.no_grad():
            target = teacher_outputs(teacher, input_ids=batch)
        out = student(input_ids=batch, output_hidden_states=True)
        loss = distillation_loss(out, target, config.kl_weight, config.mse_weight)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if after_step is not None:
            student.eval()
            after_step(step + 1)
            student.train()
    student.eval()
    return losses
