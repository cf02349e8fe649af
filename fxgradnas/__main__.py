"""``python -m fxgradnas``: the ``fxgradnas`` command (:mod:`fxgradnas.cli`)."""

import sys

from .cli import main

sys.exit(main())
