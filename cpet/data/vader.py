"""Four real sentiment tasks from the VADER human-rated sentences (sdist of ``vaderSentiment==3.3.2``).

``additional_resources/hutto_ICWSM_2014.tar.gz`` inside the sdist holds ``<domain>_GroundTruth.txt`` files
with lines ``id<TAB>mean rating<TAB>text`` (ratings from -4 to 4, each the mean of about 20 raters).
Labels: ``positive`` if the mean is >= 0.5, ``negative`` if <= -0.5; near-neutral items (|mean| < 0.5)
are dropped. :func:`~cpet.data.tasks.make_task` then drops near-duplicates (same
:func:`~cpet.data.dedup.normalised_key`; the tweets hold 30 sentences in 6 case/punctuation variants each)
before the stratified 80/10/10 split, seed 0. Product and news sentences are split by document (the review or
editorial their id names, :func:`~cpet.data.tasks.split_by_group`): split sentence by sentence, every test
sentence had a sentence of its review in train, and the majority label of those predicted 81.5% of product's
test labels (a global majority: 58.6%). Movie snippets and tweets are one sentence per document.

Counts after filtering (measured on the real file; positive / negative, near-duplicates dropped, no label
conflicts): movie 4,995 / 5,075 (2 dropped); product 1,738 / 1,231 (16); news 1,175 / 1,756 (39);
tweets 2,270 / 1,012 (150) (tests/data checks).
"""

from __future__ import annotations

import html
import io
import tarfile
from pathlib import Path

from ..assets import fetch_asset
from .dedup import normalised_key
from .tasks import ClassificationTask, Example, UnionFind, make_task, split_by_group

VADER_DOMAINS = {
    "movie": "movieReviewSnippets",
    "product": "amazonReviewSnippets",
    "news": "nytEditorialSnippets",
    "tweets": "tweets",
}
NEUTRAL_BAND = 0.5
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"


def _read_ground_truth(archive: Path, stem: str) -> str:
    with tarfile.open(archive, "r:gz") as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
        if inner_member is None:
            raise ValueError(f"{archive} has no {INNER_ARCHIVE}: not the vaderSentiment 3.3.2 sdist")
        inner_bytes = outer.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith(f"{stem}_GroundTruth.txt")), None)
        if member is None:
            raise ValueError(f"{INNER_ARCHIVE} in {archive} has no {stem}_GroundTruth.txt")
        return inner.extractfile(member).read().decode("utf-8", errors="replace")


def parse_ground_truth(raw: str) -> list[Example]:
    """Rated lines -> labelled examples in file order (neutral band dropped, whitespace normalised).

    Duplicates are kept here: :func:`make_task` removes near-duplicates (and conflicting ones) for every task.
    """
    return [example for _, example in parse_rated_documents(raw)]


def parse_rated_documents(raw: str) -> list[tuple[str, Example]]:
    """:func:`parse_ground_truth`'s examples, each with its document: the id's part before ``_`` (product ids are
    ``review_sentence``, news ids ``editorial_sentence``; a movie snippet or a tweet is its own document)."""
    examples = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        mean = float(parts[1])
        if abs(mean) < NEUTRAL_BAND:
            continue
        text = " ".join(html.unescape("\t".join(parts[2:])).split())
        if not text:
            continue
        examples.append((parts[0].strip().split("_")[0], Example(text, "positive" if mean > 0 else "negative")))
    return examples


def document_groups(examples: list[Example], documents: list[str]) -> list[int]:
    """A group id per example: examples of one document, and documents that share a sentence (same
    :func:`~cpet.data.dedup.normalised_key`: the copy make_task drops must sit in the same split as the one it
    keeps), are one group; ids are the index of the group's first example."""
    sets = UnionFind()
    for example, document in zip(examples, documents):
        sets.join(("document", document), ("sentence", normalised_key(example.text)))
    first: dict[tuple, int] = {}
    return [first.setdefault(sets.root(("document", document)), i) for i, document in enumerate(documents)]


def load_vader_task(domain: str, archive: Path | None = None) -> ClassificationTask:
    """The ``vader-<domain>`` task (domain: movie, product, news, tweets)."""
    return _vader_task_and_groups(domain, archive)[0]


def groups_of_test_split(domain: str, archive: Path | None = None) -> list[int]:
    """The document group (:func:`document_groups`: a review or editorial, with the documents it shares a
    sentence with) of each test example of ``vader-<domain>``, in the test split's order: the dependent units a
    clustered bootstrap resamples (product: 287 test sentences from 24 reviews). Movie snippets and tweets are one
    sentence per document, so there every test example is a unit of its own."""
    task, group_of = _vader_task_and_groups(domain, archive)
    return [group_of[normalised_key(e.text)] for e in task.split("test")]


def _vader_task_and_groups(domain: str, archive: Path | None) -> tuple[ClassificationTask, dict[str, int]]:
    """The task, and the document group of each rated sentence by its normalised text (the groups it was split
    by; sentences that share a normalised text are in one group by construction)."""
    if domain not in VADER_DOMAINS:
        raise ValueError(f"unknown VADER domain {domain!r}; choose from {', '.join(VADER_DOMAINS)}")
    archive = Path(archive) if archive is not None else fetch_asset("vader-sdist")
    rated = parse_rated_documents(_read_ground_truth(archive, VADER_DOMAINS[domain]))
    examples, documents = [example for _, example in rated], [document for document, _ in rated]
    groups = document_groups(examples, documents)
    split_of = None
    if len(set(documents)) < len(documents):  # sentences of one review or editorial stay in one split
        split_of = split_by_group([e.label for e in examples], groups, seed=0)
    task = make_task(f"vader-{domain}", examples, source=f"VADER {VADER_DOMAINS[domain]}", seed=0,
                     split_of=split_of, description=f"VADER {VADER_DOMAINS[domain]} (human-rated, |mean| >= 0.5)",
                     family="sentiment")
    return task, {normalised_key(e.text): group for e, group in zip(examples, groups)}
