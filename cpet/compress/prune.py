"""Structured pruning with torch-pruning: FFN channel groups and GQA-aware attention heads.

The unit of coupled change is a *group*:

- FFN channel ``j``: row ``j`` of gate and up (or fc1) together with column ``j`` of down (or fc2). The
  groups come from torch-pruning's ``DependencyGraph`` traced on the model (with the output reduced to the
  logits, which transformers 5 wraps with a cache object the tracer cannot follow);
- attention head ``h``: its ``head_dim`` rows of q and columns of o (``query`` mode, the same number per
  KV group), or a whole KV group: its k/v rows plus all its query heads (``kv_group`` mode). torch-pruning's
  dependency graph cannot build these groups under GQA (on SmolLM2 its q/k groups come out incomplete and the
  v group stops before o_proj), so they are cut with its low-level ``prune_linear_out_channels`` /
  ``prune_linear_in_channels``.

A group's importance is the sum of an element score over all weights in the group: ``|W|`` (magnitude),
``|W * dL/dW|`` (first-order Taylor, LM loss on calibration batches) or ``|W| * ||X||`` (Wanda, with
``||X||`` the norm of each input feature over the calibration tokens).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from ..config import HeadMode, Importance, PruneConfig
from ..models import (Geometry, UnsupportedArchitectureError, decoder_layers, family_of, geometry,
                      iter_layer_linears, layer_linears)
from .calibration import input_rms
from .index_maps import FFN_CHANNELS, KV_HEADS, QUERY_HEADS, IndexMaps, head_rows
from .quantize import is_quantized
from .stages import StageContext, register_stage


def kept_ffn_width(width: int, ratio: float, round_to: int) -> int:
    """Channels kept of ``width`` at ``ratio``: rounded down to a multiple of ``round_to``, but at least one
    multiple and at most ``width`` (so a ``round_to`` above what is kept rounds up; :func:`validate` refuses one
    that would keep a whole layer)."""
    keep = int(round(width * (1.0 - ratio)))
    keep = max((keep // round_to) * round_to, round_to)
    return min(keep, width)


def valid_head_ratios(num_heads: int, num_kv_heads: int, mode: HeadMode) -> list[float]:
    """Head ratios that keep a whole number of heads in every KV group (query mode) or of KV groups."""
    units = num_heads // num_kv_heads if mode == HeadMode.QUERY else num_kv_heads
    return [round(removed / units, 6) for removed in range(units)]


def validate(model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None, previous: Sequence = ()) -> None:
    """Every check that can fail, before any expensive work.

    ``model`` is the pipeline's input; ``previous`` the configs of the stages before this one, whose head
    pruning this stage's head ratio applies to (two ``head_ratio=0.5`` stages: half, then half of the rest).
    """
    family = family_of(model)
    geo = geometry_after(model, previous)
    if is_quantized(model):
        raise ValueError("the input model is already quantized: compress takes the full-precision original "
                         "(load it again without quantization)")
    if config.needs_calibration and calibration is None:
        raise ValueError(f"importance {config.importance.value!r} needs calibration batches "
                         "(compress(..., calibration=calibration_ids(...))), or use importance='magnitude'")
    if (config.importance == Importance.TAYLOR and calibration is not None and calibration.numel()
            and calibration.shape[-1] < 2):
        # one-token windows leave the shifted LM loss nothing to predict: NaN loss and gradients, every channel
        # scored NaN, and the lowest indices were kept without a word (the zero-row placeholder of
        # CPET.check_stages, which stands for windows still to be made, passes)
        raise ValueError(f"taylor importance needs calibration windows of at least 2 tokens (its LM loss predicts "
                         f"each next token), got windows of {calibration.shape[-1]}: make longer windows "
                         "(calibration_ids' seq_len), or use importance='activation' or 'magnitude'")
    if config.layer_schedule:
        bad = [layer for layer in config.layer_schedule if not 0 <= layer < geo.num_layers]
        if bad:
            raise ValueError(f"layer_schedule names layers {bad}; the model has layers 0..{geo.num_layers - 1}")
    if config.head_ratio > 0:
        if not family.head_pruning:
            raise ValueError(f"family {family.name!r}: its heads cannot be pruned (the attention derives its head "
                             "width from hidden_size / num_heads, or holds head-indexed tensors besides q/k/v/o, "
                             "such as norms over all heads or attention sinks); use head_ratio=0")
        valid = valid_head_ratios(geo.num_heads, geo.num_kv_heads, config.head_mode)
        if not any(abs(config.head_ratio - v) < 1e-6 for v in valid):
            raise ValueError(
                f"head_ratio {config.head_ratio} does not fit {geo.num_heads} query heads in {geo.num_kv_heads} "
                f"KV groups with head_mode={config.head_mode.value!r}; valid ratios: {valid}")
        _check_pruned_heads_build(model, geo, config)
        if family.derived:  # the families of CPET's own table are known to lay o_proj out per head
            _check_heads_are_independent(model, geo.head_dim)
    if config.ffn_ratio > 0 or config.layer_schedule:
        schedule = config.layer_schedule or {}
        for layer, width in enumerate(planned_ffn_widths(model, previous)):
            ratio = schedule.get(layer, config.ffn_ratio)
            if ratio > 0 and int(round(width * (1.0 - ratio))) >= width:
                # before the round_to check: this ratio keeps the whole layer at any round_to, and that message
                # asked for a smaller round_to, a fix that does not exist at round_to 1
                raise ValueError(f"ratio {ratio} removes no channel of the {width} of layer {layer} (it rounds to 0): "
                                 f"use a ratio of at least {1 / width:.3g}, or 0 to leave the layer as it is")
            if ratio > 0 and kept_ffn_width(width, ratio, config.round_to) >= width:
                raise ValueError(f"round_to {config.round_to} keeps all {width} FFN channels of layer {layer} "
                                 f"(ffn_ratio {ratio} rounded up to one multiple of {config.round_to}): it would "
                                 "prune nothing there; use a smaller round_to")


def geometry_after(model: nn.Module, previous: Sequence) -> Geometry:
    """The model's geometry with the head counts the pruning configs among ``previous`` leave."""
    geo = geometry(model)
    for config in previous:
        if isinstance(config, PruneConfig) and config.head_ratio > 0:
            heads, kv = pruned_head_counts(geo.num_heads, geo.num_kv_heads, config)
            geo = dataclasses.replace(geo, num_heads=heads, num_kv_heads=kv)
    return geo


def planned_ffn_widths(model: nn.Module, previous: Sequence) -> list[int]:
    """Each layer's FFN width after the pruning configs among ``previous`` (the widths :func:`geometry_after`
    leaves out, per layer since a schedule may differ between layers)."""
    widths = [layer_linears(model, i)["up"].out_features for i in range(len(decoder_layers(model)))]
    for config in previous:
        if isinstance(config, PruneConfig):
            schedule = config.layer_schedule or {}
            ratios = [schedule.get(i, config.ffn_ratio) for i in range(len(widths))]
            # a layer at ratio 0 keeps every channel (prune() skips it): no rounding down to round_to
            widths = [kept_ffn_width(w, r, config.round_to) if r > 0 else w for w, r in zip(widths, ratios)]
    return widths


def pruned_head_counts(num_heads: int, num_kv_heads: int, config: PruneConfig) -> tuple[int, int]:
    """``(query heads, KV heads)`` left after pruning heads with ``config``."""
    per_group = num_heads // num_kv_heads
    if config.head_mode == HeadMode.QUERY:
        return round(per_group * (1 - config.head_ratio)) * num_kv_heads, num_kv_heads
    kv = round(num_kv_heads * (1 - config.head_ratio))
    return kv * per_group, kv


def _check_pruned_heads_build(model: nn.Module, geo, config: PruneConfig) -> None:
    # Some architectures constrain head counts (DiffLlama needs an even number of KV heads): find out from
    # the pruned config before cutting anything, since the result must rebuild from its config.
    heads, kv = pruned_head_counts(geo.num_heads, geo.num_kv_heads, config)
    try:
        target = copy.deepcopy(model.config)
        target.num_attention_heads, target.head_dim = heads, geo.head_dim
        if hasattr(target, "num_key_value_heads"):
            target.num_key_value_heads = kv
        family_of(target)
    except (UnsupportedArchitectureError, ValueError) as exc:
        raise ValueError(f"head_ratio {config.head_ratio} (head_mode={config.head_mode.value!r}) leaves {heads} query "
                         f"/ {kv} KV heads, which this architecture cannot be built with: {exc}") from None


@torch.no_grad()
def _check_heads_are_independent(model: nn.Module, head_dim: int) -> None:
    """Refuse an attention whose query head ``h`` does not own exactly o_proj's input columns ``h*head_dim ..
    (h+1)*head_dim - 1``, the columns head pruning cuts with its q rows.

    The shapes can fit while the layout does not: DiffLlama pairs head ``h`` with head ``h + H/2`` and lays o_proj's
    input out per pair, ``2*head_dim`` wide, so pruning cut q/k/v and o of different heads (logits 5.5 off on a
    tiny model). Checked by running: query head 0 of layer 0 perturbed, only its own o_proj input columns may move.
    A forward pass of a few tokens, on the model as given (its weights restored after).
    """
    linears = layer_linears(model, 0)
    q, o = linears["q"], linears["o"]
    seen: list[torch.Tensor] = []
    handle = o.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float().clone()))
    ids = torch.tensor([[1, 7, 42, 3, 99, 12, 5, 64]], device=q.weight.device) % model.config.vocab_size
    kept = q.weight[:head_dim].clone()
    was_training = model.training
    model.eval()  # attention dropout in train mode would move every head's columns at random
    try:
        model(input_ids=ids)
        generator = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(kept.shape, generator=generator).to(kept.device, kept.dtype)
        q.weight[:head_dim] += noise * kept.float().abs().mean().clamp(min=1e-3).to(kept.dtype)
        model(input_ids=ids)
    finally:
        q.weight[:head_dim].copy_(kept)
        handle.remove()
        model.train(was_training)
    moved = (seen[0] - seen[1]).abs().reshape(-1, seen[0].shape[-1]).amax(dim=0)  # per o_proj input column
    own, others = moved[:head_dim].max(), moved[head_dim:].max()
    if not others <= 1e-6 * max(float(own), 1e-12):
        raise ValueError(f"family {family_of(model).name!r}: its heads cannot be pruned (its attention output is not "
                         "laid out one head_dim block per query head: query head 0 moves o_proj input columns beyond "
                         "its own, so cutting a head's q rows and o columns would cut different things); use "
                         "head_ratio=0")


# --------------------------------------------------------------------------------------------------
# Element scores
# --------------------------------------------------------------------------------------------------


@dataclass
class ElementScores:
    """Per-weight importance of every mapped linear: ``{module name: tensor shaped like its weight}``."""

    scores: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.scores[name]


def _mapped(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer[role] for layer in iter_layer_linears(model) for role, name in layer.names.items()}


def element_scores(model: nn.Module, importance: Importance, calibration: torch.Tensor | None,
                   batch_size: int = 4, progress: bool = False) -> ElementScores:
    linears = _mapped(model)
    if importance == Importance.MAGNITUDE:
        return ElementScores({n: m.weight.detach().abs() for n, m in linears.items()})
    device = next(model.parameters()).device
    batches = calibration.split(batch_size)
    if importance == Importance.ACTIVATION:
        rms = input_rms(model, calibration, list(linears), batch_size)
        return ElementScores({n: m.weight.detach().abs() * rms[n].to(m.weight.device).unsqueeze(0)
                              for n, m in linears.items()})
    # first-order Taylor: |W * dL/dW| with the gradient summed over the calibration batches. Only the mapped
    # linears take gradients: every other parameter is frozen for the pass (and restored), so that no gradient
    # of the embedding, the norms or lm_head is computed or left behind on the model. The sum is kept in fp32,
    # not left to autograd's accumulation in .grad: that runs in the weight's dtype, and in bf16 (CPET's default
    # on CUDA) each added batch is rounded to 8 bits of mantissa, so later batches count for less
    params = dict(model.named_parameters())
    flags = {name: param.requires_grad for name, param in params.items()}
    mapped = {id(m.weight) for m in linears.values()}
    for param in params.values():
        param.requires_grad_(id(param) in mapped)
        param.grad = None
    was_training = model.training
    model.eval()
    try:
        sums = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
        for batch in tqdm(batches, desc="taylor", disable=not progress, leave=False):
            batch = batch.to(device)
            model(input_ids=batch, labels=batch).loss.backward()
            for name, module in linears.items():
                sums[name] += module.weight.grad
                module.weight.grad = None
        return ElementScores({n: (m.weight.detach().float() * sums[n]).abs() for n, m in linears.items()})
    finally:
        for name, param in params.items():
            param.grad = None
            param.requires_grad_(flags[name])
        model.train(was_training)


def ffn_channel_importance(scores: ElementScores, names: dict[str, str]) -> torch.Tensor:
    """``[intermediate]``: gate/up row sums plus down column sums (fp32)."""
    # summed in fp32 whatever the model's dtype: in bf16 (CPET's default on CUDA) a sum keeps 8 bits of mantissa,
    # so channels whose importance differs by under ~0.4% tied and the lower index was kept, not the larger one
    total = scores[names["up"]].sum(1, dtype=torch.float32) + scores[names["down"]].sum(0, dtype=torch.float32)
    if "gate" in names:
        total = total + scores[names["gate"]].sum(1, dtype=torch.float32)
    return total


def head_importance(scores: ElementScores, names: dict[str, str], num_heads: int, num_kv_heads: int,
                    head_dim: int, mode: HeadMode) -> torch.Tensor:
    """``[num_heads]`` (query mode) or ``[num_kv_heads]`` (kv_group mode), in fp32 (see
    :func:`ffn_channel_importance`: bf16 sums tie heads that differ)."""
    q = scores[names["q"]].reshape(num_heads, head_dim, -1).sum((1, 2), dtype=torch.float32)
    o = scores[names["o"]].reshape(scores[names["o"]].shape[0], num_heads, head_dim).sum((0, 2), dtype=torch.float32)
    per_query = q + o
    if mode == HeadMode.QUERY:
        return per_query
    kv = sum(scores[names[r]].reshape(num_kv_heads, head_dim, -1).sum((1, 2), dtype=torch.float32) for r in ("k", "v"))
    return per_query.reshape(num_kv_heads, -1).sum(1) + kv


# --------------------------------------------------------------------------------------------------
# Selection and surgery
# --------------------------------------------------------------------------------------------------


def top_k_sorted(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` most important entries, in increasing index order (ties: lower index)."""
    order = torch.argsort(importance, descending=True, stable=True)
    return order[:keep].sort().values


def select_query_heads(importance: torch.Tensor, num_kv_heads: int, keep_per_group: int) -> torch.Tensor:
    """Keep the ``keep_per_group`` best query heads inside each KV group (GQA stays consistent)."""
    group = importance.numel() // num_kv_heads
    kept = [g * group + top_k_sorted(importance[g * group:(g + 1) * group], keep_per_group)
            for g in range(num_kv_heads)]
    return torch.cat(kept)


def _trace_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    # The tracer follows autograd, so parameters must require grad while it runs; transformers 5 returns
    # a cache object beside the logits that the tracer cannot follow, so the output is reduced to logits.
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(True)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # torch-pruning names every norm weight it has no module rule for ("Unwrapped parameters detected",
            # 61 names for SmolLM2) and says it would prune their last dimension: that is the hidden size, which
            # CPET never prunes (FFN channels and heads only), so the warning told users nothing they could act on
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example,
                output_transform=lambda out: out.logits if hasattr(out, "logits") else out)
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])


def _complement(kept: torch.Tensor, size: int) -> list[int]:
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten().tolist()


def prune_ffn(model: nn.Module, kept_per_layer: list[torch.Tensor], progress: bool = False) -> None:
    """Remove every FFN channel not in ``kept_per_layer[i]`` through torch-pruning's dependency groups."""
    device = next(model.parameters()).device
    graph = _trace_graph(model, torch.arange(8, device=device).unsqueeze(0) % model.config.vocab_size)
    for index, kept in enumerate(tqdm(kept_per_layer, desc="prune ffn", disable=not progress, leave=False)):
        linears = layer_linears(model, index)
        width = linears["up"].out_features
        removed = _complement(kept, width)
        if not removed:
            continue
        first = linears["gate"] if "gate" in linears.modules else linears["up"]
        group = graph.get_pruning_group(first, tp.prune_linear_out_channels, idxs=removed)
        group.prune()
        new = layer_linears(model, index)
        shapes = [new[r].out_features for r in ("gate", "up") if r in new.modules] + [new["down"].in_features]
        if any(s != len(kept) for s in shapes):  # the traced group must be exactly gate/up rows + down columns
            raise RuntimeError(f"torch-pruning group of layer {index} did not cover gate/up/down: {shapes}")


def prune_heads(model: nn.Module, kept_q: list[torch.Tensor], kept_kv: list[torch.Tensor], head_dim: int) -> None:
    """Cut query heads (q rows, o columns) and KV heads (k/v rows) with torch-pruning's functions."""
    for index, (q_heads, kv_heads) in enumerate(zip(kept_q, kept_kv)):
        linears = layer_linears(model, index)
        removed_q = _complement(head_rows(q_heads, head_dim), linears["q"].out_features)
        removed_kv = _complement(head_rows(kv_heads, head_dim), linears["k"].out_features)
        if removed_q:
            tp.prune_linear_out_channels(linears["q"], removed_q)
            tp.prune_linear_in_channels(linears["o"], removed_q)
        if removed_kv:
            tp.prune_linear_out_channels(linears["k"], removed_kv)
            tp.prune_linear_out_channels(linears["v"], removed_kv)
        attention = model.get_submodule(linears.names["q"].rsplit(".", 1)[0])
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = len(q_heads) // len(kv_heads)


def prune(model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None,
          progress: bool = False) -> IndexMaps:
    """Prune ``model`` in place; returns the stage's index maps (into the model as it was given).

    Every layer gets an explicit FFN map (gate/up rows, down columns; ``arange`` where nothing is cut); the
    attention maps (q/o and k/v rows, whole heads) only when heads are pruned. Updates the config (FFN width,
    head counts, explicit ``head_dim``) when widths are uniform.
    """
    validate(model, config, calibration)
    geo = geometry(model)
    family = family_of(model)
    maps = IndexMaps.identity(geo, family.roles)
    scores = element_scores(model, config.importance, calibration, progress=progress)
    kept_ffn, kept_q, kept_kv = [], [], []
    for layer in iter_layer_linears(model):
        ratio = (config.layer_schedule or {}).get(layer.index, config.ffn_ratio)
        width = layer["up"].out_features
        ffn = (top_k_sorted(ffn_channel_importance(scores, layer.names), kept_ffn_width(width, ratio, config.round_to))
               if ratio > 0 else torch.arange(width))
        maps.select(layer.index, FFN_CHANNELS, ffn)
        kept_ffn.append(ffn)
        if config.head_ratio > 0:
            # chosen on the CPU, as index maps are kept: on a CUDA model, kv_heads * per_group + arange(...) mixed
            # a CUDA tensor with a 1-D CPU one, which torch refuses
            importance = head_importance(scores, layer.names, geo.num_heads, geo.num_kv_heads, geo.head_dim,
                                         config.head_mode).cpu()
            per_group = geo.num_heads // geo.num_kv_heads
            if config.head_mode == HeadMode.QUERY:
                q_heads = select_query_heads(importance, geo.num_kv_heads, round(per_group * (1 - config.head_ratio)))
                kv_heads = torch.arange(geo.num_kv_heads)
            else:
                kv_heads = top_k_sorted(importance, round(geo.num_kv_heads * (1 - config.head_ratio)))
                q_heads = (kv_heads.unsqueeze(1) * per_group + torch.arange(per_group)).reshape(-1)
            maps.select(layer.index, QUERY_HEADS, head_rows(q_heads, geo.head_dim))
            maps.select(layer.index, KV_HEADS, head_rows(kv_heads, geo.head_dim))
            kept_q.append(q_heads)
            kept_kv.append(kv_heads)
    del scores
    with torch.no_grad():
        prune_ffn(model, kept_ffn, progress)
        if config.head_ratio > 0:
            prune_heads(model, kept_q, kept_kv, geo.head_dim)
    widths = {len(ffn) for ffn in kept_ffn}
    if len(widths) == 1:
        setattr(model.config, family.intermediate_attr, widths.pop())
    if config.head_ratio > 0:
        model.config.num_attention_heads = len(kept_q[0])
        if hasattr(model.config, "num_key_value_heads"):
            model.config.num_key_value_heads = len(kept_kv[0])
    if family.head_pruning:  # hidden_size / heads, transformers' derived head_dim, is wrong once heads are gone
        model.config.head_dim = geo.head_dim
    return maps


# --------------------------------------------------------------------------------------------------
# The registered stage
# --------------------------------------------------------------------------------------------------


def resize_linears(model: nn.Module, index_maps: IndexMaps) -> nn.Module:
    """Give every mapped linear the widths its index maps state (fresh ``nn.Linear`` where they differ).

    For bases with per-layer widths, which transformers builds from ``config.json`` with one width for all
    layers. Linears that already have their widths are left alone (so a loaded model is unchanged).
    """
    for layer in iter_layer_linears(model):
        for role, module in layer.modules.items():
            rows, cols = index_maps.rows(layer.index, role), index_maps.cols(layer.index, role)
            out_features = module.out_features if rows is None else len(rows)
            in_features = module.in_features if cols is None else len(cols)
            if (out_features, in_features) != (module.out_features, module.in_features):
                _replace(model, layer.names[role], nn.Linear(in_features, out_features, bias=module.bias is not None))
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


class PruneStage:
    """:class:`~cpet.compress.stages.Stage` for :class:`~cpet.config.PruneConfig` (rank 100)."""

    PER_LAYER = "per-layer FFN widths (layer_schedule)"

    def validate(self, model: nn.Module, config: PruneConfig, context: StageContext, previous) -> None:
        validate(model, config, context.calibration, previous)
        if config.layer_schedule:
            context.custom_layout = context.custom_layout or self.PER_LAYER

    def apply(self, model: nn.Module, config: PruneConfig, context: StageContext):
        return model, prune(model, config, context.calibration, progress=context.progress)

    def rebuild(self, model: nn.Module, config: PruneConfig, index_maps: IndexMaps) -> nn.Module:
        return resize_linears(model, index_maps)


PRUNE_RANK = 100
register_stage(PruneConfig, PruneStage(), rank=PRUNE_RANK)
