"""Every method row of the comparison grid on the Brown genre task (4 classes: press, prose, learned,
fiction; validation/test passages from Brown's held-out documents). See grid.py for the options.

    python experiments/brown_genre.py --settings ffn25-nf4 --seeds 0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.grid import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--tasks", "brown-genre", *sys.argv[1:]]))
