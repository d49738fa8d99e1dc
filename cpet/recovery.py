"""Knowledge recovery: low-rank bypasses beside compressed linears that restore what compression removed.

A bypass computes ``x -> A (r x d_in) -> act -> B (d_out x r) * alpha / r`` and is added to the output of
the compressed linear it sits beside. Two ways to get one:

- **per task** (CA-LoRA): ``act = GELU``, A Kaiming-uniform and B zero, so it starts as a no-op; trained
  jointly with the task LoRA (task loss + lambda * hidden-state MSE against the uncompressed teacher);
- **shared** (task-agnostic): ``act = identity``, initialised from the truncated SVD of the layer's
  compression residual ``W_orig[kept] - dequant(W_compressed)`` (optionally weighted by input-activation
  scales, as in EoRA), then distilled on calibration text against the uncompressed model.

Bypasses are attached with forward hooks on the compressed linears (on a MoEfied FFN's expert banks, as side
paths each expert reads its slice of), never by replacing modules, so they
compose with peft's LoRA wrappers (which keep the compressed linear as ``base_layer``) and can be switched
on and off. A model carries at most one :class:`RecoverySet` per slot (``"shared"``, ``"per_task"``), all in
one ``nn.ModuleDict`` registered on the model as ``cpet_recovery``, so that every attached set trains,
checkpoints and moves (``.to()``) with the model, and shared and per-task recovery can run together.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .assembly import RECOVERY_REMEDY, read_safetensors
from .assets import atomic_path
from .compress.manifest import short_base_id
from .models import linear_roles, unwrap
from .moe.experts import LowRankPath, bank_of

RECOVERY_FILE = "recovery.safetensors"
RECOVERY_META = "recovery.json"
ATTRIBUTE = "cpet_recovery"
SHARED, PER_TASK = "shared", "per_task"
SLOTS = (SHARED, PER_TASK)


@dataclass(frozen=True)
class RecoveryConfig:
    """How recovery bypasses are built.

    Attributes:
        rank: bypass rank r.
        alpha: scale numerator (output is multiplied by alpha / r).
        activation: ``"gelu"`` (CA-LoRA per-task recovery) or ``"identity"`` (linear, SVD-initialisable).
        target_roles: module-map roles that get a bypass (None: every mapped linear of the family).
        init: ``"zero"`` (B = 0: starts as a no-op) or ``"svd"`` (truncated SVD of the compression residual).
    """

    rank: int = 8
    alpha: float = 8.0
    activation: str = "gelu"
    target_roles: tuple[str, ...] | None = None
    init: str = "zero"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"recovery rank must be >= 1, got {self.rank}")
        # (not a plain `<= 0` test: NaN passes it) at 0 the residual-SVD start divides by the scale (NaN outputs)
        # and a zero-init set trains nothing; a negative one flips every bypass
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"recovery alpha must be a finite number > 0 (the bypass scale is alpha / rank), got "
                             f"{self.alpha}")
        if self.activation not in ("gelu", "identity"):
            raise ValueError(f"recovery activation must be 'gelu' or 'identity', got {self.activation!r}")
        if self.init not in ("zero", "svd"):
            raise ValueError(f"recovery init must be 'zero' or 'svd', got {self.init!r}")
        if self.init == "svd" and self.activation != "identity":
            raise ValueError("SVD initialisation needs activation='identity' (a GELU bypass is not linear)")
        if self.target_roles is not None:
            object.__setattr__(self, "target_roles", tuple(self.target_roles))


class RecoveryBypass(nn.Module):
    """``B(act(A x)) * alpha / rank`` with ``A: [rank, in_features]`` and ``B: [out_features, rank]``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, activation: str):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        self.scale = alpha / rank
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.weight.dtype)
        return self.B(self.act(self.A(x))) * self.scale


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")


def _features(module: nn.Module) -> tuple[int, int]:
    if not hasattr(module, "in_features"):
        raise ValueError(f"{type(module).__name__} is not a linear layer: recovery needs in/out features")
    return module.in_features, module.out_features


def _recovery_sets(base: nn.Module, create: bool = False) -> nn.ModuleDict | None:
    """The ``{slot: RecoverySet}`` container registered on a causal LM (made on demand with ``create``)."""
    sets = getattr(base, ATTRIBUTE, None)
    if sets is None and create:
        sets = nn.ModuleDict()
        base.add_module(ATTRIBUTE, sets)
    return sets


def attached_recovery(model: nn.Module) -> dict[str, "RecoverySet"]:
    """``{slot: RecoverySet}`` of the sets attached to ``model`` (a causal LM or a peft model around one)."""
    sets = _recovery_sets(unwrap(model))
    return dict(sets.items()) if sets is not None else {}


class _AddBypass:
    """The forward hook of one recovered linear: adds ``bypass(input)`` to its output while ``owner`` is enabled.

    An object, not a closure, so that ``copy.deepcopy`` of a model gives the copy's hooks the copy's set and
    bypasses (a closure would be shared and keep reading the original's)."""

    def __init__(self, owner: "RecoverySet", bypass: RecoveryBypass):
        self.owner, self.bypass = owner, bypass

    def __call__(self, module, inputs, output):
        if not self.owner.enabled:
            return output
        return output + self.bypass(inputs[0]).to(output.dtype)


class _BypassSidePath:
    """An expert-bank side path reading one bypass's factors while ``owner`` is enabled (an object, as above)."""

    def __init__(self, owner: "RecoverySet", bypass: RecoveryBypass):
        self.owner, self.bypass = owner, bypass

    def __call__(self) -> LowRankPath | None:
        if not self.owner.enabled:
            return None
        bypass = self.bypass
        return LowRankPath(bypass.A.weight, bypass.B.weight, bypass.scale, bypass.act, nn.Identity())


class RecoverySet(nn.Module):
    """Bypasses keyed by the compressed linear's module name, attached with forward hooks.

    Attributes:
        config: the :class:`RecoveryConfig`.
        targets: module names (relative to the causal LM) that carry a bypass.
        enabled: when False the hooks add nothing (the compressed base alone).
    """

    def __init__(self, model: nn.Module, config: RecoveryConfig):
        super().__init__()
        base = unwrap(model)
        roles = linear_roles(base)
        available = sorted(set(roles.values()))
        wanted = available if config.target_roles is None else config.target_roles
        unknown = [r for r in wanted if r not in available]
        if unknown:
            raise ValueError(f"recovery targets {unknown} do not exist in this model; its roles are {available}")
        self.config = config
        self.targets = [name for name, role in roles.items() if role in wanted]
        self.bypasses = nn.ModuleDict()
        for name in self.targets:
            d_in, d_out = _features(base.get_submodule(name))
            self.bypasses[_key(name)] = RecoveryBypass(d_in, d_out, config.rank, config.alpha, config.activation)
        self.enabled = True
        self._handles: list = []

    def bypass(self, name: str) -> RecoveryBypass:
        return self.bypasses[_key(name)]

    def weight_delta(self, name: str) -> torch.Tensor | None:
        """What this set adds to linear ``name``'s weight, ``B A * alpha / rank`` as fp32 ``[out, in]`` (None: no
        bypass there). Only a linear (``identity``) bypass is a weight; a GELU one is refused."""
        if _key(name) not in self.bypasses:
            return None
        if self.config.activation != "identity":
            raise ValueError(f"a {self.config.activation} recovery bypass is not linear: it adds no fixed weight")
        bypass = self.bypass(name)
        return (bypass.B.weight.detach().float() @ bypass.A.weight.detach().float()) * bypass.scale

    def attach(self, model: nn.Module, *, slot: str = SHARED, trainable: bool = False) -> "RecoverySet":
        """Hook every target linear of ``model`` and register this set as ``model.cpet_recovery[slot]``.

        ``slot`` is ``"shared"`` (task-agnostic, from :meth:`CPET.recover`) or ``"per_task"`` (trained with
        one adapter); a set already in that slot is detached first (its hooks stop adding), the other slot is
        left alone, so both bypasses of a linear add to its output. Attach after wrapping the model with peft
        (peft freezes every non-LoRA parameter it finds); ``trainable`` sets ``requires_grad`` of the bypasses.
        """
        if slot not in SLOTS:
            raise ValueError(f"recovery slot must be one of {SLOTS}, got {slot!r}")
        base = unwrap(model)
        self.detach()
        existing = _recovery_sets(base)
        if existing is not None and slot in existing:
            existing[slot].detach()  # the last set leaving drops the container: make it (again) only after this
        sets = _recovery_sets(base, create=True)
        for name in self.targets:
            module = base.get_submodule(name)
            bank = bank_of(module)
            if bank is not None:  # a MoEfied FFN calls its banks per expert, not through forward: a side path
                self._handles.append(bank.add_side_path(self._side_path(self.bypass(name))))
            else:
                self._handles.append(module.register_forward_hook(self._hook(self.bypass(name))))
        self.to(next(base.parameters()).device)
        self.requires_grad_(trainable)
        sets[slot] = self
        object.__setattr__(self, "_owner", (base, slot))  # plain attribute: not a submodule (no cycle)
        return self

    def _hook(self, bypass: RecoveryBypass) -> "_AddBypass":
        return _AddBypass(self, bypass)

    def _side_path(self, bypass: RecoveryBypass) -> "_BypassSidePath":
        return _BypassSidePath(self, bypass)

    def detach(self) -> None:
        """Remove the hooks and the registration (the model then computes without this set)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        owner = self.__dict__.pop("_owner", None)
        if owner is None:
            return
        base, slot = owner
        sets = _recovery_sets(base)
        if sets is not None and slot in sets and sets[slot] is self:
            del sets[slot]
            if not len(sets):  # a model without recovery looks as it did before any attach
                delattr(base, ATTRIBUTE)

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path, meta: dict) -> None:
        """Write ``recovery.safetensors`` + ``recovery.json`` (config, targets, ``meta``) atomically."""
        with atomic_path(Path(directory)) as tmp:
            tmp.mkdir()
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / RECOVERY_FILE))
            payload = {"config": asdict(self.config), "targets": self.targets, **meta}
            (tmp / RECOVERY_META).write_text(json.dumps(payload, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, expected_base_id: str | None = None
             ) -> "RecoverySet":
        """Load a saved set for ``model``; refuses a set made for another base (naming both ids)."""
        directory = Path(directory)
        meta = json.loads((directory / RECOVERY_META).read_text())
        if expected_base_id is not None and meta.get("base_id") != expected_base_id:
            raise ValueError(f"recovery modules in {directory} were made for base "
                             f"{short_base_id(meta.get('base_id'))}, not for this base "
                             f"{short_base_id(expected_base_id)}: recovery modules run only on the "
                             "base they were made for; make shared ones for this base with `cpet recover PIPELINE` "
                             "(per-task ones are made with their adapter: re-tune it on this base)")
        config = RecoveryConfig(**meta["config"])
        # the bypasses' random init is overwritten below: drawing it must not move the caller's random stream
        # (a LoRA initialised after this load would otherwise depend on whether recovery was loaded first)
        with torch.random.fork_rng(devices=[]):
            recovery = cls(model, config)
        if recovery.targets != meta["targets"]:
            raise ValueError(f"recovery modules in {directory} target other modules than this model has")
        recovery.load_state_dict(read_safetensors(directory / RECOVERY_FILE, RECOVERY_REMEDY, ValueError))
        return recovery


def read_recovery_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / RECOVERY_META).read_text())


def recovery_sha256(directory: str | Path) -> str:
    """SHA-256 of a saved set's weights file: what ties an adapter to the shared recovery it was trained with
    (``cpet recover`` run again replaces ``recovery/`` under the same base_id)."""
    digest = hashlib.sha256()
    with open(Path(directory) / RECOVERY_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stale_recovery(meta: dict, directory: str | Path, recovery_sha: str) -> str | None:
    """Why an adapter (its ``cpet.json`` ``meta``, stored in ``directory``) cannot run with the shared recovery
    whose weights hash to ``recovery_sha`` (None: it can). An adapter saved before CPET recorded the hash
    passes: nothing says which set it was trained with."""
    recorded = meta.get("shared_recovery") or {}
    trained = recorded.get("sha256") if isinstance(recorded, dict) else recorded
    if trained is not None and not isinstance(trained, str):
        return (f"adapter {directory} records shared_recovery {meta.get('shared_recovery')!r} in its cpet.json, not "
                "the hash of a recovery set: its metadata is damaged; tune the adapter again")
    if trained is None or trained == recovery_sha:
        return None
    return (f"adapter {directory} was trained with shared recovery {trained[:12]}, but the shared recovery at hand "
            f"is {recovery_sha[:12]} (`cpet recover` run again since it was tuned, or another pipeline's set): it "
            "would run with modules it never saw; re-tune it, or use the recovery it was trained with")


def check_trained_with(meta: dict, directory: str | Path, recovery_sha: str) -> None:
    """Refuse an adapter trained with other shared recovery (:func:`stale_recovery` says why).

    Raises:
        ValueError: the adapter recorded another set's hash.
    """
    reason = stale_recovery(meta, directory, recovery_sha)
    if reason:
        raise ValueError(reason)


# --------------------------------------------------------------------------------------------------
# Residual-SVD initialisation (LoftQ / EoRA style)
# --------------------------------------------------------------------------------------------------


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The effective fp32 weight ``[out, in]`` of a linear, dequantizing bitsandbytes 4/8-bit storage (an expert
    bank gives its experts' weights joined in whole-FFN order)."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.data, quant_state).float().reshape(module.out_features, -1)
    if getattr(weight, "SCB", None) is not None or getattr(getattr(module, "state", None), "SCB", None) is not None:
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0
    return weight.detach().float()


def compression_residual(original_linear: nn.Module, compressed_linear: nn.Module, rows, cols) -> torch.Tensor:
    """``W_orig[rows][:, cols] - dequant(W_compressed)`` as fp32 ``[out_kept, in_kept]``, on the compressed
    weight's device (the original may sit elsewhere; index maps live on the CPU)."""
    compressed = dequantized_weight(compressed_linear)
    weight = original_linear.weight.detach().float().to(compressed.device)
    if rows is not None:
        weight = weight.index_select(0, rows.to(compressed.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(compressed.device))
    if compressed.shape != weight.shape:
        raise ValueError(f"compressed weight {tuple(compressed.shape)} does not match the kept part of the "
                         f"original {tuple(weight.shape)}: the index maps belong to another base")
    return weight - compressed


def low_rank_factors(residual: torch.Tensor, rank: int, input_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [out, rank], A [rank, in])`` with ``B A`` the best rank-``rank`` approximation of ``residual``.

    With ``input_scale`` (per input feature, e.g. the RMS of the layer's inputs on calibration text) the
    SVD is of ``residual * scale``, so the error is measured on the outputs the layer actually produces
    (EoRA); A is then un-scaled, and is 0 on the features of scale 0 (never active on the calibration text). The
    singular values are split evenly: ``B = U sqrt(S)``, ``A = sqrt(S) Vh``.
    """
    residual = residual.float()
    weighted = residual * input_scale.unsqueeze(0) if input_scale is not None else residual
    U, S, Vh = torch.linalg.svd(weighted, full_matrices=False)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root.unsqueeze(0)
    A = root.unsqueeze(1) * Vh[:rank]
    if input_scale is not None:
        # an input feature that never fired on the calibration text (scale 0: a dead ReLU unit) weighed nothing in
        # the SVD, so A's column there is noise; dividing it by a clamped 0 blew it up (~6 against ~0.1 on OPT's
        # fc2). It gets no correction: nothing measured what it would need.
        live = input_scale > 1e-6 * input_scale.max()
        A = torch.where(live.unsqueeze(0), A / input_scale.clamp(min=1e-12).unsqueeze(0), 0.0)
    return B, A


def check_svd_rank(rank: int, shapes: dict[str, tuple[int, int]], fix: str) -> None:
    """Refuse a residual-SVD start of ``rank`` that some target cannot give: a truncated SVD of an ``[out, in]``
    weight has at most ``min(out, in)`` factors (e.g. SmolLM2's k/v projections: 192, fewer after head pruning).
    ``shapes``: target name -> ``(out, in)``; ``fix``: what to do instead. Checked before the original model and
    calibration load, not at the first copy of too few factors."""
    if not shapes:
        return
    name, (out, inp) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(out, inp):
        raise ValueError(f"rank {rank} is more than a truncated SVD of {name} ([{out}, {inp}]) can give "
                         f"({min(out, inp)} factors); {fix}")


def relative_error(residual: torch.Tensor, approx: torch.Tensor) -> float:
    """``||residual - approx||_F / ||residual||_F``."""
    return float(torch.linalg.norm(residual - approx) / torch.linalg.norm(residual).clamp(min=1e-12))


def residual_svd_init(bypass: RecoveryBypass, residual: torch.Tensor,
                      input_scale: torch.Tensor | None = None) -> float:
    """Set the bypass (``B A * scale``) to :func:`low_rank_factors` of ``residual`` ``[out, in]``.

    Returns the relative Frobenius error left, in the plain (unweighted) norm.
    """
    B, A = low_rank_factors(residual, bypass.A.weight.shape[0], input_scale)
    with torch.no_grad():
        bypass.B.weight.copy_(B / bypass.scale)
        bypass.A.weight.copy_(A)
    return relative_error(residual.float(), B @ A)


def init_from_residuals(recovery: RecoverySet, original: nn.Module, compressed: nn.Module, index_maps,
                        input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """SVD-initialise every bypass from its layer's compression residual (EoRA-weighted if scales given).

    ``input_scales`` are per-feature input RMS of the *original* linears (:func:`input_rms`); they are
    restricted to the kept input features. Returns ``{module name: relative residual error left}``.
    """
    from .models import iter_layer_linears

    errors = {}
    originals = {layer.index: layer for layer in iter_layer_linears(original)}
    for layer in iter_layer_linears(compressed):
        for role, name in layer.names.items():
            if name not in recovery.targets:
                continue
            rows, cols = index_maps.rows(layer.index, role), index_maps.cols(layer.index, role)
            residual = compression_residual(originals[layer.index][role],
                                            getattr(layer[role], "base_layer", layer[role]), rows, cols)
            if not residual.any():  # unchanged weights (e.g. MoEfication moves, not changes, them): keep the
                errors[name] = 0.0  # zero-start init, which distillation can move (an SVD of 0 would stay 0)
                continue
            scale = None
            if input_scales is not None:
                scale = input_scales[name] if cols is None else input_scales[name].index_select(0, cols)
            errors[name] = residual_svd_init(recovery.bypass(name), residual, scale)
    return errors
