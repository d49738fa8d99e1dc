"""Export a pipeline for standard engines: the compressed base as a transformers checkpoint, one plain PEFT
LoRA directory per task adapter, with linear shared recovery folded in exactly.

```
out/
  base/                    transformers checkpoint (bitsandbytes weights with their quantization state)
  adapters/<name>/         adapter_config.json + adapter_model.safetensors (+ README.md): a standard PEFT LoRA
  export.json              what was exported, what was skipped and why, and the logit check of each adapter
```

**Folding shared recovery.** A task LoRA adds ``s_l B_l A_l x`` and a linear (identity-activation) shared
recovery bypass on the same linear adds ``s_r B_r A_r x``; their sum is one LoRA of rank ``r_l + r_r`` with
``A = [A_l; A_r]`` and ``B = [s_l B_l, s_r B_r]`` at scale 1. Recovery usually sits on linears the task LoRA
does not target: there the LoRA part is zero. Every module gets the same rank (zero-padded where one part is
missing or narrower), so the directory needs no ``rank_pattern`` (which engines such as vLLM do not read), and
``lora_alpha == r`` makes peft's scale exactly 1. The result reproduces CPET's outputs up to float rounding;
:func:`export_pipeline` checks this by reloading each adapter with plain transformers + peft. The folding reads the
adapter as the serving engine and evaluation assemble it (:meth:`cpet.assembly.Assembly.folded_lora`).

Per-task recovery with an identity activation is linear too and folds the same way.

Not exportable, refused by name: bases transformers cannot build (per-layer widths, MoEfied FFNs, quantized
embeddings: ``manifest.json`` says ``"uniform": false``), and recovery with a GELU (per-task recovery's default,
CA-LoRA's; or a GELU shared set): a GELU bypass is not linear, so no LoRA reproduces it, and such adapters stay
inside CPET. Adapters tuned on the uncompressed original are plain PEFT adapters of the source model already and
are not part of the export. An exported adapter whose plain-peft logits differ from CPET's by more than
:data:`CHECK_TOLERANCE` (relative to the largest logit) fails the export: nothing is written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import check_adapter_name, read_adapter_meta
from .assets import atomic_path, check_output_dir
from .recovery import read_recovery_meta, recovery_sha256, stale_recovery

EXPORT_META = "export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ExportReport:
    """What :func:`export_pipeline` wrote: ``adapters`` ``{name: {...}}`` with the folded rank, the modules and
    the largest logit difference against CPET; ``skipped`` ``{name: reason}``."""

    out: str
    base_id: str
    adapters: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


CHECK_TOLERANCE = 1e-3  # largest |logit difference| / max(1, largest |logit|) an export may show


def base_refusal(manifest) -> str | None:
    """Why a base cannot leave CPET as a transformers checkpoint, or None when it can."""
    if manifest.uniform:
        return None
    names = {record.config.get("stage") for record in manifest.stages}
    if "moefy" in names:
        return ("the base is MoEfied: its FFN blocks are CPET's expert banks and routers, which no transformers "
                "architecture (and so no serving engine) knows")
    if any(record.config.get("embeddings") for record in manifest.stages):
        return ("the base has quantized token embeddings, which transformers' bitsandbytes integration cannot "
                "load; compress with QuantizeConfig(embeddings=False) to export")
    return "the base has per-layer FFN widths, which a transformers config.json cannot state"


def write_peft_adapter(directory: Path, folded: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                       base_reference: str) -> None:
    """A standard PEFT LoRA directory for ``folded`` factors (``lora_alpha == r``: scale 1; uniform rank)."""
    from peft import LoraConfig

    suffixes = sorted({name.rsplit(".", 1)[-1] for name in folded})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=suffixes, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_reference)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, (A, B) in folded.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def export_pipeline(pipeline, out: str | Path, names: list[str] | None = None, *, check: bool = True,
                    check_ids: torch.Tensor | None = None) -> ExportReport:
    """Export ``pipeline`` (a :class:`~cpet.pipeline.CPET`) to ``out``, written atomically.

    ``names``: adapters to export (default: every adapter tuned on the compressed base). With ``check``, each
    exported adapter is reloaded with plain transformers + peft and its logits on ``check_ids`` compared with
    CPET's (``max_abs_diff`` in the report).

    Raises:
        ValueError: a base that cannot be exported (named), or a named adapter that cannot (with why).
        FileNotFoundError: an unknown adapter name (the known ones listed).
        ValueError: ``out`` exists and is not a previous export (never overwritten), lies inside the pipeline's
            base directory, or holds the pipeline's work directory (replacing it would delete the pipeline).
    """
    from .compress.manifest import MANIFEST_FILE, Manifest

    out = Path(out)
    if out.exists() and not (out / EXPORT_META).exists():
        raise ValueError(f"{out} exists and is not a CPET export (no {EXPORT_META}): choose a new --out directory "
                         "(a previous export is replaced, anything else is left alone)")
    check_output_dir(out)  # a file on the way: refused naming it, before any work
    base_dir = pipeline.work_dir / "base"
    if out.resolve().is_relative_to(base_dir.resolve()):  # the copy of base/ would hold itself, without end
        raise ValueError(f"--out {out} is inside the pipeline's base directory {base_dir}: choose a directory "
                         "outside it")
    if pipeline.work_dir.resolve().is_relative_to(out.resolve()):
        # ``out`` is replaced as a whole (a previous export there): the pipeline inside it would go with it, as in
        # CPET.save
        raise ValueError(f"--out {out} holds the pipeline's work directory {pipeline.work_dir} (replacing the "
                         "export there would delete the pipeline being exported): choose an --out outside it")
    if not (base_dir / MANIFEST_FILE).exists():
        raise FileNotFoundError(f"{pipeline.work_dir} has no compressed base: run `cpet compress` first")
    manifest = Manifest.read(base_dir / MANIFEST_FILE)
    refusal = base_refusal(manifest)
    if refusal:
        raise ValueError(f"cannot export {pipeline.work_dir}: {refusal}")
    available = pipeline.adapters()
    paths = _export_names(pipeline, names) if names else available
    metas, unreadable = {}, {}
    for name, path in paths.items():
        try:
            metas[name] = read_adapter_meta(path)
        except (OSError, ValueError) as exc:  # a damaged adapter is skipped with why, as `cpet list` shows it
            if names:
                raise ValueError(f"cannot export {name}: {exc}") from None
            unreadable[name] = str(exc)
    chosen = paths if names else {name: path for name, path in paths.items()
                                  if name in metas and metas[name].get("on") != "original"}
    has_recovery = (pipeline.recovery_dir / "recovery.safetensors").exists()
    recovery_sha = recovery_sha256(pipeline.recovery_dir) if has_recovery else None
    shared_activation = read_recovery_meta(pipeline.recovery_dir)["config"]["activation"] if has_recovery else None
    reasons = {name: _adapter_refusal(metas[name], chosen[name], recovery_sha, shared_activation, manifest.base_id)
               for name in chosen}
    if names:
        refused = {name: why for name, why in reasons.items() if why}
        if refused:
            raise ValueError("cannot export " + "; ".join(f"{name}: {why}" for name, why in refused.items()))
    report = ExportReport(str(out), manifest.base_id)
    report.skipped.update(unreadable)
    with atomic_path(out) as tmp, pipeline.engine() as engine:
        shutil.copytree(base_dir, tmp / "base")
        for name, path in chosen.items():
            if reasons[name]:
                report.skipped[name] = reasons[name]
                continue
            try:  # a backstop: _adapter_refusal names what is known to fail before any work
                engine.load("exported", path)  # the adapter as serving and evaluation assemble it
                folded, rank = engine.assembly("exported").folded_lora()
            except ValueError as exc:  # AdapterError included
                if names:
                    raise ValueError(f"cannot export {name}: {exc}") from None
                report.skipped[name] = str(exc)
                continue
            target = tmp / "adapters" / name
            write_peft_adapter(target, folded, rank, "../../base")
            meta = metas[name]
            (target / "README.md").write_text(_card(name, meta, rank, sorted(folded)))
            entry = {"rank": rank, "modules": len(folded), "recovery": meta.get("recovery", "none"),
                     "task": meta.get("task")}
            if check:
                entry["max_abs_diff"] = _check(name, tmp / "base", target, engine.view("exported"), check_ids)
            report.adapters[name] = entry
        (tmp / EXPORT_META).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    return report


def _export_names(pipeline, names: Sequence[str | Path]) -> dict[str, Path]:
    """Each requested adapter (a name of the pipeline's or an adapter directory) under the name it is exported as.

    A directory is exported under its adapter name (``.../adapters/<name>/adapter`` -> ``<name>``; another
    directory: its own name), never under the path itself: ``out / "adapters" / "/abs/path"`` would be the
    source directory, and the export would overwrite the adapter it reads.
    """
    paths: dict[str, Path] = {}
    known = pipeline.adapters()
    for requested in names:
        path = pipeline.resolve_adapter(requested)
        if str(requested) in known and known[str(requested)] == path:
            name = str(requested)
        else:
            where = path.resolve()
            name = where.parent.name if where.name == "adapter" else where.name
        check_adapter_name(name)
        if name in paths and paths[name].resolve() != path.resolve():
            raise ValueError(f"two adapters would be exported as {name!r} ({paths[name]} and {path}): "
                             "export them one at a time into different --out directories")
        paths[name] = path
    return paths


def _adapter_refusal(meta: dict, directory: Path, recovery_sha: str | None, shared_activation: str | None,
                     base_id: str) -> str | None:
    """Why an adapter (its ``cpet.json``) cannot be exported, or None; ``recovery_sha`` / ``shared_activation``
    describe the pipeline's shared recovery (None: it has none)."""
    recovery = meta.get("recovery", "none")
    tuned_on = meta.get("base_id")
    if meta.get("on") == "compressed" and tuned_on not in (None, base_id):
        from .compress.manifest import short_base_id

        return (f"tuned on base {short_base_id(tuned_on)}, but the pipeline's base is now {short_base_id(base_id)} "
                "(`cpet compress` was run again since): re-tune it on this base")
    if meta.get("on") == "original":
        return "tuned on the uncompressed original: it is a plain PEFT adapter of the source model already"
    if recovery in ("shared", "both"):
        if recovery_sha is None:
            return ("trained with the pipeline's shared recovery, which is gone (no recovery/): it cannot run "
                    "without it; run `cpet recover` and re-tune it")
        stale = stale_recovery(meta, directory, recovery_sha)
        if stale:
            return stale
        if shared_activation != "identity":
            return (f"trained with shared recovery whose bypasses have a {str(shared_activation).upper()} "
                    "activation, which is not linear: no LoRA reproduces it (keep it in CPET: `cpet eval PIPELINE "
                    "--adapter NAME`)")
    per_task_activation = (meta.get("per_task_recovery") or {}).get("activation", "gelu")
    if recovery in ("per_task", "both") and per_task_activation != "identity":
        return (f"trained with per-task recovery, a {per_task_activation.upper()} bypass that is not linear: no LoRA "
                "reproduces it (keep it in CPET: `cpet eval PIPELINE --adapter NAME`)")
    return None


def load_exported(base: str | Path, adapter: str | Path):
    """Plain transformers + peft, as an engine-side user would load the export (CPET's 4-bit layout kept), in the
    dtype the base was saved in (``config.json``), as ``from_pretrained`` without a dtype and CPET's own loader both
    read it: a bf16 base compared in fp32 differs from CPET by its rounding, not by the export."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from .compress.io import saved_dtype
    from .compress.quantize import keep_4bit_layout

    dtype = saved_dtype(AutoConfig.from_pretrained(str(base)))
    model = keep_4bit_layout(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype))
    return PeftModel.from_pretrained(model, str(adapter)).eval()


@torch.no_grad()
def _check(name: str, base: Path, adapter: Path, reference: nn.Module, ids: torch.Tensor | None) -> float:
    """Largest |logit difference| between plain transformers + peft on the export and CPET.

    Raises:
        ValueError: above :data:`CHECK_TOLERANCE` of the largest logit: the export would not compute what CPET
            does, and is not written.
    """
    if ids is None:
        ids = torch.tensor([[1, 42, 7, 300, 12, 5, 99, 17]]) % reference.config.vocab_size
    plain = load_exported(base, adapter)
    expected = reference.eval()(input_ids=ids).logits
    diff = float((plain(input_ids=ids).logits - expected).abs().max())
    tolerance = CHECK_TOLERANCE * max(1.0, float(expected.abs().max()))
    if not diff <= tolerance:
        raise ValueError(f"the export of {name} does not reproduce CPET's logits with plain transformers + peft "
                         f"(largest difference {diff:.3g}, tolerance {tolerance:.3g}); nothing was written. This "
                         "is a bug: please report it with the pipeline's manifest.json and the adapter's cpet.json")
    return diff


def _card(name: str, meta: dict, rank: int, modules: list[str]) -> str:
    recovery = meta.get("recovery", "none")
    parts = {"shared": "the pipeline's shared recovery", "per_task": "its own (linear) per-task recovery",
             "both": "the pipeline's shared recovery and its own (linear) per-task recovery"}.get(recovery)
    folded = (f"its LoRA and {parts}, folded into one LoRA (the ranks concatenated, zero-padded to one rank for "
              "every module, scale 1)") if parts else "its LoRA"
    return (f"# {name} (exported by CPET)\n\nA standard PEFT LoRA adapter of rank {rank} on {len(modules)} linears "
            f"of the compressed base in `../../base`, holding {folded}. Load it with plain transformers + peft:\n\n"
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            "base = AutoModelForCausalLM.from_pretrained(\"EXPORT/base\")\n"
            "for module in base.modules():  # keep the canonical 4-bit layout (see below)\n"
            "    if hasattr(module, \"support_avx512bf16_for_cpu\"):\n"
            "        module.support_avx512bf16_for_cpu = False\n"
            f"model = PeftModel.from_pretrained(base, \"EXPORT/adapters/{name}\")\n```\n\n"
            "The loop matters for a 4-bit base only: without it, bitsandbytes (>= 0.50) on CPUs with AVX512-BF16 "
            "repacks the 4-bit weights into a bf16 layout on the first inference call, and the logits no longer "
            "match CPET's (which is what this export was checked against).\n\n"
            f"Task: {meta.get('task')}. Labels: {meta.get('labels')}.\n" + _prompt_facts(meta))


def _prompt_facts(meta: dict) -> str:
    """How the adapter reads an example, so that an engine outside CPET classifies as it was trained to."""
    if not meta.get("label_words"):
        return ""
    from .data.prompts import PROMPT_CUT_WORDS, prompt_cut_of

    cut = PROMPT_CUT_WORDS[prompt_cut_of(meta)]
    words = ", ".join(f"`{label}` -> {json.dumps(word)}" for label, word in meta["label_words"].items())
    return (f"\nPrompt: {json.dumps(meta.get('template'))} with the example's text in `{{text}}`; a prompt over "
            f"{meta.get('max_prompt_tokens')} tokens is cut ({cut}). The predicted label is the one whose word "
            f"has the highest log-probability right after the prompt: {words}.\n")


__all__ = ["export_pipeline", "write_peft_adapter", "base_refusal", "load_exported", "ExportReport"]
