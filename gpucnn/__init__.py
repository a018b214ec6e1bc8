"""gpucnn: convolutional neural networks on NVIDIA GPUs, every kernel our own and readable.

    import gpucnn as gc
    gc.device()              # "cuda" where CuPy finds a GPU, else "cpu" ($GPUCNN_DEVICE overrides)
    x = gc.asarray(images)   # onto the current device
"""
__version__ = "0.1.0"

from .backend import (DeviceError, DeviceMemoryError, asarray, device, precision, seed, set_precision,  # noqa: F401
                      to_numpy, use_device)
from . import layers  # noqa: F401
from . import losses  # noqa: F401
from . import testing  # noqa: F401
from . import data, models, optim, viz  # noqa: F401
from .checkpoint import CheckpointError  # noqa: F401
from .data import ArrayDataset, Augment  # noqa: F401
from .model import Sequential  # noqa: F401
from .profile import profile  # noqa: F401
