"""Index maps: which rows and columns of the *original* weights every mapped linear of a compressed base holds.

One map per ``(layer, role, axis)``: ``role`` is a module-map role (``q``, ``k``, ``v``, ``o``, ``gate``,
``up``, ``down``, ...), ``axis`` is ``"rows"`` (output features) or ``"cols"`` (input features)::

    W_compressed[layer, role] == W_orig[layer, role][rows(layer, role)][:, cols(layer, role)]   # before storage

A map is an int64 vector ``[kept]`` of original indices in the order the compressed weight holds them: a
sorted subset (pruning), a permutation (expert grouping), or both. A missing map (``None``) means that axis is
unchanged: all of the original, in order. Stages return maps relative to *their* input; :meth:`compose` turns
them into original coordinates, so readers (inheritance, residual-SVD recovery, the loader) never need to
know which stage made a map.

On disk (``index_maps.safetensors``, layout 2, marked in the safetensors metadata): ``num_layers`` ``[1]``,
``head_dim`` ``[1]``, ``shapes.{role}`` ``[2]`` = original ``(out, in)``, ``layers.{i}.{role}.{rows|cols}``.
Layout 1 (before maps were generic: ``head_dim``, ``layers.{i}.ffn`` / ``q_heads`` / ``kv_heads``) still loads.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROWS, COLS = "rows", "cols"
AXES = (ROWS, COLS)
ROLES = ("q", "k", "v", "o", "gate", "up", "down")  # the module-map roles, in a fixed order
Slot = tuple[str, str]  # (role, axis)

# Units of coupled change: slots that structured pruning keeps or drops together (one index map for all)
FFN_CHANNELS: tuple[Slot, ...] = (("gate", ROWS), ("up", ROWS), ("down", COLS))
QUERY_HEADS: tuple[Slot, ...] = (("q", ROWS), ("o", COLS))
KV_HEADS: tuple[Slot, ...] = (("k", ROWS), ("v", ROWS))

LAYOUT = "2"
_FORMAT = "cpet-index-maps"
_ENTRY = re.compile(r"layers\.(\d+)\.(.+)\.(rows|cols)")
_LEGACY = re.compile(r"layers\.(\d+)\.(ffn|q_heads|kv_heads)")


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of every head in ``heads`` ``[h]``: ``[h * head_dim]`` (head ``i`` owns rows ``i*hd .. i*hd+hd-1``)."""
    heads = heads.to("cpu", torch.int64)  # index maps live on the CPU, whatever device scored the heads
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def rows_to_heads(rows: torch.Tensor, head_dim: int) -> torch.Tensor | None:
    """Inverse of :func:`head_rows`; None when ``rows`` are not whole heads in order."""
    if head_dim < 1 or rows.numel() % head_dim:
        return None
    heads = rows.reshape(-1, head_dim)[:, 0] // head_dim
    return heads if torch.equal(head_rows(heads, head_dim), rows) else None


def _as_index(value) -> torch.Tensor:
    index = torch.as_tensor(value)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"an index map is a 1-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}")
    # on the CPU (indices scored on a GPU come here too), own storage: safetensors refuses shared tensors,
    # callers may mutate
    return index.to("cpu", torch.int64).clone()


class IndexMaps:
    """Per-layer, per-role index maps of a compressed base, always in the original model's coordinates.

    Args:
        num_layers: decoder layers of the model.
        shapes: original ``(out_features, in_features)`` of each role the model has (the same in every layer);
            it names the roles and sizes what a missing map means. May be empty for maps read from layout 1,
            whose every map is explicit.
        head_dim: width of one attention head, for the head-level views (:meth:`q_rows`, ``layers[i].q_heads``).
        entries: ``{(layer, role, axis): int64 [kept]}``; missing = unchanged.
    """

    def __init__(self, num_layers: int, shapes: dict[str, tuple[int, int]], head_dim: int,
                 entries: dict[tuple[int, str, str], torch.Tensor] | None = None):
        self.num_layers = int(num_layers)
        self.shapes = {role: (int(out), int(inp)) for role, (out, inp) in shapes.items()}
        self.head_dim = int(head_dim)
        self._entries: dict[tuple[int, str, str], torch.Tensor] = {}
        for (layer, role, axis), index in (entries or {}).items():
            self._set(layer, role, axis, index)

    @classmethod
    def identity(cls, geo, roles: Iterable[str] = ROLES) -> "IndexMaps":
        """Maps of an uncompressed model with :class:`~cpet.models.Geometry` ``geo``: everything kept.

        ``roles``: the roles the model has (``family_of(model).roles``; a non-gated FFN has no ``gate``).
        """
        q, kv, h, i = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim, geo.hidden_size, \
            geo.intermediate_size
        known = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}
        return cls(geo.num_layers, {r: known[r] for r in roles}, geo.head_dim)

    def __len__(self) -> int:
        return self.num_layers

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles with a known shape or a map: module-map roles first, in :data:`ROLES` order."""
        named = set(self.shapes) | {role for _, role, _ in self._entries}
        return tuple(r for r in ROLES if r in named) + tuple(sorted(named - set(ROLES)))

    # ------------------------------------------------------------------ reading
    def rows(self, layer: int, role: str) -> torch.Tensor | None:
        """Original output rows the compressed ``role`` of ``layer`` holds, in its order. None = all, in order."""
        return self._entries.get((layer, role, ROWS))

    def cols(self, layer: int, role: str) -> torch.Tensor | None:
        """Original input columns the compressed ``role`` of ``layer`` holds, in its order. None = all, in order."""
        return self._entries.get((layer, role, COLS))

    def full(self, layer: int, role: str, axis: str) -> torch.Tensor:
        """Like :meth:`rows` / :meth:`cols` but never None: an unchanged axis gives ``arange(original size)``."""
        index = self._entries.get((layer, role, axis))
        if index is not None:
            return index
        if role not in self.shapes:
            raise KeyError(f"index maps know no shape for role {role!r} (roles: {list(self.shapes)})")
        return torch.arange(self.shapes[role][AXES.index(axis)])

    def width(self, layer: int, role: str, axis: str) -> int | None:
        """Features the compressed linear has on ``axis`` (None: unchanged and of unknown original size)."""
        index = self._entries.get((layer, role, axis))
        if index is not None:
            return len(index)
        return self.shapes[role][AXES.index(axis)] if role in self.shapes else None

    def uniform(self) -> bool:
        """True when every role has the same widths in every layer (a plain transformers config can state them)."""
        slots = {(role, axis) for _, role, axis in self._entries}
        return all(len({self.width(layer, r, a) for layer in range(self.num_layers)}) == 1 for r, a in slots)

    # ------------------------------------------------------------------ writing (stages)
    def set(self, layer: int, role: str, *, rows=None, cols=None) -> None:
        """Record that ``role`` of ``layer`` holds these original ``rows`` / ``cols`` (int ``[kept]``, any order)."""
        if rows is not None:
            self._set(layer, role, ROWS, rows)
        if cols is not None:
            self._set(layer, role, COLS, cols)

    def select(self, layer: int, slots: Iterable[Slot], index) -> None:
        """Give every slot of a coupled unit (e.g. :data:`FFN_CHANNELS`) whose role the model has the same map."""
        roles = self.roles
        for role, axis in slots:
            if role in roles:
                self._set(layer, role, axis, index)

    def _set(self, layer: int, role: str, axis: str, index) -> None:
        if not 0 <= layer < self.num_layers or axis not in AXES:
            raise ValueError(f"no slot (layer {layer}, {role!r}, {axis!r}) in maps of {self.num_layers} layers")
        self._entries[(int(layer), role, axis)] = _as_index(index)

    # ------------------------------------------------------------------ composition
    def compose(self, local: "IndexMaps") -> "IndexMaps":
        """Maps after a further stage whose ``local`` maps index into *this* stage's output.

        ``result.rows(l, r) == self.full(l, r, "rows")[local.rows(l, r)]`` (likewise cols); slots ``local``
        leaves unchanged keep this map.
        """
        if len(local) != len(self):
            raise ValueError(f"cannot compose index maps of {len(self)} and {len(local)} layers")
        entries = dict(self._entries)
        for key, index in local._entries.items():
            mine = self._entries.get(key)
            entries[key] = index if mine is None else mine[index]
        return IndexMaps(self.num_layers, self.shapes, self.head_dim, entries)

    # ------------------------------------------------------------------ head-level views (layout 1)
    def _unit(self, layer: int, slots: Iterable[Slot]) -> torch.Tensor:
        present = [s for s in slots if s[0] in self.roles]
        if not present:
            raise KeyError(f"these index maps have none of the roles {[role for role, _ in slots]}")
        return self.full(layer, *present[0])

    def ffn_rows(self, layer: int) -> torch.Tensor:
        """Original FFN channel of each kept channel: gate/up rows, down columns. ``[kept]`` int64."""
        return self._unit(layer, FFN_CHANNELS)

    def q_rows(self, layer: int) -> torch.Tensor:
        """Original rows of q_proj (= columns of o_proj) that were kept. ``[kept_heads * head_dim]``."""
        return self._unit(layer, QUERY_HEADS)

    def kv_rows(self, layer: int) -> torch.Tensor:
        """Original rows of k_proj / v_proj that were kept."""
        return self._unit(layer, KV_HEADS)

    @property
    def layers(self) -> list["LayerIndex"]:
        """One writable :class:`LayerIndex` view per layer."""
        return [LayerIndex(self, i) for i in range(self.num_layers)]

    def widths(self) -> list[dict[str, int]]:
        return [{"ffn": len(li.ffn), "q_heads": len(li.q_heads), "kv_heads": len(li.kv_heads)} for li in self.layers]

    # ------------------------------------------------------------------ identity and persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """The layout-2 tensors (see the module docstring)."""
        out = {"num_layers": torch.tensor([self.num_layers]), "head_dim": torch.tensor([self.head_dim])}
        for role, shape in self.shapes.items():
            out[f"shapes.{role}"] = torch.tensor(shape, dtype=torch.int64)
        for (layer, role, axis), index in sorted(self._entries.items()):
            out[f"layers.{layer}.{role}.{axis}"] = index
        return out

    def legacy_tensors(self) -> dict[str, torch.Tensor] | None:
        """The layout-1 tensors, or None when these maps cannot be written in it.

        Layout 1 holds per layer one map per coupled unit (kept FFN channels, query heads, KV heads); maps fit
        it when only those slots are mapped, the slots of each unit agree and attention maps are whole heads.
        """
        units = {"ffn": FFN_CHANNELS, "q_heads": QUERY_HEADS, "kv_heads": KV_HEADS}
        covered = {slot for slots in units.values() for slot in slots}
        if any((role, axis) not in covered for _, role, axis in self._entries):
            return None
        roles, out = self.roles, {"head_dim": torch.tensor([self.head_dim])}
        for layer in range(self.num_layers):
            for name, slots in units.items():
                present = [s for s in slots if s[0] in roles]
                try:
                    values = [self.full(layer, role, axis) for role, axis in present]
                except KeyError:
                    return None
                if not values or any(not torch.equal(values[0], v) for v in values[1:]):
                    return None
                index = values[0] if name == "ffn" else rows_to_heads(values[0], self.head_dim)
                if index is None:
                    return None
                out[f"layers.{layer}.{name}"] = index.contiguous()
        return out

    def digest(self) -> str:
        """SHA-256 of the maps (part of ``base_id``).

        Maps that fit layout 1 hash their layout-1 tensors, exactly as before maps were generic, so the
        ``base_id`` of an unchanged configuration stays the same; other maps hash their layout-2 tensors.
        """
        tensors = self.legacy_tensors()
        tensors = self.tensors() if tensors is None else tensors
        digest = hashlib.sha256()
        for key, value in sorted(tensors.items()):
            digest.update(key.encode())
            digest.update(value.cpu().numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path) -> None:
        save_file(self.tensors(), str(path), metadata={"format": _FORMAT, "layout": LAYOUT})

    @classmethod
    def load(cls, path: str | Path, geometry=None) -> "IndexMaps":
        """Read layout 2, or layout 1 (written before maps were generic).

        ``geometry``: the original model's geometry (a :class:`~cpet.models.Geometry` or anything with its
        attributes, e.g. the manifest's ``geometry_before``); layout 1 records no shapes, so without it maps read
        from layout 1 know only the slots they map (:meth:`full` of another slot raises KeyError).

        Raises:
            ValueError: any other layout (a newer CPET's, or a damaged file), with what to do.
        """
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        if metadata.get("format") == _FORMAT and metadata.get("layout") == LAYOUT:
            return cls._from_layout2(tensors)
        if "head_dim" in tensors and tensors.keys() - {"head_dim"} and all(
                _LEGACY.fullmatch(k) for k in tensors.keys() - {"head_dim"}):
            maps = cls._from_layout1(tensors)
            if geometry is not None:  # layout 1 did not say which roles exist: all of them (unread if absent)
                maps.shapes = cls.identity(geometry).shapes
            return maps
        raise ValueError(f"{path}: index maps in a layout this CPET does not read ({metadata.get('format')!r} "
                         f"layout {metadata.get('layout')!r}; it reads layouts 1 and {LAYOUT}): compress the base "
                         "again with this CPET (`cpet compress --model MODEL --out PIPELINE ...`)")

    @classmethod
    def _from_layout2(cls, tensors: dict[str, torch.Tensor]) -> "IndexMaps":
        shapes = {k.split(".", 1)[1]: tuple(v.tolist()) for k, v in tensors.items() if k.startswith("shapes.")}
        entries = {}
        for key, value in tensors.items():
            match = _ENTRY.fullmatch(key)
            if match:
                entries[(int(match[1]), match[2], match[3])] = value
        return cls(int(tensors["num_layers"][0]), shapes, int(tensors["head_dim"][0]), entries)

    @classmethod
    def _from_layout1(cls, tensors: dict[str, torch.Tensor]) -> "IndexMaps":
        # Layout 1 names no roles or sizes: every slot of every unit becomes an explicit map (a role the model
        # lacks, e.g. a non-gated FFN's gate, is never read), so nothing depends on the unknown shapes.
        head_dim = int(tensors["head_dim"][0])
        n = len([k for k in tensors if k.endswith(".ffn")])
        maps = cls(n, {}, head_dim)
        for i in range(n):
            for slots, index in ((FFN_CHANNELS, tensors[f"layers.{i}.ffn"]),
                                 (QUERY_HEADS, head_rows(tensors[f"layers.{i}.q_heads"], head_dim)),
                                 (KV_HEADS, head_rows(tensors[f"layers.{i}.kv_heads"], head_dim))):
                for role, axis in slots:
                    maps._set(i, role, axis, index)
        return maps

    def __eq__(self, other) -> bool:
        """Same kept coordinates (by :meth:`digest`), whichever layout either was read from."""
        return isinstance(other, IndexMaps) and self.digest() == other.digest()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"IndexMaps({self.num_layers} layers, roles {list(self.roles)}, {len(self._entries)} maps)"


class LayerIndex:
    """One layer's maps as kept FFN channels, query heads and KV heads, sorted or not, in original coordinates.

    A writable view (the layout before maps were generic): reading gives the unit's map (``ffn`` ``[kept]``,
    ``q_heads`` / ``kv_heads`` ``[kept heads]``), assigning sets every slot of the unit (e.g. ``ffn`` sets gate
    and up rows and down columns).
    """

    def __init__(self, maps: IndexMaps, layer: int):
        self._maps, self._layer = maps, layer

    def _heads(self, slots) -> torch.Tensor:
        heads = rows_to_heads(self._maps._unit(self._layer, slots), self._maps.head_dim)
        if heads is None:
            raise ValueError(f"layer {self._layer}: the attention maps are not whole heads")
        return heads

    @property
    def ffn(self) -> torch.Tensor:
        return self._maps.ffn_rows(self._layer)

    @ffn.setter
    def ffn(self, index) -> None:
        self._maps.select(self._layer, FFN_CHANNELS, index)

    @property
    def q_heads(self) -> torch.Tensor:
        return self._heads(QUERY_HEADS)

    @q_heads.setter
    def q_heads(self, heads) -> None:
        self._maps.select(self._layer, QUERY_HEADS, head_rows(_as_index(heads), self._maps.head_dim))

    @property
    def kv_heads(self) -> torch.Tensor:
        return self._heads(KV_HEADS)

    @kv_heads.setter
    def kv_heads(self, heads) -> None:
        self._maps.select(self._layer, KV_HEADS, head_rows(_as_index(heads), self._maps.head_dim))


__all__ = ["IndexMaps", "LayerIndex", "ROWS", "COLS", "ROLES", "FFN_CHANNELS", "QUERY_HEADS", "KV_HEADS",
           "head_rows", "rows_to_heads"]
