"""Layers: thin objects that own parameters, caches and shape checks, and call ``gpucnn.kernels``.

Subclass :class:`Layer` for a layer of your own (see ``examples/custom_layer.py``).
"""
from .base import LAYER_TYPES, Layer
from .activation import *  # noqa: F401,F403
from .conv import *  # noqa: F401,F403
from .conv_transpose import *  # noqa: F401,F403
from .pool import *  # noqa: F401,F403
from .dense import *  # noqa: F401,F403
from .dropout import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .coral import *  # noqa: F401,F403
