"""The serving engine: one compressed base, many task adapters, mixed in one batch.

Every mapped linear of the base carries one forward hook. A batch runs the base once (each base linear once
per layer per step, whatever the adapters in it); the hook then adds, row by row, what that row's adapter
adds to the linear: its LoRA and its per-task recovery, computed for each distinct adapter on the rows that
use it (a segmented matmul: rows grouped by adapter), and the base's shared recovery, computed once for the
whole batch and added only to the rows whose adapter was trained with it. Rows without an adapter get the
bare base. What a row runs is its adapter's :class:`~cpet.assembly.Assembly` (:meth:`Engine.assembly`), the one
description evaluation and export read too. :meth:`Engine.reference_logits` computes the same thing the plain
way (one adapter at a time, each factor on its own rows) for tests. :meth:`Engine.view` is one adapter on the
engine as a model (what :meth:`cpet.pipeline.CPET.evaluate` scores); :meth:`Engine.close` removes the hooks.

On a MoEfied base the FFN's expert banks are called per expert, not through ``forward``: there the same
per-row deltas are registered as the banks' routed paths (:meth:`~cpet.moe.experts.ExpertBank.add_routed_path`),
which know the batch rows of the tokens routed to each expert; each expert reads its slice of the factors.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..assembly import AdapterSource, Assembly, LoadedAdapter, LowRank, read_recovery, reordered_modules
from ..models import cache_argument, context_length, iter_layer_linears, output_cache
from ..compress.quantize import is_bnb_layer
from ..recovery import recovery_sha256
from .registry import AdapterRegistry, module_shapes


@dataclass
class _Batch:
    """The adapter of each row of the batch being computed (None: the bare base)."""

    rows: list[LoadedAdapter | None]
    tokens_per_row: int | None = None

    def groups(self) -> list[tuple[LoadedAdapter, torch.Tensor]]:
        """``[(adapter, row indices)]`` for each distinct adapter in the batch, in first-row order."""
        seen: dict[int, tuple[LoadedAdapter, list[int]]] = {}
        for i, adapter in enumerate(self.rows):
            if adapter is not None:
                seen.setdefault(id(adapter), (adapter, []))[1].append(i)
        return [(adapter, torch.tensor(rows)) for adapter, rows in seen.values()]


def _by_row(t: torch.Tensor, batch: _Batch, module: str) -> torch.Tensor:
    """``t`` with the batch's rows on dim 0: ``[rows, ...]`` as most families pass a linear's input, or a flattened
    ``[rows * tokens_per_row, d]`` (OPT's FFN flattens its hidden states before ``fc1``) viewed as
    ``[rows, tokens_per_row, d]``, so that each row's factors reach that row's tokens and no other's.

    Raises:
        RuntimeError: dim 0 is neither the rows nor the rows' tokens (no row could be told apart).
    """
    rows = len(batch.rows)
    if t.shape[0] == rows:
        return t
    if t.dim() == 2 and batch.tokens_per_row is not None and t.shape[0] == rows * batch.tokens_per_row:
        return t.view(rows, batch.tokens_per_row, t.shape[1])
    raise RuntimeError(f"module {module} got input {tuple(t.shape)} for a batch of {rows} rows of "
                       f"{batch.tokens_per_row} tokens: its first dim is neither the rows nor their tokens, so "
                       "per-row adapters cannot be applied; please report the model family")


def _add_as_peft(base_layer: nn.Module, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``out`` (the base linear's output, in the model's dtype) plus ``delta`` (fp32 low-rank deltas), rounded as
    peft rounds a LoRA on that kind of linear, so that serving, evaluation and an export read by plain peft agree
    to the bit in bf16 / fp16 as in fp32: on a plain linear peft adds in fp32 and rounds the sum once; on a
    bitsandbytes linear (``Linear4bit``, ``Linear8bitLt``) it rounds the delta to the output's dtype first and
    adds in that dtype. (Rounding twice on a plain bf16 linear put serving 0.05 off evaluation on a tiny model's
    logits; rounding once on an nf4 bf16 base put it a bf16 step off the export, and an int8 fp16 base 0.08 off,
    as LLM.int8 re-quantizes the activations that differ, and every such export failed its check.)"""
    if out.dtype != torch.float32 and is_bnb_layer(base_layer):
        return out + delta.to(out.dtype)
    return (out.to(delta.dtype) + delta).to(out.dtype)


class Engine:
    """A compressed base with hooks that apply per-row adapters (see the module docstring).

    Args:
        model: the causal LM (a compressed base, or an original model; frozen, eval mode); its linears get the
            hooks until :meth:`close`.
        base_id: the base's id (adapters are checked against it).
        shared_recovery: directory of the base's shared recovery set, or None.
        capacity, root: the registry's (see :class:`~cpet.serve.registry.AdapterRegistry`).
    """

    def __init__(self, model: nn.Module, base_id: str, tokenizer=None, *, shared_recovery: str | Path | None = None,
                 capacity: int = 64, root: str | Path | None = None):
        from ..moe.experts import bank_of

        self.model, self.base_id, self.tokenizer = model.eval(), base_id, tokenizer
        shapes = module_shapes(model)
        # every factor on the base's device: the shared path and the expert banks multiply by them as they are;
        # copied off the file it was read from (a recovery copied over it in place would change the served one)
        device = next(model.parameters()).device
        self.shared = ({name: factor.owned(device) for name, factor in
                        read_recovery(Path(shared_recovery), shapes, base_id=base_id).items()}
                       if shared_recovery is not None else {})
        self.registry = AdapterRegistry(shapes, base_id, capacity=capacity, root=root, device=device,
                                        has_shared_recovery=bool(self.shared),
                                        shared_recovery_sha256=(recovery_sha256(shared_recovery)
                                                                if shared_recovery is not None else None),
                                        reordered=reordered_modules(model))
        self._batch: _Batch | None = None
        self._lock = threading.Lock()  # one batch through the hooks at a time
        self._cache_key = cache_argument(model)
        self.fast = True  # stacked batched matmuls; False: the plain per-adapter loop (the reference)
        self._stacks: dict[str, tuple] = {}
        self.base_calls = 0  # base-linear forward calls (checks: one per linear per step, whatever the adapters)
        self._handles = []
        self.closed = False
        for layer in iter_layer_linears(model):
            for role, name in layer.names.items():
                bank = bank_of(layer[role])
                if bank is None:
                    self._handles.append(layer[role].register_forward_hook(self._hook(name)))
                else:
                    self._handles.append(bank.add_routed_path(self._routed(name, bank)))

    def close(self) -> None:
        """Remove the hooks: the base computes as it did before the engine (the registry stays readable; running
        the engine or its views afterwards is an error, not a silent bare base)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self, name: str, directory: AdapterSource | str | Path, *, pin: bool = False) -> LoadedAdapter:
        """Read, check and register an adapter directory under ``name`` (see :class:`AdapterRegistry`)."""
        return self.registry.load(name, directory, pin=pin)

    def resolve(self, adapter: "str | LoadedAdapter | None") -> LoadedAdapter | None:
        """The loaded adapter a row runs: ``adapter`` itself when already resolved, the registry's adapter of that
        name (marked recently used; :class:`~cpet.serve.registry.UnknownAdapterError` if none), None for the bare
        base. A resolved adapter keeps working after it is unloaded or evicted: a request that resolved it at
        admission finishes with it."""
        if adapter is None or isinstance(adapter, LoadedAdapter):
            return adapter
        return self.registry.get(adapter)

    def assembly(self, name: str | None) -> Assembly:
        """What a row using adapter ``name`` (None: the bare base) runs: the adapter's factors, plus the shared
        recovery when the adapter was trained with it."""
        return Assembly.of(self.base_id, self.registry.get(name) if name is not None else None, self.shared)

    def view(self, name: str | None | Sequence[str | None]) -> "AdapterView":
        """Adapter ``name`` (None: the bare base) on this engine as a model: ``view(input_ids=...)`` runs every
        row with it; a list of names gives each batch row its own. Nothing is copied; the view works while the
        engine is open."""
        view = AdapterView(self, name)
        for each in view.distinct_names:
            if each is not None:
                self.registry.get(each)  # unknown names fail here, not at the first call
        return view

    @classmethod
    def from_pipeline(cls, directory: str | Path, **kwargs) -> "Engine":
        """The engine of a pipeline directory: its compressed base and, when present, its shared recovery."""
        from ..compress import CompressedBase

        directory = Path(directory)
        base = CompressedBase.load(directory / "base")
        recovery = directory / "recovery"
        return cls(base.model, base.base_id, base.tokenizer,
                   shared_recovery=recovery if (recovery / "recovery.json").exists() else None, **kwargs)

    # ------------------------------------------------------------------ the per-row deltas
    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.base_calls += 1
            batch = self._batch
            if batch is None:
                return output
            x, out = _by_row(inputs[0], batch, name), _by_row(output, batch, name)
            if self.fast and x.dim() == 3:
                delta = self._fast_delta(name, batch, x)
            else:
                delta = torch.zeros(out.shape, dtype=torch.float32, device=out.device)  # the reference: each
                for factor, mask in self._row_factors(name, batch):                     # factor on its rows
                    rows = mask.nonzero(as_tuple=True)[0].to(x.device)
                    delta.index_add_(0, rows, factor(x.index_select(0, rows)).float())
            return _add_as_peft(module, out, delta).view(output.shape)

        return hook

    def _fast_delta(self, name: str, batch: "_Batch", x: torch.Tensor) -> torch.Tensor:
        """Shared recovery once for the whole batch, kept on the rows trained with it, plus every row's own
        factors through the stacked batched matmuls (:meth:`_stacked_delta`)."""
        delta = self._stacked_delta(name, batch, x)
        shared = self.shared.get(name)
        if shared is not None:
            flags = [a is not None and a.shared for a in batch.rows]
            if any(flags):  # asked of the Python list: a tensor's any() waits for the device, at every linear
                users = torch.tensor(flags, device=x.device)
                delta = delta + shared(x) * users.view(-1, *[1] * (x.dim() - 1))
        return delta

    def _row_factors(self, name: str, batch: "_Batch") -> list[tuple[LowRank, torch.Tensor]]:
        """``[(factor, rows using it [rows] bool)]`` of module ``name`` in this batch: shared recovery for the rows
        trained with it, each adapter's LoRA and per-task recovery for its rows."""
        out = []
        shared = self.shared.get(name)
        if shared is not None:
            users = torch.tensor([a is not None and a.shared for a in batch.rows])
            if users.any():
                out.append((shared, users))
        for adapter, rows in batch.groups():
            mask = torch.zeros(len(batch.rows), dtype=torch.bool)
            mask[rows] = True
            out += [(p, mask) for p in (adapter.lora.get(name), adapter.per_task.get(name)) if p is not None]
        return out

    def _routed(self, name: str, bank):
        """The expert-bank path adding each token's row's deltas (see the module docstring)."""
        def path(*args):
            batch = self._batch
            if batch is None or batch.tokens_per_row is None:
                return None
            factors = self._row_factors(name, batch)
            if not factors:
                return None
            if bank.split == "rows":  # (expert, x_e [n, in], tokens_e [n])
                expert, x, tokens = args
                rows = tokens // batch.tokens_per_row
                part = bank.expert_slice(expert)
                delta = None
                for factor, mask in factors:
                    low = x.to(factor.A.dtype) @ factor.A.T
                    low = torch.nn.functional.gelu(low) if factor.gelu else low
                    d = (low @ factor.B[part].T) * factor.scale * mask.to(x.device)[rows].unsqueeze(1)
                    delta = d if delta is None else delta + d
                return delta
            parts, num_tokens = args  # the down bank: accumulate each factor's A over the chosen experts first
            if not parts:
                return None
            token_rows = torch.arange(num_tokens, device=parts[0].values.device) // batch.tokens_per_row
            delta = None
            for factor, mask in factors:
                low = torch.zeros(num_tokens, factor.A.shape[0], dtype=factor.A.dtype, device=token_rows.device)
                for routed in parts:
                    cols = bank.expert_slice(routed.expert)
                    low.index_add_(0, routed.tokens, routed.values.to(factor.A.dtype) @ factor.A[:, cols].T)
                low = low * mask.to(low.device)[token_rows].unsqueeze(1)
                low = torch.nn.functional.gelu(low) if factor.gelu else low
                d = (low @ factor.B.T) * factor.scale
                delta = d if delta is None else delta + d
            return delta

        return path

    def _stacked_delta(self, name: str, batch: "_Batch", x: torch.Tensor) -> torch.Tensor:
        """The fast path: every row's factors gathered into ``[rows, r, in]`` / ``[rows, out, r]`` stacks (ranks
        zero-padded, scales folded into B), then two batched matmuls for LoRA and two for each kind of per-task
        recovery present (GELU or linear), whatever the number of distinct adapters. Stacks are reused while the
        batch's adapters stay the same (every decode step)."""
        key = tuple(id(a) for a in batch.rows)
        stacks = self._stacks.get(name)
        if stacks is None or stacks[0] != key:
            # the entry holds the adapters themselves (stacks[1]): while it lives no id in its key can be reused
            # by a newly loaded adapter, which would otherwise be served another adapter's stacked factors
            per_task = [a.per_task.get(name) if a else None for a in batch.rows]
            stacks = (key, tuple(batch.rows), (
                (_stack([a.lora.get(name) if a else None for a in batch.rows], x), False),
                # per-task recovery is GELU (CA-LoRA's default) or linear, per adapter: one stack of each kind
                (_stack([p if p is not None and p.gelu else None for p in per_task], x), True),
                (_stack([p if p is not None and not p.gelu else None for p in per_task], x), False)))
            self._stacks[name] = stacks
        out = None
        for stacked, gelu in stacks[2]:
            if stacked is None:
                continue
            A, B = stacked
            low = torch.bmm(x.to(A.dtype), A.transpose(1, 2))
            if gelu:
                low = torch.nn.functional.gelu(low)
            part = torch.bmm(low, B.transpose(1, 2))
            out = part if out is None else out + part
        return out if out is not None else x.new_zeros(())

    def release_stacks(self) -> None:
        """Drop the stacked factors kept for the last batch: they hold its adapters and a copy of their factors per
        row, so kept while nothing runs they would keep an unloaded or evicted adapter's memory alive. Called
        when a batch ends (the end of :meth:`classify` and :meth:`generate`; the scheduler once no row runs)."""
        self._stacks.clear()

    @torch.no_grad()
    def forward(self, adapters: Sequence[str | LoadedAdapter | None], **model_inputs):
        """One model call on a batch whose row ``i`` uses adapter ``adapters[i]`` (a name, an adapter already
        resolved by :meth:`resolve`, or None: the bare base)."""
        if self.closed:
            raise RuntimeError("this engine was closed (its hooks are removed): open a new one")
        rows = [self.resolve(adapter) for adapter in adapters]
        ids = model_inputs.get("input_ids")
        ids = ids if ids is not None else model_inputs.get("inputs_embeds")
        with self._lock:
            self._batch = _Batch(rows, ids.shape[1] if ids is not None else None)
            try:
                return self.model(**model_inputs)
            finally:
                self._batch = None

    # ------------------------------------------------------------------ requests
    def end_token_ids(self) -> frozenset[int]:
        """The tokens that end a generation: the model's ``generation_config.eos_token_id`` (one id or a list, as
        Llama 3's ``[<|end_of_text|>, <|eot_id|>]``; the config's when the model has no generation config) and the
        tokenizer's EOS, as transformers' ``generate`` stops. Only the tokenizer's EOS once ended a generation, and
        a chat model then wrote on past its end-of-turn token. Read at each call: a generation config changed after
        the engine was built counts."""
        config = getattr(self.model, "generation_config", None)
        config = config if config is not None else getattr(self.model, "config", None)
        declared = getattr(config, "eos_token_id", None)
        declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
        own = getattr(self.tokenizer, "eos_token_id", None)
        return frozenset(int(t) for t in [*declared, *([own] if own is not None else [])])

    def text_of(self, tokens: Sequence[int]) -> str:
        """The text of generated ``tokens``, special tokens left out (``<pad>``, ``<bos>``, a chat template's
        markers), as vLLM and other OpenAI-compatible servers detokenise by default: they are no text, and a stop
        string is matched on the text without them. :meth:`generate` and the scheduler both decode through here,
        so their texts, and a stream's pieces, agree."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def classifier_meta(self, adapter: str | LoadedAdapter) -> dict:
        """The ``cpet.json`` of a loaded adapter (a name or a resolved one); ValueError unless it names labels and
        label words."""
        loaded = self.resolve(adapter)
        meta = loaded.meta
        if not meta.get("labels") or not meta.get("label_words"):
            raise ValueError(f"adapter {loaded.name} is not a classification adapter (its cpet.json names no labels)")
        from ..adapters import trained_prompt_limit
        from ..data.prompts import PromptTemplate, prompt_cut_of
        from ..evaluate import label_token_ids

        # everything classify reads from cpet.json is checked here, at admission: a damaged adapter fails its own
        # requests, never the mixed batch of other adapters' requests it would have joined
        missing = [label for label in meta["labels"] if label not in meta["label_words"]]
        if missing:
            raise ValueError(f"adapter {loaded.name}'s cpet.json has no label word for labels {missing}")
        try:
            PromptTemplate(meta.get("template") or PromptTemplate.template)
            label_token_ids(self.tokenizer, [meta["label_words"][label] for label in meta["labels"]])
            trained_prompt_limit(meta)
        except ValueError as err:
            raise ValueError(f"adapter {loaded.name}'s cpet.json: {err}") from None
        prompt_cut_of(meta)
        return meta

    @torch.no_grad()
    def classify(self, requests: Sequence[tuple[str | LoadedAdapter, str]]) -> list[dict]:
        """``[(adapter (a name or resolved), text)]`` -> ``[{"label", "probabilities"}]`` with each adapter's own
        template, verbalizer and prompt length (its ``cpet.json``), scored as CPET scores
        (:func:`cpet.evaluate.label_logprobs`: a label's log-probability is the sum over its tokens), all rows in
        one mixed batch; probabilities are the softmax of the label scores."""
        from ..adapters import trained_prompt_limit
        from ..data.prompts import PromptTemplate, fit_prompt, prompt_cut_of
        from ..evaluate import (DEFAULT_MAX_PROMPT_TOKENS, encode_prompt_and_label, label_sequences, label_token_ids,
                                logits_at, padded, scored_positions, store_sequence_score)

        sequences = []  # (adapter, request index, ids, label column or -1 for all single-token labels, label ids)
        labels_of = []  # (labels, label token ids) per request
        for index, (adapter, text) in enumerate(requests):
            loaded = self.resolve(adapter)  # resolved once: the batch's rows hold the adapter, not its name
            meta = self.classifier_meta(loaded)
            labels = list(meta["labels"])
            words = [meta["label_words"][label] for label in labels]
            label_ids = label_token_ids(self.tokenizer, words)
            limit = trained_prompt_limit(meta) or DEFAULT_MAX_PROMPT_TOKENS
            template = PromptTemplate(meta.get("template") or PromptTemplate.template)
            prompt = fit_prompt(template, text, self.tokenizer, limit, prompt_cut_of(meta))
            prompt_ids = encode_prompt_and_label(self.tokenizer, prompt, words[0], limit)[0]
            labels_of.append((labels, label_ids))
            sequences += [(loaded, index, *seq) for seq in label_sequences(prompt_ids, label_ids)]
        input_ids, attention = padded([seq[2] for seq in sequences], self.tokenizer.pad_token_id or 0)
        device = next(self.model.parameters()).device
        needed = [p for *_first, ids, col, lab in sequences for p in scored_positions(ids, col, lab)]
        rows = [seq[0] for seq in sequences]
        try:
            at = logits_at(self.model, needed, forward=lambda **inputs: self.forward(rows, **inputs),
                           input_ids=input_ids.to(device), attention_mask=attention.to(device))
        finally:
            self.release_stacks()
        logp = torch.log_softmax(at.logits.float(), dim=-1).cpu()
        scores = [torch.zeros(len(labels)) for labels, _ in labels_of]
        for i, (_, index, ids, col, lab) in enumerate(sequences):
            store_sequence_score(scores[index], logp[i], ids, col, lab, labels_of[index][1], at.where)
        out = []
        for (labels, _), score in zip(labels_of, scores):
            probabilities = torch.softmax(score, dim=-1).tolist()
            out.append({"label": labels[int(score.argmax())], "probabilities": dict(zip(labels, probabilities))})
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapters: Sequence[str | None], *, max_tokens: int = 32,
                 temperature: float = 0.0, seed: int | None = None, stop: Sequence[str] = ()) -> list[dict]:
        """Greedy (``temperature`` 0) or sampled completions of a mixed-adapter batch with one KV cache.

        Prompts are left-padded; each row stops at ``max_tokens``, at any of the model's end tokens
        (:meth:`end_token_ids`) or when its text (:meth:`text_of`: special tokens left out) contains one of
        ``stop`` (cut before it). Returns ``[{"text", "tokens", "finish_reason"}]``.
        """
        if len(prompts) != len(adapters):
            raise ValueError(f"{len(prompts)} prompts for {len(adapters)} adapters")
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id or 0]
                   for p in prompts]
        for ids in encoded:
            self.check_generation_fits(len(ids), max_tokens)
        device = next(self.model.parameters()).device
        input_ids, attention, positions = self.left_padded(encoded, device)
        # one generator per row, each seeded with ``seed``: a row's sample does not depend on the rows beside it
        # (as the server seeds each request), so the same prompt and seed give the same text in any batch
        generators = [torch.Generator(device=device).manual_seed(seed) if seed is not None else None
                      for _ in encoded]
        ends = self.end_token_ids()
        tokens: list[list[int]] = [[] for _ in encoded]
        finish = [None] * len(encoded)
        cache = None
        step_ids, step_positions = input_ids, positions
        try:
            for _ in range(max_tokens):
                out = self.forward(list(adapters), input_ids=step_ids, attention_mask=attention,
                                   position_ids=step_positions, use_cache=True, **{self._cache_key: cache})
                cache = output_cache(out)
                logits = out.logits[:, -1].float()
                chosen = torch.cat([next_token(logits[i:i + 1], temperature, generator)
                                    for i, generator in enumerate(generators)])
                for i, token in enumerate(chosen.tolist()):
                    if finish[i] is not None:
                        continue
                    if token in ends:
                        finish[i] = "stop"
                        continue
                    tokens[i].append(token)
                    if cut_at_stop(self.text_of(tokens[i]), stop)[1]:
                        finish[i] = "stop"
                if all(f is not None for f in finish):
                    break
                step_ids = chosen.unsqueeze(1)
                step_positions = step_positions[:, -1:] + 1
                attention = torch.cat([attention, attention.new_ones(len(encoded), 1)], dim=1)
        finally:
            self.release_stacks()
        return [{"text": cut_at_stop(self.text_of(ids), stop)[0], "tokens": len(ids),
                 "finish_reason": finish[i] or "length"} for i, ids in enumerate(tokens)]

    def check_generation_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a prompt of ``prompt_tokens`` that, with ``max_tokens`` generated after it, would pass the model's
        context (ValueError): a model with learned positions fails there, and in the server's continuous batch the
        failure would take every other running request with it."""
        limit = context_length(self.model)
        if limit is not None and prompt_tokens + max_tokens > limit:
            raise ValueError(f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) need "
                             f"{prompt_tokens + max_tokens} positions, more than this model's context of {limit} "
                             f"(max_position_embeddings): shorten the prompt or ask for at most "
                             f"{max(limit - prompt_tokens, 0)} tokens")

    def left_padded(self, encoded: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts ``encoded`` as one left-padded batch: ``(input_ids, attention_mask, position_ids)``, each
        ``[rows, longest]``, positions counting each row's real tokens from 0."""
        from ..evaluate import padded

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, attention = padded(encoded, pad, left=True)
        input_ids, attention = input_ids.to(device), attention.to(device)
        return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)

    # ------------------------------------------------------------------ reference (plain, one adapter at a time)
    @torch.no_grad()
    def reference_logits(self, adapters: Sequence[str | None], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Row by row with each adapter applied alone through the same factors, no batching: the semantics the
        fast path must equal (and, for CPET adapters, what ``CPET.model_for(...)`` computes)."""
        outs = []
        for i, name in enumerate(adapters):
            mask = attention_mask[i:i + 1] if attention_mask is not None else None
            outs.append(self.forward([name], input_ids=input_ids[i:i + 1], attention_mask=mask).logits)
        return torch.cat(outs)


class AdapterView(nn.Module):
    """Adapters on an :class:`Engine`, as a model: every row of every call runs with adapter ``name`` (None: the
    bare base), or row ``i`` with ``name[i]`` when ``name`` is a list. ``parameters()``, ``eval()`` and
    ``train()`` reach the engine's base; :func:`cpet.models.unwrap` gives the base (``causal_lm``)."""

    def __init__(self, engine: Engine, name: str | None | Sequence[str | None]):
        super().__init__()
        self.engine, self.name = engine, name
        self.per_row = not (name is None or isinstance(name, str))
        self.base = engine.model  # a submodule, so that parameters() and the device are the base's
        self.train(engine.model.training)  # a view must not flip its base to training mode when restored

    @property
    def causal_lm(self) -> nn.Module:
        return self.base

    @property
    def config(self):
        return self.base.config

    @property
    def distinct_names(self) -> list[str | None]:
        return list(dict.fromkeys(self.name)) if self.per_row else [self.name]

    def row_adapters(self, rows: int) -> list[str | None]:
        if not self.per_row:
            return [self.name] * rows
        if len(self.name) != rows:
            raise ValueError(f"this view names {len(self.name)} adapters, one per row, for a batch of {rows} rows")
        return list(self.name)

    @property
    def nbytes(self) -> int:
        """Bytes this model holds: the base's tensors, plus the factors of its adapters and of the shared recovery
        when one of them uses it (what a standalone copy of the model would hold; each factor counted once)."""
        from ..evaluate import memory_bytes

        terms = {}
        for name in self.distinct_names:
            assembly = self.engine.assembly(name)
            terms.update((id(t), t) for module in assembly.modules for t in assembly.terms(module))
        return memory_bytes(self.base) + sum(t.nbytes for t in terms.values())

    def forward(self, input_ids: torch.Tensor | None = None, **model_inputs):
        reference = input_ids if input_ids is not None else model_inputs["inputs_embeds"]
        return self.engine.forward(self.row_adapters(reference.shape[0]), input_ids=input_ids, **model_inputs)


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of ``logits [rows, vocab]``: the argmax at ``temperature`` 0, else a draw from
    the softmax of the logits over ``temperature``, after subtracting each row's largest logit: a tiny temperature
    then cannot make inf - inf (NaN) of the scaled logits, and the draw tends to the argmax as it should."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest occurrence of any (non-empty) stop string, and whether one occurred."""
    cut = min((text.index(s) for s in stop if s and s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def _stack(parts: list[LowRank | None], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A [rows, r, in], B*scale [rows, out, r])`` with zeros for rows without a factor; None if no row has one."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    rank = max(p.A.shape[0] for p in present)
    d_in, d_out = present[0].A.shape[1], present[0].B.shape[0]
    A = x.new_zeros(len(parts), rank, d_in, dtype=present[0].A.dtype)
    B = x.new_zeros(len(parts), d_out, rank, dtype=present[0].B.dtype)
    for i, p in enumerate(parts):
        if p is not None:
            r = p.A.shape[0]
            A[i, :r] = p.A
            B[i, :, :r] = p.B * p.scale
    return A, B


__all__ = ["AdapterView", "Engine", "cut_at_stop"]
