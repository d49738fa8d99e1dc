"""Assembly: one step from (base, adapter, recovery) to what runs, shared by evaluation, serving and export.

An adapter directory is read once into a typed :class:`AdapterSource` (its ``adapter_config.json``, its
``cpet.json`` when it is a CPET adapter, its weights and their hash on first use), and turned once into checked
low-rank factors, a :class:`LoadedAdapter` (:func:`load_factors`). An :class:`Assembly` is the pure description of
one runnable model: a base (by ``base_id``), the adapter's factors and the base's shared recovery factors when the
adapter was trained with them. Nothing here touches a model:

- serving (:class:`cpet.serve.engine.Engine`) adds the factors of each batch row through hooks on one base;
- evaluation runs the same engine with one adapter (:meth:`cpet.pipeline.CPET.evaluate`), so nothing is
  reloaded or copied per adapter;
- export folds an assembly's linear terms into one LoRA (:meth:`Assembly.folded_lora`).

Every low-rank term computes ``act(x A^T) B^T * scale`` with ``A [r, in]``, ``B [out, r]``; ``act`` is the
identity for LoRA and shared recovery, GELU for CA-LoRA per-task recovery (which therefore cannot be folded).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .assets import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


class AdapterError(ValueError):
    """An adapter that cannot be used here; the message says what was wrong."""


@dataclass(frozen=True)
class LowRank:
    """``act(x A^T) B^T * scale`` with ``A [r, in]``, ``B [out, r]`` (``act`` identity, or GELU when ``gelu``)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    gelu: bool = False

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def owned(self, device: torch.device | str | None = None) -> "LowRank":
        """The same factors on ``device`` (None: where they are) in memory of their own, never the file they were
        read from.

        Safetensors files are read memory-mapped and an fp32 factor's ``float()`` is no copy, so a factor as read
        is the file's pages: a new version copied over the file in place (``cp``: the same file, truncated and
        rewritten) would change the adapter already loaded, under the requests running with it, and a file cut
        shorter than its mapping kills the server (SIGBUS) at its next read. A served factor lives as long as the
        server, so it is copied (``Tensor.to`` returns the tensor itself when nothing changes).
        """
        def own(t: torch.Tensor) -> torch.Tensor:
            moved = t.to(device) if device is not None else t
            return moved.clone() if moved is t else moved

        return replace(self, A=own(self.A), B=own(self.B))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low = x.to(self.A.dtype) @ self.A.T
        if self.gelu:
            low = torch.nn.functional.gelu(low)
        return (low @ self.B.T) * self.scale


def require_file(path: Path) -> None:
    """An :class:`AdapterError` naming ``path`` (a safetensors file of an adapter) when it does not exist: CPET
    reads safetensors only, never a pickled ``.bin``."""
    if not path.exists():
        raise AdapterError(f"{path.parent} has no {path.name} (CPET reads safetensors adapters only; re-save a .bin "
                           "adapter with `save_pretrained(..., safe_serialization=True)`)")


# how to make each kind of CPET safetensors file again, for the message that names a damaged one
ADAPTER_REMEDY = "re-run the step that wrote it, e.g. `cpet tune` for a pipeline's adapter"
BASE_REMEDY = "compress again: `cpet compress --model MODEL --out PIPELINE ...` with the same stages"
RECOVERY_REMEDY = ("a pipeline's shared recovery/: `cpet recover PIPELINE`, then re-tune the adapters trained with "
                   "it; an adapter's per_task_recovery/: re-tune the adapter")


def _unreadable(path: Path, exc: BaseException, remedy: str) -> str:
    return (f"{path} is not a readable safetensors file ({exc}): it is damaged (truncated or overwritten) or not "
            f"one; delete it and make it again ({remedy})")


@contextlib.contextmanager
def naming_damaged_safetensors(path: Path, remedy: str, error: type[ValueError] = ValueError) -> Iterator[None]:
    """Turn a :class:`SafetensorError` raised in the block (a truncated or garbled file) into ``error`` naming
    ``path`` and how to make it again (``remedy``).

    safetensors' own message ("incomplete metadata, file not fully covered") names no file: the CLI could only
    say that *a* file was damaged, and API callers got nothing to act on. Every place CPET reads one of its own
    safetensors files (a compressed base's weights and index maps, a recovery set, an adapter) goes through this,
    directly or by :func:`read_safetensors`; this form is for readers CPET does not own (``from_pretrained``,
    :meth:`~cpet.compress.manifest.IndexMaps.load`). Other errors (a missing file, a layout refused by name)
    pass as they are.
    """
    try:
        yield
    except SafetensorError as exc:
        raise error(_unreadable(path, exc, remedy)) from None


def read_safetensors(path: Path, remedy: str = ADAPTER_REMEDY,
                     error: type[ValueError] = AdapterError) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or unreadable file is an ``error`` (by default an
    :class:`AdapterError`) naming it, with ``remedy``: how to make it again."""
    if path.name == ADAPTER_WEIGHTS:
        require_file(path)  # says that a pickled .bin is not read (and how to convert it)
    elif not path.exists():
        raise error(f"{path.parent} has no {path.name}: make it again ({remedy})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(_unreadable(path, exc, remedy)) from None


class AdapterSource:
    """An adapter directory, read once: a CPET adapter (``cpet.json``) or a plain PEFT LoRA directory.

    ``config`` (``adapter_config.json``) and ``meta`` (``cpet.json``; empty for a plain PEFT adapter) are read
    on construction; ``tensors`` and ``weights_sha256`` on first use, then kept. What kind of adapter is
    acceptable is the user's to check (:func:`load_factors` to run it, :func:`cpet.adapters.check_inheritable`
    to inherit from it).

    Raises:
        AdapterError: not an adapter directory, or invalid JSON.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / ADAPTER_CONFIG
        if not config_path.exists():
            raise AdapterError(f"{self.directory} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        self.config: dict = _read_json(config_path)
        _check_lora_numbers(self.config, config_path)
        from .adapters import ADAPTER_META

        meta_path = self.directory / ADAPTER_META
        self.meta: dict = _read_json(meta_path) if meta_path.exists() else {}

    @property
    def is_cpet(self) -> bool:
        return bool(self.meta)

    @property
    def recovery(self) -> str:
        """``"none"``, ``"shared"``, ``"per_task"`` or ``"both"`` (a plain PEFT adapter: ``"none"``)."""
        return self.meta.get("recovery", "none")

    @property
    def uses_shared_recovery(self) -> bool:
        return self.recovery in ("shared", "both")

    @property
    def per_task_recovery_dir(self) -> Path | None:
        return self.directory / "per_task_recovery" if self.recovery in ("per_task", "both") else None

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        return read_safetensors(self.directory / ADAPTER_WEIGHTS)

    @cached_property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights file: which adapter exactly a run inherited from."""
        from .assets import sha256_of

        return sha256_of(self.directory / ADAPTER_WEIGHTS)

    def rank(self, module: str) -> int | None:
        """The rank ``adapter_config.json`` states for ``module`` (``rank_pattern``, else ``r``); None if neither."""
        from peft.utils.other import get_pattern_key

        rank_pattern = self.config.get("rank_pattern") or {}
        stated = rank_pattern.get(get_pattern_key(list(rank_pattern), module), self.config.get("r"))
        return stated if isinstance(stated, int) and not isinstance(stated, bool) else None

    def scale(self, module: str, rank: int) -> float:
        """peft's scale for ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), alpha patterns honoured."""
        from peft.utils.other import get_pattern_key

        alpha_pattern = self.config.get("alpha_pattern") or {}
        key = get_pattern_key(list(alpha_pattern), module)
        alpha = alpha_pattern.get(key, self.config.get("lora_alpha", 8))  # peft's LoraConfig default: 8
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def __repr__(self) -> str:
        return f"AdapterSource({str(self.directory)!r}, {'cpet' if self.is_cpet else 'peft'})"


def _check_lora_numbers(config: dict, path: Path) -> None:
    """Refuse an ``adapter_config.json`` whose rank or alpha (or their per-module patterns) are not numbers
    (``"lora_alpha": "16"`` was a TypeError once the scale was computed, a 500 in the server)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0

    for key, whole in (("r", True), ("lora_alpha", False)):
        value = config.get(key)
        if value is not None and not (number(value) and (not whole or isinstance(value, int))):
            kind = "an integer > 0" if whole else "a number > 0"
            raise AdapterError(f"{path}: {key} must be {kind}, got {value!r}: fix the file or save the adapter again")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(number(v) for v in pattern.values()):
            raise AdapterError(f"{path}: {key} must map module names to numbers > 0, got {pattern!r}: fix the file or "
                               "save the adapter again")


def check_stated_rank(source: AdapterSource, module: str, rank: int) -> None:
    """Refuse factors of ``module`` whose rank is not the one ``adapter_config.json`` states for it (``r`` /
    ``rank_pattern``).

    peft builds each LoRA layer from the config and then fails to load such weights with a bare "size mismatch"
    (after the base has loaded, in inheritance: after the original and the compressed base did); serving
    (:func:`load_factors`) and inheritance (:func:`cpet.adapters.plain_peft_meta`) both refuse the directory
    here, before any model work, naming the module and both ranks.

    Raises:
        AdapterError: the ranks differ.
    """
    stated = source.rank(module)
    if stated is not None and rank != stated:
        raise AdapterError(f"{source.directory}: module {module} has rank-{rank} factors, but adapter_config.json "
                           f"says rank {stated} for it (r / rank_pattern): its config does not describe its weights; "
                           "fix r / rank_pattern, or save the adapter again")


def as_source(adapter: "AdapterSource | str | Path") -> AdapterSource:
    """``adapter`` itself when already resolved, else the directory read into an :class:`AdapterSource`."""
    return adapter if isinstance(adapter, AdapterSource) else AdapterSource(adapter)


@dataclass
class LoadedAdapter:
    """One adapter's checked factors, ready to run on its base.

    Attributes:
        lora: module name (relative to the causal LM) -> its LoRA.
        per_task: module name -> per-task recovery bypass (empty without per-task recovery).
        shared: whether the adapter was trained with its base's shared recovery (its ``cpet.json``).
        meta: ``cpet.json`` (empty for a plain PEFT adapter).
    """

    name: str
    directory: Path
    lora: dict[str, LowRank]
    per_task: dict[str, LowRank] = field(default_factory=dict)
    shared: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((lr.A.shape[0] for lr in self.lora.values()), default=0)

    def owned(self, device: torch.device | str | None = None) -> "LoadedAdapter":
        """The same adapter with every factor :meth:`LowRank.owned` on ``device`` (where the base that runs it is;
        None: where they are)."""
        return replace(self, lora={k: v.owned(device) for k, v in self.lora.items()},
                       per_task={k: v.owned(device) for k, v in self.per_task.items()})

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in (*self.lora.values(), *self.per_task.values()))


def load_factors(name: str, source: AdapterSource | str | Path, module_shapes: dict[str, tuple[int, int]], *,
                 base_id: str, shared_available: bool, shared_sha256: str | None = None,
                 reordered: frozenset[str] = frozenset()) -> LoadedAdapter:
    """Check ``source`` against a base and read its factors (LoRA, and per-task recovery when it has one).

    Args:
        module_shapes: ``{module name: (in_features, out_features)}`` of the base's mapped linears.
        base_id: the base's id; a CPET adapter tuned on another base is refused.
        shared_available: whether the base's shared recovery is at hand (adapters trained with it need it).
        shared_sha256: the SHA-256 of that recovery's weights; an adapter that recorded another one (trained
            before ``cpet recover`` was run again) is refused.
        reordered: modules whose neurons the base keeps in another order than the source model at the same shape
            (:func:`reordered_modules`); a plain PEFT adapter (no ``cpet.json``, so no base_id to check) with a
            LoRA on one is refused: its factors would act on the wrong neurons.
    Raises:
        AdapterError: not a LoRA (or a DoRA), another base, a module the base lacks, shapes that do not fit, a
            missing or unreadable weights file, or shared recovery that is not available.
    """
    source = as_source(source)
    directory = source.directory
    if source.config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{directory} is a {source.config.get('peft_type')} adapter; only LoRA adapters run here: "
                           "train a LoRA (peft LoraConfig, or `cpet tune`)")
    if source.config.get("use_dora"):
        raise AdapterError(f"{directory} is a DoRA adapter (a magnitude vector per module, which the stacked low-rank "
                           "paths cannot apply): only LoRA runs here; train it again with use_dora=False")
    from .adapters import check_plain_delta

    try:  # pissa / olora saved unconverted, activated LoRA, layer_replication: not a plain delta on every token
        check_plain_delta(source.config, directory)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    if source.is_cpet:  # the base first: an adapter of another base is named as such, not by a shape mismatch
        from .adapters import check_adapter_base

        try:
            check_adapter_base(source.meta, base_id=base_id, directory=directory)
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in source.tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{directory}: tensor {key!r} is not a LoRA factor (only LoRA A/B are used)")
        factors.setdefault(match[1], {})[match[2]] = tensor.float()
    lora = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{directory}: module {module} has only lora_{''.join(pair)}")
        shape = module_shapes.get(module)
        if shape is None:
            raise AdapterError(f"{directory}: module {module} is not a linear of this base")
        if module in reordered and not source.is_cpet:
            raise reordered_plain_lora(directory, module)
        A, B = pair["A"], pair["B"]
        if A.shape[1] != shape[0] or B.shape[0] != shape[1] or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{directory}: module {module} has LoRA shapes A {tuple(A.shape)}, B "
                               f"{tuple(B.shape)}; the base linear is {shape[0]} -> {shape[1]}: an adapter of "
                               "another base")
        check_stated_rank(source, module, A.shape[0])
        lora[module] = LowRank(A, B, source.scale(module, A.shape[0]))
    if not lora:
        raise AdapterError(f"{directory} holds no LoRA factors")
    adapter = LoadedAdapter(name, directory, lora, meta=source.meta)
    if source.is_cpet:
        adapter.shared = source.uses_shared_recovery
        if adapter.shared and not shared_available:
            raise AdapterError(f"adapter {directory} was trained with its pipeline's shared recovery, which is not "
                               "at hand: the pipeline has no recovery/ (run `cpet recover`), or the server was not "
                               "started from the pipeline directory")
        if adapter.shared and shared_sha256 is not None:
            from .recovery import stale_recovery

            stale = stale_recovery(source.meta, directory, shared_sha256)
            if stale:
                raise AdapterError(stale)
        if source.per_task_recovery_dir is not None:
            adapter.per_task = read_recovery(source.per_task_recovery_dir, module_shapes, base_id=base_id)
    return adapter


def read_recovery(directory: Path, module_shapes: dict[str, tuple[int, int]], *, base_id: str | None = None
                  ) -> dict[str, LowRank]:
    """A saved :class:`~cpet.recovery.RecoverySet` (``recovery.json`` + safetensors) as plain factors, checked
    against the base (its recorded ``base_id`` when ``base_id`` is given, and every module's shape).

    Raises:
        AdapterError: missing or unreadable files, a set made for another base, or one that does not fit it.
    """
    from .recovery import RECOVERY_FILE, RECOVERY_META

    if not (directory / RECOVERY_META).exists():
        raise AdapterError(f"{directory} holds no recovery modules (no {RECOVERY_META})")
    meta = _read_json(directory / RECOVERY_META)
    if base_id is not None and meta.get("base_id") not in (None, base_id):
        raise AdapterError(f"the recovery modules in {directory} were made for base {str(meta['base_id'])[:12]}, not "
                           f"for this base {base_id[:12]}")
    tensors = read_safetensors(directory / RECOVERY_FILE, RECOVERY_REMEDY)
    try:
        config, targets = meta["config"], list(meta["targets"])
        scale, gelu = config["alpha"] / config["rank"], config["activation"] == "gelu"
    except (KeyError, TypeError, ZeroDivisionError) as exc:  # a damaged file is the artifact's fault: say which
        raise AdapterError(f"{directory / RECOVERY_META} is damaged ({type(exc).__name__}: {exc}; it needs a config "
                           "with alpha, rank and activation, and a list of targets): make the recovery again") from None
    out = {}
    for module in targets:
        key = module.replace(".", "__")
        pair = (tensors.get(f"bypasses.{key}.A.weight"), tensors.get(f"bypasses.{key}.B.weight"))
        if pair[0] is None or pair[1] is None:
            raise AdapterError(f"{directory / RECOVERY_FILE} lacks the factors of {module}: make it again")
        A, B = pair[0].float(), pair[1].float()
        fits = module in module_shapes and (A.shape[1], B.shape[0]) == module_shapes[module]
        if not fits:
            raise AdapterError(f"recovery in {directory} does not fit this base (module {module})")
        out[module] = LowRank(A, B, scale, gelu=gelu)
    return out


def module_shapes(model) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of every mapped linear of a causal LM (the modules adapters and recovery may target)."""
    from .models import iter_layer_linears, unwrap

    return {name: (layer[role].in_features, layer[role].out_features)
            for layer in iter_layer_linears(unwrap(model)) for role, name in layer.names.items()}


def reordered_plain_lora(directory: Path, module: str) -> AdapterError:
    """The refusal of a plain PEFT adapter (no ``cpet.json``) with a LoRA on ``module``, a linear whose neurons the
    base keeps in another order than the source model (:func:`reordered_modules`): its factors would act on the
    wrong neurons. Serving (:func:`load_factors`) and :func:`cpet.adapters.load_standalone` both raise it."""
    return AdapterError(f"{directory} is a plain PEFT adapter with a LoRA on {module}, whose neurons this base keeps "
                        "in another order than the source model (MoEfication groups them into experts): its factors "
                        "would act on the wrong neurons. Tune a CPET adapter from it instead, which maps it through "
                        "the base's index maps: `cpet tune PIPELINE --task TASK --init inherit --inherit-from "
                        f"{directory}`")


def reordered_modules(model) -> frozenset[str]:
    """The mapped linears whose neurons a compression stage keeps in another order at the same shape: the expert
    banks of a MoEfied FFN (its neurons permuted into experts). A LoRA made on the source model cannot be read
    onto these by shape; it must be mapped through the base's index maps (inheritance)."""
    from .models import iter_layer_linears, unwrap
    from .moe.experts import bank_of

    return frozenset(name for layer in iter_layer_linears(unwrap(model)) for role, name in layer.names.items()
                     if bank_of(layer[role]) is not None)


@dataclass(frozen=True)
class Assembly:
    """One runnable model, described: the base ``base_id``, an adapter's factors (None: the bare base) and the
    base's shared recovery factors when that adapter was trained with them (empty otherwise)."""

    base_id: str
    adapter: LoadedAdapter | None
    shared: dict[str, LowRank] = field(default_factory=dict)

    @classmethod
    def of(cls, base_id: str, adapter: LoadedAdapter | None, shared_recovery: dict[str, LowRank]) -> "Assembly":
        """The assembly of ``adapter`` on a base whose shared recovery is ``shared_recovery`` (kept only when the
        adapter was trained with it)."""
        return cls(base_id, adapter, dict(shared_recovery) if adapter is not None and adapter.shared else {})

    def terms(self, module: str) -> list[LowRank]:
        """The low-rank terms added to ``module``'s output, in order: shared recovery, LoRA, per-task recovery."""
        if self.adapter is None:
            return []
        parts = (self.shared.get(module), self.adapter.lora.get(module), self.adapter.per_task.get(module))
        return [p for p in parts if p is not None]

    @property
    def modules(self) -> list[str]:
        names = set(self.shared)
        if self.adapter is not None:
            names |= set(self.adapter.lora) | set(self.adapter.per_task)
        return sorted(names)

    def folded_lora(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
        """``({module: (A [r, in], B [out, r])}, r)`` at scale 1: every term of every module concatenated along
        the rank (exact, since each term is linear), zero-padded to one rank ``r`` for all modules.

        Raises:
            ValueError: a nonlinear term (per-task recovery, or GELU shared recovery): no LoRA reproduces it.
        """
        parts: dict[str, list[LowRank]] = {}
        for module in self.modules:
            for term in self.terms(module):
                if term.gelu:
                    kind = "per-task" if self.adapter and term is self.adapter.per_task.get(module) else "shared"
                    raise ValueError(f"{kind} recovery on {module} has a GELU and is not linear: it cannot be "
                                     "folded into a LoRA")
                parts.setdefault(module, []).append(term)
        if not parts:
            raise ValueError("nothing to fold: the assembly has no adapter")
        rank = max(sum(t.A.shape[0] for t in terms) for terms in parts.values())
        folded = {}
        for module, terms in parts.items():
            A = torch.cat([t.A for t in terms])
            B = torch.cat([t.B * t.scale for t in terms], dim=1)
            pad = rank - A.shape[0]
            if pad:
                A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
                B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
            folded[module] = (A.contiguous(), B.contiguous())
        return folded, rank


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; AdapterError naming the file when it is not one."""
    try:
        return read_json_object(path, "is it the right file?")
    except ValueError as exc:
        raise AdapterError(str(exc)) from None


__all__ = ["AdapterError", "AdapterSource", "Assembly", "LoadedAdapter", "LowRank", "as_source", "check_stated_rank",
           "load_factors", "module_shapes", "naming_damaged_safetensors", "read_recovery", "read_safetensors",
           "reordered_modules", "reordered_plain_lora"]
