from __future__ import annotations

import pytest

from cpet.data import load_brown, load_brown_genre_task, template_for, verbalizer_for
from cpet.data.genre import document_splits, genre_group, passages, split_sentences
from tests.conftest import real_asset
from tests.data.test_brown import make_archive


def test_sentences_split_at_ends_before_capitals():
    text = 'He said "Go." Then he left! Was it 5 p.m. or later? 3 men stayed. "Why?" she asked. (It rained.) Ok.'
    assert split_sentences(text) == ['He said "Go."', "Then he left!", "Was it 5 p.m. or later?",
                                     "3 men stayed.", '"Why?" she asked.', "(It rained.)", "Ok."]


@pytest.mark.parametrize("sentence_words, expected", [
    ([10] * 16, [80, 80]),            # 8 sentences fill a passage exactly
    ([30] * 7, [60, 60, 60]),         # a third sentence would pass 80 words; the 30-word tail is dropped
    ([45, 45, 45], []),               # 45 < 50 and 90 > 80: no run fits
    ([200], [80, 80]),                # a long sentence is cut into 80-word pieces; the 40-word rest dropped
    ([20, 40, 30, 10, 10], [60, 50]),
])
def test_passages_are_bounded_runs_of_sentences(sentence_words, expected):
    text = " ".join(" ".join(["Word"] + ["w"] * (n - 2) + ["end."]) for n in sentence_words)
    assert [len(p.split()) for p in passages(text)] == expected


def test_genre_groups():
    assert [genre_group(c) for c in "abcdefghjklmnpr"] == ["press"] * 3 + ["prose"] * 5 + ["learned"] + \
        ["fiction"] * 6
    with pytest.raises(ValueError, match="unknown Brown genre code 'z'"):
        genre_group("z")


def _tagged_doc(doc_id: str, sentences: int = 16) -> str:
    """``sentences`` 10-word sentences whose first word names the document (two 80-word passages)."""
    return "\n\n".join(f"{doc_id.capitalize()}/np " + " ".join(f"w{i}/nn" for i in range(8)) + " ./."
                       for _ in range(sentences))


@pytest.fixture
def genre_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path / "cache"))
    counts = {"a": 3, "b": 2, "d": 2, "e": 2, "j": 11, "k": 2, "r": 1}  # held out: index 0 (and 10) per genre
    docs = {f"c{g}{i:02d}": _tagged_doc(f"c{g}{i:02d}") for g, n in counts.items() for i in range(1, n + 1)}
    path = tmp_path / "brown.tgz"
    make_archive(path, docs)
    return path


def test_fixture_task_splits_by_document(genre_archive):
    assert document_splits(genre_archive) == {
        "ca01": "validation", "cb01": "test", "cd01": "validation", "ce01": "test", "cj01": "validation",
        "cj11": "test", "ck01": "validation", "cr01": "test",
        **{d: "train" for d in ("ca02", "ca03", "cb02", "cd02", "ce02", "ck02",
                                *(f"cj{i:02d}" for i in range(2, 11)))}}
    task = load_brown_genre_task(genre_archive)
    docs_of = {s: {e.text.split()[0].lower() for e in v} for s, v in task.splits.items()}
    assert docs_of["validation"] == {"ca01", "cd01", "cj01", "ck01"}
    assert docs_of["test"] == {"cb01", "ce01", "cj11", "cr01"}
    assert len(docs_of["train"]) == 15
    assert task.label_counts("test") == {"fiction": 1, "learned": 1, "press": 1, "prose": 1}
    # every passage of a document is the same text, so each document keeps one (duplicates_dropped)
    assert task.dedup_report["duplicates_dropped"] == 23 and task.dedup_report["cross_split_dropped"] == 0
    assert task.family == "genre" and verbalizer_for(task).words_for(task.labels) == [
        " fiction", " academic", " news", " prose"]
    assert load_brown_genre_task(genre_archive).splits == task.splits


# measured on the real corpus: 446 train, 27 validation, 27 test documents
REAL_COUNTS = {
    "train": {"fiction": 3069, "learned": 2007, "press": 2172, "prose": 5102},
    "validation": {"fiction": 195, "learned": 112, "press": 140, "prose": 305},
    "test": {"fiction": 191, "learned": 106, "press": 141, "prose": 310},
}


def test_real_brown_genre_task():
    archive = real_asset("brown-npm")
    task = load_brown_genre_task(archive)
    assert {s: task.label_counts(s) for s in task.splits} == REAL_COUNTS
    assert task.dedup_report == {"duplicates_dropped": 0, "conflicting_dropped": 0, "conflicting_keys": 0,
                                 "cross_split_dropped": 0}
    doc_split = document_splits(archive)
    heldout = {d.doc_id for d in load_brown("heldout", archive)}
    assert {d for d, s in doc_split.items() if s != "train"} == heldout  # val/test only from held-out docs
    assert sorted(doc_split.values()).count("validation") == 27 == sorted(doc_split.values()).count("test")
    words = [len(e.text.split()) for v in task.splits.values() for e in v]
    assert min(words) >= 50 and max(words) <= 80
    assert template_for(task).format("x").startswith("Passage: x\nGenre")
    assert len({e.label for e in task.split("test")[:12]}) == 4  # shuffled: any prefix mixes genres
    from cpet.data.genre import documents_of_test_split

    documents = documents_of_test_split(archive)  # the bootstrap's units, in the task's test order
    assert len(documents) == len(task.split("test")) == 748 and len(set(documents)) == 27
    assert set(documents) == {d for d, s in doc_split.items() if s == "test"}
