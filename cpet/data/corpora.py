"""Text corpora for calibration and perplexity: ``brown`` or any local UTF-8 text file."""

from __future__ import annotations

from pathlib import Path

from .brown import brown_text
from .tasks import read_utf8

CORPORA = ("brown",)


def load_corpus(name: str, split: str = "heldout") -> str:
    """Corpus text. ``brown`` has ``train``/``heldout``/``all`` splits; a ``.txt`` path is used whole.

    Raises:
        ValueError: unknown name, an empty corpus, or a file that is not UTF-8 (path and byte offset).
    """
    if name == "brown":
        text = brown_text(split)
    elif Path(name).suffix in (".txt", ".text", ".md") or Path(name).is_file():
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        text = read_utf8(path)
    else:
        raise ValueError(f"unknown corpus {name!r}; use {', '.join(CORPORA)} or a path to a .txt file")
    if not text.strip():
        raise ValueError(f"corpus {name!r} is empty")
    return text
