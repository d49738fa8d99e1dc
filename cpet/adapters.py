"""Task adapters: peft LoRA on a frozen base, saved as standard PEFT directories plus ``cpet.json``.

``cpet.json`` records what the adapter needs to be used correctly: the ``base_id`` of the base it was
trained on, the source model's fingerprint, the task, its labels, prompt template and verbalizer, the
recovery modules it was trained with, and its metrics. Loaders refuse an adapter made for another base.
``README.md`` is a model card generated from ``cpet.json`` (:func:`model_card`).

The base an adapter names (``base_model_name_or_path`` in ``adapter_config.json``) is portable: a
compressed base is recorded relative to the adapter directory (``../../../base`` in a pipeline), so a
pipeline copied anywhere still finds it (:func:`resolve_base_reference`, :func:`load_standalone`); the
original model is recorded by its hub id when it has one.

A plain PEFT LoRA directory trained elsewhere (no ``cpet.json``) can still be an inheritance source:
:func:`plain_peft_meta` checks that it was made for the same source model (its recorded base model name
and every LoRA tensor's shape) and describes it in the same form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from torch import nn

from .assets import read_json_object, write_text_atomic
from .compress.manifest import ORIGINAL_BASE_ID, describe_base
from .models import target_module_suffixes

if TYPE_CHECKING:
    from .assembly import AdapterSource

ADAPTER_META = "cpet.json"
MODEL_CARD = "README.md"


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float,
             target_roles: Sequence[str] | None = None, target_modules: Sequence[str] | str | None = None,
             use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, layers_to_transform: int | list[int] | None = None,
             layers_pattern: str | list[str] | None = None, exclude_modules: list[str] | str | None = None,
             adapter_name: str = "default"):
    """Wrap a frozen causal LM with a fresh peft LoRA adapter on the given module-map roles.

    ``target_roles`` None means every mapped linear; ``target_modules`` (peft's module-name suffixes or
    regex, e.g. from an inherited adapter's config) overrides the roles. Each LoRA computes
    ``B A * scale`` with ``A: [r, d_in]``, ``B: [d_out, r]`` and ``scale = alpha / r`` (``alpha / sqrt(r)``
    with ``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` (peft's ``{module-name pattern: value}``)
    override r / alpha per module; ``layers_to_transform`` / ``layers_pattern`` / ``exclude_modules`` (peft's)
    restrict which layers and modules get a LoRA. Inheritance passes the source adapter's values
    (:func:`cpet.lora_init.lora_shape_of`) so every copied pair keeps its shape and scale.
    Returns the ``PeftModel``; only the LoRA tensors (and modules registered as trainable afterwards)
    require grad. peft's default init is used: A Kaiming-uniform, B zero (the adapter starts as a no-op).
    """
    from peft import LoraConfig, get_peft_model

    from .moe.peft_lora import has_expert_banks, register_bank_lora

    if target_modules is None:
        target_modules = target_module_suffixes(model, None if target_roles is None else tuple(target_roles))
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=target_modules, use_rslora=use_rslora,
                        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                        exclude_modules=exclude_modules)
    if has_expert_banks(model):
        register_bank_lora(config)
    return get_peft_model(model, config, adapter_name=adapter_name)


def check_inheritable(config: dict, directory: str | Path) -> None:
    """Refuse a PEFT ``adapter_config.json`` (as a dict) whose adapter CPET cannot carry to a compressed base.

    Raises:
        ValueError: not a LoRA; a LoRA with trained biases, ``modules_to_save``, ``lora_bias`` or trainable
            tokens, tensors peft would write into the compressed base's frozen weights or embedding; a LoRA
            saved with a PiSSA-family init (``pissa``, ``olora``, ``corda``) and not converted, or with LoftQ,
            whose ``B A`` is a delta against a modified base rather than the source model; or a DoRA. DoRA rescales
            each output row of ``W + B A * scale`` to a learned magnitude vector ``m: [d_out]`` measured against
            the row norms of the *full* weight; pruning and quantization change those norms, so ``m`` would have
            to be re-derived and copying A/B alone would not reproduce the source's delta.
    """
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter {directory} is a {config.get('peft_type')} adapter; CPET inherits LoRA only")
    if config.get("use_dora"):
        raise ValueError(f"adapter {directory} is a DoRA adapter (use_dora: true); CPET does not support DoRA "
                         "inheritance: its magnitude vector is per output row of the full weight and would need "
                         "re-deriving after pruning/quantization. Train a plain LoRA (use_dora: false) instead")
    # what a LoRA config may carry beyond A/B that CPET would drop: peft would load the extra tensors into the
    # compressed base's own frozen weights (biases, a tied lm_head), which the saved adapter cannot reproduce
    extras = {"bias": config.get("bias", "none") not in (None, "none"),
              "modules_to_save": bool(config.get("modules_to_save")),
              "lora_bias": bool(config.get("lora_bias")),
              "trainable_token_indices": bool(config.get("trainable_token_indices"))}
    carried = [f"{key}={config.get(key)!r}" for key, present in extras.items() if present]
    if carried:
        raise ValueError(f"adapter {directory} trains more than LoRA A/B ({', '.join(carried)}); CPET inherits "
                         "plain LoRA factors only: train the source with bias='none', no modules_to_save, "
                         "lora_bias=False and no trainable_token_indices")
    check_plain_delta(config, directory)


def check_plain_delta(config: dict, directory: str | Path) -> None:
    """Refuse a PEFT LoRA config (``adapter_config.json`` as a dict) whose ``scale * B A`` is not a delta added to
    every token of the unmodified base: what CPET reads a LoRA as, to inherit it and to serve it.

    Raises:
        ValueError: an init that changes the base (LoftQ; PiSSA, OLoRA, CorDA, LoRA-GA saved unconverted), an
            activated LoRA (``alora_invocation_tokens``: the delta starts at its invocation tokens), a rebuilt
            layer stack (``layer_replication``) or LoRA on parameters (``target_parameters``). peft reproduces
            each such adapter; read as a plain delta it put logits 2.5-6 off on a tiny model.
    """
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith("loftq"):
        raise ValueError(f"adapter {directory} was initialised with LoftQ: its factors correct the LoftQ-quantized "
                         "base, not the source model, and peft cannot convert it to a plain LoRA. Use a LoRA "
                         "trained on the full-precision source")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "lora_ga")):
        # these inits move the principal part of W into A/B and subtract it from the base: unless converted on
        # save, the saved B A is a delta against that modified base, not against the source model's weights
        raise ValueError(f"adapter {directory} was saved with init_lora_weights={init!r} and not converted to a "
                         "plain LoRA: its factors are a delta against a modified base. Save it with peft's "
                         "path_initial_model_for_weight_conversion (a plain LoRA of twice the rank) and use that")
    unusual = {"alora_invocation_tokens": "an activated LoRA (it acts from its invocation tokens on)",
               "layer_replication": "a LoRA on a rebuilt layer stack",
               "target_parameters": "a LoRA on parameters rather than linears"}
    for key, what in unusual.items():
        if config.get(key):
            raise ValueError(f"adapter {directory} is {what} ({key}={config[key]!r}); CPET reads a LoRA as a plain "
                             "delta on every token of the base's linears: train one without it")


def target_module_names(target_modules) -> list[str] | str:
    """peft's ``target_modules`` (a set of names or one regex) in a stable, JSON-able form."""
    return target_modules if isinstance(target_modules, str) else sorted(target_modules)


def is_cpet_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_META).exists()


def check_adapter_name(name: str) -> str:
    """``name`` if it can name an adapter: one directory under the pipeline's ``adapters/`` (returned as is).

    A name with a path separator or ``..`` would put the adapter outside ``adapters/``, where neither
    ``cpet list`` nor a lookup by name finds it, and its relative base reference would point elsewhere.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"adapter name {name!r} must be one directory name (no '/', '\\' or '..'), e.g. "
                         "'movie-cpet': adapters live in <pipeline>/adapters/<name>")
    return name


def read_adapter_meta(directory: str | Path) -> dict:
    """The ``cpet.json`` of an adapter directory (clear error when the directory is not one or is corrupt)."""
    path = Path(directory) / ADAPTER_META
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_META}: not a CPET adapter directory")
    # not JSON, or JSON but no object (every reader takes keys from it): named, not a traceback later
    return read_json_object(path, "the adapter's metadata is damaged; tune the adapter again")


def check_adapter_base(meta: dict, *, base_id: str | None = None, source_fingerprint: str | None = None,
                       where: str | None = None, directory: str | Path | None = None,
                       inheriting: bool = False) -> None:
    """Refuse an adapter made for another base (``base_id``) or another source model (fingerprint).

    The message names both bases (ids cut to 12 hex characters) and what to do instead; ``inheriting`` says
    the adapter was given as an inheritance source, which must be tuned on the original model. ``where``
    names the adapter in messages (default: ``adapter DIRECTORY``).
    """
    where = where or (f"adapter {directory}" if directory is not None else "adapter")
    if not isinstance(meta.get("source_fingerprint"), (str, type(None))):
        raise ValueError(f"{where} records source_fingerprint {meta.get('source_fingerprint')!r} in its cpet.json, "
                         "not a string: its metadata is damaged; tune the adapter again")
    if source_fingerprint is not None and meta.get("source_fingerprint") not in (None, source_fingerprint):
        raise ValueError(f"{where} was trained on source model {meta.get('source_fingerprint')[:16]}… "
                         f"({meta.get('source_name')}), not on this source model {source_fingerprint[:16]}…")
    made = meta.get("base_id")
    if base_id is None or made == base_id:
        return
    if inheriting:
        raise ValueError(f"`--inherit-from` needs an adapter tuned with `--on original` ({where} was tuned on "
                         f"{describe_base(made)}); tune one with `cpet tune PIPELINE --on original --task T`")
    if base_id == ORIGINAL_BASE_ID:
        raise ValueError(f"{where} was made for {describe_base(made)}, and this is the original model: use it on "
                         "the base it was made for (`cpet eval PIPELINE --adapter NAME` in its pipeline), or tune one "
                         "on the original with `cpet tune PIPELINE --on original --task T`")
    source = directory if made == ORIGINAL_BASE_ID and directory is not None else "DIR"
    raise ValueError(f"{where} was made for {describe_base(made)}, and this is {describe_base(base_id)}: an adapter "
                     "runs only on the base it was tuned on, so it must be re-tuned on this base (`cpet tune "
                     f"PIPELINE --task T`), or inherited: `--init inherit --inherit-from {source}`"
                     + ("" if source != "DIR" else " with DIR an adapter tuned with `--on original`"))


def trained_prompt_limit(meta: dict, where: str = "the adapter") -> int | None:
    """The prompt length (tokens) a CPET adapter was trained with, from its ``cpet.json`` (``max_prompt_tokens``,
    else its ``tune_config``'s); None where neither records one.

    Raises:
        ValueError: the recorded value is not a positive integer (damaged metadata: a TypeError deep in prompt
            fitting otherwise, or a silent cut at a negative length).
    """
    tune_config = meta.get("tune_config") if isinstance(meta.get("tune_config"), dict) else {}
    trained_with = meta.get("max_prompt_tokens", tune_config.get("max_prompt_tokens"))
    if trained_with is not None and (isinstance(trained_with, bool) or not isinstance(trained_with, int)
                                     or trained_with < 1):
        raise ValueError(f"{where} records max_prompt_tokens {trained_with!r} in its cpet.json, not a positive "
                         "integer: its metadata is damaged; tune the adapter again")
    return trained_with


def check_scoring(meta: dict, task, max_prompt_tokens: int | None, where: str = "the adapter") -> int | None:
    """Refuse to score a CPET adapter (its ``cpet.json``) on a task it cannot answer, or on prompts cut to
    another length than it was trained on; return the length to cut prompts to (None: not recorded, nor asked).

    Raises:
        ValueError: the task has labels the adapter does not know, or ``max_prompt_tokens`` is given and differs
            from the recorded one (scoring with it would measure another model).
    """
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{where} records no list of labels in its cpet.json (labels: {labels!r}), so it cannot be "
                         "scored on a task; its metadata is damaged or it was not made by `cpet tune`")
    unknown = sorted(set(task.labels) - set(labels))
    if unknown:
        raise ValueError(f"task {task.name!r} has labels {unknown} that {where} does not know "
                         f"(it knows {meta['labels']})")
    trained_with = trained_prompt_limit(meta, where)
    if max_prompt_tokens is not None and trained_with is not None and max_prompt_tokens != trained_with:
        raise ValueError(f"{where} was trained on prompts cut to {trained_with} tokens; scoring it with "
                         f"{max_prompt_tokens} would measure another model (leave --max-prompt-tokens out)")
    return trained_with or max_prompt_tokens


def save_adapter(peft_model, directory: str | Path, meta: dict, *, base_reference: str | None = None,
                 name: str | None = None) -> None:
    """Write the PEFT directory (``adapter_config.json``, ``adapter_model.safetensors``), ``cpet.json`` and
    the model card (``README.md``, replacing peft's empty template).

    ``directory`` is expected to be a fresh (temporary) directory; callers make the final move atomic.
    ``base_reference`` replaces peft's ``base_model_name_or_path`` (the path the base happened to be loaded
    from, often relative to the working directory): a hub id, or a path relative to the adapter's *final*
    directory. ``name`` is the adapter's name in its pipeline (for the card; default: the parent's name).
    """
    directory = Path(directory)
    if base_reference is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_reference
    # CPET never resizes the vocabulary, so no full embedding matrix is saved; saying so also stops peft from
    # looking for the base's config.json relative to the working directory (a warning for relative references)
    peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    (directory / MODEL_CARD).write_text(model_card(json.loads(json.dumps(meta, default=str)),
                                                   base_reference_of(directory), name or directory.parent.name))


def write_adapter_meta(directory: str | Path, meta: dict) -> None:
    """Rewrite an adapter's ``cpet.json`` and its model card, each atomically (e.g. after adding metrics)."""
    directory = Path(directory)
    write_text_atomic(directory / ADAPTER_META, json.dumps(meta, indent=2, sort_keys=True, default=str))
    write_text_atomic(directory / MODEL_CARD, model_card(meta, base_reference_of(directory),
                                                         directory.parent.name))


def base_reference_of(directory: str | Path) -> str | None:
    """``base_model_name_or_path`` as recorded in an adapter's ``adapter_config.json`` (None: not recorded)."""
    path = Path(directory) / "adapter_config.json"
    return json.loads(path.read_text()).get("base_model_name_or_path") if path.exists() else None


def resolve_base_reference(directory: str | Path) -> str | None:
    """The base model an adapter names, usable from any working directory.

    A relative path that exists relative to the adapter directory (how CPET records a compressed base:
    ``../../../base``) becomes that absolute path; hub ids, absolute paths and anything else are returned
    as recorded. None when the adapter names no base.
    """
    reference = base_reference_of(directory)
    if not reference or Path(reference).is_absolute():
        return reference or None
    beside = Path(directory) / reference
    return str(beside.resolve()) if beside.exists() else reference


def load_standalone(directory: str | Path):
    """An adapter on the base it names (see :func:`resolve_base_reference`), outside its pipeline.

    A compressed base is read with :meth:`cpet.compress.CompressedBase.load` (4-bit layout kept, per-layer
    widths) and its ``base_id`` checked against ``cpet.json``; any other base with :func:`cpet.models.load_base`.
    Returns ``(peft_model, tokenizer)`` in eval mode.
    Raises:
        ValueError: the adapter names no base, or needs recovery modules (which live in its pipeline:
            use ``CPET.load(pipeline).model_for(name)``), or its base is another one.
    """
    directory = Path(directory)
    meta = read_adapter_meta(directory) if is_cpet_adapter(directory) else {}
    if meta.get("recovery", "none") != "none":
        raise ValueError(f"adapter {directory} was trained with {meta['recovery']} recovery modules, which live in "
                         f"its pipeline: use CPET.load(PIPELINE).model_for({directory.parent.name!r}) or "
                         f"`cpet eval PIPELINE --adapter {directory.parent.name}`")
    reference = resolve_base_reference(directory)
    if reference is None:
        raise ValueError(f"adapter {directory} does not name its base model (base_model_name_or_path)")
    if (Path(reference) / "manifest.json").exists():
        from .compress import CompressedBase

        base = CompressedBase.load(reference)
        model, tokenizer = base.model, base.tokenizer
        if meta:
            check_adapter_base(meta, base_id=base.base_id, directory=directory)
        else:  # no base_id to check: at least refuse factors that would act on neurons moved by MoEfication
            _refuse_plain_lora_on_reordered(directory, model)
    else:
        from .models import load_base

        loaded = load_base(reference)
        model, tokenizer = loaded.model, loaded.tokenizer
    from peft import PeftModel

    from .moe.peft_lora import peft_config_for

    peft_model = PeftModel.from_pretrained(model, str(directory), config=peft_config_for(model, directory))
    return peft_model.eval(), tokenizer


def _refuse_plain_lora_on_reordered(directory: Path, model: nn.Module) -> None:
    """Refuse a plain PEFT LoRA (no ``cpet.json``) with factors on linears whose neurons ``model`` (a compressed
    base) keeps in another order than the source at the same shape (MoEfied expert banks): peft loads them without
    complaint and they act on the wrong neurons (logits 4 off on a tiny model). The engine refuses the same
    adapters (:func:`cpet.assembly.load_factors`); inheritance maps them through the index maps instead."""
    from .assembly import ADAPTER_WEIGHTS, read_safetensors, reordered_modules, reordered_plain_lora

    reordered = reordered_modules(model)
    if not reordered:
        return
    modules = {key.split(".lora_")[0].removeprefix("base_model.model.")
               for key in read_safetensors(directory / ADAPTER_WEIGHTS) if ".lora_" in key}
    hit = sorted(modules & reordered)
    if hit:
        raise reordered_plain_lora(directory, hit[0])


def load_adapter(model: nn.Module, directory: str | Path, *, base_id: str | None = None,
                 adapter_name: str = "default", is_trainable: bool = False, meta: dict | None = None):
    """Load a CPET adapter onto ``model`` with plain peft after checking its ``base_id`` (``meta``: its
    ``cpet.json`` when already read)."""
    from peft import PeftModel

    from .moe.peft_lora import peft_config_for

    meta = meta if meta is not None else read_adapter_meta(directory)
    check_adapter_base(meta, base_id=base_id, directory=directory)
    return PeftModel.from_pretrained(model, str(directory), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=peft_config_for(model, directory))


def inheritance_facts(task_name: str, source: "AdapterSource | str | Path | None") -> dict:
    """Which task an inheritance source was trained for, and whether that is another task than this one.

    ``inherited_task`` is None for a plain PEFT source (no ``cpet.json``) or no source; so is
    ``inherited_from_other_task`` then, since nothing says. Tuning from another task's adapter is allowed
    (its labels were checked) but recorded, so reports can say so.
    """
    from .assembly import as_source

    meta = as_source(source).meta if source is not None else {}
    if not meta:
        return {"inherited_task": None, "inherited_from_other_task": None}
    inherited = meta.get("task")
    return {"inherited_task": inherited, "inherited_from_other_task": inherited != task_name}


def _same_model_name(name: str, aliases: Sequence[str]) -> bool:
    """Whether a recorded base model name (hub id or path) names one of ``aliases`` (compared by last part)."""
    def key(text: str) -> str:
        return Path(str(text).rstrip("/")).name.lower()

    return key(name) in {key(alias) for alias in aliases}


def plain_peft_source(directory: str | Path) -> "AdapterSource":
    """A plain PEFT LoRA directory, read (:class:`~cpet.assembly.AdapterSource`).

    Raises:
        FileNotFoundError: neither a CPET adapter nor a PEFT adapter directory (no ``adapter_config.json``).
    """
    from .assembly import ADAPTER_WEIGHTS, AdapterSource, require_file

    if not (Path(directory) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{directory} is neither a CPET adapter ({ADAPTER_META}) nor a PEFT adapter "
                                "(adapter_config.json)")
    source = AdapterSource(directory)
    # what needs no model is checked here, so that a DoRA or a .bin-only directory is refused before the source
    # model loads (plain_peft_meta then checks it against the model)
    check_inheritable(source.config, directory)
    require_file(Path(directory) / ADAPTER_WEIGHTS)
    return source


def plain_peft_meta(directory: "AdapterSource | str | Path", model: nn.Module, aliases: Sequence[str]) -> dict:
    """Check a plain PEFT LoRA directory (trained outside CPET) against the source model; describe it.

    Args:
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (pickled ``.bin``
            weights are refused); or the :class:`~cpet.assembly.AdapterSource` already read from it.
        model: the uncompressed source model the adapter must fit.
        aliases: names of the source model (embedded name, hub id, local path); the adapter's recorded
            ``base_model_name_or_path``, if any, must name one of them.
    Returns:
        ``{"source_name": ..., "labels": None}`` (labels are unknown: the task's own verbalizer is used).
    Raises:
        FileNotFoundError: neither a CPET nor a PEFT adapter directory.
        ValueError: not a LoRA (or a DoRA, see :func:`check_inheritable`), made for another model (by name
            or by shapes), LoRA on missing modules, or factors of another rank than the config states.
    """
    from .assembly import AdapterSource

    source = directory if isinstance(directory, AdapterSource) else plain_peft_source(directory)
    directory = source.directory
    config = source.config
    check_inheritable(config, directory)
    trained_on = config.get("base_model_name_or_path")
    known = [alias for alias in aliases if alias]
    if trained_on and not _same_model_name(trained_on, known):
        raise ValueError(f"adapter {directory} was trained on source model {trained_on!r}, not on this source "
                         f"model ({', '.join(known)}); if it is the same model under another name, set "
                         "base_model_name_or_path in its adapter_config.json to one of these")
    from .assembly import check_stated_rank, module_shapes

    modules, mapped = dict(model.named_modules()), module_shapes(model)
    stray = []
    for key, tensor in source.tensors.items():
        kind = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None
        if kind is None:
            if "lora_embedding" in key:
                raise ValueError(f"adapter {directory} has a LoRA on an embedding ({key}); CPET carries LoRA on "
                                 "the layers' linears only (q/k/v/o and the FFN): train one without it")
            stray.append(key)  # refused below, after what a LoRA tensor can say more precisely
            continue
        name = key.split(f".{kind}.")[0].removeprefix("base_model.model.")
        weight = getattr(modules.get(name), "weight", None)
        if weight is None:
            raise ValueError(f"adapter {directory} has a LoRA on {name!r}, which this source model "
                             f"({', '.join(known)}) does not have: it was made for another model")
        if name not in mapped:
            raise ValueError(f"adapter {directory} has a LoRA on {name!r}; CPET carries LoRA on the layers' linears "
                             "only (attention q/k/v/o and the FFN), through compression: train one without it")
        expected = weight.shape[1] if kind == "lora_A" else weight.shape[0]
        got = tensor.shape[1] if kind == "lora_A" else tensor.shape[0]
        if got != expected:
            raise ValueError(f"adapter {directory} was made for another model ({trained_on or 'unnamed'}): its "
                             f"LoRA on {name} has {got} {'input' if kind == 'lora_A' else 'output'} features, "
                             f"this source model ({', '.join(known)}) has {expected}")
        # the rank serving checks too: peft would fail on it only after both models loaded ("size mismatch")
        check_stated_rank(source, name, tensor.shape[0] if kind == "lora_A" else tensor.shape[1])
    if stray:
        raise ValueError(f"adapter {directory} holds {stray[0]!r}, which is not a LoRA A/B factor: CPET inherits "
                         "plain LoRA factors only (inheriting would drop it silently)")
    return {"source_name": trained_on, "labels": None}


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def _stage_text(config: dict) -> str:
    """``prune(ffn_ratio=0.25, importance='taylor')`` from a stage config dict (its ``"stage"`` key first)."""
    args = ", ".join(f"{key}={value!r}" for key, value in config.items() if key != "stage")
    return f"{config.get('stage', '?')}({args})"


def _literal(value) -> str:
    """A string as code in a table cell: JSON-quoted, so spaces and newlines show and rows stay one line."""
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _recovery_text(meta: dict) -> str:
    """``shared (rank 16 identity bypasses, distilled 100 steps) + per-task (rank 8 gelu bypasses)``."""
    mode = meta.get("recovery", "none")
    parts = []
    shared, per_task = meta.get("shared_recovery"), meta.get("per_task_recovery")
    if mode in ("shared", "both"):
        config = (shared or {}).get("config") or {}
        parts.append(f"shared (rank {config.get('rank', '?')} {config.get('activation', '')} bypasses, distilled "
                     f"{(shared or {}).get('distill_steps', '?')} steps on text; frozen)")
    if mode in ("per_task", "both"):
        parts.append(f"per-task (rank {(per_task or {}).get('rank', '?')} {(per_task or {}).get('activation', '')} "
                     "bypasses trained with the adapter, in per_task_recovery/)")
    return " + ".join(parts) or "none"


def _metrics_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    if metrics.get("val_accuracy") is not None:
        rows.append(("validation accuracy", f"{metrics['val_accuracy']:.4f} (best checkpoint, step "
                                             f"{metrics.get('step')})"))
    if metrics.get("test_accuracy") is not None:
        rows.append(("test accuracy", f"{metrics['test_accuracy']:.4f} on {metrics.get('test_n', '?')} examples "
                                       f"(split {metrics.get('test_split', 'test')})"))
    else:
        rows.append(("test accuracy", "not measured yet (`cpet eval PIPELINE --adapter NAME`)"))
    return rows


def _cut_words(meta: dict) -> str:
    from .data.prompts import LEGACY_PROMPT_CUT, PROMPT_CUT_WORDS

    cut = meta.get("prompt_cut", LEGACY_PROMPT_CUT)
    return PROMPT_CUT_WORDS.get(cut, cut)


def _card_facts(meta: dict, base_reference: str | None) -> list[tuple[str, str]]:
    """The card's table: task, verbalizer, base, source, compression, recovery, init, metrics."""
    words = meta.get("label_words") or {}
    compression = meta.get("compression") or {}
    source = f"`{meta.get('source_name')}`"
    if meta.get("source_hub_id"):
        source += f" (hub: `{meta['source_hub_id']}`)"
    if meta.get("source_fingerprint"):
        source += f", content fingerprint `{meta['source_fingerprint'][:16]}…`"
    on_compressed = meta.get("on") != "original"
    inherited = meta.get("inherited_task")
    init = meta.get("init", "?")
    if init == "inherit":
        init += f" (from an adapter for task `{inherited}`)" if inherited else " (from a plain PEFT LoRA)"
        if meta.get("inherited_from_other_task"):
            init += " — another task than this one"
    rows = [("task", f"`{meta.get('task')}`" + (f" (from `{meta['task_source']}`)" if meta.get("task_source")
                                                 and meta["task_source"] != meta.get("task") else "")),
            ("labels → verbalizer words", ", ".join(f"`{label}` → {_literal(words.get(label, label))}"
                                                   for label in meta.get("labels") or [])),
            ("prompt template", f"{_literal(meta.get('template'))} (prompts over {meta.get('max_prompt_tokens')} "
                                f"tokens are cut: {_cut_words(meta)})"),
            ("base", (f"compressed base `{meta.get('base_id')}`" if on_compressed else "the original model")
             + (f" at `{base_reference}`" if base_reference else "")),
            ("source model", source)]
    if on_compressed:
        rows.append(("compression", " → ".join(_stage_text(c) for c in compression.get("stages", [])) or "?"))
    rows += [("recovery", _recovery_text(meta)), ("LoRA init", init)]
    config = meta.get("tune_config") or {}
    if config:
        rows.append(("training", f"rank {config.get('rank')}, alpha {config.get('alpha')}, {config.get('steps')} "
                                 f"steps of batch {config.get('batch_size')}, lr {config.get('lr')}, "
                                 f"seed {config.get('seed')}"))
    return rows + _metrics_rows(meta.get("metrics") or {})


def _how_to_load(meta: dict, base_reference: str | None, name: str) -> str:
    """Plain peft where the adapter needs nothing else; the CPET API where it needs recovery modules."""
    if meta.get("recovery", "none") != "none":
        return ("This adapter was trained with recovery modules that plain peft does not attach (shared ones "
                "live in the pipeline, per-task ones in `per_task_recovery/` here); load it with CPET from its "
                "pipeline (the directory three levels above this one, PIPELINE below):\n\n"
                f"```bash\ncpet eval PIPELINE --adapter {name}\n```\n\n"
                "```python\nfrom cpet import CPET\n\npipeline = CPET.load(\"PIPELINE\")\n"
                f"model = pipeline.model_for(\"{name}\")  # base + recovery + this adapter, ready to score\n"
                f"print(pipeline.evaluate(\"{name}\", \"{meta.get('task')}\"))\n```\n")
    if meta.get("on") == "original":
        note = ""
        if meta.get("source_hub_id") and meta.get("source_name") != meta.get("source_hub_id"):
            name = meta.get("source_name")
            note = (f"\nCPET trained it on `{name}` (`cpet.load_base(\"{name}\")` gives exactly those weights); "
                    "the hub model above is the same model.\n")
        return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{base_reference or meta.get('source_name')}\")\n"
                "model = PeftModel.from_pretrained(model, \"PATH/TO/THIS/DIRECTORY\")\n```\n" + note)
    if not (meta.get("compression") or {}).get("uniform", True):
        # CPET's loader: CompressedBase.load builds the base, and a LoRA on MoE expert banks needs CPET's peft
        # config (plain PeftModel.from_pretrained refuses an ExpertBank target)
        return (f"The base has {_non_uniform_layout(meta['compression'])}, which plain `from_pretrained` cannot "
                "build; CPET's loader reads it (`CompressedBase.load` for the base, relative to this directory, "
                "and peft with CPET's config for the adapter) and checks its base_id:\n\n"
                "```python\nfrom cpet.adapters import load_standalone\n\n"
                "model, tokenizer = load_standalone(\"PATH/TO/THIS/DIRECTORY\")\n```\n")
    return ("The base path is relative to this directory (`base_model_name_or_path`; "
            "`cpet.adapters.load_standalone(DIRECTORY)` resolves it for you):\n\n"
            "```python\nimport torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            "adapter = \"PATH/TO/THIS/DIRECTORY\"\n"
            f"model = AutoModelForCausalLM.from_pretrained(f\"{{adapter}}/{base_reference}\", dtype=torch.float32)\n"
            "# 4-bit bases on a CPU: cpet.compress.quantize.keep_4bit_layout(model) gives CPET's exact logits\n"
            "model = PeftModel.from_pretrained(model, adapter)\n```\n")


def _non_uniform_layout(compression: dict) -> str:
    """What makes a base non-uniform, from its stage configs (for the model card)."""
    stages = [stage for stage in compression.get("stages") or [] if isinstance(stage, dict)]
    parts = []
    if any(stage.get("layer_schedule") for stage in stages if stage.get("stage") == "prune"):
        parts.append("per-layer FFN widths")
    if any(stage.get("stage") == "moefy" for stage in stages):
        parts.append("MoE blocks (expert banks and routers)")
    if any(stage.get("embeddings") for stage in stages if stage.get("stage") == "quantize"):
        parts.append("a quantized token embedding / LM head")
    return " and ".join(parts) or "a layout no transformers architecture describes"


def model_card(meta: dict, base_reference: str | None, name: str) -> str:
    """The ``README.md`` of an adapter directory: what it is, how well it does, and how to load it.

    Args:
        meta: the adapter's ``cpet.json``.
        base_reference: its recorded ``base_model_name_or_path``.
        name: its name in the pipeline (``adapters/<name>/adapter``).
    """
    front = ["---", "library_name: peft", "tags: [cpet, lora, text-classification]"]
    if meta.get("on") == "original" and meta.get("source_hub_id"):
        front.append(f"base_model: {meta['source_hub_id']}")  # the hub links the card to its base model
    front.append("---")
    where = "a compressed base" if meta.get("on") != "original" else "the original model"
    table = "\n".join(f"| {key} | {value} |" for key, value in _card_facts(meta, base_reference))
    return ("\n".join(front) + f"\n\n# {name}\n\nA LoRA adapter trained by CPET on {where} to classify "
            f"`{meta.get('task')}` through a verbalizer: the prediction is the label whose verbalizer word the "
            "model scores highest after the prompt. Everything below is also in `cpet.json`.\n\n"
            f"| | |\n|---|---|\n{table}\n\n## How to load\n\n" + _how_to_load(meta, base_reference, name))
