"""Data: corpora (Brown), classification tasks (VADER, local files, hub), prompts and verbalizers."""

from .brown import BrownDocument, brown_text, load_brown, parse_brown_document
from .corpora import load_corpus
from .prompts import PromptTemplate, Verbalizer, template_for, verbalizer_for
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
    "BrownDocument", "brown_text", "load_brown", "parse_brown_document", "load_corpus", "PromptTemplate",
    "Verbalizer", "template_for", "verbalizer_for", "TASKS", "ClassificationTask", "Example", "load_csv_task",
    "load_hf_task", "load_jsonl_task", "load_task", "register_task", "split_examples", "VADER_DOMAINS",
    "load_vader_task",
]
