"""Prompt templates and verbalizers: how a causal LM reads a classification example and names a label.

Training puts the loss on the label word's tokens after the prompt; scoring compares the log-probability
of each label word after the prompt (:func:`cpet.evaluate.label_logprobs`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptTemplate:
    """``template`` with a ``{text}`` slot; texts longer than ``max_chars`` are cut at a word boundary."""

    template: str = "Text: {text}\nLabel:"
    max_chars: int = 600

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{text}} slot")

    def format(self, text: str) -> str:
        if len(text) > self.max_chars:
            cut = text[: self.max_chars]
            text = (cut.rsplit(" ", 1)[0] if " " in cut else cut) + ELLIPSIS
        return self.template.replace("{text}", text)


ELLIPSIS = " …"  # marks a text cut short, by characters (PromptTemplate.max_chars) or by tokens (fit_prompt)


# How a prompt over the token limit is cut, as an adapter's cpet.json records it ("prompt_cut"):
#   "text_end": the text loses its end and the template nothing (fit_prompt; adapters trained since 213802e);
#   "left": the whole prompt loses its first tokens (adapters whose cpet.json names no cut were trained so).
PROMPT_CUT = "text_end"
LEGACY_PROMPT_CUT = "left"
PROMPT_CUTS = (PROMPT_CUT, LEGACY_PROMPT_CUT)
PROMPT_CUT_WORDS = {  # for model cards
    PROMPT_CUT: "the text loses its end at a word boundary, marked \" …\", and the template stays whole",
    LEGACY_PROMPT_CUT: "the whole prompt loses its first tokens"}


def prompt_cut_of(meta: dict) -> str:
    """The cut a CPET adapter was trained with, from its ``cpet.json``: scoring and serving cut its prompts the
    same way (an adapter from before the key was recorded was trained on left-cut prompts)."""
    cut = meta.get("prompt_cut", LEGACY_PROMPT_CUT)
    if cut not in PROMPT_CUTS:
        raise ValueError(f"cpet.json names prompt_cut {cut!r}; this CPET knows {list(PROMPT_CUTS)}: upgrade CPET")
    return cut


def scoring_cut(meta: dict | None) -> str:
    """The cut to score with: a CPET adapter's own (``meta``, its ``cpet.json``), else today's (a bare model, or a
    plain PEFT adapter: no ``cpet.json``, so nothing says it was trained otherwise)."""
    return prompt_cut_of(meta) if meta else PROMPT_CUT


def fit_prompt(template, text: str, tokenizer, max_tokens: int, cut: str = PROMPT_CUT) -> str:
    """``template.format(text)``, its text cut (and marked with :data:`ELLIPSIS`) until the whole prompt is at most
    ``max_tokens`` tokens.

    The text loses its end, the template nothing: the instruction before the slot and the answer cue after it
    stay whole, and the text keeps its beginning (an email's subject, a passage's first words). Cutting the
    tokens off the left instead would drop the instruction and the subject first. The cut keeps the most
    words that fit (a binary search over the text's word ends, tokenising the whole prompt, so merges at the
    slot's edges are counted); when not even the first word fits (a long URL, a text without spaces), the most
    characters of it that do. When the template with no text (only the ellipsis in its slot) is over the limit,
    the uncut prompt is returned and the encoder's left truncation (:func:`cpet.evaluate.encode_prompt_and_label`)
    cuts it, as it cuts every prompt with ``cut="left"`` (:data:`LEGACY_PROMPT_CUT`, for adapters trained so).

    ``template`` has ``format(text) -> str`` (a :class:`PromptTemplate`).
    """
    if cut not in PROMPT_CUTS:
        raise ValueError(f"cut must be one of {list(PROMPT_CUTS)}, got {cut!r}")

    def length(prompt: str) -> int:
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    prompt = template.format(text)
    if cut == LEGACY_PROMPT_CUT or length(prompt) <= max_tokens:
        return prompt

    def cut_at(end: int) -> str:
        head = text[:end].rstrip()
        return template.format(head + ELLIPSIS if head else ELLIPSIS.strip())

    def longest(ends: list[int]) -> int | None:
        """The last of the increasing ``ends`` whose cut fits, or None."""
        low, high = -1, len(ends) - 1  # the answer's index lies in [low, high]; -1: none fits
        while low < high:
            middle = (low + high + 1) // 2
            if length(cut_at(ends[middle])) <= max_tokens:
                low = middle
            else:
                high = middle - 1
        return ends[low] if low >= 0 else None

    if length(cut_at(0)) > max_tokens:
        return prompt
    word_ends = [match.start() for match in re.finditer(r"\s+", text) if match.start() > 0]
    end = longest(word_ends)
    if end is None:  # not even the first word fits: as many of its characters as do
        first_word = word_ends[0] if word_ends else len(text)
        end = longest(list(range(1, first_word))) or 0
    return cut_at(end)


@dataclass(frozen=True)
class Verbalizer:
    """Label -> the word the model should produce for it (with its leading space)."""

    label_words: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_word: dict[str, list[str]] = {}
        for label, word in self.label_words.items():
            by_word.setdefault(word, []).append(label)
        shared = {word: labels for word, labels in by_word.items() if len(labels) > 1}
        if shared:
            listed = "; ".join(f"labels {labels} all map to {word!r}" for word, labels in shared.items())
            raise ValueError(f"verbalizer maps two labels to the same word ({listed}), so the model could not tell "
                             "them apart: rename one of the labels (a label's default word is the label with '_' "
                             "read as a space), or give the task label words that differ")

    def words_for(self, labels) -> list[str]:
        missing = [label for label in labels if label not in self.label_words]
        if missing:
            raise ValueError(f"labels {missing} have no verbalizer word; it knows {sorted(self.label_words)}")
        return [self.label_words[label] for label in labels]

    @classmethod
    def default_for(cls, labels) -> "Verbalizer":
        return cls({label: " " + str(label).replace("_", " ") for label in labels})


DEFAULT_TEMPLATES = {
    "sentiment": PromptTemplate("Review: {text}\nSentiment (positive or negative):"),
    "genre": PromptTemplate("Passage: {text}\nGenre (news, prose, academic or fiction):"),
    "spam": PromptTemplate("Email: {text}\nSpam or ham:"),
    "generic": PromptTemplate("Text: {text}\nLabel:"),
}


def template_for(task) -> PromptTemplate:
    """The prompt template of the task's ``family`` (``generic`` when unknown)."""
    return DEFAULT_TEMPLATES.get(getattr(task, "family", "generic"), DEFAULT_TEMPLATES["generic"])


def verbalizer_for(task) -> Verbalizer:
    """The task's own ``label_words`` if it has them, else each label as its own word."""
    words = getattr(task, "label_words", None)
    return Verbalizer(dict(words)) if words else Verbalizer.default_for(task.labels)


def tuning_prompts(task, *splits: str) -> tuple[PromptTemplate, Verbalizer]:
    """The template and verbalizer to tune ``task`` with, once ``task`` has every split in ``splits``.

    Raises ValueError for a missing or empty split, or for two labels that would share a label word
    ("very_good" and "very good"): call it before any model loads, so that a task that cannot be tuned costs no
    model work (``cpet tune``, ``cpet demo`` and :meth:`cpet.pipeline.CPET.tune` all do).
    """
    task.require(*splits)
    return template_for(task), verbalizer_for(task)


def scoring_prompts(task, meta: dict | None) -> tuple[PromptTemplate, Verbalizer]:
    """The template and verbalizer to score ``task`` with: a CPET adapter's own (``meta``, its ``cpet.json``), as
    serving uses them, when it records them; else the task's. An adapter tuned on one task and scored on another
    file with the same labels is scored with the prompt it learned, not the other file's generic one."""
    if meta and meta.get("template") and meta.get("label_words"):
        words, template = meta["label_words"], meta["template"]
        missing = [label for label in task.labels if not isinstance(words, dict) or not isinstance(words.get(label), str)]
        if missing or not isinstance(template, str):  # a KeyError or TypeError later would be a traceback
            what = f"no label word for {missing}" if missing else f"a template that is no string ({template!r})"
            raise ValueError(f"the adapter's cpet.json records {what}: its metadata is damaged; tune the adapter "
                             "again")
        return PromptTemplate(template), Verbalizer({label: words[label] for label in task.labels})
    return template_for(task), verbalizer_for(task)


def check_single_token_labels(tokenizer, verbalizer: Verbalizer) -> None:
    """Raise ValueError unless every label word is exactly one token under ``tokenizer``.

    Words are tokenised alone, without special tokens, as training and scoring encode them
    (:func:`cpet.evaluate.encode_prompt_and_label`). Single-token words score all labels in one forward pass
    and weigh every label alike; the error names each offending word and its token count.
    """
    bad = {}
    for label, word in verbalizer.label_words.items():
        n_tokens = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        if n_tokens != 1:
            bad[label] = (word, n_tokens)
    if bad:
        listed = ", ".join(f"{word!r} (label {label!r}) has {n} tokens" for label, (word, n) in bad.items())
        raise ValueError(f"label words must be single tokens for this tokenizer: {listed}; choose words "
                         "(with their leading space) that the tokenizer keeps whole")
