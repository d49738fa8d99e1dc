"""MoEfication stage: split every FFN into equal experts with a learned router (:class:`MoEfyConfig`).

Per decoder layer:

1. cluster the FFN's intermediate neurons into E equal groups (balanced k-means on normalised neuron weight
   vectors, or on their co-activation over calibration tokens: :mod:`cpet.moe.clustering`);
2. permute the neurons so that each expert is a contiguous slice (``gate``/``up`` rows and ``down`` columns;
   the permutation is this stage's index map, so inheritance and recovery read it like a pruning map);
3. replace the FFN block by a :class:`~cpet.moe.layer.MoEFFN` with one :class:`~cpet.moe.experts.ExpertBank`
   per linear and a router, first layer from each expert's mean gate direction, trained on the calibration
   tokens' FFN inputs to predict each expert's output norm (MSE, normalised by the mean squared target).

The partition needs no storage of its own: expert ``e`` holds the permuted neurons ``e*m .. (e+1)*m - 1``.
A MoEfied base is not a transformers architecture: it saves with ``save_pretrained`` (the banks' per-expert
weights by module name) and reloads only with :meth:`cpet.compress.CompressedBase.load`, which builds the model
from ``config.json`` and lets this stage put the MoE blocks back before loading the weights.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import as_number
from ..models import decoder_layers, family_of, geometry, layer_linears, submodule, unwrap
from ..moe.clustering import balanced_kmeans, expert_order
from ..moe.experts import COLS, ROWS, ExpertBank, bank_of
from ..moe.layer import MoEFFN, Router, count_attended_tokens_only
from .calibration import StopForward, check_token_windows, run_batches
from .index_maps import FFN_CHANNELS, IndexMaps
from .prune import planned_ffn_widths
from .stages import StageContext, register_stage

CLUSTERINGS = ("weights", "coactivation")
ROUTER_INPUTS = ("dense", "moefied")
LAYOUT_NOTE = "MoEfied FFNs (expert banks and routers)"


@dataclass(frozen=True)
class MoEfyConfig:
    """Split each FFN into ``num_experts`` equal experts chosen per token by a trained router.

    Attributes:
        num_experts: E; every layer's FFN width (after pruning) must divide by it.
        top_k: experts per token (top-k choice); None without ``tau``: half of the experts. With ``tau`` set, the
            cap of dynamic-k (None: no cap).
        tau: dynamic-k: per token the fewest experts whose predicted output norms reach this share of the
            total, in (0, 1] (1 chooses all, up to the ``top_k`` cap). None: plain top-k.
        clustering: ``coactivation`` (neuron magnitudes over calibration tokens; the default: on SmolLM2-135M it
            halves perplexity at 8 of 16 experts against ``weights``, docs/moefication.md) or ``weights``
            (normalised gate rows; up rows for a non-gated FFN).
        router_width: hidden units of each layer's router MLP (>= num_experts: the first E start at the
            experts' mean gate directions); None: ``max(64, num_experts)``.
        router_steps, router_lr: Adam steps and learning rate of router training (full batch of calibration
            tokens).
        router_inputs: what each layer's clustering and router learn from: ``dense``, every layer's FFN input
            from one pass of the dense model, or ``moefied``, layer by layer the input it reads once the layers
            before it are MoEfied (what it sees at inference; one calibration pass per layer, each stopped at that
            layer).
        seed: seeds clustering and router training.
    """

    num_experts: int = 16
    top_k: int | None = None
    tau: float | None = None
    clustering: str = "coactivation"
    router_width: int | None = None
    router_steps: int = 300
    router_lr: float = 3e-3
    router_inputs: str = "dense"
    seed: int = 0

    stage: ClassVar[str] = "moefy"
    added_fields: ClassVar[tuple[str, ...]] = ("router_inputs",)  # at its default, out of the dict and the base_id

    def __post_init__(self) -> None:
        # numbers in one type each, so that equal settings written differently (``tau=1`` and ``1.0``) are one
        # config with one base_id; the CLI and the defaults already give these types
        for name in ("num_experts", "top_k", "router_width", "router_steps", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_number(name, getattr(self, name), int))
        for name in ("tau", "router_lr"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_number(name, getattr(self, name), float))
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {self.num_experts} (CLI: --moefy-experts)")
        if self.top_k is None and self.tau is None:
            object.__setattr__(self, "top_k", max(1, self.num_experts // 2))
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k} "
                             "(CLI: --moefy-top-k, at most --moefy-experts)")
        if self.tau is not None and not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau (dynamic-k share) must be in (0, 1], got {self.tau} (CLI: --moefy-tau)")
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {self.clustering!r}")
        if self.router_inputs not in ROUTER_INPUTS:
            raise ValueError(f"router_inputs must be one of {ROUTER_INPUTS}, got {self.router_inputs!r}")
        if self.router_width is None:
            object.__setattr__(self, "router_width", max(64, self.num_experts))
        if self.router_width < self.num_experts:
            raise ValueError(f"router_width ({self.router_width}) must be >= num_experts ({self.num_experts}): "
                             "the router's first units start at the experts' mean gate directions")
        # written as a range so that nan fails it too (and inf, which trained every router to NaN scores)
        if self.router_steps < 0 or not 0.0 < self.router_lr < math.inf:
            raise ValueError(f"need router_steps >= 0 and a finite router_lr > 0, got {self.router_steps}, "
                             f"{self.router_lr}")

    @property
    def expert_share(self) -> float | None:
        """Share of experts a top-k router uses (None under dynamic-k, where it varies per token)."""
        return None if self.tau is not None else self.top_k / self.num_experts


# ---------------------------------------------------------------------------------------------- structure

def _ffn_parent(model: nn.Module, index: int) -> tuple[nn.Module, str]:
    """The module holding layer ``index``'s FFN block, and the block's attribute name."""
    fam = family_of(model)
    path = fam.mlp.split(".")
    layer = decoder_layers(model)[index]
    return submodule(layer, ".".join(path[:-1])), path[-1]


def _activation(block: nn.Module, config) -> nn.Module:
    """The FFN's activation: the block's own ``act_fn`` / ``act`` / ``activation_fn``, else transformers'
    ``ACT2FN`` of the config's ``hidden_act`` / ``hidden_activation``."""
    for name in ("act_fn", "act", "activation_fn"):
        act = getattr(block, name, None)
        if isinstance(act, nn.Module):
            return copy.deepcopy(act)
    from transformers.activations import ACT2FN

    name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if name is None:
        raise ValueError("cannot tell this FFN's activation: its block has no act_fn and the config no hidden_act")
    return ACT2FN[name]


def moe_block(model: nn.Module, index: int, config: MoEfyConfig, order: torch.Tensor | None = None) -> MoEFFN:
    """A :class:`MoEFFN` from layer ``index``'s dense FFN, its neurons taken in ``order`` (None: as they are).

    The router is freshly initialised; the dense block is left untouched.
    """
    fam = family_of(model)
    linears = layer_linears(model, index)
    block = submodule(decoder_layers(model)[index], fam.mlp)

    def bank(role: str, split: str) -> ExpertBank | None:
        if role not in linears.modules:
            return None
        linear = copy.deepcopy(linears[role])
        if order is not None:
            with torch.no_grad():
                where = order.to(linear.weight.device)  # clustering ran on the CPU
                if split == ROWS:
                    linear.weight.data = linear.weight.data.index_select(0, where)
                    if linear.bias is not None:
                        linear.bias.data = linear.bias.data.index_select(0, where)
                else:
                    linear.weight.data = linear.weight.data.index_select(1, where)
        return ExpertBank.from_linear(linear, config.num_experts, split)

    up = bank("up", ROWS)
    router = Router(up.in_features, config.num_experts, config.router_width).to(linears["up"].weight.device)
    names = {role: fam.linears[role] for role in ("gate", "up", "down") if role in fam.linears}
    return MoEFFN(bank("gate", ROWS), up, bank("down", COLS), _activation(block, unwrap(model).config), router,
                  top_k=config.top_k, tau=config.tau, names=names)


def _caller_streams_kept(module: nn.Module):
    """A context that leaves the caller's random streams as they were while modules are built on ``module``'s
    device (expert slices draw a throwaway init there): the CPU stream, and the CUDA one of a CUDA module."""
    device = next(module.parameters()).device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _valid_expert_counts(widths: Sequence[int]) -> str:
    """Every expert count that splits all of ``widths`` into equal experts (the whole list: a cut one reads as
    complete), or that none does but one neuron per expert."""
    counts = [d for d in range(2, min(widths) + 1) if all(w % d == 0 for w in widths)]
    if all(count == min(widths) for count in counts):
        return ("no expert count splits every layer's width into experts of two neurons or more"
                + (f" ({counts[0]} experts would be one neuron each)" if counts else ""))
    return f"expert counts that divide every layer's width: {counts}"


def _check_ffn_formula(model: nn.Module) -> None:
    """Refuse an FFN block that is not ``down(act(gate(x)) * up(x))`` / ``down(act(up(x)))`` (checked on numbers,
    with one expert holding every neuron), before any work."""
    fam = family_of(model)
    if not fam.mlp:
        raise ValueError(f"family {fam.name!r} keeps its FFN linears in the decoder layer itself, not in an FFN "
                         "block that MoEfication could replace; MoEfication supports families with an MLP block")
    block = submodule(decoder_layers(model)[0], fam.mlp)
    width = layer_linears(model, 0)["up"].out_features
    experts = next((d for d in range(2, width + 1) if width % d == 0), None)  # the smallest split of this width
    if experts is None:
        return  # a one-neuron FFN: the width check refuses it
    # in fp32 whatever the model's dtype: a bf16 model's rounding is not a different formula
    with _caller_streams_kept(block):
        probe = moe_block(model, 0, MoEfyConfig(num_experts=experts, top_k=experts), order=None).float()
    # compared in eval mode: a model left in train mode (built with from_config) made a block with dropout random,
    # and a valid FFN was refused as "another formula"
    block, probe = copy.deepcopy(block).float().eval(), probe.eval()
    weight = layer_linears(model, 0)["up"].weight
    x = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        dense = block(x)
        routed = probe(x, chosen=torch.ones(4, experts, dtype=torch.bool, device=x.device))
        block.train()
        if not torch.equal(block(x), block(x)):  # dropout inside the block (Starcoder2's residual_dropout)
            warnings.warn(f"family {fam.name!r}: its FFN block ({type(block).__name__}) applies dropout in training, "
                          "which the MoEfied FFN does not: tuning on this base runs without it (inference is "
                          "unchanged)", stacklevel=2)
    if not torch.allclose(dense, routed, atol=1e-4, rtol=1e-3):
        raise ValueError(f"family {fam.name!r}: its FFN block ({type(block).__name__}) computes something other "
                         "than down(act(gate(x)) * up(x)) or down(act(up(x))) "
                         f"(max difference {float((dense - routed).abs().max()):.3g}); MoEfication cannot split it")


# ---------------------------------------------------------------------------------------------- training

@torch.no_grad()
def ffn_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int = 4,
               layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The FFN block inputs of ``layers`` (None: every layer) over the calibration batches: ``[n * seq, hidden]``
    fp32 per layer, in the order of ``layers``. Each batch's forward pass stops at the last of them."""
    base = unwrap(model)
    fam = family_of(base)
    count = len(decoder_layers(base))
    wanted = list(range(count)) if layers is None else list(layers)
    if not wanted or not all(-count <= i < count for i in wanted):
        raise ValueError(f"layers must name at least one of the model's {count} decoder layers, got {layers}")
    wanted = [i % count for i in wanted]  # -1: the last layer, as Python indexes
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    last = max(wanted)
    handles = []
    for i in captured:  # one hook per layer, however often it is named: two appended every token twice
        def hook(module, inputs, i=i):
            captured[i].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu())
            if i == last:
                raise StopForward
        handles.append(submodule(decoder_layers(base)[i], fam.mlp).register_forward_pre_hook(hook))
    run_batches(base, calibration, handles, batch_size)
    return [torch.cat(captured[i]) for i in wanted]


def _neuron_vectors(model: nn.Module, index: int, tokens: torch.Tensor, clustering: str) -> torch.Tensor:
    """``[I, d]`` vectors to cluster: gate (or up) rows, or per-token neuron magnitudes (co-activation)."""
    linears = layer_linears(model, index)
    reader = linears["gate"] if "gate" in linears.modules else linears["up"]
    if clustering == "weights":
        return reader.weight.detach().float().cpu()
    act = _activation(submodule(decoder_layers(model)[index], family_of(model).mlp), unwrap(model).config)
    with torch.no_grad():
        x = tokens.to(reader.weight.device, reader.weight.dtype)
        hidden = linears["up"](x)
        hidden = act(reader(x)) * hidden if "gate" in linears.modules else act(hidden)
    return hidden.abs().float().T.cpu()


def train_router(block: MoEFFN, tokens: torch.Tensor, steps: int, lr: float) -> float:
    """Fit ``block.router`` to the true expert norms on ``tokens`` ``[N, hidden]``; returns the final
    normalised MSE (0 = perfect, 1 = as bad as predicting zero)."""
    device = block.router.proj.weight.device
    x = tokens.to(device)
    with torch.no_grad():  # the experts in their own dtype (a bf16 model's), the router in fp32
        target = block.expert_norms(x.to(bank_of(block.bank("up")).experts[0].weight.dtype)).float()
    scale = target.pow(2).mean().clamp(min=1e-12)
    optimizer = torch.optim.Adam(block.router.parameters(), lr=lr)
    block.router.requires_grad_(True)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (block.router(x).float() - target).pow(2).mean() / scale
            loss.backward()
            optimizer.step()
    block.router.requires_grad_(False)
    with torch.no_grad():
        return float((block.router(x).float() - target).pow(2).mean() / scale)


# ---------------------------------------------------------------------------------------------- the stage

class MoEfyStage:
    """:class:`~cpet.compress.stages.Stage` for :class:`MoEfyConfig` (rank 500: after pruning, before
    quantization, which then quantizes every expert slice like any linear)."""

    def validate(self, model: nn.Module, config: MoEfyConfig, context: StageContext, previous) -> None:
        from .quantize import is_quantized

        if any(isinstance(m, MoEFFN) for m in model.modules()):
            raise ValueError("the input model is already MoEfied: compress takes the dense original (load it again "
                             "from its source)")
        if is_quantized(model):
            raise ValueError("the input model is already quantized, and MoEfication splits full-precision weights: "
                             "MoEfy the dense model and quantize after it (QuantizeConfig after MoEfyConfig in one "
                             "compress call)")
        if context.calibration is None:
            raise ValueError("MoEfication trains its routers on calibration text: pass calibration batches "
                             "(compress(..., calibration=calibration_ids(...)); `cpet compress` does by default)")
        check_token_windows(context.calibration, allow_empty=True)  # CPET.check_stages passes an empty stand-in
        _check_ffn_formula(model)
        widths = planned_ffn_widths(model, previous)
        if config.num_experts > min(widths):
            raise ValueError(f"{config.num_experts} experts are more than the {min(widths)} FFN neurons of the "
                             "narrowest layer: use fewer experts")
        bad = sorted({w for w in widths if w % config.num_experts})
        if bad:
            raise ValueError(f"FFN widths {bad} do not split into {config.num_experts} equal experts; "
                             f"{_valid_expert_counts(widths)} (or prune to widths that split: "
                             "PruneConfig(round_to=a multiple of num_experts), cpet compress --round-to)")
        context.custom_layout = context.custom_layout or LAYOUT_NOTE

    def apply(self, model: nn.Module, config: MoEfyConfig, context: StageContext):
        check_token_windows(context.calibration)
        dense_inputs = ffn_inputs(model, context.calibration) if config.router_inputs == "dense" else None
        local = IndexMaps.identity(geometry(model), family_of(model).roles)
        layers = range(len(decoder_layers(model)))
        for i in tqdm(layers, desc="moefy", disable=not context.progress):
            # "moefied": what layer i reads once the layers before it are MoEfied, as it will at inference
            inputs = dense_inputs[i] if dense_inputs is not None else \
                ffn_inputs(model, context.calibration, layers=[i])[0]
            vectors = _neuron_vectors(model, i, inputs, config.clustering)
            assignment, _ = balanced_kmeans(vectors, config.num_experts, seed=config.seed + i)
            order = expert_order(assignment, config.num_experts)
            # the router's random init is a function of the config's seed alone, not of whatever the caller
            # drew before (validation builds modules too), and the caller's random stream is left as it was
            with torch.random.fork_rng(devices=[]), _caller_streams_kept(layer_linears(model, i)["up"]):
                torch.manual_seed(config.seed + i)
                block = moe_block(model, i, config, order)
                block.router.init_from_centres(_centres(block, config.num_experts))
                train_router(block, inputs, config.router_steps, config.router_lr)
            parent, name = _ffn_parent(model, i)
            setattr(parent, name, block)
            local.select(i, FFN_CHANNELS, order)
        for block in moe_blocks(model):  # the "moefied" passes routed calibration tokens: not the model's own use
            block.reset_counts()
        count_attended_tokens_only(unwrap(model))
        context.custom_layout = LAYOUT_NOTE
        return model, local

    def rebuild(self, model: nn.Module, config: MoEfyConfig, index_maps: IndexMaps) -> nn.Module:
        for i in range(len(decoder_layers(model))):
            block = moe_block(model, i, config, order=None)  # weights, order included, come from the checkpoint
            parent, name = _ffn_parent(model, i)
            setattr(parent, name, block)
        count_attended_tokens_only(unwrap(model))
        return model


def _centres(block: MoEFFN, num_experts: int) -> torch.Tensor:
    """Normalised mean of each expert's (normalised) gate rows, up rows for a non-gated FFN: ``[E, hidden]``."""
    reader = block.bank("gate") or block.bank("up")
    rows = torch.nn.functional.normalize(reader.dense_weight(), dim=1)
    centres = rows.reshape(num_experts, -1, rows.shape[1]).mean(dim=1)
    return torch.nn.functional.normalize(centres, dim=1).to(block.router.proj.weight.dtype)


def moe_blocks(model: nn.Module) -> list[MoEFFN]:
    """The MoEfied FFN blocks of ``model`` (empty for a dense model)."""
    return [m for m in unwrap(model).modules() if isinstance(m, MoEFFN)]


def router_digest(model: nn.Module) -> str:
    """SHA-256 of every MoEfied layer's router weights, in layer order ("" for a dense model).

    Routers are trained on calibration text, so two bases with the same configs and the same expert partition
    (``clustering="weights"`` does not read calibration) may still route differently: this digest is part of
    the base's identity (:attr:`Manifest.trained_digest`)."""
    import hashlib

    blocks = moe_blocks(model)
    if not blocks:
        return ""
    digest = hashlib.sha256()
    for index, block in enumerate(blocks):
        for name, tensor in sorted(block.router.state_dict().items()):
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def batch_expert_union(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Share of experts that at least one row of a batch chooses at a position, over positions and MoEfied layers.

    ``input_ids`` ``[B, L]``: B rows that run together; each position stands for one decode step of the B rows.
    An expert that any row chooses has its whole slice of the FFN weights read in that step, so this is the
    share of FFN weight bytes a batched decode step reads: the share of experts per token for one row, up to
    ``min(1, B x that)`` for B rows (1.0 when the rows' choices never overlap enough to skip an expert).
    The model's running choice counts (:meth:`MoEFFN.expert_share`) are left as they were.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("batch_expert_union needs a MoEfied model (compress with a MoEfyConfig)")
    counts = [(block.chosen_experts, block.routed_tokens) for block in blocks]
    shares: list[float] = []

    def record(block: MoEFFN, inputs: tuple, _output) -> None:
        x = inputs[0]
        chosen = block.choose(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)  # [B, L, E]
        shares.append(float(chosen.any(dim=0).float().mean()))

    from ..evaluate import evaluating  # here: cpet.evaluate's imports reach back into cpet.compress

    handles = [block.register_forward_hook(record) for block in blocks]
    try:
        with evaluating(model):  # a model in train mode (dropout) would route noisy inputs; its flags come back
            model(input_ids=input_ids.to(next(unwrap(model).parameters()).device))
    finally:
        for handle, block, (chosen, routed) in zip(handles, blocks, counts):
            handle.remove()
            block.chosen_experts, block.routed_tokens = chosen, routed
    return sum(shares) / len(shares)


MOEFY_RANK = 500
register_stage(MoEfyConfig, MoEfyStage(), rank=MOEFY_RANK, repeatable=False,
               order_note="pruning after MoEfication would cut across experts")
