"""Every method row of the comparison grid on the SpamAssassin task (ham or spam per email; subject + body,
cut to fit 128 prompt tokens). See grid.py for the options.

    python experiments/spam.py --settings ffn25-nf4 --seeds 0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.grid import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--tasks", "spam-assassin", *sys.argv[1:]]))
