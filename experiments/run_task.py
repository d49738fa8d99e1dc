"""Every method row of the comparison grid on any task: a local JSONL/CSV file or a registered name.

    python experiments/run_task.py my_task.jsonl --settings nf4 --seeds 0 --steps 100
    python experiments/table.py --tasks my_task

The file needs a text and a label column (``text``/``label``; any label strings); see ``cpet.data.tasks``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.grid import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python experiments/run_task.py TASK [grid options]")
    sys.exit(main(["--tasks", sys.argv[1], *sys.argv[2:]]))
