"""Every method row of the comparison grid on the VADER news task (see grid.py for the options).

    python experiments/vader_news.py --settings ffn25-nf4 --seeds 0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.grid import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--tasks", "vader-news", *sys.argv[1:]]))
