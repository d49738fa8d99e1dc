"""Data: corpora (Brown), classification tasks (VADER, Brown genre, SpamAssassin, local files, hub),
near-duplicate removal, prompts and verbalizers."""

from .brown import BrownDocument, brown_text, load_brown, parse_brown_document
from .corpora import load_corpus
from .dedup import dedup_examples, normalised_key
from .genre import load_brown_genre_task
from .prompts import (PromptTemplate, Verbalizer, check_single_token_labels, template_for, tuning_prompts,
                      verbalizer_for)
from .spam import load_spam_task
from .tasks import (
    TASKS,
    ClassificationTask,
    Example,
    load_csv_task,
    load_hf_task,
    load_jsonl_task,
    load_task,
    register_task,
    split_examples,
)
from .vader import VADER_DOMAINS, load_vader_task

__all__ = [
    "BrownDocument", "brown_text", "load_brown", "parse_brown_document", "load_corpus", "dedup_examples",
    "normalised_key", "load_brown_genre_task", "PromptTemplate", "Verbalizer", "check_single_token_labels",
    "template_for", "tuning_prompts", "verbalizer_for", "load_spam_task", "TASKS", "ClassificationTask", "Example",
    "load_csv_task", "load_hf_task", "load_jsonl_task", "load_task", "register_task", "split_examples",
    "VADER_DOMAINS", "load_vader_task",
]
