from __future__ import annotations

import io
import tarfile

import pytest

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
    + ["200\t0.49\tmeh", "201\t-0.2\tfine I guess", "202\t3.0\tgreat day number 0 & more"]  # neutral, duplicate
)


def test_labels_drop_neutral_and_duplicates():
    examples = parse_ground_truth(RATED)
    assert len(examples) == 50
    assert sum(e.label == "positive" for e in examples) == 30
    assert examples[0].text == "great day number 0 & more"  # HTML entity unescaped


def test_fixture_task_splits_are_stratified_and_deterministic(tmp_path):
    make_sdist(tmp_path / "vader.tar.gz", RATED)
    task = load_vader_task("tweets", tmp_path / "vader.tar.gz")
    again = load_vader_task("tweets", tmp_path / "vader.tar.gz")
    assert task.splits == again.splits
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 40, "validation": 5, "test": 5}
    assert task.label_counts("train") == {"negative": 16, "positive": 24}
    assert task.name == "vader-tweets" and task.labels == ("negative", "positive")


def test_unknown_domain_and_wrong_archive(tmp_path):
    with pytest.raises(ValueError, match="unknown VADER domain 'books'"):
        load_vader_task("books", tmp_path / "x")
    (tmp_path / "other.tar.gz").write_bytes(_tar_bytes({"README": b"hi"}))
    with pytest.raises(ValueError, match="not the vaderSentiment 3.3.2 sdist"):
        load_vader_task("movie", tmp_path / "other.tar.gz")


EXPECTED = {"movie": (4995, 5075), "product": (1744, 1233), "news": (1175, 1756), "tweets": (2345, 1087)}


@pytest.mark.parametrize("domain", list(VADER_DOMAINS))
def test_real_vader_tasks(domain):
    archive = real_asset("vader-sdist")
    task = load_vader_task(domain, archive)
    totals = {label: sum(task.label_counts(s)[label] for s in task.splits) for label in task.labels}
    assert (totals["positive"], totals["negative"]) == EXPECTED[domain]
    texts = {s: {e.text for e in v} for s, v in task.splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    n = sum(totals.values())
    assert abs(len(task.split("test")) - n / 10) <= 2
    share = totals["positive"] / n
    assert abs(task.label_counts("test")["positive"] / len(task.split("test")) - share) < 0.02  # stratified
    assert load_vader_task(domain, archive).split("test") == task.split("test")
