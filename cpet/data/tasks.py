"""Classification tasks: a registry of named tasks, local JSONL/CSV files, and hub datasets.

A task is a set of ``Example(text, label)`` in ``train``/``validation``/``test`` splits with any label
strings. Files without a split column are split deterministically (stratified by label, seeded).
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

SPLIT_NAMES = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test"}


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: str


@dataclass
class ClassificationTask:
    """A named classification task with its label set and splits.

    Attributes:
        name: task name (used in adapter metadata).
        labels: the label strings, sorted; at least two.
        splits: ``{"train": [...], "validation": [...], "test": [...]}``.
        description: where the data came from.
    """

    name: str
    labels: tuple[str, ...]
    splits: dict[str, list[Example]]
    description: str = ""
    family: str = field(default="generic")

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]

    def label_counts(self, split: str) -> dict[str, int]:
        counts = Counter(e.label for e in self.split(split))
        return {label: counts.get(label, 0) for label in self.labels}


def split_examples(examples: Iterable[Example], *, seed: int = 0,
                   fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[Example]]:
    """Deterministic stratified train/validation/test split (same input + seed -> same split anywhere)."""
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    splits: dict[str, list[Example]] = {name: [] for name in SPLIT_NAMES}
    for label in sorted(by_label):
        items = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(items)
        n_train = round(fractions[0] * len(items))
        n_val = round(fractions[1] * len(items))
        splits["train"] += items[:n_train]
        splits["validation"] += items[n_train:n_train + n_val]
        splits["test"] += items[n_train + n_val:]
    for name in SPLIT_NAMES:  # interleave labels so that prefixes (--limit) stay balanced
        random.Random(f"{seed}:{name}").shuffle(splits[name])
    return splits


def make_task(name: str, examples: list[Example], *, source: str, split_of: list[str] | None = None,
              seed: int = 0, description: str = "", family: str = "generic") -> ClassificationTask:
    """Validate examples and build a task (using ``split_of`` per example if given, else a seeded split)."""
    if not examples:
        raise ValueError(f"{source} has no examples")
    labels = tuple(sorted({e.label for e in examples}))
    if len(labels) < 2:
        raise ValueError(f"{source}: the label column has only one class ({labels[0]!r}); a classification "
                         "task needs at least two")
    if split_of is None:
        splits = split_examples(examples, seed=seed)
    else:
        splits = {name: [] for name in SPLIT_NAMES}
        for example, split in zip(examples, split_of):
            splits[split].append(example)
    return ClassificationTask(name, labels, splits, description or source, family)


def _split_value(value: str, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"{where}: unknown split {value!r}; use one of train, validation (valid, dev), test")
    return _SPLIT_ALIASES[key]


def _rows_to_task(rows: list[tuple[int, dict]], path: Path, text_field: str, label_field: str,
                  split_field: str | None, name: str | None, kind: str) -> ClassificationTask:
    examples, split_of = [], []
    use_split = split_field or ("split" if rows and "split" in rows[0][1] else None)
    for line_no, row in rows:
        for required in (text_field, label_field):
            if required not in row or row[required] is None:
                raise ValueError(f"{path} {kind} {line_no}: missing field {required!r}; it has "
                                 f"{sorted(row)}")
        examples.append(Example(str(row[text_field]).strip(), str(row[label_field]).strip()))
        if use_split:
            split_of.append(_split_value(row.get(use_split, ""), f"{path} {kind} {line_no}"))
    return make_task(name or path.stem, examples, source=str(path), split_of=split_of or None)


def load_jsonl_task(path: str | Path, text_field: str = "text", label_field: str = "label",
                    name: str | None = None, split_field: str | None = None) -> ClassificationTask:
    """A task from a JSONL file: one object per line with a text and a label field (any label values)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {line_no}: malformed JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path} is empty: no examples")
    return _rows_to_task(rows, path, text_field, label_field, split_field, name, "line")


def load_csv_task(path: str | Path, text_column: str = "text", label_column: str = "label",
                  name: str | None = None, split_column: str | None = None) -> ClassificationTask:
    """A task from a CSV (or TSV, by extension) file with a header row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        rows = [(i, row) for i, row in enumerate(reader, start=2)]
    if not rows:
        raise ValueError(f"{path} is empty: no examples")
    return _rows_to_task(rows, path, text_column, label_column, split_column, name, "row")


def load_hf_task(dataset: str, text_field: str = "text", label_field: str = "label",
                 config: str | None = None) -> ClassificationTask:
    """A task from a hub dataset (online users). ClassLabel ids become their names."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset, config)
    except Exception as exc:  # network, missing dataset, offline mode: all surface as one clear error
        raise ValueError(f"could not load hub dataset {dataset!r}: {exc}") from exc
    examples, split_of = [], []
    for split_name, split in loaded.items():
        if split_name.lower() not in _SPLIT_ALIASES:
            continue
        feature = split.features.get(label_field)
        names = getattr(feature, "names", None)
        for row in split:
            label = names[row[label_field]] if names else str(row[label_field])
            examples.append(Example(str(row[text_field]), label))
            split_of.append(_SPLIT_ALIASES[split_name.lower()])
    has_all = set(split_of) >= {"train", "validation", "test"}
    return make_task(dataset, examples, source=f"hub dataset {dataset}", split_of=split_of if has_all else None)


TASKS: dict[str, Callable[[], ClassificationTask]] = {}


def register_task(name: str, loader: Callable[[], ClassificationTask]) -> None:
    """Make ``load_task(name)`` call ``loader()``."""
    TASKS[name] = loader


def _register_vader() -> None:
    from .vader import VADER_DOMAINS, load_vader_task

    for domain in VADER_DOMAINS:
        register_task(f"vader-{domain}", lambda domain=domain: load_vader_task(domain))


_register_vader()


def load_task(spec: str, **kwargs) -> ClassificationTask:
    """A task by registered name, local ``.jsonl``/``.json``/``.csv``/``.tsv`` path, or ``hf:<dataset>``."""
    if spec in TASKS:
        return TASKS[spec]()
    if spec.startswith("hf:"):
        return load_hf_task(spec[3:], **kwargs)
    suffix = Path(spec).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return load_jsonl_task(spec, **kwargs)
    if suffix in (".csv", ".tsv"):
        return load_csv_task(spec, **kwargs)
    raise ValueError(f"unknown task {spec!r}: use a registered name ({', '.join(sorted(TASKS))}), a .jsonl/"
                     ".csv/.tsv file with text and label columns, or hf:<dataset>")
