"""``python -m deform_attn.experiments``: see :mod:`deform_attn.experiments.runner`."""

import sys

from .runner import main

sys.exit(main())
