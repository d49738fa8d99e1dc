"""``python -m cpet.cli``: the same as the ``cpet`` command."""

import sys

from . import main

sys.exit(main())
