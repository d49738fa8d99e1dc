from __future__ import annotations

import json

import pytest

from cpet.data import TASKS, load_task, normalised_key
from cpet.data.dedup import dedup_examples
from cpet.data.tasks import Example
from tests.conftest import real_asset

SAME = [  # (a, b): near-duplicates
    ("Great movie!!  :-)", "great movie :)"),
    ("I can't", "i CANT"),
    ("YAY!!! Another good phone interview!!!", "Yay. Another good phone interview."),
    ("so sad :'(((", "So sad :'("),
    ("love it <333", "LOVE it <3"),
    ("lol XDDD", "lol xd"),
    ("Wow, it\u2019s AMAZING!", "wow its amazing"),
    ("tabs\tand\nnewlines", "tabs and newlines"),
]
DIFFERENT = [  # (a, b): not near-duplicates
    ("sad :'(", "sad :)"),
    ("ok :)", "ok :("),
    ("ok :D", "ok :P"),
    ("ok ;)", "ok :)"),
    ("meh :/", "meh"),
    ("fun =)", "fun"),
    ("I <3 it", "I it"),
    ("love 😀", "love"),
    ("at 10:30", "at 1030"),
]
KEYS = [  # text -> key
    ("Great movie!!  :-)", "great movie :)"),
    (":D :P :/ ;) =) :'( <3 xD ^_^", ":d :p :/ ;) =) :'( <3 xd ^_^"),
    ("Re:Deals at 10:30, note:Pay", "re deals at 10 30 note pay"),
    ("a, b. c? -- (d)", "a b c d"),
]


@pytest.mark.parametrize("a, b", SAME)
def test_near_duplicates_share_a_key(a, b):
    assert normalised_key(a) == normalised_key(b)


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_emoticons_and_words_keep_keys_apart(a, b):
    assert normalised_key(a) != normalised_key(b)


@pytest.mark.parametrize("text, key", KEYS)
def test_keys(text, key):
    assert normalised_key(text) == key


def test_dedup_drops_repeats_and_every_conflicting_example():
    examples = [Example("Good film!", "pos"), Example("bad film", "neg"), Example("GOOD FILM", "pos"),
                Example("so-so :)", "pos"), Example("So so :)", "neg"), Example("so so :(", "neg")]
    kept, splits, report = dedup_examples(examples)
    assert [e.text for e in kept] == ["Good film!", "bad film", "so so :("] and splits is None
    assert report == {"duplicates_dropped": 1, "conflicting_dropped": 2, "conflicting_keys": 1,
                      "cross_split_dropped": 0}


def test_dedup_with_splits_keeps_the_first_split():
    examples = [Example("a b", "x"), Example("A, b!", "x"), Example("c", "y"), Example("C", "y")]
    kept, splits, report = dedup_examples(examples, ["test", "train", "train", "train"])
    assert [e.text for e in kept] == ["a b", "c"] and splits == ["test", "train"]
    assert report["cross_split_dropped"] == 1 and report["duplicates_dropped"] == 1


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_split_column_file_cannot_leak_between_splits(tmp_path):
    rows = [{"text": f"item {i}", "label": "ab"[i % 2], "split": ["train", "validation", "test"][i % 3]}
            for i in range(30)]
    rows += [{"text": "ITEM 0!!", "label": "a", "split": "test"},  # train's item 0 again, in test
             {"text": "Item 3.", "label": "a", "split": "train"},  # item 3 (train, label b) as a: conflict
             {"text": "item 6", "label": "a", "split": "train"}]  # same split, same label: a repeat
    task = load_task(_write_jsonl(tmp_path / "leaky.jsonl", rows))
    assert task.dedup_report == {"duplicates_dropped": 1, "conflicting_dropped": 2, "conflicting_keys": 1,
                                 "cross_split_dropped": 1}
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 9, "validation": 10, "test": 10}
    assert "1 repeated across splits" in task.description


@pytest.mark.parametrize("a, b", [("un film naïf, très réussi", "un film nai\u0308f, tre\u0300s re\u0301ussi"),
                                  ("Great movie", "\uff27\uff52\uff45\uff41\uff54 movie"),
                                  ("great movie", "gre\u00adat mo\u200bvie")])
def test_one_text_in_two_unicode_encodings_gets_one_key_and_cannot_leak(tmp_path, a, b):
    """Combining accents, full-width letters and invisible format characters gave a text a second key (the accent
    dropped as punctuation split the word: "nai ve"), so the same sentence stayed in train and in test."""
    assert normalised_key(a) == normalised_key(b) == normalised_key(a.casefold())
    assert normalised_key("can\u00b4t") == normalised_key("can't") == "cant"  # NFKC splits the acute: "can t"
    rows = [{"text": f"item {i}", "label": "xy"[i % 2], "split": ["train", "validation", "test"][i % 3]}
            for i in range(30)]
    rows += [{"text": a, "label": "x", "split": "train"}, {"text": b, "label": "x", "split": "test"}]
    task = load_task(_write_jsonl(tmp_path / "encodings.jsonl", rows))
    assert task.dedup_report["cross_split_dropped"] == 1
    assert b not in [example.text for example in task.split("test")]


def test_file_without_split_column_is_deduplicated_before_splitting(tmp_path):
    rows = [{"text": f"Review {i % 40}{'!' * (i // 40)}", "label": "ab"[i % 40 % 2]} for i in range(120)]
    task = load_task(_write_jsonl(tmp_path / "dups.jsonl", rows))
    assert task.dedup_report["duplicates_dropped"] == 80
    assert sum(len(v) for v in task.splits.values()) == 40


@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_tasks_share_no_normalised_text_between_splits(name):
    asset = {"brown-genre": "brown-npm", "spam-assassin": "spam-assassin-npm"}.get(name, "vader-sdist")
    real_asset(asset)  # skips offline
    task = load_task(name)
    keys = {s: {normalised_key(e.text) for e in v} for s, v in task.splits.items()}
    assert all(keys.values())
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(k) for k in keys.values()) == sum(len(v) for v in task.splits.values())  # no repeats


def test_texts_without_words_are_told_apart_by_their_characters():
    """Every text of punctuation only has the empty normalised key: "!!!" (x) and "???" (y) were a conflict
    and both dropped, and "!!!" and "..." with one label a duplicate."""
    examples = [Example("!!!", "x"), Example("???", "y"), Example("...", "x"), Example("  !!! ", "x"),
                Example("great", "x")]
    kept, _, report = dedup_examples(examples)
    assert [e.text for e in kept] == ["!!!", "???", "...", "great"]
    assert report == {"duplicates_dropped": 1, "conflicting_dropped": 0, "cross_split_dropped": 0,
                      "conflicting_keys": 0}
