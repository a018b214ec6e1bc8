"""``python -m gpucnn ...``: the command line of :mod:`gpucnn.cli`."""
import sys

from .cli import main

sys.exit(main())
