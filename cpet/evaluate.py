"""Evaluation: perplexity, classification accuracy by label log-probability, size, FLOPs, throughput.

All functions take a transformers causal LM (or a peft wrapper of one) and its tokenizer, run under
``torch.no_grad`` in eval mode, and restore the model's training flag afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data.prompts import PROMPT_CUT, fit_prompt
from .models import check_context_length, unwrap

# Prompts are cut to this many tokens unless told otherwise (the text loses its end, the template nothing:
# cpet.data.prompts.fit_prompt); an adapter records the value it was trained with
# (``TuneConfig.max_prompt_tokens``) and is always scored with that value.
DEFAULT_MAX_PROMPT_TOKENS = 128


@contextlib.contextmanager
def training_flags_kept(model: nn.Module) -> Iterator[None]:
    """Run the block, then give every module of ``model`` back its own training flag (not ``model.train(flag)``,
    which would also flip submodules the caller kept in another mode, such as a frozen base in eval mode under a
    model in train mode)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; every module's previous training flag is restored afterwards."""
    with training_flags_kept(model), torch.no_grad():
        model.eval()
        yield


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity = exp(nll / tokens) over the scored tokens.

    ``read_tokens`` is how many tokens of the text were read; the first token of each non-overlapping
    window has no context and is not scored, so ``tokens`` can be smaller (510 of 512 in two windows).
    """

    ppl: float
    nll: float
    tokens: int
    read_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def strided_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_scored)`` covering ``num_tokens`` tokens.

    Each window is at most ``max_length`` long and starts ``stride`` after the previous one; only the
    positions ``first_scored..end-1`` not scored by an earlier window are scored, and never a window's
    first position (it has no context). With ``stride < max_length`` every token but the very first is
    scored exactly once, with ``max_length - stride`` tokens of extra context; with ``stride == max_length``
    the windows are disjoint and each window's first token goes unscored.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length={max_length}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, max(num_tokens - 1, 1), stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def perplexity(model: nn.Module, tokenizer, text: str, *, max_length: int = 256, stride: int = 256,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with strided windows (see :func:`strided_windows`).

    Args:
        text: the corpus; tokenised without special tokens.
        max_length: window length in tokens.
        stride: step between window starts; ``stride < max_length`` gives every scored token more context.
        max_tokens: score only the first ``max_tokens`` tokens of the text (None = all).
    Raises:
        ValueError: empty text, fewer than two tokens, a window shorter than 2 or a stride below 1.
    """
    if max_length < 2 or stride < 1:  # a 1-token window predicts nothing: no token would be scored
        raise ValueError(f"perplexity needs max_length >= 2 and stride >= 1, got {max_length} and {stride}")
    if not text or not text.strip():
        raise ValueError("cannot compute perplexity on an empty corpus")
    check_context_length(model, max_length, "the perplexity window (max_length)",
                         "lower max_length (cpet eval --max-length)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the corpus has {len(ids)} token(s); perplexity needs at least 2")
    ids_t = torch.tensor(ids, dtype=torch.long)
    windows = strided_windows(len(ids), max_length, stride)
    device = model_device(model)
    nll, scored = 0.0, 0
    with evaluating(model):
        batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
            width = max(end - begin for begin, end, _ in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            labels = torch.full_like(input_ids, -100)
            for row, (begin, end, first) in enumerate(batch):
                n = end - begin
                input_ids[row, :n] = ids_t[begin:end]
                attention[row, :n] = 1
                labels[row, first - begin:n] = ids_t[first:end]
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            # position t predicts token t+1
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = labels[:, 1:].to(device)
            mask = target != -100
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll -= picked[mask].sum().item()
            scored += int(mask.sum())
    return PerplexityResult(ppl=math.exp(nll / scored), nll=nll, tokens=scored, read_tokens=len(ids))


# --------------------------------------------------------------------------------------------------
# Classification by label log-probability
# --------------------------------------------------------------------------------------------------


def encode_prompt_and_label(tokenizer, prompt: str, label_word: str,
                            max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
                            ) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (left-truncated to ``max_prompt_tokens``) and of ``label_word``.

    Callers fit the prompt first (:func:`cpet.data.prompts.fit_prompt`), so the left truncation cuts only a
    template too long for the limit on its own.

    Prompt and label are tokenised separately so that the label's tokens are the same for every prompt;
    training (loss on the label tokens) and scoring use this same encoding.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    label_ids = tokenizer(label_word, add_special_tokens=False)["input_ids"]
    if not label_ids:
        raise ValueError(f"label word {label_word!r} tokenises to nothing")
    return prompt_ids, label_ids


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[list[int]]:
    """The token ids of each label word, tokenised alone (as training and scoring encode them)."""
    return [encode_prompt_and_label(tokenizer, "", w)[1] for w in label_words]


def check_labelled_prompt_length(model: nn.Module, label_ids: Sequence[list[int]], max_prompt_tokens: int) -> None:
    """Refuse a ``max_prompt_tokens`` whose prompts, followed by the longest label word (``label_ids``, from
    :func:`label_token_ids`), would pass the model's context (:func:`cpet.models.check_context_length`): training
    reads prompt + label, scoring prompt (+ label)."""
    longest_label = max(len(ids) for ids in label_ids)
    check_context_length(model, max_prompt_tokens + longest_label,
                         f"a prompt of max_prompt_tokens={max_prompt_tokens} followed by its longest label word "
                         f"({longest_label} tokens)", "lower max_prompt_tokens (--max-prompt-tokens)",
                         reserved=longest_label)


def label_sequences(prompt_ids: list[int], label_ids: list[list[int]]) -> list[tuple[list[int], int, list[int]]]:
    """The sequences that score every label after one prompt, as ``(ids, label column, label ids)``.

    When every label word is one token, one sequence (the prompt; column -1) scores all labels at once;
    otherwise one sequence per label (prompt + label tokens), its log-probability the sum over its tokens.
    """
    if all(len(ids) == 1 for ids in label_ids):
        return [(prompt_ids, -1, [])]
    return [(prompt_ids + ids, col, ids) for col, ids in enumerate(label_ids)]


def scored_positions(ids: list[int], col: int, lab: list[int]) -> list[int]:
    """The positions of a :func:`label_sequences` sequence whose next-token log-probabilities score it: the last
    (column -1: every single-token label), or the positions that predict its own label's tokens."""
    if col < 0:
        return [len(ids) - 1]
    return list(range(len(ids) - len(lab) - 1, len(ids) - 1))


def store_sequence_score(row_scores: torch.Tensor, logp: torch.Tensor, ids: list[int], col: int, lab: list[int],
                         label_ids: list[list[int]], where: dict[int, int]) -> None:
    """Write what a sequence of :func:`label_sequences` scores into its prompt's ``row_scores [labels]``, from the
    sequence's log-probabilities ``logp [K, vocab]`` at the kept positions (``where`` maps a position to its row
    of ``logp``, :func:`logits_at`): every label's log-probability (column -1), or its own label's, summed over
    the label's tokens, in column ``col``."""
    rows = [where[p] for p in scored_positions(ids, col, lab)]
    if col < 0:
        row_scores[:] = logp[rows[0], torch.tensor([w[0] for w in label_ids])]
    else:
        row_scores[col] = logp[torch.tensor(rows), torch.tensor(lab)].sum()


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes transformers' ``logits_to_keep``."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


@dataclass
class PositionLogits:
    """Logits at some positions of a forward pass: ``logits [B, K, vocab]`` at the K distinct positions,
    ``where`` maps each position to its index in K, ``outputs`` is the model's output (hidden states etc.)."""

    logits: torch.Tensor
    where: dict[int, int]
    outputs: object


def logits_at(model: nn.Module, positions, *, forward=None, **model_inputs) -> PositionLogits:
    """One forward pass of ``model`` (through ``forward(**model_inputs)`` when given: a wrapper that calls it, as
    the serving engine's per-row adapters do) with the LM head computed at ``positions`` only (any order, repeats
    allowed).

    Scoring and training read the next-token distribution at a few positions per row (a label after its
    prompt), yet a causal LM computes and normalises logits at every position: on SmolLM2-135M (vocabulary 49,152,
    21% of its multiply-adds in the LM head) batches of 8 vader-product prompts of up to 64 tokens train 1.17-1.21x
    and score 1.19-1.23x faster on one CPU thread with the head at the needed positions (``scripts/bench_label_logits.py``,
    README "Measured here"). transformers' ``logits_to_keep`` takes a 1-D
    tensor of positions, shared by every row of the batch, so the head runs at the union of the rows' positions
    (at most a few per row). A model whose forward does not take it computes every position and the needed ones
    are picked from them.
    """
    kept = sorted(set(int(p) for p in positions))
    where = {p: k for k, p in enumerate(kept)}
    inputs = model_inputs.get("input_ids")
    device = (inputs if inputs is not None else model_inputs["inputs_embeds"]).device
    index = torch.tensor(kept, dtype=torch.long, device=device)
    forward = forward or model
    if takes_logits_to_keep(model):
        outputs = forward(**model_inputs, logits_to_keep=index)
        return PositionLogits(outputs.logits, where, outputs)
    outputs = forward(**model_inputs)
    return PositionLogits(outputs.logits.index_select(1, index), where, outputs)


def padded(sequences: Sequence[list[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``[len(sequences), longest]``: the sequences padded with ``pad`` on
    the right (scoring: positions stay 0-based), or on the left (generation: every row ends at the last column)."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids)
        attention[i, span] = 1
    return input_ids, attention


def label_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], label_words: Sequence[str], *,
                   batch_size: int = 8, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                   progress: bool = False) -> torch.Tensor:
    """Log-probability of each label word after each prompt: a float tensor ``[len(prompts), len(labels)]``.

    Multi-token label words are scored as the sum of their tokens' log-probabilities. When every label
    word is one token, one forward pass per prompt scores all labels at once (:func:`label_sequences`).
    Sequences are batched shortest first, so that a batch pads its rows to a length near their own (scores do
    not depend on the order up to float rounding: each row is scored at its own positions, padding masked; on
    SmolLM2 in fp32 the scores moved by at most 1.5e-5 against batches in input order).
    """
    label_ids = label_token_ids(tokenizer, label_words)
    check_labelled_prompt_length(model, label_ids, max_prompt_tokens)
    device = model_device(model)
    sequences: list[tuple[list[int], int, int, list[int]]] = []  # ids, prompt row, label column, label ids
    for row, prompt in enumerate(prompts):
        prompt_ids = encode_prompt_and_label(tokenizer, prompt, label_words[0], max_prompt_tokens)[0]
        sequences += [(ids, row, col, lab) for ids, col, lab in label_sequences(prompt_ids, label_ids)]
    scores = torch.zeros(len(prompts), len(label_words))
    pad = tokenizer.pad_token_id or 0
    # by length: VADER prompts cut at 128 tokens run from a few tokens to 128, and a batch of rows in input order
    # pads every row to its longest
    sequences.sort(key=lambda sequence: len(sequence[0]))
    unscored = Counter(row for _ids, row, _col, _lab in sequences)  # a prompt is done when all its sequences are
    with evaluating(model):
        bar = tqdm(total=len(prompts), desc="scoring", unit="example", disable=not progress, leave=False)
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            input_ids, attention = padded([ids for ids, *_rest in chunk], pad)
            needed = [p for ids, _row, col, lab in chunk for p in scored_positions(ids, col, lab)]
            at = logits_at(model, needed, input_ids=input_ids.to(device), attention_mask=attention.to(device))
            logp = torch.log_softmax(at.logits.float(), dim=-1).cpu()
            for i, (ids, row, col, lab) in enumerate(chunk):
                store_sequence_score(scores[row], logp[i], ids, col, lab, label_ids, at.where)
            unscored.subtract(row for _ids, row, _col, _lab in chunk)
            bar.update(len({row for _ids, row, _col, _lab in chunk if unscored[row] == 0}))  # examples, not batches
    bar.close()
    return scores


@dataclass(frozen=True)
class AccuracyResult:
    """Accuracy of argmax-label predictions, with per-label recall."""

    accuracy: float
    n: int
    per_label_recall: dict[str, float]
    predictions: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("predictions")
        return out


def classification_accuracy(model: nn.Module, tokenizer, texts: Sequence[str], gold: Sequence[str], *,
                            template, verbalizer, labels: Sequence[str], batch_size: int = 8,
                            max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, prompt_cut: str = PROMPT_CUT,
                            progress: bool = False) -> AccuracyResult:
    """Accuracy of predicting ``argmax_label log p(verbalizer[label] | template(text))``.

    Prompts are fitted to ``max_prompt_tokens`` (:func:`cpet.data.prompts.fit_prompt`: the text loses its end, or
    with ``prompt_cut="left"`` the prompt its start): pass the values an adapter was trained with.

    ``template`` has ``format(text) -> str``; ``verbalizer.label_words`` maps each label to its word.
    """
    if not texts:
        raise ValueError("cannot evaluate accuracy on zero examples")
    if len(gold) != len(texts):  # zip would drop the extra texts, or the recall fail after all the scoring
        raise ValueError(f"{len(texts)} texts but {len(gold)} gold labels: give one gold label per text")
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise ValueError(f"gold labels {unknown} are not among the task labels {list(labels)}")
    words = [verbalizer.label_words[label] for label in labels]
    prompts = [fit_prompt(template, text, tokenizer, max_prompt_tokens, prompt_cut) for text in texts]
    scores = label_logprobs(model, tokenizer, prompts, words, batch_size=batch_size,
                            max_prompt_tokens=max_prompt_tokens, progress=progress)
    predicted = [labels[i] for i in scores.argmax(dim=-1).tolist()]
    correct = sum(p == g for p, g in zip(predicted, gold))
    recall = {}
    for label in labels:
        idx = [i for i, g in enumerate(gold) if g == label]
        if idx:
            recall[label] = sum(predicted[i] == label for i in idx) / len(idx)
    return AccuracyResult(correct / len(gold), len(gold), recall, tuple(predicted))


# --------------------------------------------------------------------------------------------------
# Size and cost
# --------------------------------------------------------------------------------------------------


def _logical_numel(param: torch.Tensor) -> int:
    # bitsandbytes 4-bit parameters store two values per byte; their quant_state keeps the real shape.
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return param.numel()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (logical) parameters; shared tensors such as tied embeddings count once."""
    seen, total = set(), 0
    for param in model.parameters():
        if trainable_only and not param.requires_grad:
            continue
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total += _logical_numel(param)
    return total


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's tensors (parameters, buffers and quantization state), each counted once."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def disk_bytes(path: str | Path) -> int:
    """Total size of the files under ``path`` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def flops_per_token(model: nn.Module, context: int = 128) -> float:
    """Forward FLOPs per token at ``context`` tokens of context.

    2 FLOPs per weight of every linear layer (including ``lm_head``; embeddings are lookups) plus
    attention scores and mixing: ``2 * 2 * layers * context * heads * head_dim``. A MoEfied FFN counts its
    router in full and its experts times the share of experts it ran (:meth:`~cpet.moe.MoEFFN.expert_share`).
    """
    from .compress.quantized_embeddings import TiedQuantizedHead
    from .models import geometry
    from .moe import ExpertBank, MoEFFN

    experts = {id(m) for bank in model.modules() if isinstance(bank, ExpertBank) for m in bank.experts}
    linear = sum(m.in_features * m.out_features for m in model.modules()  # a tied quantized head is a matmul too
                 if isinstance(m, (nn.Linear, TiedQuantizedHead)) and id(m) not in experts)
    for block in (m for m in model.modules() if isinstance(m, MoEFFN)):
        banks = [bank for bank in block.modules() if isinstance(bank, ExpertBank)]
        linear += block.expert_share() * sum(bank.in_features * bank.out_features for bank in banks)
    geo = geometry(model)
    attention = 2 * 2 * geo.num_layers * context * geo.num_heads * geo.head_dim
    return float(2 * linear + attention)


# --------------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputResult:
    """Tokens per second for prefill (prompt processing) and greedy decoding with a KV cache."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    batch_size: int
    prompt_len: int
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def throughput(model: nn.Module, tokenizer=None, *, batch_size: int = 8, prompt_len: int = 128,
               new_tokens: int = 32, repeats: int = 1, seed: int = 0,
               last_logits_only: bool = False) -> ThroughputResult:
    """Measure prefill and decode speed on random token ids (best of ``repeats`` after one warm-up).

    Decoding feeds the greedy token back one step at a time with the model's KV cache, so decode speed is
    ``batch_size * new_tokens / seconds`` for the decode steps alone. ``last_logits_only``: the prefill
    computes the LM head for the last position only (``logits_to_keep=1``), as transformers' ``generate``
    does; by default it computes logits for every prompt position (as a plain forward pass does; CPET's scoring
    and training compute them at the label positions only, :func:`logits_at`).
    """
    prefill_kwargs = {}
    if last_logits_only:
        if not takes_logits_to_keep(model):
            raise ValueError(f"{type(unwrap(model)).__name__}.forward takes no logits_to_keep: time its "
                             "prefill with last_logits_only=False")
        prefill_kwargs["logits_to_keep"] = 1
    device = model_device(model)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    from .models import cache_argument, output_cache

    cache_key = cache_argument(model)
    best_prefill, best_decode = math.inf, math.inf
    with evaluating(model):
        model(input_ids=ids[:, :8])  # warm-up
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **prefill_kwargs)
            sync()
            best_prefill = min(best_prefill, time.perf_counter() - start)
            cache = output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_key: cache})
                cache = output_cache(out)
                token = out.logits[:, -1:].argmax(-1)
            sync()
            best_decode = min(best_decode, time.perf_counter() - start)
    return ThroughputResult(batch_size * prompt_len / best_prefill, batch_size * new_tokens / best_decode,
                            batch_size, prompt_len, new_tokens)
