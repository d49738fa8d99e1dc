"""Fitting prompts to a token limit: the text loses its end, the template nothing."""

import pytest

from cpet.data.prompts import ELLIPSIS, PromptTemplate, fit_prompt
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


def test_a_template_too_long_for_the_limit_keeps_no_words_and_encoding_cuts_it_from_the_left():
    tokenizer = byte_tokenizer()
    prompt = fit_prompt(TEMPLATE, "many words " * 20, tokenizer, 10)
    assert prompt == TEMPLATE.format(ELLIPSIS.strip())
    ids, _ = encode_prompt_and_label(tokenizer, prompt, " spam", 10)
    assert tokenizer.decode(ids) == prompt[-10:]


def test_the_character_cut_and_the_token_cut_mark_the_text_once():
    tokenizer = byte_tokenizer()
    template = PromptTemplate("{text}?", max_chars=30)
    prompt = fit_prompt(template, "abc " * 40, tokenizer, 20)
    assert prompt.count("…") == 1 and n_tokens(tokenizer, prompt) <= 20
    assert template.format("abc " * 40).count("…") == 1
