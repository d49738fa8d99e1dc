from __future__ import annotations

import io
import tarfile

import pytest

from cpet.data.dedup import normalised_key
from cpet.data.vader import VADER_DOMAINS, load_vader_task, parse_ground_truth
from tests.conftest import real_asset


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_sdist(path, ground_truth: str) -> None:
    """A tar.gz holding additional_resources/hutto_ICWSM_2014.tar.gz holding the tweets ground truth."""
    inner = _tar_bytes({"hutto_ICWSM_2014/tweets_GroundTruth.txt": ground_truth.encode()})
    path.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))


RATED = "\r\n".join(
    [f"{i}\t{2.0 + i / 100}\tgreat day number {i} &amp; more" for i in range(30)]
    + [f"{100 + i}\t{-1.5}\tawful night {i}" for i in range(20)]
    + ["200\t0.49\tmeh", "201\t-0.2\tfine I guess",  # neutral
       "202\t3.0\tgreat day number 0 & more",  # exact duplicate
       "203\t2.5\tGREAT day, number 1 & more!!",  # near-duplicate (case, punctuation)
       "204\t2.0\tAwful night 19."]  # near-duplicate with the other label: both go
)


def test_parse_keeps_duplicates_for_make_task():
    examples = parse_ground_truth(RATED)
    assert len(examples) == 53  # 55 lines - 2 neutral; duplicates are left to make_task
    assert sum(e.label == "positive" for e in examples) == 33
    assert examples[0].text == "great day number 0 & more"  # HTML entity unescaped


def test_fixture_task_drops_near_duplicates_then_splits(tmp_path):
    make_sdist(tmp_path / "vader.tar.gz", RATED)
    task = load_vader_task("tweets", tmp_path / "vader.tar.gz")
    again = load_vader_task("tweets", tmp_path / "vader.tar.gz")
    assert task.splits == again.splits
    assert task.dedup_report == {"duplicates_dropped": 2, "conflicting_dropped": 2, "conflicting_keys": 1,
                                 "cross_split_dropped": 0}
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 39, "validation": 5, "test": 5}
    assert task.label_counts("train") == {"negative": 15, "positive": 24}
    assert "awful night 19" not in {e.text for v in task.splits.values() for e in v}
    assert task.name == "vader-tweets" and task.labels == ("negative", "positive")
    assert "dropped 2 near-duplicates, 2 with conflicting labels" in task.description


def test_unknown_domain_and_wrong_archive(tmp_path):
    with pytest.raises(ValueError, match="unknown VADER domain 'books'"):
        load_vader_task("books", tmp_path / "x")
    (tmp_path / "other.tar.gz").write_bytes(_tar_bytes({"README": b"hi"}))
    with pytest.raises(ValueError, match="not the vaderSentiment 3.3.2 sdist"):
        load_vader_task("movie", tmp_path / "other.tar.gz")


# positive, negative, near-duplicates dropped (no VADER domain has a text with conflicting labels)
EXPECTED = {"movie": (4995, 5075, 2), "product": (1738, 1231, 16), "news": (1175, 1756, 39),
            "tweets": (2270, 1012, 150)}


@pytest.mark.parametrize("domain", list(VADER_DOMAINS))
def test_real_vader_tasks(domain):
    archive = real_asset("vader-sdist")
    task = load_vader_task(domain, archive)
    totals = {label: sum(task.label_counts(s)[label] for s in task.splits) for label in task.labels}
    assert (totals["positive"], totals["negative"], task.dedup_report["duplicates_dropped"]) == EXPECTED[domain]
    assert task.dedup_report["conflicting_dropped"] == 0 and task.dedup_report["cross_split_dropped"] == 0
    keys = {s: {normalised_key(e.text) for e in v} for s, v in task.splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    n = sum(totals.values())
    by_document = domain in ("product", "news")  # whole reviews and editorials move: sizes and shares land near
    assert abs(len(task.split("test")) - n / 10) <= (0.05 * n / 10 if by_document else 2)
    share = totals["positive"] / n
    assert abs(task.label_counts("test")["positive"] / len(task.split("test")) - share) < (0.07 if by_document
                                                                                          else 0.02)  # stratified
    assert load_vader_task(domain, archive).split("test") == task.split("test")


@pytest.mark.parametrize("domain", ["product", "news"])
def test_the_sentences_of_one_review_or_editorial_share_a_split(domain):
    """Split sentence by sentence, every product and news test sentence had a sentence of its document in train
    (the majority label of those predicted 81.5% of product's test labels)."""
    from cpet.data.vader import _read_ground_truth, parse_rated_documents

    archive = real_asset("vader-sdist")
    task = load_vader_task(domain, archive)
    documents_of: dict[str, set] = {}
    for document, example in parse_rated_documents(_read_ground_truth(archive, VADER_DOMAINS[domain])):
        documents_of.setdefault(normalised_key(example.text), set()).add(document)
    splits_of: dict[str, set] = {}
    for split, examples in task.splits.items():
        for example in examples:
            for document in documents_of[normalised_key(example.text)]:
                splits_of.setdefault(document, set()).add(split)
    assert len(splits_of) > 250 and all(len(splits) == 1 for splits in splits_of.values())
