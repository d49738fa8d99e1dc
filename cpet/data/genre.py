"""``brown-genre``: which of four Brown genre groups a passage comes from (press, prose, learned, fiction).

Groups of Brown's 15 categories: press = A-C (reportage, editorial, reviews), prose = D-H (religion,
skills, popular lore, belles lettres, government), learned = J, fiction = K-R (general, mystery, science,
adventure, romance, humor). Passages are runs of consecutive sentences of one document, 50-80 words, so a
prompt stays under ~128 SmolLM2 tokens.

Splits are by document and follow Brown's perplexity split (:func:`cpet.data.brown.load_brown`): training
passages come only from the ``train`` documents (the ones calibration reads), validation and test passages
only from the ``heldout`` documents, which alternate between validation and test within each group in
document-id order. No document lands in two splits. Each split is shuffled (seeded) so prefixes mix genres.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from .brown import load_brown
from .tasks import ClassificationTask, Example, make_task

GENRE_GROUPS = {"press": "abc", "prose": "defgh", "learned": "j", "fiction": "klmnpr"}
LABEL_WORDS = {"press": " news", "prose": " prose", "learned": " academic", "fiction": " fiction"}
MIN_WORDS, MAX_WORDS = 50, 80
# a sentence ends at . ! ? (and a closing quote or bracket) before a space and a capital, digit or quote
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]?)\s+(?=[\"'(\[]?[A-Z0-9])")


def genre_group(genre_code: str) -> str:
    """Brown category letter (``"a"`` … ``"r"``) -> its group label."""
    for label, codes in GENRE_GROUPS.items():
        if genre_code in codes:
            return label
    raise ValueError(f"unknown Brown genre code {genre_code!r}")


def split_sentences(text: str) -> list[str]:
    """Detokenised Brown text -> sentences (a heuristic split at ``. ! ?`` before a capital)."""
    return [s.strip() for s in _SENTENCE_END.sub(r"\1\n", text).split("\n") if s.strip()]


def passages(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[str]:
    """Consecutive sentences grouped into passages of ``min_words``..``max_words`` words, in order.

    Sentences longer than ``max_words`` are cut into ``max_words`` pieces; a run that cannot reach
    ``min_words`` without passing ``max_words`` (and the document's tail) is dropped.
    """
    out, current = [], []
    for sentence in split_sentences(text):
        words = sentence.split()
        for start in range(0, len(words), max_words):
            piece = words[start:start + max_words]
            if len(current) + len(piece) > max_words:
                if len(current) >= min_words:
                    out.append(" ".join(current))
                current = []
            current += piece
    if len(current) >= min_words:
        out.append(" ".join(current))
    return out


def document_splits(archive: Path | None = None) -> dict[str, str]:
    """Brown document id -> ``train``, ``validation`` or ``test``.

    ``train`` documents are Brown's ``train`` split; the ``heldout`` ones alternate between validation and
    test within each group, in document-id order (5/5 press, 11/11 prose, 4/4 learned, 7/7 fiction).
    """
    splits = {doc.doc_id: "train" for doc in load_brown("train", archive)}
    by_group: dict[str, list[str]] = {}
    for doc in load_brown("heldout", archive):  # sorted by id
        by_group.setdefault(genre_group(doc.genre_code), []).append(doc.doc_id)
    for ids in by_group.values():
        splits.update({doc_id: ("validation", "test")[i % 2] for i, doc_id in enumerate(ids)})
    return splits


def _labelled_passages(archive: Path | None, seed: int) -> tuple[list[Example], list[str], list[str]]:
    """``(examples, split of each, Brown document of each)``, each split in a seeded order."""
    doc_split = document_splits(archive)
    per_split: dict[str, list[tuple[Example, str]]] = {}
    for doc in load_brown("all", archive):
        label = genre_group(doc.genre_code)
        per_split.setdefault(doc_split[doc.doc_id], []).extend((Example(p, label), doc.doc_id)
                                                               for p in passages(doc.text))
    examples, split_of, documents = [], [], []
    for split in sorted(per_split):
        items = per_split[split]
        random.Random(f"{seed}:{split}").shuffle(items)  # prefixes (--limit) mix genres and documents
        examples += [example for example, _ in items]
        documents += [doc_id for _, doc_id in items]
        split_of += [split] * len(items)
    return examples, split_of, documents


def documents_of_test_split(archive: Path | None = None, seed: int = 0) -> list[str]:
    """The Brown document of each ``brown-genre`` test passage, in the task's test order: the units a bootstrap
    must resample (748 passages come from 27 documents, and passages of one document are not independent).

    Raises:
        ValueError: near-duplicate removal changed the test split, so the documents no longer line up.
    """
    examples, split_of, documents = _labelled_passages(archive, seed)
    expected = _genre_task(examples, split_of, seed).split("test")
    if [e for e, split in zip(examples, split_of) if split == "test"] != expected:
        raise ValueError("brown-genre's test split is not the passages in their built order: documents unknown")
    return [doc for doc, split in zip(documents, split_of) if split == "test"]


def load_brown_genre_task(archive: Path | None = None, seed: int = 0) -> ClassificationTask:
    """The ``brown-genre`` task (4 labels; label words " news", " prose", " academic", " fiction")."""
    examples, split_of, _ = _labelled_passages(archive, seed)
    return _genre_task(examples, split_of, seed)


def _genre_task(examples: list[Example], split_of: list[str], seed: int) -> ClassificationTask:
    return make_task("brown-genre", examples, source="Brown corpus genres", split_of=split_of, seed=seed,
                     shuffle_given=False,  # _labelled_passages ordered every split already
                     description=f"Brown genre group of {MIN_WORDS}-{MAX_WORDS}-word passages (press A-C, "
                                 "prose D-H, learned J, fiction K-R); held-out documents for validation/test",
                     family="genre", label_words=dict(LABEL_WORDS))
