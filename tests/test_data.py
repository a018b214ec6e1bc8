"""Data: IDX and CIFAR-10 files (and every way they can be wrong), datasets, batches, augmentation."""
import gzip
from pathlib import Path

import numpy as np
import pytest

from gpucnn import backend, data
from gpucnn.data import ArrayDataset, Augment, DataError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------
# writing small files in the real formats


def write_idx(path, array, magic, gz=False):
    """An IDX file: big-endian magic, one big-endian int32 per dimension, then the bytes."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_idx_set(folder, rng, n_train=12, n_test=5, gz=True, size=(6, 5), num_classes=10):
    """The four IDX files of an MNIST-like dataset in ``folder``; returns the arrays written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n,) + size).astype(np.uint8)
        labels = rng.integers(0, num_classes, n).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{part}-images-idx3-ubyte{ext}", images, 2051, gz)
        write_idx(folder / f"{part}-labels-idx1-ubyte{ext}", labels, 2049, gz)
        arrays[part] = (images, labels)
    return arrays


def write_cifar_batch(path, images, labels):
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    Path(path).write_bytes(records.astype(np.uint8).tobytes())


@pytest.fixture
def no_data_dirs(tmp_path, monkeypatch):
    """A world where none of the standard places holds any data (HOME, $GPUCNN_DATA, Debian's folder)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPUCNN_DATA", str(tmp_path / "gpucnn-data"))
    monkeypatch.setattr(data, "_SYSTEM_DIRS", {"fashion-mnist": [str(tmp_path / "usr-share")]})
    return tmp_path


# ------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, rng, gz):
    images = rng.integers(0, 256, (7, 4, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    x = data.read_idx_images(write_idx(tmp_path / "im", images, 2051, gz))
    y = data.read_idx_labels(write_idx(tmp_path / "lb", labels, 2049, gz))
    assert x.dtype == np.uint8 and x.shape == (7, 4, 3) and np.array_equal(x, images)
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    x[0, 0, 0] ^= 1  # the arrays are the caller's to change
    assert x[0, 0, 0] != images[0, 0, 0]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("loader, name, classes", [(data.fashion_mnist, "fashion-mnist", data.FASHION_MNIST_CLASSES),
                                                   (data.mnist, "mnist", data.MNIST_CLASSES)])
def test_idx_datasets_from_root(tmp_path, rng, gz, loader, name, classes):
    written = write_idx_set(tmp_path, rng, gz=gz)
    train, test = loader(tmp_path)
    assert len(train) == 12 and len(test) == 5 and train.shape == (1, 6, 5)
    assert np.array_equal(train.images[:, 0], written["train"][0])
    assert np.array_equal(test.labels, written["t10k"][1])
    assert train.num_classes == 10 and train.classes == classes
    assert train.name == f"{name} train" and test.name == f"{name} test"


def test_search_order_env_then_home(tmp_path, rng, no_data_dirs, monkeypatch):
    home_set = write_idx_set(tmp_path / "home" / ".gpucnn" / "data" / "mnist", rng)
    assert data.locate("mnist") == tmp_path / "home" / ".gpucnn" / "data" / "mnist"
    env_set = write_idx_set(tmp_path / "gpucnn-data" / "mnist", rng)
    train, _ = data.mnist()  # $GPUCNN_DATA comes first
    assert np.array_equal(train.images[:, 0], env_set["train"][0])
    assert not np.array_equal(train.images[:, 0], home_set["train"][0])
    # root given: root itself or root/<name>, and nothing else
    write_idx_set(tmp_path / "mine" / "mnist", rng)
    assert data.locate("mnist", tmp_path / "mine") == tmp_path / "mine" / "mnist"


def test_wrong_magic(tmp_path, rng):
    labels_file = write_idx(tmp_path / "labels", rng.integers(0, 10, 4), 2049)
    with pytest.raises(DataError, match=r"labels: not an IDX images file: magic number 2049, expected 2051 "
                                        r"\(this is a label file\)"):
        data.read_idx_images(labels_file)
    odd = write_idx(tmp_path / "odd", rng.integers(0, 10, (2, 2, 2)), 1234)
    with pytest.raises(DataError, match="odd: not an IDX labels file: magic number 1234, expected 2049$"):
        data.read_idx_labels(odd)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_and_overlong(tmp_path, rng, gz):
    images = rng.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    raw = 2051 .to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 4, 3)) + images.tobytes()
    for name, content, message in [
            ("short", raw[:-1], r"short: truncated: the header says 5 x 4 x 3 = 60 bytes of images, the file has 59"),
            ("long", raw + b"\0", r"long: longer than its header says: .* the file has 61"),
            ("header", raw[:10], r"header: only 10 bytes, too short for an IDX images header \(16 bytes\)")]:
        (tmp_path / name).write_bytes(gzip.compress(content) if gz else content)
        with pytest.raises(DataError, match=message):
            data.read_idx_images(tmp_path / name)


def test_damaged_gzip(tmp_path, rng):
    path = write_idx(tmp_path / "im.gz", rng.integers(0, 256, (50, 8, 8)), 2051, gz=True)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"im.gz: cannot decompress this gzip file .*damaged or truncated"):
        data.read_idx_images(path)


def test_image_label_count_mismatch(tmp_path, rng):
    write_idx_set(tmp_path, rng, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 11), 2049)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has 12 images but .*train-labels-idx1-ubyte "
                                        r"has 11 labels"):
        data.fashion_mnist(tmp_path)


def test_label_out_of_range(tmp_path, rng):
    write_idx_set(tmp_path, rng, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 12, 3, 4]), 2049)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 12 is out of range \(expected 0..9\)"):
        data.mnist(tmp_path)


def test_missing_files_list_every_place(tmp_path, rng, no_data_dirs):
    partial = tmp_path / "home" / ".gpucnn" / "data" / "fashion-mnist"
    write_idx_set(partial, rng)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        data.fashion_mnist()
    message = str(info.value)
    assert "\n" not in message  # the command line prints it as one line
    for place in [f"{tmp_path / 'gpucnn-data' / 'fashion-mnist'} (no such folder)",
                  f"{partial} (missing t10k-labels-idx1-ubyte[.gz])",
                  f"{tmp_path / 'usr-share'} (no such folder)",
                  "apt-get install dataset-fashion-mnist", "~/.gpucnn/data/fashion-mnist/"]:
        assert place in message
    with pytest.raises(FileNotFoundError, match=r"mnist data not found; looked in: .*nowhere \(no such folder\); "
                                                r".*nowhere/mnist \(no such folder\)\. To get it: copy"):
        data.mnist(tmp_path / "nowhere")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet': expected one of fashion-mnist, mnist, cifar10"):
        data.load("imagenet")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(),
                    reason=f"real Fashion-MNIST not installed at {DEBIAN_FASHION} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    train, test = data.fashion_mnist(DEBIAN_FASHION)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == np.uint8
    assert test.labels.dtype == np.int64 and train.classes[9] == "Ankle boot"
    assert np.array_equal(np.bincount(train.labels), np.full(10, 6000))  # the set is balanced
    assert np.array_equal(np.bincount(test.labels), np.full(10, 1000))
    assert train.images.max() == 255 and 50 < train.images[:100].mean() < 120


# ------------------------------------------------------------------------------------------------
# CIFAR-10


def write_cifar_set(folder, rng, per_batch=3):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in data.CIFAR10_FILES:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32)).astype(np.uint8)
        labels = rng.integers(0, 10, per_batch)
        write_cifar_batch(folder / name, images, labels)
        written[name] = (images, labels)
    return written


def test_cifar10_round_trip(tmp_path, rng):
    written = write_cifar_set(tmp_path / "cifar-10-batches-bin", rng)
    train, test = data.cifar10(tmp_path)  # the parent of the extracted folder is found too
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert np.array_equal(train.images[3:6], written["data_batch_2.bin"][0])  # channel-major records
    assert np.array_equal(test.labels, written["test_batch.bin"][1])
    assert train.classes == data.CIFAR10_CLASSES and train.labels.dtype == np.int64


def test_cifar10_bad_record_size_and_labels(tmp_path, rng):
    write_cifar_set(tmp_path, rng)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"data_batch_3.bin: 9214 bytes is not a whole number of CIFAR-10 records "
                                        r"\(3073 bytes each: 1 label byte \+ 3072 pixel bytes\)"):
        data.cifar10(tmp_path)
    write_cifar_batch(path, rng.integers(0, 256, (2, 3, 32, 32)), np.array([4, 57]))
    with pytest.raises(DataError, match=r"data_batch_3.bin: label 57 is out of range \(expected 0..9\)"):
        data.cifar10(tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar10 data not found; .*\(missing test_batch.bin\)"):
        data.cifar10(tmp_path)


# ------------------------------------------------------------------------------------------------
# ArrayDataset


def numbered(n, c=1, h=3, w=4, dtype=np.float32):
    """A dataset whose image i holds the value i everywhere and whose label is i % 7."""
    images = np.broadcast_to(np.arange(n, dtype=dtype)[:, None, None, None], (n, c, h, w)).copy()
    return ArrayDataset(images, np.arange(n) % 7)


def ids_of(batches):
    """(image ids, labels) of each batch, copied: the batch buffer is reused by the next batch."""
    return [(backend.to_numpy(xb)[:, 0, 0, 0].astype(int), backend.to_numpy(yb).copy()) for xb, yb in batches]


def test_dataset_basics(rng):
    images = rng.integers(0, 256, (6, 5, 4)).astype(np.uint8)
    ds = ArrayDataset(images, np.array([0, 3, 1, 2, 3, 0], np.int32))
    assert ds.images.shape == (6, 1, 5, 4) and ds.shape == (1, 5, 4) and len(ds) == 6
    assert ds.num_classes == 4 and ds.labels.dtype == np.int64 and ds.classes is None
    assert ArrayDataset(images, np.zeros(6, np.uint8), num_classes=10).num_classes == 10
    assert "6 images of 1x5x4 uint8, 4 classes" in repr(ds)


@pytest.mark.parametrize("images, labels, kw, error, message", [
    (np.zeros((3, 1, 2, 2), np.uint8), np.zeros(2, np.int64), {}, ValueError, "mine: 3 images but 2 labels"),
    (np.zeros((3, 2, 2), np.float32), np.zeros((3, 1), np.int64), {}, ValueError,
     r"mine: expected labels of shape \(N,\), got shape \(3, 1\)"),
    (np.zeros((3, 4), np.float32), np.zeros(3, np.int64), {}, ValueError,
     r"mine: expected images of shape \(N, C, H, W\) or \(N, H, W\), got shape \(3, 4\)"),
    (np.zeros((3, 2, 2), np.int32), np.zeros(3, np.int64), {}, TypeError,
     "mine: expected uint8, float32 or float64 images, got int32"),
    (np.zeros((3, 2, 2), np.uint8), np.array([0.0, 1.0, 2.0]), {}, TypeError,
     r"mine: expected integer labels \(class indices\), got float64"),
    (np.zeros((3, 2, 2), np.uint8), np.array([0, -1, 2]), {}, ValueError, "mine: labels must be >= 0"),
    (np.zeros((3, 2, 2), np.uint8), np.array([0, 5, 2]), {"num_classes": 3}, ValueError,
     "mine: num_classes=3 but a label is 5"),
    (np.zeros((3, 2, 2), np.uint8), np.array([0, 1, 2]), {"classes": ["a", "b"], "num_classes": 3}, ValueError,
     "mine: 2 class names for 3 classes"),
    (np.zeros((0, 2, 2), np.uint8), np.zeros(0, np.int64), {}, ValueError, r"mine: the dataset is empty"),
])
def test_dataset_errors(images, labels, kw, error, message):
    with pytest.raises(error, match=message):
        ArrayDataset(images, labels, name="mine", **kw)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 10])
def test_batches_cover_every_index_once(batch_size):
    ds = numbered(10)
    got = ids_of(ds.batches(batch_size, seed=3, epoch=2))
    ids = np.concatenate([i for i, _ in got])
    assert sorted(ids.tolist()) == list(range(10))
    assert np.array_equal(ids, np.random.default_rng([3, 2]).permutation(10))
    assert np.array_equal(np.concatenate([y for _, y in got]), ids % 7)  # labels travel with their images
    assert len(got) == ds.num_batches(batch_size)


def test_batch_order_depends_on_seed_and_epoch_only():
    ds = numbered(50)
    order = lambda **kw: np.concatenate([i for i, _ in ids_of(ds.batches(8, **kw))])
    assert np.array_equal(order(seed=1, epoch=4), order(seed=1, epoch=4))
    fresh = np.concatenate([i for i, _ in ids_of(numbered(50).batches(8, seed=1, epoch=4))])
    assert np.array_equal(order(seed=1, epoch=4), fresh)  # no state carried between epochs or datasets
    assert not np.array_equal(order(seed=1, epoch=4), order(seed=1, epoch=5))
    assert not np.array_equal(order(seed=1, epoch=4), order(seed=2, epoch=4))
    assert np.array_equal(order(shuffle=False), np.arange(50))


def test_two_epochs_at_once_do_not_share_a_buffer():
    ds = numbered(12)
    for (xa, _), (xb, _), ra, rb in zip(ds.batches(4, epoch=0), ds.batches(4, epoch=1),
                                        np.random.default_rng([0, 0]).permutation(12).reshape(3, 4),
                                        np.random.default_rng([0, 1]).permutation(12).reshape(3, 4)):
        assert np.array_equal(xa[:, 0, 0, 0], ra) and np.array_equal(xb[:, 0, 0, 0], rb)


def test_batches_dtypes_and_drop_last(rng):
    ds = ArrayDataset(rng.integers(0, 256, (10, 2, 3, 3)).astype(np.uint8), rng.integers(0, 3, 10))
    sizes = [len(xb) for xb, _ in ds.batches(4)]
    assert sizes == [4, 4, 2] and ds.num_batches(4) == 3
    kept = list((xb.copy(), yb) for xb, yb in ds.batches(4, drop_last=True))
    assert [len(xb) for xb, _ in kept] == [4, 4] and ds.num_batches(4, drop_last=True) == 2
    xb, yb = kept[0]
    assert xb.dtype == np.uint8 and xb.shape == (4, 2, 3, 3) and yb.dtype == np.int64
    first = np.random.default_rng([0, 0]).permutation(10)[:4]
    assert np.array_equal(xb, ds.images[first]) and np.array_equal(yb, ds.labels[first])
    with pytest.raises(ValueError, match="ArrayDataset.batches: batch_size must be a positive integer, got 0"):
        ds.batches(0)  # at the call, not at the first batch


def test_limit():
    ds = numbered(20)
    small = ds.limit(6)
    assert len(small) == 6 and np.array_equal(small.labels, np.arange(6) % 7)
    assert small.num_classes == ds.num_classes  # not recomputed from the 6 labels kept
    assert sorted(np.concatenate([i for i, _ in ids_of(small.batches(4))]).tolist()) == list(range(6))
    assert len(ds.limit(1000)) == 20
    with pytest.raises(ValueError, match="ArrayDataset.limit: expected a positive integer, got 0"):
        ds.limit(0)


# ------------------------------------------------------------------------------------------------
# augmentation


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("padding, flip", [(0, True), (2, False), (4, True)])
def test_augment_matches_its_definition(rng, dtype, padding, flip):
    x = (rng.random((9, 2, 5, 6)) * 200 + 1).astype(dtype)  # no zeros: padding shows up as 0
    out = Augment(padding, flip)(x, np.random.default_rng(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    draws = np.random.default_rng(7)
    flips = draws.random(9) < 0.5 if flip else np.zeros(9, bool)
    offsets = draws.integers(0, 2 * padding + 1, size=(9, 2))
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    for b in range(9):  # the definition, one image at a time
        dy, dx = offsets[b]
        want = padded[b, :, dy:dy + 5, dx:dx + 6]
        assert np.array_equal(out[b], want[:, :, ::-1] if flips[b] else want), f"image {b}"


def test_flip_really_flips(rng):
    x = rng.standard_normal((32, 3, 4, 5)).astype(np.float32)
    out = Augment(crop_padding=0, flip=True)(x, np.random.default_rng(1))
    flipped = np.array([np.array_equal(o, i[:, :, ::-1]) for o, i in zip(out, x)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert np.all(flipped ^ same) and 5 < flipped.sum() < 27


def test_augmented_batches_are_deterministic(rng):
    ds = ArrayDataset(rng.integers(1, 256, (20, 1, 6, 6)).astype(np.uint8), rng.integers(0, 3, 20))
    aug = Augment(crop_padding=2, flip=True)
    run = lambda epoch: [xb.copy() for xb, _ in ds.batches(8, seed=5, epoch=epoch, augment=aug)]
    a, b, c = run(1), run(1), run(2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    plain = [xb.copy() for xb, _ in ds.batches(8, seed=5, epoch=1)]
    assert not all(np.array_equal(p, q) for p, q in zip(a, plain))
    assert np.array_equal(aug(plain[1], np.random.default_rng([5, 1, 1])), a[1])  # batch k: rng [seed, epoch, k]


def test_augment_identity_and_errors(rng):
    x = rng.standard_normal((2, 1, 3, 3))
    assert Augment(0, False)(x, np.random.default_rng(0)) is x
    with pytest.raises(ValueError, match="Augment: crop_padding must be an integer >= 0, got -1"):
        Augment(crop_padding=-1)
    with pytest.raises(TypeError, match="Augment: flip must be True or False, got 'yes'"):
        Augment(flip="yes")


@pytest.mark.sim
def test_sim_batches_stay_numpy(rng):
    """On "sim" the data stay host NumPy arrays (the simulator runs on them), augmentation included."""
    ds = ArrayDataset(rng.integers(0, 256, (6, 1, 4, 4)).astype(np.uint8), rng.integers(0, 3, 6))
    (xb, yb), = list(ds.batches(8, augment=Augment(1, True)))
    assert backend.device() == "sim"
    assert type(xb) is np.ndarray and type(yb) is np.ndarray and xb.dtype == np.uint8 and yb.dtype == np.int64
    assert sorted(yb.tolist()) == sorted(ds.labels.tolist())
