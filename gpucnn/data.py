"""Data: image datasets in memory, their batches on the device, augmentation, and the standard files.

    train, test = gc.data.fashion_mnist()          # read from the IDX files already on disk, never downloaded
    for xb, yb in train.batches(128, epoch=e, augment=gc.data.Augment(crop_padding=2, flip=True)):
        ...                                        # xb (B, 1, 28, 28) uint8 and yb (B,) int64, on the device

An :class:`ArrayDataset` keeps its images on the host as NumPy, in their stored dtype (uint8 stays uint8:
a quarter of the bytes to move; the model converts to float on the device). Every random choice - the
order of an epoch, each batch's crops and flips - is drawn from a generator seeded by (seed, epoch[,
batch]), so a run resumed at epoch e sees exactly the batches the uninterrupted run would have seen.

File formats, read with ``np.frombuffer`` and checked before use (a damaged file is a :class:`DataError`
naming it, never a reshape error later):

* IDX (MNIST, Fashion-MNIST): a big-endian int32 magic number (2051 images, 2049 labels), one big-endian
  int32 per dimension, then unsigned bytes; plain or gzipped.
* CIFAR-10 binary version: records of 1 label byte + 3072 pixel bytes (3 x 32 x 32, channel-major).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from . import backend

__all__ = ["ArrayDataset", "Augment", "DataError", "fashion_mnist", "mnist", "cifar10", "load", "locate",
           "read_idx_images", "read_idx_labels", "read_cifar10_batch", "DATASETS",
           "FASHION_MNIST_CLASSES", "MNIST_CLASSES", "CIFAR10_CLASSES"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

DATASETS = ("fashion-mnist", "mnist", "cifar10")

# The whole training set is uploaded once when it takes at most this share of the GPU's free memory;
# the rest is left to activations, gradients and CuPy's pool.
GPU_CACHE_FRACTION = 0.5


class DataError(ValueError):
    """A data file exists but cannot be read as what it should be; the message names the file."""


# ----------------------------------------------------------------------------------------------
# datasets in memory


class ArrayDataset:
    """Images (N, C, H, W) and integer labels (N,) held on the host, served in batches on the device.

    ``images`` may be uint8 or float32/float64 ((N, H, W) is read as one channel); ``labels`` any
    non-negative integers. ``num_classes`` defaults to max label + 1; ``classes`` names them.
    """

    def __init__(self, images, labels, num_classes=None, classes=None, name="ArrayDataset"):
        self.name = name
        images = backend.to_numpy(images) if hasattr(images, "shape") else np.asarray(images)
        labels = backend.to_numpy(labels) if hasattr(labels, "shape") else np.asarray(labels)
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise ValueError(f"{name}: expected images of shape (N, C, H, W) or (N, H, W), "
                             f"got shape {images.shape}")
        if images.dtype != np.uint8 and images.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: expected uint8, float32 or float64 images, got {images.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"{name}: expected labels of shape (N,), got shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integer labels (class indices), got {labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError(f"{name}: the dataset is empty (0 images)")
        if labels.min() < 0:
            raise ValueError(f"{name}: labels must be >= 0 (class indices), found {labels.min()}")
        top = int(labels.max()) + 1
        if num_classes is None:
            num_classes = len(classes) if classes is not None else top
        if num_classes < top:
            raise ValueError(f"{name}: num_classes={num_classes} but a label is {top - 1}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{name}: {len(classes)} class names for {num_classes} classes")
        self.images = np.ascontiguousarray(images)
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else None
        self._gpu = None        # (images, labels) as CuPy arrays once uploaded; False when they do not fit

    def __len__(self):
        return len(self.images)

    @property
    def shape(self) -> tuple:
        """The shape of one image, (C, H, W)."""
        return tuple(self.images.shape[1:])

    def __repr__(self):
        c, h, w = self.shape
        return (f"<{self.name}: {len(self)} images of {c}x{h}x{w} {self.images.dtype}, "
                f"{self.num_classes} classes>")

    def limit(self, n: int) -> "ArrayDataset":
        """The first ``n`` items (all of them when there are fewer), as a dataset sharing the arrays."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{self.name}.limit: expected a positive integer, got {n!r}")
        return ArrayDataset(self.images[:n], self.labels[:n], self.num_classes, self.classes, self.name)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields per epoch."""
        self._check_batch_size(batch_size)
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                augment: "Augment | None" = None, drop_last: bool = False):
        """Yield ``(xb, yb)`` on the current device: xb (B, C, H, W) in the stored dtype, yb (B,) int64.

        The order is ``np.random.default_rng([seed, epoch]).permutation(N)`` (or 0..N-1 without
        shuffle), and batch ``k``'s augmentation draws from ``default_rng([seed, epoch, k])``.
        On "cpu"/"sim" xb is one buffer per epoch, overwritten by the next batch: copy it to keep it.
        """
        n_batches = self.num_batches(batch_size, drop_last)  # checks batch_size now, not at the first batch
        n = len(self)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        gather = self._gpu_gatherer(order) if backend.device() == "cuda" else None
        if gather is None:
            gather = self._host_gatherer(order, batch_size)
        return self._iterate(gather, n_batches, batch_size, n, seed, epoch, augment)

    @staticmethod
    def _iterate(gather, n_batches, batch_size, n, seed, epoch, augment):
        for k in range(n_batches):
            xb, yb = gather(k * batch_size, min((k + 1) * batch_size, n))
            if augment is not None:
                xb = augment(xb, np.random.default_rng([seed, epoch, k]))
            yield xb, yb

    def _host_gatherer(self, order, batch_size):
        """Batches gathered on the host with np.take into one buffer (an epoch allocates once); on "cuda"
        (a set too big for the GPU) each batch is then copied over, in its stored dtype."""
        buffer = np.empty((min(batch_size, len(order)),) + self.shape, self.images.dtype)
        to_gpu = backend.device() == "cuda"

        def gather(start, stop):
            rows = order[start:stop]
            xb = np.take(self.images, rows, axis=0, out=buffer[:len(rows)])
            yb = self.labels[rows]
            return (backend.asarray(xb), backend.asarray(yb)) if to_gpu else (xb, yb)
        return gather

    def _gpu_gatherer(self, order):
        """Batches gathered on the GPU from the dataset's device copy, uploaded once: an epoch copies only
        its order from the host. None when the set does not fit on the GPU."""
        cached = self._device_copy()
        if cached is None:
            return None
        cp = backend._cupy
        images, labels = cached
        order = cp.asarray(order)

        def gather(start, stop):
            rows = order[start:stop]
            return cp.take(images, rows, axis=0), cp.take(labels, rows)
        return gather

    def _device_copy(self):
        """The images and labels as CuPy arrays, uploaded at the first call; None when they do not fit."""
        if self._gpu is None:
            cp = backend._cupy
            free, _total = cp.cuda.runtime.memGetInfo()
            need = self.images.nbytes + self.labels.nbytes
            self._gpu = (cp.asarray(self.images), cp.asarray(self.labels)) \
                if need <= GPU_CACHE_FRACTION * free else False
        return self._gpu or None

    def _check_batch_size(self, batch_size):
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{self.name}.batches: batch_size must be a positive integer, got {batch_size!r}")


class Augment:
    """Random crop after zero padding by ``crop_padding`` pixels, and random horizontal flip (p = 1/2).

    Applied to a whole batch on its own device with array arithmetic: pad once, then gather every
    image's window - shifted by its own offset, mirrored when flipped - with one fancy index.
    """

    def __init__(self, crop_padding: int = 4, flip: bool = True):
        if not isinstance(crop_padding, (int, np.integer)) or isinstance(crop_padding, bool) or crop_padding < 0:
            raise ValueError(f"Augment: crop_padding must be an integer >= 0, got {crop_padding!r}")
        if not isinstance(flip, bool):
            raise TypeError(f"Augment: flip must be True or False, got {flip!r}")
        self.crop_padding = int(crop_padding)
        self.flip = flip

    def __repr__(self):
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip})"

    def __call__(self, x, rng: np.random.Generator):
        """The batch ``x`` (B, C, H, W) cropped and flipped with draws from ``rng``; dtype and device kept.

        Draws, in this order: B flips (``rng.random(B) < 0.5``, only when ``flip``), then B (dy, dx)
        offsets (``rng.integers(0, 2p + 1, size=(B, 2))``).
        Image b is ``pad(x)[b, :, dy:dy+H, dx:dx+W]``, mirrored left-right when flipped.
        """
        p = self.crop_padding
        if p == 0 and not self.flip:
            return x
        b, c, h, w = x.shape
        flips = rng.random(b) < 0.5 if self.flip else np.zeros(b, bool)
        offsets = rng.integers(0, 2 * p + 1, size=(b, 2))
        xp = backend.xp(x)
        if p:
            padded = xp.zeros((b, c, h + 2 * p, w + 2 * p), x.dtype)
            padded[:, :, p:p + h, p:p + w] = x
        else:
            padded = x
        rows = offsets[:, :1] + np.arange(h)                          # (B, H) source rows
        cols = offsets[:, 1:] + np.arange(w)                          # (B, W) source columns
        cols = np.where(flips[:, None], cols[:, ::-1], cols)
        rows, cols = xp.asarray(rows), xp.asarray(cols)
        return padded[xp.arange(b)[:, None, None, None], xp.arange(c)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

IDX_IMAGES_MAGIC = 2051   # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049   # 0x00000801: unsigned bytes, 1 dimension


def _read_bytes(path) -> bytes:
    """The file's bytes, decompressed when it is gzip (recognised by its first two bytes, not its name)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot decompress this gzip file ({e}); it is damaged or truncated: "
                            "get it again") from None
    return data


def _read_idx(path, magic: int, ndim: int, what: str) -> np.ndarray:
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found != magic:
        hint = {IDX_IMAGES_MAGIC: " (this is an image file)", IDX_LABELS_MAGIC: " (this is a label file)"}
        raise DataError(f"{path}: not an IDX {what} file: magic number {found}, expected {magic}"
                        f"{hint.get(found, '')}")
    if len(data) < header:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX {what} header ({header} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    expected = int(np.prod(dims))
    body = len(data) - header
    if body != expected:
        shape = " x ".join(map(str, dims))
        problem = "truncated" if body < expected else "longer than its header says"
        raise DataError(f"{path}: {problem}: the header says {shape} = {expected} bytes of {what}, "
                        f"the file has {body}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def read_idx_images(path) -> np.ndarray:
    """The images of an IDX file (plain or gzip), as a (N, H, W) uint8 array."""
    return _read_idx(path, IDX_IMAGES_MAGIC, 3, "images")


def read_idx_labels(path) -> np.ndarray:
    """The labels of an IDX file (plain or gzip), as a (N,) int64 array."""
    return _read_idx(path, IDX_LABELS_MAGIC, 1, "labels").astype(np.int64)


IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CIFAR10_FILES = [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]

# Where each dataset may already be, after $GPUCNN_DATA and ~/.gpucnn/data (Debian's packages)
_SYSTEM_DIRS = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}
_HOW_TO_GET = {
    "fashion-mnist": "install Debian's package (apt-get install dataset-fashion-mnist), or copy the four files "
                     "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                     "t10k-labels-idx1-ubyte.gz into ~/.gpucnn/data/fashion-mnist/",
    "mnist": "copy the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
             "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz into ~/.gpucnn/data/mnist/",
    "cifar10": "extract CIFAR-10's binary version (cifar-10-binary.tar.gz, from "
               "https://www.cs.toronto.edu/~kriz/cifar.html) and give its folder cifar-10-batches-bin "
               "(or copy it to ~/.gpucnn/data/cifar10/)",
}


def _candidates(name: str, root=None) -> list[Path]:
    """The folders searched for dataset ``name``, in order; only ``root`` and root/<name> when given."""
    if root is not None:
        root = Path(root).expanduser()
        places = [root, root / name]
    else:
        places = [Path(os.environ["GPUCNN_DATA"]).expanduser() / name] if os.environ.get("GPUCNN_DATA") else []
        places.append(Path.home() / ".gpucnn" / "data" / name)
        places += [Path(p) for p in _SYSTEM_DIRS.get(name, [])]
    if name == "cifar10":  # also inside the folder that CIFAR-10's archive extracts to
        places += [p / "cifar-10-batches-bin" for p in places]
    return places


def _files_in(folder: Path, name: str):
    """name -> path of each file ``name`` needs in ``folder``, or the list of those missing."""
    if name == "cifar10":
        found = {f: folder / f for f in CIFAR10_FILES if (folder / f).is_file()}
        missing = [f for f in CIFAR10_FILES if f not in found]
        return found, missing
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for fname in (stem, stem + ".gz"):  # the uncompressed file reads faster when both are there
            if (folder / fname).is_file():
                found[key] = folder / fname
                break
        else:
            missing.append(stem + "[.gz]")
    return found, missing


def locate(name: str, root=None) -> Path:
    """The folder holding dataset ``name``'s files; FileNotFoundError listing every place looked."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    looked = []
    for folder in _candidates(name, root):
        if not folder.is_dir():
            looked.append(f"{folder} (no such folder)")
            continue
        _found, missing = _files_in(folder, name)
        if not missing:
            return folder
        looked.append(f"{folder} (missing {', '.join(missing)})")
    raise FileNotFoundError(f"{name} data not found; looked in: {'; '.join(looked)}. "
                            f"To get it: {_HOW_TO_GET[name]}. Nothing is downloaded at run time.")


def _idx_dataset(name: str, classes, root=None):
    folder = locate(name, root)
    files, _ = _files_in(folder, name)
    out = []
    for part in ("train", "test"):
        images = read_idx_images(files[f"{part}_images"])
        labels = read_idx_labels(files[f"{part}_labels"])
        if len(images) != len(labels):
            raise DataError(f"{files[f'{part}_images']} has {len(images)} images but "
                            f"{files[f'{part}_labels']} has {len(labels)} labels")
        if labels.max() >= len(classes):
            raise DataError(f"{files[f'{part}_labels']}: label {labels.max()} is out of range "
                            f"(expected 0..{len(classes) - 1})")
        out.append(ArrayDataset(images, labels, len(classes), classes, f"{name} {part}"))
    return tuple(out)


def fashion_mnist(root=None):
    """Fashion-MNIST as (train, test): 60000 and 10000 images of 1x28x28 uint8, 10 classes."""
    return _idx_dataset("fashion-mnist", FASHION_MNIST_CLASSES, root)


def mnist(root=None):
    """MNIST as (train, test): 60000 and 10000 images of 1x28x28 uint8, digits 0-9."""
    return _idx_dataset("mnist", MNIST_CLASSES, root)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (binary version)

CIFAR10_RECORD = 1 + 3 * 32 * 32


def read_cifar10_batch(path):
    """One CIFAR-10 binary batch file as (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    data = _read_bytes(path)
    if len(data) == 0 or len(data) % CIFAR10_RECORD:
        raise DataError(f"{path}: {len(data)} bytes is not a whole number of CIFAR-10 records "
                        f"({CIFAR10_RECORD} bytes each: 1 label byte + 3072 pixel bytes)")
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise DataError(f"{path}: label {labels.max()} is out of range (expected 0..9): not a CIFAR-10 "
                        "binary batch (CIFAR-100's binary records have 2 label bytes)")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def cifar10(path=None):
    """CIFAR-10 as (train, test): 50000 and 10000 images of 3x32x32 uint8, 10 classes.

    ``path`` is the folder of the binary version (data_batch_1.bin ... data_batch_5.bin, test_batch.bin);
    without it the same places as the other datasets are searched (``$GPUCNN_DATA/cifar10`` ...).
    """
    folder = locate("cifar10", path)
    parts = [read_cifar10_batch(folder / f) for f in CIFAR10_FILES]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    test_x, test_y = parts[5]
    return (ArrayDataset(train_x, train_y, 10, CIFAR10_CLASSES, "cifar10 train"),
            ArrayDataset(test_x, test_y, 10, CIFAR10_CLASSES, "cifar10 test"))


def load(name: str, root=None):
    """Dataset ``name`` ("fashion-mnist", "mnist", "cifar10") as (train, test); ``root`` its folder."""
    loaders = {"fashion-mnist": fashion_mnist, "mnist": mnist, "cifar10": cifar10}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    return loaders[name](root)
