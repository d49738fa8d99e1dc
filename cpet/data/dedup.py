"""Near-duplicate removal before splitting: a normalised text key and one dedup pass over examples.

Two texts are near-duplicates when :func:`normalised_key` gives the same key: case-folded, apostrophes
deleted (``can't`` = ``cant``), other punctuation removed, whitespace collapsed, but common ASCII emoticons
(``:) :( :D ;) :P :/ :'( <3 =) xD ^_^``) kept as tokens, since they carry the label in tweets (``:)`` and
``:'(`` give different keys). Noses and repeated mouths do not matter (``:-)))`` = ``:)``).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

# eyes [:;=], an optional tear, an optional nose, a mouth (repeats allowed); not after a digit (10:30) and
# not before a letter or digit (Re:Deals, Note:Pay); then hearts, xD, ^_^ and -_-.
_EMOTICON = re.compile(
    r"(?<!\d)(?P<eyes>[:;=])(?P<tear>'?)-?(?P<mouth>[()\[\]/\\|*@DPpOo3])(?P=mouth)*(?![A-Za-z0-9])"
    r"|<\/?3+|(?<![A-Za-z])[xX][dD]+(?![A-Za-z])|\^_*\^|-_+-"
)
_REPEATS = re.compile(r"(.)\1+")
_APOSTROPHES = re.compile(r"['\u2019`\u00b4]")
_TOKEN = re.compile(r"\w+|[^\w\s]")

DEDUP_COUNTS = ("duplicates_dropped", "conflicting_dropped", "cross_split_dropped")


def _canonical_emoticon(match: re.Match) -> str:
    if match.group("eyes"):
        return match.group("eyes") + match.group("tear") + match.group("mouth").casefold()
    return _REPEATS.sub(r"\1", match.group(0).casefold())  # <333 -> <3, xDDD -> xd, ^__^ -> ^_^


def _is_kept_symbol(token: str) -> bool:
    """Non-ASCII symbols (emoji, ♥) stay as tokens; ASCII and Unicode punctuation go."""
    return len(token) == 1 and ord(token) > 127 and unicodedata.category(token).startswith("S")


def _plain_tokens(segment: str) -> list[str]:
    segment = _APOSTROPHES.sub("", segment.casefold())
    return [tok for tok in _TOKEN.findall(segment) if tok[0].isalnum() or tok[0] == "_" or _is_kept_symbol(tok)]


def normalised_key(text: str) -> str:
    """The near-duplicate key of ``text``: case-folded word tokens and emoticons joined by single spaces.

    ``normalised_key("Great movie!!  :-)") == normalised_key("great movie :)") == "great movie :)"``;
    ``normalised_key("sad :'(") != normalised_key("sad :)")``.

    The text is first brought to Unicode NFKC with its invisible format characters (soft hyphen, zero-width
    space) removed, so that one text in two encodings gets one key: an accent typed as a combining mark ("nai\u0308ve")
    or full-width letters ("Ｇｒｅａｔ") gave another key, and the same sentence could sit in train and in test.
    """
    # the acute accent used as an apostrophe ("can´t") first becomes the right quote, which NFKC keeps and the
    # apostrophe rule removes: NFKC alone splits it into a space and a combining accent ("can t")
    text = text.replace("\u00b4", "\u2019")
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")
    tokens, pos = [], 0
    for match in _EMOTICON.finditer(text):
        tokens += _plain_tokens(text[pos:match.start()])
        tokens.append(_canonical_emoticon(match))
        pos = match.end()
    tokens += _plain_tokens(text[pos:])
    return " ".join(tokens)


def dedup_key(text: str) -> str:
    """:func:`normalised_key`, or for a text with no word, emoticon or symbol in it (``"!!!"``, ``"???"``) the
    text itself, case-folded with whitespace collapsed: every such text has the empty key, so ``"!!!"`` and
    ``"???"`` would count as one text (duplicates, or a conflict that drops both when their labels differ).
    The fallback starts with a NUL so that it never equals the key of a text with words."""
    return normalised_key(text) or "\0" + " ".join(text.casefold().split())


def dedup_examples(examples: Sequence, split_of: Sequence[str] | None = None
                   ) -> tuple[list, list[str] | None, dict[str, int]]:
    """Drop near-duplicate examples (same :func:`dedup_key`), keeping order.

    Args:
        examples: objects with ``text`` and ``label`` (``Example``).
        split_of: the split of each example (a file's split column), or None (split later).

    Returns:
        ``(kept examples, their splits or None, report)``. A key seen with two or more labels drops all its
        examples (``conflicting_dropped``, and ``conflicting_keys`` = how many keys); otherwise the first
        occurrence is kept and later ones dropped: ``cross_split_dropped`` when a later one sat in another
        split than the first (it would have leaked between splits), else ``duplicates_dropped``.
    """
    keys = [dedup_key(e.text) for e in examples]
    labels_of: dict[str, set[str]] = {}
    for key, example in zip(keys, examples):
        labels_of.setdefault(key, set()).add(example.label)
    report = {name: 0 for name in DEDUP_COUNTS}
    first_split: dict[str, str | None] = {}
    kept, kept_splits = [], []
    for i, (key, example) in enumerate(zip(keys, examples)):
        split = split_of[i] if split_of is not None else None
        if len(labels_of[key]) > 1:
            report["conflicting_dropped"] += 1
        elif key in first_split:
            report["cross_split_dropped" if first_split[key] != split else "duplicates_dropped"] += 1
        else:
            first_split[key] = split
            kept.append(example)
            kept_splits.append(split)
    report["conflicting_keys"] = sum(len(labels) > 1 for labels in labels_of.values())
    return kept, (kept_splits if split_of is not None else None), report


def describe_dedup(report: dict[str, int]) -> str:
    """A task description's dedup clause: ``"dropped 3 near-duplicates, 2 with conflicting labels (1 texts),
    0 repeated across splits"``."""
    return (f"dropped {report.get('duplicates_dropped', 0)} near-duplicates, "
            f"{report.get('conflicting_dropped', 0)} with conflicting labels "
            f"({report.get('conflicting_keys', 0)} texts), "
            f"{report.get('cross_split_dropped', 0)} repeated across splits")
