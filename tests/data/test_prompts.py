"""Fitting prompts to a token limit: the text loses its end, the template nothing."""

import pytest

from cpet.data.prompts import (ELLIPSIS, LEGACY_PROMPT_CUT, PROMPT_CUT, PromptTemplate, fit_prompt,
                               prompt_cut_of)
from cpet.evaluate import encode_prompt_and_label
from cpet.models import byte_tokenizer

TEMPLATE = PromptTemplate("Email: {text}\nSpam or ham:")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_prompt_within_the_limit_is_the_plain_format():
    tokenizer = byte_tokenizer()
    text = "Subject line\nshort body"
    assert fit_prompt(TEMPLATE, text, tokenizer, 200) == TEMPLATE.format(text)


@pytest.mark.parametrize("limit", [40, 57, 90])
def test_a_long_text_keeps_its_beginning_and_the_whole_template(limit):
    tokenizer = byte_tokenizer()  # one token per byte: the limit is in characters
    words = [f"w{i}" for i in range(60)]
    text = "SUBJECT\n" + " ".join(words)
    prompt = fit_prompt(TEMPLATE, text, tokenizer, limit)
    assert n_tokens(tokenizer, prompt) <= limit
    assert prompt.startswith("Email: SUBJECT\n") and prompt.endswith(ELLIPSIS + "\nSpam or ham:")
    kept = prompt[len("Email: "):-len(ELLIPSIS + "\nSpam or ham:")]
    assert text.startswith(kept)
    # the most words that fit: one more word would pass the limit
    one_more = " ".join(text.split(" ")[: len(kept.split(" ")) + 1])
    assert n_tokens(tokenizer, TEMPLATE.format(one_more + ELLIPSIS)) > limit


def test_a_template_too_long_for_the_limit_is_cut_from_the_left_by_the_encoder():
    tokenizer = byte_tokenizer()
    text = "many words " * 20
    prompt = fit_prompt(TEMPLATE, text, tokenizer, 10)
    assert prompt == TEMPLATE.format(text)  # no room for any text: the old cut, which keeps the text's end
    ids, _ = encode_prompt_and_label(tokenizer, prompt, " spam", 10)
    assert tokenizer.decode(ids) == prompt[-10:]


# (text, the fewest tokens the fitted prompt may have): a first word longer than the room is cut by characters,
# to the last one that fits; words between newlines are words too (cut at a word end: up to 5 tokens unused)
@pytest.mark.parametrize("text, fewest", [("x" * 200, 60), ("https://example.com/" + "a" * 100 + " tail", 60),
                                          ("line\n" * 40, 55)])
def test_a_text_without_a_word_that_fits_keeps_what_fits_of_its_start(text, fewest):
    tokenizer = byte_tokenizer()
    prompt = fit_prompt(TEMPLATE, text, tokenizer, 60)
    kept = prompt[len("Email: "):-len(ELLIPSIS + "\nSpam or ham:")]
    assert fewest <= n_tokens(tokenizer, prompt) <= 60
    assert kept and text.startswith(kept)


def test_the_legacy_cut_leaves_the_prompt_to_the_encoder_and_unknown_cuts_are_refused():
    tokenizer = byte_tokenizer()
    text = "w " * 100
    assert fit_prompt(TEMPLATE, text, tokenizer, 20, cut=LEGACY_PROMPT_CUT) == TEMPLATE.format(text)
    with pytest.raises(ValueError, match="cut must be one of"):
        fit_prompt(TEMPLATE, text, tokenizer, 20, cut="middle")
    assert prompt_cut_of({}) == LEGACY_PROMPT_CUT and prompt_cut_of({"prompt_cut": PROMPT_CUT}) == PROMPT_CUT
    with pytest.raises(ValueError, match="upgrade CPET"):
        prompt_cut_of({"prompt_cut": "middle"})


def test_the_character_cut_and_the_token_cut_mark_the_text_once():
    tokenizer = byte_tokenizer()
    template = PromptTemplate("{text}?", max_chars=30)
    prompt = fit_prompt(template, "abc " * 40, tokenizer, 20)
    assert prompt.count("…") == 1 and n_tokens(tokenizer, prompt) <= 20
    assert template.format("abc " * 40).count("…") == 1


def test_an_adapters_damaged_prompt_metadata_is_refused_by_name_not_a_traceback():
    from cpet.data.prompts import scoring_prompts
    from cpet.data.tasks import Example, make_task

    task = make_task("toy", [Example(f"t{i}", "xy"[i % 2]) for i in range(40)], source="test")
    good = {"template": "Text: {text}\nLabel:", "label_words": {"x": " yes", "y": " no"}}
    template, verbalizer = scoring_prompts(task, good)
    assert template.template == good["template"] and verbalizer.label_words == {"x": " yes", "y": " no"}
    for damaged, message in [({**good, "label_words": {"x": " yes"}}, r"no label word for \['y'\]"),  # KeyError
                             ({**good, "label_words": ["yes", "no"]}, r"no label word for \['x', 'y'\]"),
                             ({**good, "template": 5}, r"a template that is no string \(5\)")]:
        with pytest.raises(ValueError, match=message + ".*metadata is damaged; tune the adapter again"):
            scoring_prompts(task, damaged)
