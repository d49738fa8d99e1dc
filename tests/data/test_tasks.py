from __future__ import annotations

import json

import pytest

from cpet.data import PromptTemplate, Verbalizer, load_task, split_examples, template_for, verbalizer_for
from cpet.data.tasks import Example


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
            {"sentence": "c", "y": 1, "split": "test"}, {"sentence": "d", "y": 0, "split": "train"}]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), text_field="sentence", label_field="y")
    assert task.labels == ("0", "1")
    assert [e.text for e in task.split("train")] == ["a", "d"]
    assert task.split("validation") == [Example("b", "1")]


def test_csv_and_tsv_tasks(tmp_path):
    (tmp_path / "t.csv").write_text('text,label\n"hello, world",yes\nbye,no\nagain,yes\n')
    task = load_task(str(tmp_path / "t.csv"))
    assert task.labels == ("no", "yes")
    assert sum(len(v) for v in task.splits.values()) == 3
    assert "hello, world" in {e.text for v in task.splits.values() for e in v}
    (tmp_path / "t.tsv").write_text("review\tstars\ngood\t5\nbad\t1\n")
    assert load_task(str(tmp_path / "t.tsv"), text_column="review", label_column="stars").labels == ("1", "5")


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n', r"line 2: malformed JSON"),
    ('{"text": "a", "label": "x"}\n{"body": "b", "label": "y"}\n', r"line 2: missing field 'text'.*'body'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', r"only one class \('x'\)"),
    ("\n\n", "is empty"),
    ('{"text": "a", "label": "x", "split": "holdout"}\n', "unknown split 'holdout'"),
])
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
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
