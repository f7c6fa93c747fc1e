"""``python -m deform_attn.bench``: the benchmark command, and the worker it starts (``--worker``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
