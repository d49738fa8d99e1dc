"""The dependent units of a built-in task's test examples: examples of one unit are not independent, so an
interval over the test set must resample them together (:func:`cpet.stats.paired_bootstrap`).

- ``brown-genre``: 748 test passages from 27 held-out Brown documents;
- ``spam-assassin``: emails of one campaign, thread or near-identical body;
- ``vader-product`` / ``vader-news``: sentences of one review (287 test sentences from 24) or editorial (294
  from 53). Movie snippets and tweets are one sentence per document: every example is its own unit there, as in
  any task not listed (and any user task).
"""

from __future__ import annotations

from typing import Callable


def _brown_documents() -> list:
    from .genre import documents_of_test_split

    return documents_of_test_split()


def _spam_groups() -> list:
    from .spam import groups_of_test_split

    return groups_of_test_split()


def _vader_groups(domain: str) -> Callable[[], list]:
    def groups() -> list:
        from .vader import groups_of_test_split

        return groups_of_test_split(domain)
    return groups


# task name -> the unit of each of its test examples, in the split's order
UNITS_OF_TASK: dict[str, Callable[[], list]] = {
    "brown-genre": _brown_documents,
    "spam-assassin": _spam_groups,
    "vader-product": _vader_groups("product"),
    "vader-news": _vader_groups("news"),
}


def test_split_units(task_name: str) -> list | None:
    """The unit of each test example of a built-in task with dependent examples, in the split's order; None for
    a task whose examples are independent units (or that is not built in)."""
    provider = UNITS_OF_TASK.get(task_name)
    return provider() if provider is not None else None


test_split_units.__test__ = False  # a helper named test_*, not a test, where a test module imports it


__all__ = ["UNITS_OF_TASK", "test_split_units"]
