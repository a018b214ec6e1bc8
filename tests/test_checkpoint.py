"""The checkpoint format: exact round trips, atomic writes, and every kind of bad file refused clearly."""
import json
import os
import zipfile

import numpy as np
import pytest

from gpucnn import checkpoint
from gpucnn.checkpoint import CheckpointError


def _tree(rng):
    return {
        "kind": "model",
        "numbers": [1, 2.5, None, True, "text"],
        "nested": {"w": rng.standard_normal((3, 4)).astype(np.float32),
                   "b": rng.standard_normal(4),
                   "counts": rng.integers(0, 9, 5),
                   "pixels": rng.integers(0, 255, (2, 3), dtype=np.uint8),
                   "scalar": np.array(7.5),
                   "empty": np.zeros((0, 3), np.float32)},
        "shape": (1, 28, 28),
    }


def _members(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write_members(path, members):
    with open(path, "wb") as f:
        np.savez(f, **members)


def test_round_trip_is_exact(tmp_path, rng):
    tree = _tree(rng)
    path = checkpoint.save(tmp_path / "t.npz", tree)
    back = checkpoint.load(path)
    assert back["numbers"] == tree["numbers"] and back["kind"] == "model"
    assert back["shape"] == [1, 28, 28]          # tuples come back as JSON lists
    for k, a in tree["nested"].items():
        b = back["nested"][k]
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b), k
    assert os.listdir(tmp_path) == ["t.npz"]     # no temporary file left behind


def test_save_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="object array"):
        checkpoint.save(tmp_path / "o.npz", {"a": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(TypeError, match="cannot save set"):
        checkpoint.save(tmp_path / "s.npz", {"a": {1, 2}})
    with pytest.raises(ValueError, match="without '/'"):
        checkpoint.save(tmp_path / "k.npz", {"a/b": 1})
    assert not os.listdir(tmp_path)


def test_interrupted_write_leaves_the_old_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "last.npz"
    checkpoint.save(path, {"v": np.arange(3)})
    before = path.read_bytes()

    def boom(f, **kw):
        f.write(b"PK half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"v": np.arange(5)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.npz"]
    monkeypatch.undo()
    assert np.array_equal(checkpoint.load(path)["v"], np.arange(3))


def test_copy(tmp_path, rng):
    src = checkpoint.save(tmp_path / "a.npz", {"w": rng.standard_normal(5)})
    checkpoint.copy(src, tmp_path / "b.npz")
    assert np.array_equal(checkpoint.load(tmp_path / "b.npz")["w"], checkpoint.load(src)["w"])


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz: no such checkpoint"):
        checkpoint.load(tmp_path / "nope.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.npz: the file is empty"):
        checkpoint.load(tmp_path / "empty.npz")


@pytest.mark.parametrize("keep", [0.3, 0.7, 0.98])
def test_truncated_file(tmp_path, rng, keep):
    path = checkpoint.save(tmp_path / "t.npz", _tree(rng))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut\.npz: .*(truncated|corrupted)"):
        checkpoint.load(cut)


def test_flipped_byte_in_an_array(tmp_path, rng):
    path = checkpoint.save(tmp_path / "t.npz", {"w": rng.standard_normal(1000)})
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("w.npy")
    # the array's bytes end where its local entry ends: flip one in the middle of the payload
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0x10
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.npz: is corrupted"):
        checkpoint.load(bad)


def test_tampered_array_fails_the_hash(tmp_path, rng):
    """A file rewritten with a changed array (valid zip CRCs, old header) is caught by the SHA-256."""
    path = checkpoint.save(tmp_path / "t.npz", {"w": rng.standard_normal(10)})
    members = _members(path)
    members["w"] = members["w"].copy()
    members["w"][3] += 1e-12
    bad = tmp_path / "tampered.npz"
    _write_members(bad, members)
    with pytest.raises(CheckpointError, match=r"tampered\.npz: .*do not match the SHA-256"):
        checkpoint.load(bad)
    # so is a changed architecture (the JSON tree is hashed too)
    members = _members(path)
    tree = json.loads(members["__gpucnn__/tree"].tobytes())
    tree["extra"] = 1
    members["__gpucnn__/tree"] = np.frombuffer(json.dumps(tree).encode(), np.uint8)
    _write_members(bad, members)
    with pytest.raises(CheckpointError, match="SHA-256"):
        checkpoint.load(bad)


@pytest.mark.parametrize("with_header", [True, False])
def test_pickled_arrays_are_refused_not_run(tmp_path, rng, with_header):
    members = _members(checkpoint.save(tmp_path / "t.npz", {"w": rng.standard_normal(3)})) if with_header else {}
    members["evil"] = np.array([{"run": "code"}], dtype=object)
    bad = tmp_path / "pickled.npz"
    with open(bad, "wb") as f:
        np.savez(f, allow_pickle=True, **members)
    with pytest.raises(CheckpointError, match=r"pickled\.npz: the member 'evil' is a pickled \(object\) array"):
        checkpoint.load(bad)


def test_foreign_files(tmp_path, rng):
    plain = tmp_path / "plain.npz"
    _write_members(plain, {"weights": rng.standard_normal(3)})
    with pytest.raises(CheckpointError, match=r"plain\.npz: not a gpucnn checkpoint: it has no '__gpucnn__/header' "
                                              r"member \(it holds weights\)"):
        checkpoint.load(plain)
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(CheckpointError, match=r"array\.npy: not a gpucnn checkpoint: it is not an \.npz"):
        checkpoint.load(npy)
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not an .npz"):
        checkpoint.load(text)


def _with_header(tmp_path, rng, **header_changes):
    path = checkpoint.save(tmp_path / "t.npz", {"w": rng.standard_normal(3)})
    members = _members(path)
    header = json.loads(members["__gpucnn__/header"].tobytes())
    header.update(header_changes)
    members["__gpucnn__/header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    bad = tmp_path / "odd.npz"
    _write_members(bad, members)
    return bad


def test_newer_version_and_foreign_format(tmp_path, rng):
    with pytest.raises(CheckpointError, match=r"odd\.npz: written in checkpoint format version 99 by a newer gpucnn"):
        checkpoint.load(_with_header(tmp_path, rng, version=99))
    with pytest.raises(CheckpointError, match=r"odd\.npz: not a gpucnn checkpoint \(its header names format 'keras'\)"):
        checkpoint.load(_with_header(tmp_path, rng, format="keras"))
    with pytest.raises(CheckpointError, match="version '1' is not an integer"):
        checkpoint.load(_with_header(tmp_path, rng, version="1"))


def test_header_not_json(tmp_path, rng):
    path = checkpoint.save(tmp_path / "t.npz", {"w": rng.standard_normal(3)})
    members = _members(path)
    members["__gpucnn__/header"] = np.frombuffer(b"{not json", np.uint8)
    bad = tmp_path / "bad.npz"
    _write_members(bad, members)
    with pytest.raises(CheckpointError, match=r"bad\.npz: the header is not valid JSON"):
        checkpoint.load(bad)
