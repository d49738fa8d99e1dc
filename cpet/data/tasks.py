"""Classification tasks: a registry of named tasks, local JSONL/CSV files, and hub datasets.

A task is a set of ``Example(text, label)`` in ``train``/``validation``/``test`` splits with any label
strings. Files without a split column are split deterministically (stratified by label, seeded).
Every task, built in or from a file, goes through :func:`make_task`, which refuses empty texts and labels,
removes near-duplicates before splitting (:mod:`cpet.data.dedup`: a key carrying two labels loses all its
examples; with a split column, a repeat in a later split is dropped so no text leaks between splits) and
refuses labels that validation or test has but train lacks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .dedup import dedup_examples, describe_dedup

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
        description: where the data came from, and what deduplication dropped.
        family: the prompt family (:data:`cpet.data.prompts.DEFAULT_TEMPLATES`).
        dedup_report: counts from :func:`cpet.data.dedup.dedup_examples` (``duplicates_dropped``,
            ``conflicting_dropped``, ``conflicting_keys``, ``cross_split_dropped``).
        label_words: label -> the word the model produces for it (with its leading space), or None for the
            default (the label itself); read by :func:`cpet.data.prompts.verbalizer_for`.
    """

    name: str
    labels: tuple[str, ...]
    splits: dict[str, list[Example]]
    description: str = ""
    family: str = field(default="generic")
    dedup_report: dict[str, int] = field(default_factory=dict)
    label_words: dict[str, str] | None = None

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]

    def require(self, *names: str) -> None:
        """Refuse, before any model work, a task whose splits ``names`` are empty (a small file: the seeded
        80/10/10 split per label leaves validation or test empty below about 10 examples of each label).

        Raises:
            ValueError: naming the task, the empty split(s), every split's size and what to do.
        """
        empty = [name for name in names if not self.split(name)]
        if empty:
            sizes = ", ".join(f"{name} {len(examples)}" for name, examples in self.splits.items())
            words = [{"train": "training"}.get(name, name) for name in empty]
            what = f"the {' and '.join(words)} split{'s are' if len(empty) > 1 else ' is'} empty"
            raise ValueError(f"task {self.name!r}: {what} ({sizes}); give it more examples (about 10 of each label "
                             "for the seeded 80/10/10 split) or rows for that split in a split column")

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


class UnionFind:
    """Disjoint sets of hashable nodes (path halving): :meth:`join` merges two nodes' sets, and a set's root is
    the node of it that was seen first, so that ids derived from roots follow the order of the input."""

    def __init__(self) -> None:
        self.parent: dict = {}
        self.seen: dict = {}  # node -> the order it was first seen in

    def root(self, node):
        self.seen.setdefault(node, len(self.seen))
        self.parent.setdefault(node, node)
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def join(self, a, b) -> None:
        a, b = self.root(a), self.root(b)
        first, second = sorted((a, b), key=self.seen.__getitem__)
        self.parent[second] = first


def split_by_group(labels: list[str], groups: list[int], *, seed: int = 0,
                   fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[str]:
    """A split name per example, whole groups at a time (sentences of one document, emails of one campaign or
    thread): groups are stratified by their majority label (ties: the first label in sorted order), shuffled with
    ``seed`` and filled into train, then validation, then test, each until it holds its (rounded) fraction of that
    label's examples (a group may overshoot).

    A group larger than half of a held-out split's share of its label goes to train first: one group (298
    SpamAssassin digests that share their URL boilerplate) made up half of a test set, whose accuracy then
    hinged on that one kind of email and whose per-example intervals were far too narrow."""
    members: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    by_label: dict[str, list[int]] = {}
    for group, items in members.items():
        votes = [labels[i] for i in items]
        majority = sorted(set(votes), key=lambda label: (-votes.count(label), label))[0]
        by_label.setdefault(majority, []).append(group)
    split_of = [""] * len(labels)
    for label in sorted(by_label):
        chosen = sorted(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(chosen)
        total, filled = sum(len(members[g]) for g in chosen), 0
        n_train = round(fractions[0] * total)  # the example counts split_examples would give
        n_val = round(fractions[1] * total)
        largest_held_out = max(min(n_val, total - n_train - n_val), 1) / 2
        chosen = [g for g in chosen if len(members[g]) > largest_held_out] + \
            [g for g in chosen if len(members[g]) <= largest_held_out]
        for group in chosen:
            name = "train" if filled < n_train else "validation" if filled < n_train + n_val else "test"
            for i in members[group]:
                split_of[i] = name
            filled += len(members[group])
    return split_of


def make_task(name: str, examples: list[Example], *, source: str, split_of: list[str] | None = None,
              seed: int = 0, description: str = "", family: str = "generic",
              label_words: dict[str, str] | None = None, shuffle_given: bool = True) -> ClassificationTask:
    """Validate examples, drop near-duplicates, and split (``split_of`` per example if given, else seeded).

    Validation and test are put in a seeded random order either way, so that their prefixes (``eval_limit``,
    ``--limit``) hold every label even when the source lists its examples sorted by label; given train splits
    keep the source's order (training draws its batches in a seeded order of its own). ``shuffle_given=False``:
    a builder that already ordered its given splits (``brown-genre``) keeps its order.

    Raises:
        ValueError: no examples, an empty text or label, fewer than two labels, or a label that appears in
            validation/test but not in train.
    """
    if not examples:
        raise ValueError(f"{source} has no examples")
    _check_not_empty(examples, source)
    _check_two_labels({e.label for e in examples}, source)
    examples, split_of, report = dedup_examples(examples, split_of)
    labels = tuple(sorted({e.label for e in examples}))
    _check_two_labels(set(labels), f"{source} after dropping near-duplicates with conflicting labels")
    if split_of is None:
        splits = split_examples(examples, seed=seed)
    else:
        splits = {name: [] for name in SPLIT_NAMES}
        for example, split in zip(examples, split_of):
            splits[split].append(example)
        # files are often sorted by label: a prefix (eval_limit, --limit) needs every label. Train keeps the file's
        # order (training reshuffles it every epoch, and its hash identifies resumable runs made before this)
        for split in ("validation", "test") if shuffle_given else ():  # not `name`: that is the task's
            random.Random(f"{seed}:{split}").shuffle(splits[split])
    _check_labels_in_train(splits, source)
    description = f"{description or source}; {describe_dedup(report)}"
    return ClassificationTask(name, labels, splits, description, family, report, label_words)


def _check_not_empty(examples: list[Example], source: str) -> None:
    for i, example in enumerate(examples):
        for what in ("text", "label"):
            if not getattr(example, what).strip():
                raise ValueError(f"{source}: example {i} has an empty {what}; remove it or fill it in")


def _check_two_labels(labels: set[str], source: str) -> None:
    if len(labels) < 2:
        only = f"({next(iter(labels))!r})" if labels else "(none left)"
        raise ValueError(f"{source}: the label column has only one class {only}; a classification task needs "
                         "at least two")


def _check_labels_in_train(splits: dict[str, list[Example]], source: str) -> None:
    if not splits["train"]:  # no training split at all: tuning says so, in those words
        return
    in_train = {e.label for e in splits["train"]}
    for split in SPLIT_NAMES[1:]:
        unseen = sorted({e.label for e in splits[split]} - in_train)
        if unseen:
            raise ValueError(f"{source}: label(s) {unseen} appear in the {split} split but never in train, so "
                             "no adapter could learn them; add train examples for them or drop those rows")


def _split_value(value: str, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"{where}: unknown split {value!r}; use one of train, validation (valid, dev), test")
    return _SPLIT_ALIASES[key]


def _rows_to_task(rows: list[tuple[int, dict]], path: Path, text_field: str, label_field: str,
                  split_field: str | None, name: str | None, kind: str) -> ClassificationTask:
    examples, split_of = [], []
    use_split = split_field or _split_column(rows, path)
    if split_field and not any(split_field in row for _, row in rows):
        # named by the user but in no row: "no 'split' field, though other lines have one" on the first row
        # would be untrue
        fields = sorted({key for _, row in rows for key in row if isinstance(key, str)})
        raise ValueError(f"{path}: no {kind} has the split field {split_field!r} that was asked for; its fields "
                         f"are {fields} (field names are case-sensitive)")
    for line_no, row in rows:
        if None in row:  # cells beyond a CSV header are filed under None: an unquoted delimiter
            raise ValueError(f"{path} {kind} {line_no}: {len(row) - 1 + len(row[None])} cells but the header has "
                             f"{len(row) - 1}; quote a text that holds the delimiter (\"great movie, loved it\")")
        if any(value is _MISSING_CELL for value in row.values()):
            cells = sum(value is not _MISSING_CELL for value in row.values())
            raise ValueError(f"{path} {kind} {line_no}: {cells} cells but the header has {len(row)}; give every "
                             "column a cell (an empty one is two delimiters in a row)")
        for required in (text_field, label_field):
            if required not in row:
                raise ValueError(f"{path} {kind} {line_no}: missing field {required!r}; it has "
                                 f"{sorted(row)}")
            if row[required] is None:
                raise ValueError(f"{path} {kind} {line_no}: field {required!r} is null; fill it in or remove "
                                 f"that {kind}")
            if not _plain_value(row[required], text=required == text_field):
                wanted = "a string" if required == text_field else "a string or an integer"
                raise ValueError(f"{path} {kind} {line_no}: field {required!r} is {type(row[required]).__name__} "
                                 f"{row[required]!r}; it must be {wanted}")
            if not str(row[required]).strip():
                raise ValueError(f"{path} {kind} {line_no}: field {required!r} is empty; fill it in or remove "
                                 f"that {kind}")
        examples.append(Example(str(row[text_field]).strip(), str(row[label_field]).strip()))
        if use_split:
            if use_split not in row:
                raise ValueError(f"{path} {kind} {line_no}: no {use_split!r} field, though other {kind}s have one; "
                                 f"give every {kind} a split, or none (CPET then splits the examples itself)")
            split_of.append(_split_value(row[use_split], f"{path} {kind} {line_no}"))
    return make_task(name or path.stem, examples, source=str(path), split_of=split_of or None)


def _split_column(rows: list[tuple[int, dict]], path: Path) -> str | None:
    """The field that assigns splits, found whatever its case (``Split``, ``SPLIT``): missed, a user's split would
    be ignored without a word and their test rows could end up in training."""
    named = sorted({key for _, row in rows for key in row if isinstance(key, str) and key.strip().lower() == "split"})
    if len(named) > 1:
        raise ValueError(f"{path}: several split fields {named}; keep one")
    return named[0] if named else None


_MISSING_CELL = object()  # the cell of a column that a short CSV row has none for


def _row_as_dict(header: list[str], cells: list[str]) -> dict:
    """One CSV record as ``{column: cell}`` (as csv.DictReader gives it): cells beyond the header under None, a
    column the row has no cell for as :data:`_MISSING_CELL`; a column named twice keeps its last cell."""
    row = dict(zip(header, cells))
    if len(cells) > len(header):
        row[None] = cells[len(header):]
    for column in header[len(cells):]:
        row[column] = _MISSING_CELL
    return row


def _plain_value(value, text: bool) -> bool:
    """Whether a JSON value can stand as a text (a string) or a label (a string or an integer, not a bool): a
    list, an object or a float would become a class named after its repr (1 and 1.0 two classes)."""
    if isinstance(value, str):
        return True
    return not text and isinstance(value, int) and not isinstance(value, bool)


def _wide_encoding(data: bytes) -> str | None:
    """``"utf-32 (...)"`` / ``"utf-16 (...)"`` where ``data`` is plainly one of them, else None.

    By byte-order mark, or, for UTF-16 without one, by NUL bytes in at least 3 of 4 odd (little-endian) or even
    (big-endian) positions: that is mostly-ASCII UTF-16, which is valid UTF-8 byte for byte (each letter followed
    by a NUL) and would be read as such. A UTF-8 file with a stray NUL is not mistaken for it."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32 (it starts with a UTF-32 byte-order mark)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16 (it starts with a UTF-16 byte-order mark)"
    pairs = len(data) // 2
    if pairs >= 2:
        if data[1::2].count(0) >= 0.75 * pairs:
            return "utf-16le (NUL bytes after 3 of 4 characters or more: UTF-16 without a byte-order mark)"
        if data[0::2].count(0) >= 0.75 * pairs:
            return "utf-16be (NUL bytes before 3 of 4 characters or more: UTF-16 without a byte-order mark)"
    return None


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped).

    Raises:
        ValueError: the file is not valid UTF-8 (names the path, byte offset and line), or is UTF-16 (says so).
    """
    data = Path(path).read_bytes()
    wide = _wide_encoding(data)
    if wide:
        raise ValueError(f"{path} is {wide}, not UTF-8; re-save it as UTF-8 (e.g. `iconv -f {wide.split()[0]} -t "
                         "utf-8`)")
    bom = len(data) - len(data.removeprefix(b"\xef\xbb\xbf"))
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line = data[:offset].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8: byte {offset} (line {line}) is {data[offset:offset + 1]!r}; "
                         "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from exc


def load_jsonl_task(path: str | Path, text_field: str = "text", label_field: str = "label",
                    name: str | None = None, split_field: str | None = None) -> ClassificationTask:
    """A task from a JSONL file: one object per line with a text and a label field (any label values)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    rows = []
    # JSON Lines separates records by "\n" only (a trailing "\r" is whitespace to json.loads): str.splitlines would
    # also split inside strings that hold U+2028, U+2029 or U+0085, which JSON may carry unescaped
    for line_no, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ("; a task file holds one JSON object per line (JSON Lines), not a JSON array or an object over "
                    "several lines" if not rows and line.lstrip().startswith(("[", "{")) else "")
            raise ValueError(f"{path} line {line_no}: malformed JSON ({exc.msg}){hint}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path} is empty: no examples")
    return _rows_to_task(rows, path, text_field, label_field, split_field, name, "line")


def load_csv_task(path: str | Path, text_column: str = "text", label_column: str = "label",
                  name: str | None = None, split_column: str | None = None) -> ClassificationTask:
    """A task from a CSV (or TSV, by extension) file with a header row (rows named by the line they start on)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # strict: a quote that does not close where a cell ends is an error, not a cell that swallows the rows after it.
    # A plain csv.reader, not csv.DictReader: DictReader skips blank lines without a trace, so every row after one
    # was named by the wrong line, and a blank first line became an empty header (every row "too many cells")
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter=delimiter, strict=True)
    header, rows, line = None, [], 1  # each record named by the line it starts on (a quoted cell may span lines)
    limit = csv.field_size_limit()
    try:
        csv.field_size_limit(max(limit, 64 * 1024 * 1024))  # a long email or document is one cell, not an error
        for cells in reader:
            start, line = line, reader.line_num + 1
            if not cells:  # a blank line (before the header too)
                continue
            if header is None:
                header = cells
                continue
            rows.append((start, _row_as_dict(header, cells)))
    except csv.Error as exc:
        raise ValueError(f"{path} row {line}: {exc}; a quote opens a cell only at its start and must close it "
                         "where the cell ends (write a quote inside a quoted cell as \"\"; a text that begins "
                         "with a quote is quoted whole: \"\"\"Great\"\" movie\")") from exc
    finally:
        csv.field_size_limit(limit)

    if not rows:
        raise ValueError(f"{path} is empty: no examples")
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:  # csv.DictReader keeps the last of them: a label column could be read from the wrong one
        raise ValueError(f"{path}: the header names column(s) {repeated} more than once; give each column its own "
                         "name")
    return _rows_to_task(rows, path, text_column, label_column, split_column, name, "row")


def load_hf_task(dataset: str, text_field: str = "text", label_field: str = "label",
                 config: str | None = None) -> ClassificationTask:
    """A task from a hub dataset (online users). ClassLabel ids become their names; rows with an empty text
    are skipped (a user cannot edit a hub dataset, unlike a local file, where they are refused)."""
    import datasets

    from ..hub import hub_offline_by_choice, hub_reachable, unreachable_reason

    if not hub_offline_by_choice() and not hub_reachable():  # datasets reads offline mode at import: too late here
        raise ValueError(f"could not load hub dataset {dataset!r}: the hub is out of reach ({unreachable_reason()}); "
                         "a dataset already in the local hub cache loads with HF_HUB_OFFLINE=1 set, or give a "
                         "local task file (.jsonl or .csv)")
    try:
        loaded = datasets.load_dataset(dataset, config)
    except Exception as exc:  # network, missing dataset, offline mode: all surface as one clear error
        raise ValueError(f"could not load hub dataset {dataset!r}: {exc}") from exc
    examples, split_of = [], []
    for split_name, split in loaded.items():
        if split_name.lower() not in _SPLIT_ALIASES:
            continue
        missing = [field for field in (text_field, label_field) if field not in split.column_names]
        if missing:
            raise ValueError(f"hub dataset {dataset!r} split {split_name!r} has no column {missing[0]!r}; its "
                             f"columns: {', '.join(split.column_names)} (name the text and label columns, e.g. "
                             "text_field= / label_field=)")
        feature = split.features.get(label_field)
        names = getattr(feature, "names", None)
        for row in split:
            if not str(row[text_field] or "").strip() or row[label_field] is None:  # unlabelled: skipped
                continue
            if names and not 0 <= row[label_field] < len(names):  # -1: no label (GLUE's test splits); not names[-1]
                continue
            label = names[row[label_field]] if names else str(row[label_field])
            examples.append(Example(str(row[text_field]), label))
            split_of.append(_SPLIT_ALIASES[split_name.lower()])
    has_all = set(split_of) >= {"train", "validation", "test"}
    return make_task(dataset, examples, source=f"hub dataset {dataset}", split_of=split_of if has_all else None)


TASKS: dict[str, Callable[[], ClassificationTask]] = {}


def register_task(name: str, loader: Callable[[], ClassificationTask]) -> None:
    """Make ``load_task(name)`` call ``loader()``."""
    TASKS[name] = loader


def _builtin(module: str, loader: str, **kwargs) -> Callable[[], ClassificationTask]:
    """A loader that imports ``cpet.data.<module>`` when called (those modules import this one)."""
    def load() -> ClassificationTask:
        from importlib import import_module

        return getattr(import_module(f"{__package__}.{module}"), loader)(**kwargs)

    return load


def _register_builtin() -> None:
    """The built-in tasks (each loader fetches its registry asset on first use)."""
    for domain in ("movie", "product", "news", "tweets"):  # cpet.data.vader.VADER_DOMAINS
        register_task(f"vader-{domain}", _builtin("vader", "load_vader_task", domain=domain))
    register_task("brown-genre", _builtin("genre", "load_brown_genre_task"))
    register_task("spam-assassin", _builtin("spam", "load_spam_task"))


_register_builtin()


def load_task(spec: str, **kwargs) -> ClassificationTask:
    """A task by registered name, local ``.jsonl``/``.json``/``.csv``/``.tsv`` path, or ``hf:<dataset>``.

    ``kwargs`` go to the loader; ``text_field`` / ``label_field`` / ``split_field`` name the columns of every
    kind of file (a CSV's ``text_column`` etc. are accepted too). A registered task takes none (ValueError).
    """
    if spec in TASKS:
        if kwargs:  # they would be silently ignored: a built-in task's columns are fixed
            raise ValueError(f"built-in task {spec!r} takes no options, got {sorted(kwargs)}")
        return TASKS[spec]()
    if spec.startswith("hf:"):
        return load_hf_task(spec[3:], **kwargs)
    suffix = Path(spec).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return load_jsonl_task(spec, **kwargs)
    if suffix in (".csv", ".tsv"):
        renamed = {f"{key.removesuffix('_field')}_column" if key.endswith("_field") else key: value
                   for key, value in kwargs.items()}  # one vocabulary for every file kind
        return load_csv_task(spec, **renamed)
    raise ValueError(f"unknown task {spec!r}: use a registered name ({', '.join(sorted(TASKS))}), a .jsonl/"
                     ".csv/.tsv file with text and label columns, or hf:<dataset>")


def task_source_of(task) -> str | None:
    """How to load a task again: its registered name, hub spec, or absolute file path (None: an object)."""
    if not isinstance(task, (str, Path)):
        return None
    spec = str(task)
    if spec in TASKS or spec.startswith("hf:") or not Path(spec).exists():
        return spec
    return str(Path(spec).resolve())


def task_key(task: str) -> str:
    """A file-name-safe key for a task name or a path to a task file (``data/my task.jsonl`` -> ``my_task``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(task).stem if Path(task).suffix else task)


def examples_sha256(examples) -> str:
    """SHA-256 of a split's ``(text, label)`` pairs in order: which training data exactly a run saw."""
    payload = json.dumps([[e.text, e.label] for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def as_task(task) -> ClassificationTask:
    """``task`` itself, or the task a name / path / ``hf:`` spec string loads (:func:`load_task`)."""
    return load_task(task) if isinstance(task, str) else task
