"""The compression stage protocol and its registry: stages plug in by config type.

A stage is an object with three methods (:class:`Stage`), registered for one config dataclass with an order
rank (:func:`register_stage`). :func:`cpet.compress.compress` looks every config up here, checks the order
generically, validates all stages before any work, applies them, and composes their index maps; the loader
asks each recorded stage to rebuild what it changed. Adding a stage touches no other file:

```python
@dataclass(frozen=True)
class MyConfig:
    strength: float = 0.5
    stage: ClassVar[str] = "mine"          # the name in manifest.json

class MyStage:
    def validate(self, model, config, context, previous): ...   # raise ValueError before any work
    def apply(self, model, config, context): return model, local_index_maps_or_None
    def rebuild(self, model, config, index_maps): return model

register_stage(MyConfig, MyStage(), rank=500)
```

Ranks: structure changes first (pruning 100), storage last (quantization 900); stages of equal rank may
come in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import nn

from ..config import STAGE_CONFIGS, register_stage_config
from .index_maps import IndexMaps


@dataclass
class StageContext:
    """What stages may read besides the model and their config, and what they tell the stages after them.

    Attributes:
        calibration: ``[n, seq]`` token ids for data-aware stages, or None.
        progress: whether stages may show progress bars.
        custom_layout: None while transformers can rebuild the model from its ``config.json`` alone; else
            what it cannot rebuild, in words (e.g. ``"per-layer FFN widths (layer_schedule)"``). During
            validation stages set it from their configs (a prediction later stages may refuse, as quantization
            does); during application :func:`~cpet.compress.compress` sets it when a stage's index maps have
            per-layer widths, and stages that change modules set it themselves. A base saved with it set is
            reloaded through every stage's :meth:`Stage.rebuild` instead of plain ``from_pretrained``.
    """

    calibration: torch.Tensor | None
    progress: bool
    custom_layout: str | None = None

    @property
    def uniform(self) -> bool:
        """True while the model stays a plain transformers checkpoint."""
        return self.custom_layout is None


class Stage(Protocol):
    """One compression stage. Stateless: everything it needs is in its config, the model and the context."""

    def validate(self, model: nn.Module, config, context: StageContext, previous: Sequence) -> None:
        """Raise ``ValueError`` for anything that would fail, before any stage runs.

        ``model`` is the uncompressed input of the whole pipeline; ``previous`` are the configs of the stages
        that will run before this one. May record in ``context`` what later stages' validation must know.
        """

    def apply(self, model: nn.Module, config, context: StageContext) -> tuple[nn.Module, IndexMaps | None]:
        """Compress ``model`` (in place or not) and return it with the index maps of what this stage changed,
        relative to *its* input (None: no row or column moved, e.g. quantization)."""

    def rebuild(self, model: nn.Module, config, index_maps: IndexMaps) -> nn.Module:
        """Give a model that transformers built from the saved ``config.json`` what this stage changed.

        ``index_maps`` are the base's final maps (original coordinates). For a base that reloads with plain
        ``from_pretrained`` it is called after the weights are loaded; otherwise before (modules it creates get
        the saved weights by name). Must return a model that already has the structure unchanged.
        """

    # Optional: ``load_weights(model, config, state)`` for a base reloaded through the stages (not plain
    # ``from_pretrained``), called after every rebuild and before ``load_state_dict``: load the weights of modules
    # that cannot read them through ``load_state_dict`` (e.g. bitsandbytes 4-bit layers), pop their keys and return
    # the parameter names it filled.


@dataclass(frozen=True)
class Registration:
    """A registered stage: its config type, the stage object and where it may run.

    Attributes:
        rank: stages run in non-decreasing rank; a config of lower rank after one of higher rank is refused.
        repeatable: whether one pipeline may hold several configs of this type.
        order_note: why lower-ranked stages cannot follow this one, for the error message.
    """

    config_type: type
    stage: Stage
    rank: int
    repeatable: bool = True
    order_note: str = ""

    @property
    def name(self) -> str:
        return self.config_type.__name__


STAGES: dict[type, Registration] = {}  # config type -> registration; read it through registration()


def register_stage(config_type: type, stage: Stage, *, rank: int, repeatable: bool = True,
                   order_note: str = "") -> Registration:
    """Register ``stage`` for configs of ``config_type`` (re-registering a type replaces it).

    ``config_type`` is a dataclass with a ``stage: ClassVar[str]`` name (see :mod:`cpet.config`).
    Raises TypeError for a stage lacking one of the :class:`Stage` methods.
    """
    missing = [m for m in ("validate", "apply", "rebuild") if not callable(getattr(stage, m, None))]
    if missing:
        raise TypeError(f"{type(stage).__name__} is not a compression stage: it lacks {missing}")
    register_stage_config(config_type)
    entry = Registration(config_type, stage, int(rank), repeatable, order_note)
    STAGES[config_type] = entry
    return entry


def unregister_stage(config_type: type) -> None:
    """Remove a registration (and its JSON name); unknown types are ignored."""
    if STAGES.pop(config_type, None) is not None and STAGE_CONFIGS.get(config_type.stage) is config_type:
        del STAGE_CONFIGS[config_type.stage]


def registration(config) -> Registration:
    """The registration of a stage config object (or config type). Raises ValueError if unregistered."""
    config_type = config if isinstance(config, type) else type(config)
    if config_type not in STAGES:
        raise ValueError(f"unknown compression stages ['{config_type.__name__}']; known: "
                         f"{[t.__name__ for t in STAGES]}")
    return STAGES[config_type]


def check_order(stages: Sequence) -> list[Registration]:
    """The registrations of ``stages``, after the generic checks every pipeline passes.

    Raises:
        ValueError: an unregistered config, a non-repeatable stage given twice, or a stage after one of
            higher rank (the message says which to put first).
    """
    unknown = [type(s).__name__ for s in stages if type(s) not in STAGES]
    if unknown:
        raise ValueError(f"unknown compression stages {unknown}; known: {[t.__name__ for t in STAGES]}")
    entries = [STAGES[type(s)] for s in stages]
    for entry in dict.fromkeys(entries):
        if not entry.repeatable and entries.count(entry) > 1:
            raise ValueError(f"a compression pipeline takes at most one {entry.name}")
    for i, later in enumerate(entries):
        earlier = max(entries[:i], key=lambda e: e.rank, default=None)
        if earlier is not None and earlier.rank > later.rank:
            why = f" ({earlier.order_note})" if earlier.order_note else ""
            raise ValueError(f"{later.name} cannot run after {earlier.name}{why}: put {later.name} before "
                             f"{earlier.name} in the stages")
    return entries


__all__ = ["Stage", "StageContext", "Registration", "STAGES", "register_stage", "unregister_stage",
           "registration", "check_order"]
