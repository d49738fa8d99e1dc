"""The dependent units of a built-in task's test examples: examples of one unit are not independent, so an
interval over the test set must resample them together (:func:`cpet.stats.paired_bootstrap`).

- ``brown-genre``: 748 test passages from 27 held-out Brown documents;
- ``spam-assassin``: emails of one campaign, thread or near-identical body;
- ``vader-product`` / ``vader-news``: sentences of one review (287 test sentences from 24) or editorial (294
  from 53). Movie snippets and tweets are one sentence per document: every example is its own unit there, as in
  any task not listed (and any user task).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SplitUnits:
    """A task's test split as a clustered bootstrap sees it.

    Attributes:
        units: the unit of each test example, in the split's order.
        examples: the split's ``(text, label)`` pairs, in order (a cell's ``test_sha256`` is the hash of a prefix
            of them: all of them, or the first ``--test-limit``).
    """

    units: tuple
    examples: tuple[tuple[str, str], ...]

    @property
    def gold(self) -> tuple[str, ...]:
        return tuple(label for _, label in self.examples)

    def prefix_sha256(self, count: int) -> str:
        """:func:`cpet.data.tasks.examples_sha256` of the first ``count`` examples."""
        from .tasks import Example, examples_sha256

        return examples_sha256([Example(text, label) for text, label in self.examples[:count]])


@functools.lru_cache(maxsize=None)
def split_units(task_name: str) -> SplitUnits:
    """The :class:`SplitUnits` of a task of :data:`UNITS_OF_TASK` (built once per process)."""
    from .tasks import load_task

    test = load_task(task_name).split("test")
    units = tuple(test_split_units(task_name))
    if len(units) != len(test):
        raise ValueError(f"{len(units)} units for the {len(test)} test examples of {task_name}")
    return SplitUnits(units, tuple((e.text, e.label) for e in test))


__all__ = ["UNITS_OF_TASK", "SplitUnits", "split_units", "test_split_units"]
