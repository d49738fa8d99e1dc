"""The CPET pipeline: base model -> compressed base -> recovery -> task adapters -> evaluation.

```python
cpet = CPET.from_pretrained("smollm2-135m", work_dir="runs/demo")
cpet.compress([PruneConfig(ffn_ratio=0.25), QuantizeConfig("nf4")]).recover()
original = cpet.tune("vader-movie", on="original")
adapter = cpet.tune("vader-movie", init="inherit", inherit_from=original, recovery="shared")
print(cpet.evaluate(adapter, "vader-movie"))
```

Everything the pipeline makes lives in ``work_dir``: ``base/`` (the compressed base), ``recovery/`` (shared
recovery modules; ``recovery-step<N>/`` for distillation checkpoints asked for), ``adapters/<name>/adapter/`` (a
PEFT directory + ``cpet.json`` + a model card ``README.md``; the compressed base is named relative to each adapter,
so the directory can be copied anywhere), ``adapters/<name>/resume/`` (where a tuning run continues from) and
``pipeline.json`` (every step with its configs and UTC times). Each tuning run starts from a fresh copy of
the frozen base read back from ``base/`` (about a second), so runs never leak state into each other.
Evaluation does not copy anything: the base is read once per pipeline object and each adapter runs on it
through :meth:`CPET.engine` (the serving engine's hooks, removed afterwards), assembled as the server and the
export assemble it (:mod:`cpet.assembly`).
:meth:`CPET.load` reopens a directory without loading the original model: steps that need its weights
load it on first use.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .adapters import (add_lora, check_adapter_base, check_adapter_name, check_scoring, inheritance_facts,
                       is_cpet_adapter, load_adapter, plain_peft_meta, plain_peft_source, read_adapter_meta,
                       save_adapter, target_module_names, write_adapter_meta)
from .assembly import AdapterSource
from .assets import atomic_path, check_output_dir, write_text_atomic
from .compress.calibration import input_rms
from .compress.manifest import ORIGINAL_BASE_ID
from .config import stage_config_to_dict
from .data import tuning_prompts
from .data.prompts import PROMPT_CUT, scoring_cut, scoring_prompts
from .data.tasks import as_task, examples_sha256, task_key, task_source_of  # noqa: F401  (task_key: re-exported)
from .models import EMBEDDED, LoadedBase, check_context_length, context_length, hub_id_of, load_base, saved_tokenizer
from .recovery import (PER_TASK, SHARED, RecoveryConfig, RecoverySet, check_svd_rank, check_trained_with,
                       init_from_residuals, recovery_sha256)
from .train import (DistillConfig, TuneConfig, check_distill_window, check_resume_plan, check_resume_steps,
                    distill_on_text, settings_changes, text_windows, train_classifier)

if TYPE_CHECKING:
    from .serve.engine import AdapterView, Engine

INIT_MODES = ("random", "inherit", "svd")
DEFAULT_PER_TASK_RECOVERY = RecoveryConfig(rank=8, activation="gelu")  # CA-LoRA's, when tune() is given none
RECOVERY_MODES = ("none", "shared", "per_task", "both")


@dataclass
class TaskAdapter:
    """A trained adapter on disk and its ``cpet.json``."""

    directory: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.directory.name


class CPET:
    """One base model, its compressed base, shared recovery modules, and task adapters.

    Attributes:
        original: the uncompressed base (frozen), the teacher of recovery; loaded on first use when the
            pipeline was given a name (see :meth:`load`).
        work_dir: where every artifact of this pipeline is written.
    """

    def __init__(self, original: LoadedBase | str, work_dir: str | Path):
        """``original``: a loaded base, or the name/path :func:`load_base` takes, loaded on first use.

        Only compress, recover, tuning on or from the original (inheritance, SVD init, per-task recovery's
        teacher) and scoring on it need the uncompressed weights; everything on the compressed base runs
        without them (for a 135M model that halves peak memory).

        A ``work_dir`` that holds a saved pipeline is reopened as :meth:`load` does: ``pipeline.json``'s log goes
        on from its last step, and the original must be the source model it records.

        Raises:
            ValueError: ``work_dir`` is a file, its ``pipeline.json`` is damaged, or ``original`` is a loaded
                base of another source model than the saved pipeline's.
        """
        self._original: LoadedBase | None = None
        self._original_placement: dict = {}  # load_base's dtype / device for an original loaded on first use
        self._original_spec = original if isinstance(original, str) else original.name
        self._source_from_record = False  # set by load() when the spec is the one pipeline.json recorded
        if isinstance(original, LoadedBase):
            self._use_original(original)
        self.work_dir = Path(work_dir)
        # created by the first step that writes into it (atomic writes make their parents), so that a run
        # refused before any work leaves no empty directory behind
        if self.work_dir.exists() and not self.work_dir.is_dir():
            raise ValueError(_IS_A_FILE.format(self.work_dir))
        self._fingerprint: str | None = None
        self._recorded_fingerprint: str | None = None  # of a saved pipeline: the original must match it
        self._recorded_source: str | None = None  # the source name a saved pipeline records
        self._tokenizer = None
        self._served_base: tuple[str, torch.nn.Module] | None = None  # (base_id, model) that evaluation runs on
        self._engine_lock = threading.RLock()  # engines hook the same base modules: one at a time
        self.log: list[dict] = []
        if (self.work_dir / "pipeline.json").exists():  # a saved pipeline opened again (the grid, the demo,
            record = read_pipeline_record(self.work_dir)  # a script): its steps so far stay in the log,
            self.log = record["log"]                      # and its source must be the one it was built from
            self._recorded_fingerprint = _recorded_fingerprint(self.work_dir, record)
            self._recorded_source = record.get("source") if isinstance(record.get("source"), str) else None
            if self.original_loaded:  # its weights are here already: checking costs one fingerprint
                self._check_source(self._original)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2-135m", work_dir: str | Path = "runs/cpet") -> "CPET":
        return cls(load_base(name_or_path), work_dir)

    @property
    def original(self) -> LoadedBase:
        """The uncompressed source model (frozen); loading it checks it against the pipeline's record.

        Raises:
            ValueError: the loaded model is not the one the saved pipeline was built from.
        """
        if self._original is None:
            try:
                loaded = load_base(self._original_spec, **self._original_placement)
            except (OSError, ValueError) as err:
                if not self._source_from_record:  # the caller's own name: the error says all
                    raise
                kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
                raise kind(f"{err} (the source model recorded in {self.work_dir / 'pipeline.json'}): give the "
                           "model where it is now with --model (API: CPET.load(directory, original=...))") from err
            self._check_source(loaded)
            self._use_original(loaded)
        return self._original

    @property
    def original_loaded(self) -> bool:
        return self._original is not None

    def _use_original(self, loaded: LoadedBase) -> None:
        loaded.model.requires_grad_(False)
        self._original = loaded

    def _check_source(self, loaded: LoadedBase) -> None:
        """Refuse a source model other than the one the saved pipeline records (by content fingerprint)."""
        expected = self._recorded_fingerprint
        if expected and expected != loaded.content_fingerprint():
            raise ValueError(f"the pipeline in {self.work_dir} was built from source model {expected[:16]}…, "
                             f"not from {loaded.name} ({loaded.content_fingerprint()[:16]}…): open it with the model "
                             "it was built from, or give another work directory")

    @property
    def source_name(self) -> str:
        """The source model's name: the loaded original's (embedded name, path or hub id), else the one the saved
        pipeline records, else the name as given. A name given for an original that has not been loaded yet is
        not taken over the record: nothing has checked it is this pipeline's source (a wrong ``--model`` would
        otherwise be written into ``pipeline.json`` and every adapter's ``cpet.json``)."""
        if self._original is not None:
            return self._original.name
        return self._recorded_source or self._original_spec

    @property
    def source_hub_id(self) -> str | None:
        """The source model's hub id, when it has one (an embedded model's, or a hub id it was loaded by)."""
        return hub_id_of(self.source_name)

    @property
    def source_fingerprint(self) -> str:
        """Content fingerprint of the source model: the loaded original's, else the one the saved pipeline
        records (the original is checked against it when it is loaded)."""
        if self._fingerprint is None:
            if self._original is None and self._recorded_fingerprint:
                return self._recorded_fingerprint
            self._fingerprint = self.original.content_fingerprint()
        return self._fingerprint

    @property
    def tokenizer(self):
        """The source tokenizer: the original's when loaded, else the copy saved with the compressed base
        (``base/`` holds the same tokenizer files), so work on the base does not load the original."""
        if self._original is not None:
            return self._original.tokenizer
        if self._tokenizer is None:
            if not (self.base_dir / "tokenizer_config.json").exists():
                return self.original.tokenizer
            self._tokenizer = saved_tokenizer(self.base_dir)
        return self._tokenizer

    @property
    def source_aliases(self) -> list[str]:
        """Names of the source model: as asked for, its local path, its config's name, its hub id."""
        embedded = EMBEDDED.get(self.original.name)
        names = [self.original.name, str(self.original.path or ""),
                 getattr(self.original.model.config, "_name_or_path", ""), embedded.hub_id if embedded else ""]
        return list(dict.fromkeys(name for name in names if name))

    @property
    def base_dir(self) -> Path:
        return self.work_dir / "base"

    @property
    def recovery_dir(self) -> Path:
        return self.work_dir / "recovery"

    @property
    def has_base(self) -> bool:
        return (self.base_dir / "manifest.json").exists()

    def load_compressed(self):
        """A fresh, frozen copy of the compressed base (``CompressedBase``) read from ``base/``."""
        from .compress import CompressedBase

        self._require_base()
        return CompressedBase.load(self.base_dir)

    def _require_base(self) -> None:
        """Refuse work on the compressed base before :meth:`compress` has made one."""
        if not self.has_base:
            raise ValueError(f"no compressed base in {self.base_dir}: call compress(...) first (CLI: `cpet compress "
                             f"--out {self.work_dir} ...`)")

    @property
    def base_id(self) -> str:
        return json.loads((self.base_dir / "manifest.json").read_text())["base_id"]

    def _record(self, stage: str, started_at: str, **facts) -> None:
        """Append a step (its configs, results, ISO 8601 UTC start and finish) to ``pipeline.json``."""
        self.log.append({"stage": stage, "started_at": started_at, "finished_at": utc_now(), **facts})
        fingerprint = self._fingerprint or self._recorded_fingerprint
        write_text_atomic(self.work_dir / "pipeline.json", json.dumps(
            {"source": _lasting_source(self.source_name), "source_fingerprint": fingerprint, "log": self.log},
            indent=2, default=str))

    # ------------------------------------------------------------------ compress
    def compress(self, stages: Sequence, *, calibration: str = "brown", calibration_samples: int = 16,
                 seq_len: int = 128, calibration_seed: int = 0, progress: bool = True, after_stage=None) -> "CPET":
        """Compress a copy of the original model with ``stages`` and save it to ``work_dir/base``.

        Calibration: ``calibration_samples`` windows of ``seq_len`` tokens at random offsets (drawn with
        ``calibration_seed``) of the ``calibration`` corpus's training part.

        ``after_stage(i, model)`` is called after each stage (see :func:`cpet.compress.compress`).
        """
        from .compress import compress as run_stages
        from .compress.calibration import calibration_ids
        from .data import load_corpus

        start, started_at = time.perf_counter(), utc_now()
        self.check_stages(stages)  # before tokenizing the calibration text, which takes a while
        check_context_length(self.original.model, seq_len, "the calibration window (seq_len)",
                             "lower seq_len (compress(seq_len=...); cpet compress's windows are 128 tokens)")
        ids = calibration_ids(self.original.tokenizer, load_corpus(calibration, split="train"),
                              calibration_samples, seq_len, seed=calibration_seed)
        # run_stages compresses a deep copy of the model it is given (inplace=False): copying here too held a third
        # model in memory
        base = run_stages(self.original.model, list(stages), calibration=ids,
                          source_name=self.original.name, tokenizer=self.original.tokenizer, progress=progress,
                          after_stage=after_stage, source_fingerprint=self.source_fingerprint)
        # provenance outside base_id: the kept channels it selected are in the index maps' digest already
        base.manifest.calibration = {"corpus": calibration, "samples": calibration_samples, "seq_len": seq_len,
                                     "seed": calibration_seed}
        base.save(self.base_dir)
        self._served_base = None
        if self.recovery_dir.exists() and _recovery_base_id(self.recovery_dir) != base.manifest.base_id:
            shutil.rmtree(self.recovery_dir)  # made for a previous base: no longer applies (the same base keeps it)
        # its distillation checkpoints likewise (left, they stood beside the next recovery as if its own)
        _remove_recovery_checkpoints(self.work_dir, keep_base_id=base.manifest.base_id)
        self._record("compress", started_at, base_id=base.manifest.base_id,
                     stages=[stage_config_to_dict(stage) for stage in stages], calibration=base.manifest.calibration,
                     seconds=time.perf_counter() - start)
        return self

    def check_stages(self, stages: Sequence) -> None:
        """Every check of ``stages`` that :meth:`compress` runs before its work, alone and cheap (for callers
        that measure the original model first).

        Raises:
            ValueError: what :meth:`compress` would refuse for these stages (see
                :func:`cpet.compress.validate_stages`).
        """
        from .compress import validate_stages

        # the stages' checks read only whether calibration batches will be given (compress always gives them),
        # not their ids: a zero-row placeholder spares tokenizing the corpus (about 20 s for Brown) for them
        validate_stages(self.original.model, list(stages), calibration=torch.empty((0, 1), dtype=torch.long))

    # ------------------------------------------------------------------ shared recovery
    def recover(self, config: RecoveryConfig | None = None, distill: DistillConfig | None = None, *,
                text: str = "brown", activation_weighted: bool = True, progress: bool = True,
                checkpoints: Sequence[int] = ()) -> "CPET":
        """Task-agnostic recovery: SVD-initialised linear bypasses distilled on calibration text.

        The result goes to ``work_dir/recovery``; each step count in ``checkpoints`` (below
        ``distill.steps``) also saves the modules as they are after that many steps to
        ``work_dir/recovery-step<N>`` (same format), e.g. to measure how much distillation is enough. They are put
        in place with the final set, replacing every checkpoint of an earlier distillation (a run that does not
        finish leaves the previous recovery and its checkpoints as they were); each records the settings it was
        distilled with (``distill``, ``config``, ``text``) and the final ``recovery.json`` lists ``checkpoints``.
        """
        from .compress.calibration import calibration_ids
        from .data import load_corpus

        config = config or RecoveryConfig(rank=16, alpha=16.0, activation="identity", init="svd")
        distill = distill or DistillConfig()
        wanted = {int(step) for step in checkpoints}
        if any(not 0 < step < distill.steps for step in wanted):  # before any work
            raise ValueError(f"checkpoints {sorted(wanted)} must lie between 0 and the {distill.steps} distillation "
                             "steps (the last step is saved anyway)")
        self._require_base()  # before the original loads: without a base there is nothing to recover
        # before the corpus, the base, the activation pass and an SVD of every linear
        check_distill_window(self.original.model, distill)
        start, started_at = time.perf_counter(), utc_now()
        corpus = load_corpus(text, split="train")
        if len(corpus) <= 64 * distill.seq_len:  # a text this short may hold no window: say so before any work
            text_windows(self.original.tokenizer, corpus, distill.seq_len)  # (longer: tokens of 64+ characters)
        base = self.load_compressed()
        with torch.random.fork_rng(devices=[]):  # a zero-init set's random A: a function of the seed alone
            torch.manual_seed(distill.seed)
            recovery = RecoverySet(base.model, config)
        if config.init == "svd":
            check_svd_rank(config.rank, {name: (recovery.bypass(name).B.weight.shape[0],
                                                recovery.bypass(name).A.weight.shape[1]) for name in recovery.targets},
                           "use a smaller rank (cpet recover --rank), or RecoveryConfig(init='zero')")
            scales = None
            if activation_weighted:
                # 128-token windows, within the model's context: past a shorter one, a model with learned positions
                # failed with an IndexError (context_length is None where the config states none)
                window = min(128, context_length(self.original.model) or 128)
                ids = calibration_ids(self.original.tokenizer, corpus, 8, window, seed=distill.seed)  # one seed, all
                scales = input_rms(self.original.model, ids, recovery.targets)
            init_errors = init_from_residuals(recovery, self.original.model, base.model, base.index_maps, scales)
        recovery.attach(base.model, slot=SHARED, trainable=True)
        # what this distillation is: every checkpoint records it as the final set does
        made_with = {"base_id": base.manifest.base_id, "distill": asdict(distill), "text": text,
                     "activation_weighted": activation_weighted}
        # Checkpoints wait in a hidden directory until the final set is saved, then replace every earlier one:
        # recovery-step<N> directories are read by their name alone (the recovery-budget experiment), so one of an
        # earlier distillation (other steps, rank, lr or text; a step count this run does not save) or one of an
        # unfinished run must never stand beside a recovery/ it does not belong to.
        pending = self.work_dir / ".recovery-checkpoints"
        shutil.rmtree(pending, ignore_errors=True)  # left by a run killed outright

        def save_checkpoint(done: int) -> None:
            if done in wanted:
                recovery.save(pending / f"recovery-step{done}", {**made_with, "steps_done": done})

        try:
            losses = distill_on_text(base.model, self.original.model, self.original.tokenizer, corpus, distill,
                                     progress=progress, after_step=save_checkpoint)
            # the earlier checkpoints go first: cut off between these steps, recovery/ is left with fewer
            # checkpoints than it had, never with another distillation's
            _remove_recovery_checkpoints(self.work_dir)
            recovery.save(self.recovery_dir, {**made_with, "checkpoints": sorted(wanted), "losses": losses})
            for checkpoint in sorted(pending.glob("recovery-step*")):
                os.replace(checkpoint, self.work_dir / checkpoint.name)
        finally:
            shutil.rmtree(pending, ignore_errors=True)
        self._record("recover", started_at, config=asdict(config), distill=asdict(distill), text=text,
                     activation_weighted=activation_weighted, checkpoints=sorted(wanted),
                     loss_first=losses[0], loss_last=losses[-1],
                     mean_init_error=(sum(init_errors.values()) / len(init_errors)
                                      if config.init == "svd" else None),
                     seconds=time.perf_counter() - start)
        return self

    # ------------------------------------------------------------------ tune
    def tune(self, task, *, on: str = "compressed", init: str = "random",
             inherit_from: TaskAdapter | str | Path | None = None, recovery: str = "none",
             config: TuneConfig | None = None, per_task_recovery: RecoveryConfig | None = None,
             name: str | None = None, progress: bool = True, keep_optimizer_state: bool = False) -> TaskAdapter:
        """Tune one LoRA adapter for ``task`` and save it under ``work_dir/adapters/<name>``.

        Args:
            task: a task name / path / ``hf:`` spec, or a loaded ``ClassificationTask``.
            on: ``"original"`` (the uncompressed model: the upper reference and inheritance source) or
                ``"compressed"``.
            init: ``"random"`` (peft default: B = 0), ``"inherit"`` (from ``inherit_from``: an adapter
                trained on the original model, by CPET or as a plain PEFT LoRA elsewhere; its rank, alpha
                and target modules replace the config's) or ``"svd"`` (truncated SVD of the compression
                residual).
            recovery: ``"none"``, ``"shared"`` (the frozen modules made by :meth:`recover`),
                ``"per_task"`` (CA-LoRA: GELU bypasses trained with the adapter, distilled from the
                original model with the inherited adapter), or ``"both"``.
            keep_optimizer_state: keep the AdamW moments in ``adapters/<name>/resume`` once the run is
                finished (by default only the weights and the loop position stay: enough to extend ``steps``).
        Returns:
            the adapter; its ``meta`` (``cpet.json``) says ``inherited_task`` and, when that is another task
            than ``task`` (allowed when the labels fit), ``inherited_from_other_task: True``.
        Raises:
            ValueError: bad option, an adapter for another source model, a task whose labels the
                inherited adapter does not know, or missing prerequisites (base, recovery).
        """
        config = config or TuneConfig()
        if name is not None:
            check_adapter_name(name)
        started_at = utc_now()
        task_source = task_source_of(task)
        task = as_task(task)
        # a file too small to split, or two labels sharing a label word, fails here, before any model work
        template, verbalizer = tuning_prompts(task, "train", "validation")
        recovery = recovery.replace("-", "_")  # "per-task", as the CLI and the docs write it, is "per_task"
        inherit_from = self.resolve_adapter(inherit_from)
        if per_task_recovery is not None and recovery not in ("per_task", "both"):  # it would be silently unused
            raise ValueError(f"per_task_recovery is used only with recovery='per_task' or 'both', but this run has "
                             f"recovery={recovery!r}: set recovery (CLI: --recovery per-task) or leave it out")
        if per_task_recovery is not None and per_task_recovery.init != "zero":  # it would be recorded, not done
            raise ValueError(f"per_task_recovery init={per_task_recovery.init!r}: per-task recovery starts at zero and "
                             "learns with the adapter (the residual-SVD start belongs to the shared recovery, "
                             "CPET.recover); give RecoveryConfig(init='zero')")
        source = self._check_tune_args(task, on, init, inherit_from, recovery)  # the source, read once
        # before anything random (LoRA A, recovery init): the same seed gives the same run whatever ran before
        torch.manual_seed(config.seed)
        # the task's file-name-safe key: a hub name such as "stanfordnlp/imdb" would nest the adapter directory
        name = name or f"{task_key(task.name)}-{on}-{init}-{recovery}-s{config.seed}"
        out_dir = self.work_dir / "adapters" / name
        if recovery in ("per_task", "both") and config.distill_weight == 0:  # per-task recovery learns from a teacher
            config = TuneConfig(**{**config.to_dict(), "distill_weight": 1.0})
        if (out_dir / "resume" / "state.json").exists():
            # settings that clash with the run being resumed and fewer steps than it has trained, before the base and
            # the LoRA are built (what the run is for is compared once they are; an inherited LoRA's rank comes from
            # its source, so only the steps here)
            (check_resume_steps if init == "inherit" else check_resume_plan)(out_dir / "resume", config)
        # the per-task recovery this run trains (CA-LoRA's default when none is given), None without one
        per_task_config = ((per_task_recovery or DEFAULT_PER_TASK_RECOVERY) if recovery in ("per_task", "both")
                           else None)
        if (out_dir / "adapter" / "cpet.json").exists() and not (out_dir / "resume" / "state.json").exists():
            self._check_restarted_adapter(out_dir, task, on, init, recovery, source, config, per_task_config)
        teacher = None
        if on == "original":
            model, base_id, index_maps = copy.deepcopy(self.original.model), ORIGINAL_BASE_ID, None
        else:
            base = self.load_compressed()
            model, base_id, index_maps = base.model, base.manifest.base_id, base.index_maps
        structure = {}
        if init == "inherit":  # the inherited LoRA's structure (targets, ranks, scaling), whatever the config says
            from .lora_init import lora_shape_of

            structure = lora_shape_of(source)
            config = TuneConfig(**{**config.to_dict(), "rank": structure.pop("rank"),
                                   "alpha": structure.pop("alpha")})
        peft_model = add_lora(model, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                              target_roles=config.target_roles, **structure)
        # after peft wraps the model, so that a regex target_modules cannot match the bypasses, and before the
        # LoRA init, which reads what the shared bypasses already correct (init="svd")
        if recovery in ("shared", "both"):
            RecoverySet.load(self.recovery_dir, peft_model, expected_base_id=base_id).attach(peft_model, slot=SHARED)
        if init == "inherit":
            from .lora_init import apply_inherited_lora

            apply_inherited_lora(peft_model, source, index_maps, self.original.model.config)
        elif init == "svd":
            from .lora_init import apply_residual_svd_lora, lora_shapes

            check_svd_rank(config.rank, lora_shapes(peft_model), "use a smaller --rank, or --init random")
            apply_residual_svd_lora(peft_model, self.original.model, index_maps)
        per_task = None
        if per_task_config is not None:
            per_task = RecoverySet(peft_model, per_task_config)
            per_task.attach(peft_model, slot=PER_TASK, trainable=True)
            teacher = self._teacher(source)

        meta = {"base_id": base_id, "source_name": _lasting_source(self.source_name),
                "source_hub_id": self.source_hub_id,
                "source_fingerprint": self.source_fingerprint, "task": task.name, "task_source": task_source,
                "labels": list(task.labels), "label_words": verbalizer.label_words,
                "template": template.template, "on": on, "init": init,
                "recovery": recovery, "tune_config": config.to_dict(), "max_prompt_tokens": config.max_prompt_tokens,
                "prompt_cut": PROMPT_CUT,
                "inherited_from": str(source.directory) if source else None,
                "inherited_sha256": source.weights_sha256 if source else None,
                **inheritance_facts(task.name, source if init == "inherit" or per_task is not None else None),
                **self._base_facts(on, recovery, per_task)}
        identity = {"task": task.name, "train_sha256": examples_sha256(task.split("train")), "base_id": base_id,
                    "source_fingerprint": self.source_fingerprint, "init": init, "recovery": recovery,
                    "inherited_sha256": meta["inherited_sha256"],
                    "shared_recovery_sha256": (meta["shared_recovery"] or {}).get("sha256"),
                    "per_task_recovery": meta["per_task_recovery"], "prompt_cut": PROMPT_CUT,
                    "target_modules": target_module_names(peft_model.peft_config["default"].target_modules)}

        base_reference = self._base_reference(on, out_dir / "adapter")

        def save_best(directory: Path, metrics: dict) -> None:
            save_adapter(peft_model, directory, {**meta, "metrics": metrics}, base_reference=base_reference,
                         name=name)
            if per_task is not None:
                per_task.save(directory / "per_task_recovery", {"base_id": base_id})

        start = time.perf_counter()
        result = train_classifier(peft_model, self.tokenizer, task.split("train"),
                                  task.split("validation"), labels=task.labels, template=template,
                                  verbalizer=verbalizer, config=config, out_dir=out_dir,
                                  save_best=save_best, teacher=teacher, identity=identity, progress=progress,
                                  keep_optimizer_state=keep_optimizer_state)
        # the best checkpoint was written mid-run; give its cpet.json (and card) the whole learning curve
        final = read_adapter_meta(out_dir / "adapter")
        final["metrics"]["history"] = result.history
        final["tune_config"] = config.to_dict()  # a resumed, longer run that found no new best: its steps too
        write_adapter_meta(out_dir / "adapter", final)
        self._record("tune", started_at, adapter=name, task=task_source or task.name, on=on, init=init,
                     recovery=recovery, inherit_from=meta["inherited_from"], tune_config=config.to_dict(),
                     per_task_recovery=asdict(per_task.config) if per_task is not None else None,
                     keep_optimizer_state=keep_optimizer_state,
                     inherited_from_other_task=final.get("inherited_from_other_task"),
                     best_val_accuracy=result.best_accuracy, best_step=result.best_step,
                     seconds=time.perf_counter() - start)
        return TaskAdapter(out_dir / "adapter", final)

    def record_metrics(self, adapter: TaskAdapter | str | Path, **metrics) -> dict:
        """Add ``metrics`` (e.g. the test accuracy a user was shown) to an adapter's ``cpet.json``, atomically."""
        directory = self.resolve_adapter(adapter)
        meta = read_adapter_meta(directory)
        meta["metrics"] = {**meta.get("metrics", {}), **metrics}
        write_adapter_meta(directory, meta)  # the model card shows them too
        return meta

    def adapters(self) -> dict[str, Path]:
        """``{name: adapter directory}`` of every finished adapter in this pipeline, sorted by name."""
        root = self.work_dir / "adapters"
        found = sorted(root.glob("*/adapter/adapter_config.json")) if root.exists() else []
        return {path.parent.parent.name: path.parent for path in found}

    def resolve_adapter(self, adapter: TaskAdapter | str | Path | None) -> Path | None:
        """An adapter directory from a :class:`TaskAdapter`, a path, or the name of one of this pipeline's adapters.

        Raises:
            FileNotFoundError: neither an adapter directory nor a known name; the message lists the known
                names, and points one level down when given a run directory (``adapters/<name>``).
        """
        if adapter is None or isinstance(adapter, TaskAdapter):
            return _dir(adapter)
        path = Path(adapter)
        if (path / "adapter" / "adapter_config.json").exists() and not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} is a tuning run directory, not an adapter directory: "
                                    f"use {path / 'adapter'}")
        known = self.adapters()
        if str(adapter) in known and not (path / "adapter_config.json").exists():  # a name, not a local path
            return known[str(adapter)]
        if path.is_dir():  # an adapter directory (or not: the loaders say what is missing)
            return path
        raise FileNotFoundError(f"no adapter {str(adapter)!r}: not an adapter directory (adapter_config.json), nor "
                                f"the name of an adapter in {self.work_dir} ({', '.join(known) or 'none yet'})")

    def _base_facts(self, on: str, recovery: str, per_task: RecoverySet | None) -> dict:
        """What an adapter's base and recovery are, for its ``cpet.json`` and model card."""
        facts: dict = {"compression": None, "shared_recovery": None,
                       "per_task_recovery": asdict(per_task.config) if per_task is not None else None}
        if on == "compressed":
            manifest = json.loads((self.base_dir / "manifest.json").read_text())
            facts["compression"] = {"stages": [stage["config"] for stage in manifest["stages"]],
                                    "uniform": manifest.get("uniform", True)}
        if recovery in ("shared", "both"):
            saved = json.loads((self.recovery_dir / "recovery.json").read_text())
            facts["shared_recovery"] = {"config": saved.get("config"),
                                        "distill_steps": saved.get("distill", {}).get("steps"),
                                        "sha256": recovery_sha256(self.recovery_dir)}
        return facts

    def _base_reference(self, on: str, adapter_dir: Path) -> str | None:
        """``base_model_name_or_path`` for an adapter saved to ``adapter_dir``, valid wherever the pipeline goes.

        The compressed base: its path relative to the adapter directory (``../../../base``). The original:
        its hub id when it has one; a local directory made absolute (a relative one held only from the directory
        the command ran in); else None, leaving peft's record (the path it was loaded from).
        """
        if on == "compressed":
            return Path(os.path.relpath(self.base_dir.resolve(), adapter_dir.resolve())).as_posix()
        if self.source_hub_id is None and _lasting_source(self.source_name) != self.source_name:
            return _lasting_source(self.source_name)
        return self.source_hub_id

    def _check_tune_args(self, task, on, init, inherit_from, recovery) -> AdapterSource | None:
        """Refuse bad options before any work; return the inheritance source, read once (None without one)."""
        check_tune_options(on, init, recovery, inherit_from)
        if on == "compressed":
            self._require_base()
        if recovery in ("shared", "both") and not (self.recovery_dir / "recovery.json").exists():
            raise ValueError(f"no shared recovery modules in {self.recovery_dir}: call recover(...) first (CLI: "
                             f"`cpet recover {self.work_dir}`)")
        if inherit_from is not None:
            source = self._inheritance_source(_dir(inherit_from))
            labels = source.meta["labels"] if source.is_cpet else None  # a plain PEFT source: the task's own
            unknown = sorted(set(task.labels) - set(labels)) if labels is not None else []
            if unknown:
                raise ValueError(f"task {task.name!r} has labels {unknown} that adapter {_dir(inherit_from)} "
                                 f"does not know (it knows {labels})")
            return source
        return None

    def _inheritance_source(self, directory: Path) -> AdapterSource:
        """An inheritance source, read once, after checking it was trained on this source model.

        A CPET adapter must come from the original model of this source (``base_id`` and fingerprint);
        a plain PEFT LoRA trained elsewhere must name this model (if it names one) and fit its shapes.
        """
        if not is_cpet_adapter(directory):
            source = plain_peft_source(directory)
            plain_peft_meta(source, self.original.model, self.source_aliases)
            return source
        source = AdapterSource(directory)
        check_adapter_base(source.meta, base_id=ORIGINAL_BASE_ID, source_fingerprint=self.source_fingerprint,
                           directory=directory, inheriting=True)
        return source

    def _check_restarted_adapter(self, out_dir: Path, task, on: str, init: str, recovery: str,
                                 source: AdapterSource | None, config: TuneConfig,
                                 per_task: RecoveryConfig | None) -> None:
        """Refuse to train over an adapter that has no resume state, unless it was made for the same purpose
        with the same settings (``per_task``: the per-task recovery config the run trains, None without one).

        Resuming checks a run against its ``resume/state.json``; without one (a run cut before its first save,
        or a state deleted by hand) the run starts again from step 0, which is right for the same run and would
        silently replace another task's or another setting's adapter otherwise. The per-task recovery config is
        part of the setting (the resume identity holds it too): another rank under the same name was a silent
        replacement.
        """
        old = read_adapter_meta(out_dir / "adapter")
        now = {"task": task.name, "on": on, "init": init, "recovery": recovery,
               "base_id": ORIGINAL_BASE_ID if on == "original" else self.base_id,
               "inherited_sha256": source.weights_sha256 if source else None}
        differs = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in now.items() if old.get(key) != value]
        fixed = ("steps", "rank", "alpha") if init == "inherit" else ("steps",)  # inherit takes the source's shape
        differs += settings_changes(old.get("tune_config") or {}, config, ignore=fixed)
        differs += _per_task_changes(old.get("per_task_recovery"), per_task)
        if differs:
            raise ValueError(f"{out_dir} holds an adapter made for something else ({', '.join(differs)}) and no "
                             "resume state to continue it from: give the new adapter another name (--name) or "
                             f"delete {out_dir}")

    def _check_source_of(self, meta: dict, directory: Path) -> None:
        """Refuse a CPET adapter tuned on another source model's original. Every adapter tuned on an original has
        the same ``base_id`` (:data:`ORIGINAL_BASE_ID`), so only the source fingerprint tells two sources apart;
        an adapter of the compressed base is checked by its ``base_id``, which the source already enters."""
        if meta.get("on") == "original":
            check_adapter_base(meta, source_fingerprint=self.source_fingerprint, directory=directory)

    def _teacher(self, source: AdapterSource):
        """The uncompressed model with the original task adapter (a separate copy: never the student)."""
        from peft import PeftModel

        if not source.is_cpet:  # a plain PEFT adapter, checked by _inheritance_source
            return PeftModel.from_pretrained(copy.deepcopy(self.original.model), str(source.directory)).eval()
        # peft reads the weights again here: PeftModel.from_pretrained is the loader that builds peft's layers
        return load_adapter(copy.deepcopy(self.original.model), source.directory, base_id=ORIGINAL_BASE_ID,
                            meta=source.meta).eval()

    # ------------------------------------------------------------------ evaluate
    @contextlib.contextmanager
    def engine(self, on: str = "compressed") -> Iterator["Engine"]:
        """The serving engine on this pipeline's base, for the block: the compressed base (read once per pipeline
        object, with the shared recovery when there is one) or the original model (``on="original"``).

        Adapters loaded into it run as they were trained (:mod:`cpet.assembly`); nothing is copied, and the
        engine's hooks are removed when the block ends. Engines on one pipeline hook the same modules, so blocks
        in other threads wait for each other. The compressed base stays cached for later blocks (about the
        base's size in memory) until :meth:`compress` replaces it or :meth:`release_base` drops it.
        """
        from .serve.engine import Engine

        if on == "original":
            model, base_id, shared = self.original.model, ORIGINAL_BASE_ID, None
        elif on == "compressed":
            self._require_base()
            base_id = self.base_id
            if self._served_base is None or self._served_base[0] != base_id:
                self._served_base = (base_id, self.load_compressed().model)
            model = self._served_base[1]
            shared = self.recovery_dir if (self.recovery_dir / "recovery.json").exists() else None
        else:
            raise ValueError(f"on must be 'original' or 'compressed', got {on!r}")
        with self._engine_lock:
            engine = Engine(model, base_id, self.tokenizer, shared_recovery=shared)
            try:
                yield engine
            finally:
                engine.close()

    def release_base(self) -> None:
        """Drop the compressed base cached for evaluation (the next evaluation reads ``base/`` again)."""
        self._served_base = None

    @contextlib.contextmanager
    def running(self, adapter: AdapterSource | TaskAdapter | str | Path | None = None, *, on: str = "compressed"
                ) -> Iterator["AdapterView"]:
        """An adapter as a model for the block, on the base it was tuned on with the recovery it was trained with
        (None: the bare base ``on``), through :meth:`engine`: ``model(input_ids=...)`` gives its logits.
        ``model.nbytes`` is what it holds: the base's tensors plus the adapter's and recovery's factors."""
        source = adapter
        if adapter is not None and not isinstance(adapter, AdapterSource):
            source = AdapterSource(self.resolve_adapter(adapter))
        if source is not None:
            on = source.meta.get("on", on)  # a CPET adapter runs where it was tuned; a plain PEFT one on ``on``
            self._check_source_of(source.meta, source.directory)
        with self.engine(on) as engine:
            if source is not None:
                engine.load("running", source)
            yield engine.view("running" if source is not None else None)

    def model_for(self, adapter: TaskAdapter | str | Path | None = None, *, on: str = "compressed"):
        """A standalone PEFT model of an adapter as it was trained: a copy of its base with the shared / per-task
        recovery attached and the adapter loaded by peft, frozen, in eval mode (to use it as a ``PeftModel``:
        generate with transformers, inspect or merge its layers); None: the bare base's copy.

        Evaluation, serving and export do not need this copy: they run adapters on one base through
        :meth:`engine`. The two compute the same (tested).
        """
        adapter = self.resolve_adapter(adapter)
        meta = read_adapter_meta(_dir(adapter)) if adapter is not None else {"on": on, "recovery": "none"}
        if adapter is not None:
            self._check_source_of(meta, _dir(adapter))
        if meta["on"] == "original":
            model, base_id = copy.deepcopy(self.original.model), ORIGINAL_BASE_ID
        else:
            model, base_id = self.load_compressed().model, self.base_id
        if adapter is None:
            return model
        if meta.get("recovery") in ("shared", "both"):
            check_trained_with(meta, _dir(adapter), recovery_sha256(self.recovery_dir))
        peft_model = load_adapter(model, _dir(adapter), base_id=base_id)
        if meta.get("recovery") in ("shared", "both"):  # after peft, as in tune (a regex target cannot match it)
            RecoverySet.load(self.recovery_dir, peft_model, expected_base_id=base_id).attach(peft_model, slot=SHARED)
        if meta.get("recovery") in ("per_task", "both"):
            RecoverySet.load(Path(_dir(adapter)) / "per_task_recovery", peft_model,
                             expected_base_id=base_id).attach(peft_model, slot=PER_TASK)
        return peft_model.eval()

    def evaluate(self, adapter: TaskAdapter | str | Path | None, task, *, split: str = "test",
                 limit: int | None = None, on: str = "compressed", batch_size: int = 16,
                 max_prompt_tokens: int | None = None, with_predictions: bool = False) -> dict:
        """Accuracy of an adapter (or of a bare model, zero-shot) on a task split.

        Prompts are cut to the adapter's own ``max_prompt_tokens`` (as it was trained); a bare model uses
        ``max_prompt_tokens`` or the default. ``on`` places a bare model; a CPET adapter runs on the model it was
        tuned on (its ``cpet.json``), whatever ``on`` says (a plain PEFT directory is refused: nothing says
        which task, prompt or base it was trained for; ``cpet eval --model BASE --peft DIR`` scores one).
        ``limit`` None scores the whole split. The result also has the majority-class share of the scored
        examples and, with ``with_predictions``, the predicted and gold label of every example in split order
        and the :func:`~cpet.data.tasks.examples_sha256` of the scored examples (for paired comparisons).
        """
        from .evaluate import DEFAULT_MAX_PROMPT_TOKENS, classification_accuracy

        task = as_task(task)
        task.require(split)
        adapter = self.resolve_adapter(adapter)
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for the whole split), got {limit}")
        source = AdapterSource(_dir(adapter)) if adapter is not None else None  # read once, run below
        if source is not None:
            meta = source.meta or read_adapter_meta(source.directory)  # (a plain PEFT directory: says what is missing)
            max_prompt_tokens = check_scoring(meta, task, max_prompt_tokens, where=f"adapter {_dir(adapter)}")
        max_prompt_tokens = max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS
        # a CPET adapter is scored with the cut it was trained with; a bare model or plain PEFT one with today's
        prompt_cut = scoring_cut(source.meta if source is not None else None)
        template, verbalizer = scoring_prompts(task, meta if source is not None else None)
        examples = task.split(split)[:limit] if limit else task.split(split)
        gold = [e.label for e in examples]
        with self.running(source, on=on) as model:
            result = classification_accuracy(model, self.tokenizer, [e.text for e in examples], gold,
                                             template=template, verbalizer=verbalizer,
                                             labels=task.labels, batch_size=batch_size,
                                             max_prompt_tokens=max_prompt_tokens, prompt_cut=prompt_cut)
        out = {"task": task.name, "split": split, **result.to_dict(), "max_prompt_tokens": max_prompt_tokens,
               "majority_baseline": max(gold.count(label) for label in task.labels) / len(gold)}
        if with_predictions:
            out.update(predictions=list(result.predictions), gold=gold, examples_sha256=examples_sha256(examples))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Copy the whole work directory (base, recovery, adapters, log) to ``directory`` atomically.

        ``directory`` must be new, empty, or a saved pipeline (which is replaced as a whole).

        Raises:
            ValueError: ``directory`` holds files that are not a pipeline (they would be deleted), or lies
                inside the work directory (the copy would copy itself), or holds it (replacing it would delete it).
        """
        directory = Path(directory)
        if directory.resolve() == self.work_dir.resolve():
            return directory
        if self.work_dir.resolve() in directory.resolve().parents:
            raise ValueError(f"cannot save the pipeline into {directory}, inside its own work directory "
                             f"{self.work_dir}: choose a directory outside it")
        if directory.resolve() in self.work_dir.resolve().parents:  # replacing it would delete the work directory
            raise ValueError(f"cannot save the pipeline into {directory}, which holds its own work directory "
                             f"{self.work_dir} (replacing it would delete what is being copied): choose a directory "
                             "outside it")
        if directory.is_dir() and any(directory.iterdir()) and not (directory / "pipeline.json").exists():
            raise ValueError(f"{directory} holds files and is not a CPET pipeline: saving would replace them; "
                             "choose a new or empty directory (a saved pipeline there is replaced)")
        with atomic_path(directory) as tmp:
            shutil.copytree(self.work_dir, tmp)
        return directory

    @classmethod
    def load(cls, directory: str | Path, original: str | LoadedBase | None = None, *,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "CPET":
        """Reopen a saved pipeline without loading the original model's weights.

        The original is loaded on first use (see :attr:`original`) by ``original`` (a name/path) or else by
        the name recorded in the pipeline, in ``dtype`` on ``device`` (as :func:`load_base` places it, so that a
        saved pipeline runs where a new one would); an already loaded base is used as is. Either way it must be the
        source model the pipeline records (content fingerprint of ``base/manifest.json``, else of
        ``pipeline.json``): a loaded base is checked here, a name when it is loaded.

        Raises:
            FileNotFoundError: no ``pipeline.json`` in ``directory``.
            ValueError: ``original`` is a loaded base of another source model.
        """
        directory = Path(directory)
        if not (directory / "pipeline.json").exists():
            raise FileNotFoundError(f"{directory} has no pipeline.json: not a saved CPET pipeline")
        record = read_pipeline_record(directory)
        pipeline = cls(original or record["source"], directory)  # reads the log and checks a loaded original
        pipeline._source_from_record = original is None
        pipeline._original_placement = {"dtype": dtype, "device": device}
        return pipeline


_IS_A_FILE = "work directory {} is a file: give a directory (new or a pipeline's)"


def check_work_dir(work_dir: str | Path) -> None:
    """Refuse a directory that a new pipeline cannot be written to (needs no model: commands that start a
    pipeline check it before loading one; opening a saved pipeline needs no write access and does not call it).

    Raises:
        ValueError: ``work_dir`` is a file, cannot be made (a file on its way, no write access), or holds files
            of something else (a pipeline writes ``base/``, ``adapters/`` and ``recovery/`` there, replacing what
            directories of those names hold).
    """
    work_dir = Path(work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise ValueError(_IS_A_FILE.format(work_dir))
    if work_dir.is_dir() and not (work_dir / "pipeline.json").exists():
        # what a run cut off before its first step leaves (its configs/, a hidden temporary) is the pipeline's own;
        # an entry that only bears a pipeline's name is not (a model directory called base/ would be replaced)
        foreign = sorted(entry.name for entry in work_dir.iterdir()
                         if not _pipeline_own(entry) and not entry.name.startswith((".", "recovery-step")))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(f"{work_dir} holds files and is not a CPET pipeline (no pipeline.json; it holds {shown}): "
                             "choose a new or empty directory")
    check_output_dir(work_dir)


# what a pipeline's work directory holds (see the module docstring)
PIPELINE_ENTRIES = frozenset({"pipeline.json", "base", "adapters", "recovery", "configs"})


def _pipeline_own(entry: Path) -> bool:
    """Whether ``entry`` of a work directory is what a pipeline writes there, not only named so: ``base/`` with its
    manifest, ``recovery/`` with ``recovery.json``, ``adapters/`` of directories, ``configs/`` of JSON files."""
    if entry.name not in PIPELINE_ENTRIES or not entry.is_dir():
        return False
    if entry.name == "base":
        return (entry / "manifest.json").exists()
    if entry.name == "recovery":
        return (entry / "recovery.json").exists()
    if entry.name == "adapters":
        return all(child.is_dir() for child in entry.iterdir())
    return all(child.suffix == ".json" for child in entry.iterdir())  # configs/


def check_tune_options(on: str, init: str, recovery: str, inherit_from=None) -> None:
    """Refuse a combination of tuning options that no pipeline accepts (needs no model: callers check it first).

    ``inherit_from`` (an adapter or its directory) must be given exactly when it is read: by ``init='inherit'``
    or per-task recovery.

    Raises:
        ValueError: naming the option and what it takes.
    """
    if on not in ("original", "compressed"):
        raise ValueError(f"on must be 'original' or 'compressed', got {on!r}")
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
    if recovery not in RECOVERY_MODES:
        raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {recovery!r}")
    if on == "original" and (init != "random" or recovery != "none"):
        raise ValueError("tuning on the original model takes init='random' and recovery='none' (CLI: leave "
                         "--init and --recovery out with --on original)")
    reads_source = init == "inherit" or recovery in ("per_task", "both")
    if reads_source and inherit_from is None:
        raise ValueError("init='inherit' and per-task recovery need inherit_from: an adapter trained on the original "
                         "model (tune(task, on='original')); CLI: --inherit-from NAME, an adapter of `cpet tune "
                         "PIPELINE --on original`")
    if not reads_source and inherit_from is not None:  # it would be recorded as the source without being read
        raise ValueError(f"inherit_from ({_dir(inherit_from)}) is read only by init='inherit' or per-task recovery, "
                         f"but this run has init={init!r} and recovery={recovery!r}: add init='inherit' (CLI: "
                         "--init inherit) or leave the source out")


def read_pipeline_record(directory: str | Path) -> dict:
    """The record (``source``, ``source_fingerprint``, ``log``) in a pipeline's ``pipeline.json``.

    Raises:
        ValueError: the file is not valid JSON, or not an object with ``source`` and a ``log`` list (named, so
            that a damaged record is not a bare parser error or KeyError).
    """
    path = Path(directory) / "pipeline.json"
    try:
        record = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({err}): the pipeline's record is damaged") from err
    if not isinstance(record, dict) or not isinstance(record.get("source"), str) \
            or not isinstance(record.get("log"), list):
        raise ValueError(f"{path} is not a pipeline record (an object with a source name and a log list): the "
                         "pipeline's record is damaged")
    return record


def _lasting_source(name: str) -> str:
    """The source as ``pipeline.json`` keeps it: a local path made absolute, so that the pipeline finds its
    source from any working directory; embedded names and hub ids as they are."""
    path = Path(name).expanduser()
    return str(path.resolve()) if name not in EMBEDDED and path.exists() else name


def _recorded_fingerprint(directory: Path, record: dict) -> str | None:
    """The source fingerprint a saved pipeline was built from: its base's manifest, else ``pipeline.json``."""
    manifest = directory / "base" / "manifest.json"
    if manifest.exists():
        try:
            source = json.loads(manifest.read_text()).get("source", {})
            found = source.get("fingerprint") if isinstance(source, dict) else None
        except (ValueError, AttributeError):  # damaged: the record's fingerprint still names the source, so that
            found = None                      # `cpet compress` can make the base again (what `cpet list` advises)
        if found:
            return found
    return record.get("source_fingerprint")


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second (``2025-01-31T12:00:00Z``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _recovery_base_id(directory: Path) -> str | None:
    """The ``base_id`` a saved recovery set was made for; None where its ``recovery.json`` is missing or damaged."""
    from .recovery import read_recovery_meta

    try:
        base_id = read_recovery_meta(directory).get("base_id")
    except (OSError, ValueError, AttributeError):  # json.JSONDecodeError is a ValueError; a list has no .get
        return None
    return base_id if isinstance(base_id, str) else None


def _per_task_changes(saved, now: RecoveryConfig | None) -> list[str]:
    """``"per_task_recovery key saved -> now"`` for each field of a per-task recovery config that differs from the
    one an adapter recorded (``cpet.json``'s ``per_task_recovery``: a dict, or None without per-task recovery)."""
    current = json.loads(json.dumps(asdict(now))) if now is not None else None  # as recorded: tuples as lists
    if not isinstance(saved, dict) or current is None:
        return [] if saved == current else [f"per_task_recovery {saved!r} -> {current!r}"]
    return [f"per_task_recovery {key} {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def _remove_recovery_checkpoints(work_dir: Path, keep_base_id: str | None = None) -> None:
    """Delete a work directory's ``recovery-step<N>`` checkpoints (:meth:`CPET.recover`); with ``keep_base_id``,
    only those not made for that base (a missing or damaged ``recovery.json`` counts as another base)."""
    for checkpoint in work_dir.glob("recovery-step*"):
        if not (checkpoint.is_dir() and checkpoint.name.removeprefix("recovery-step").isdigit()):
            continue
        if keep_base_id is None or _recovery_base_id(checkpoint) != keep_base_id:
            shutil.rmtree(checkpoint)


def _dir(adapter: TaskAdapter | str | Path | None) -> Path | None:
    if adapter is None:
        return None
    return adapter.directory if isinstance(adapter, TaskAdapter) else Path(adapter)
