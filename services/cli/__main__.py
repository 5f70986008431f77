"""``python -m specforge_cli ARGS``: the form torchrun starts (``-m specforge_cli train``)."""

import sys

from .main import main

sys.exit(main())
