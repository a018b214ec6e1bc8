"""``python -m gpucnn.selftest``: the self-test as a command (the same as ``gpucnn selftest``)."""
import sys

from . import main

sys.exit(main())
