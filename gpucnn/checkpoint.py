"""One file format for saved models and training checkpoints: a verified .npz that never runs code.

A checkpoint is a tree of plain values (dicts, lists, str, int, float, bool, None) with NumPy arrays as
leaves. :func:`save` stores the tree as JSON and every array as its own ``.npy`` member:

    __gpucnn__/header   uint8 JSON {"format": "gpucnn", "version": 1, "sha256": "..."}
    __gpucnn__/tree     uint8 JSON of the tree, each array replaced by {"__array__": "its/path"}
    model/layers/0/params/weight, ...   the arrays, named by their path in the tree

The SHA-256 covers every member but the header (names, dtypes, shapes and bytes), so a flipped bit, a
truncated write or a hand-edited array is caught on :func:`load`. Files are written atomically: a
temporary file in the same folder, flushed and fsync'ed, then ``os.replace`` - an interruption leaves
the previous file whole. Loading uses ``np.load(allow_pickle=False)``: an object array (which would
need unpickling, and unpickling can run code) is refused, never executed. Anything wrong with a file
is a :class:`CheckpointError` that names the file and says what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

from . import backend
from .layers.base import LAYER_TYPES

FORMAT = "gpucnn"
VERSION = 1
_HEADER = "__gpucnn__/header"
_TREE = "__gpucnn__/tree"


class CheckpointError(ValueError):
    """A file that is not a readable gpucnn checkpoint: truncated, corrupted, tampered, foreign or unsafe."""


# ----------------------------------------------------------------------------------------------
# the tree <-> (JSON, arrays) split


def _is_array(v) -> bool:
    return hasattr(v, "ndim") and hasattr(v, "dtype") and not isinstance(v, np.generic)


def _contiguous(a):
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def _pack(node, path: str, arrays: dict):
    """The JSON-able copy of ``node``, with each array moved to the host into ``arrays[path]``."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if not isinstance(k, str) or "/" in k or not k:
                raise ValueError(f"checkpoint: keys must be non-empty strings without '/', got {k!r} in {path or '/'}")
            out[k] = _pack(v, f"{path}/{k}" if path else k, arrays)
        return out
    if isinstance(node, (list, tuple)):
        return [_pack(v, f"{path}/{i}" if path else str(i), arrays) for i, v in enumerate(node)]
    if _is_array(node):
        a = _contiguous(backend.to_numpy(node))
        if a.dtype.hasobject:
            raise TypeError(f"checkpoint: {path} is an object array; only numeric arrays are saved")
        arrays[path] = a
        return {"__array__": path}
    if isinstance(node, np.generic):
        return node.item()
    if node is None or isinstance(node, (str, bool, int, float)):
        return node
    raise TypeError(f"checkpoint: cannot save {type(node).__name__} at {path or '/'} (plain values and arrays only)")


def _unpack(node, arrays: dict, where: str):
    if isinstance(node, dict):
        if set(node) == {"__array__"}:
            name = node["__array__"]
            if name not in arrays:
                raise CheckpointError(f"{where}: the array {name!r} it refers to is missing")
            return arrays[name]
        return {k: _unpack(v, arrays, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_unpack(v, arrays, where) for v in node]
    return node


def _digest(arrays: dict) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = _contiguous(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _json_bytes(obj) -> np.ndarray:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# writing


def atomic_write(path, write) -> str:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Readers see the old file or the new one, never half of one; on any error (Ctrl-C included) the
    temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX); harmless where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path, tree: dict) -> str:
    """Write ``tree`` (plain values and arrays) to ``path`` as a verified .npz, atomically; returns the path."""
    arrays: dict = {}
    packed = _pack(tree, "", arrays)
    for name in arrays:
        if name.startswith("__gpucnn__"):
            raise ValueError(f"checkpoint: the name {name!r} is reserved")
    arrays[_TREE] = _json_bytes(packed)
    header = {"format": FORMAT, "version": VERSION, "sha256": _digest(arrays)}
    members = dict(arrays)
    members[_HEADER] = _json_bytes(header)
    return atomic_write(path, lambda f: np.savez(f, **members))


def copy(src, dst) -> str:
    """Copy a checkpoint file atomically (``best.npz`` from ``last.npz``), so ``dst`` is never half-written."""
    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
    return atomic_write(dst, write)


# ----------------------------------------------------------------------------------------------
# reading


def load(path) -> dict:
    """Read and verify a checkpoint written by :func:`save`; returns the tree with NumPy arrays (host).

    Raises FileNotFoundError for a missing file and CheckpointError for any file that is not a whole,
    unmodified gpucnn checkpoint of a version this gpucnn reads.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (a write that never finished?)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a gpucnn checkpoint: it is not an .npz (zip) archive, "
                              "or it is truncated (the zip directory at its end is missing)")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                arrays[name] = _read_member(path, z, name)
    except CheckpointError:
        raise
    except Exception as e:  # zipfile.BadZipFile (bad CRC), EOFError, zlib.error, OSError, ...
        raise CheckpointError(f"{path}: is corrupted or truncated and cannot be read "
                              f"({type(e).__name__}: {e})") from None
    if _HEADER not in arrays:
        names = sorted(arrays)
        raise CheckpointError(f"{path}: not a gpucnn checkpoint: it has no {_HEADER!r} member "
                              f"(it holds {', '.join(names[:5]) or 'nothing'}{', ...' if len(names) > 5 else ''})")
    header = _read_json(path, arrays.pop(_HEADER), "header")
    _check_header(path, header)
    if _TREE not in arrays:
        raise CheckpointError(f"{path}: the {_TREE!r} member is missing")
    if _digest(arrays) != header["sha256"]:
        raise CheckpointError(f"{path}: its contents do not match the SHA-256 recorded when it was written: "
                              "the file was modified or corrupted after it was saved")
    tree = _read_json(path, arrays.pop(_TREE), "tree")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: the stored tree is not a dict")
    return _unpack(tree, arrays, path)


def _read_member(path, z, name):
    try:
        return z[name]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(f"{path}: the member {name!r} is a pickled (object) array; gpucnn never "
                                  "unpickles a file, because unpickling can run arbitrary code") from None
        raise


def _read_json(path, a, what):
    if a.dtype != np.uint8 or a.ndim != 1:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 JSON bytes (dtype {a.dtype}, shape {a.shape})")
    try:
        return json.loads(a.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({e})") from None


def _check_header(path, header):
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gpucnn checkpoint (its header names format "
                              f"{header.get('format') if isinstance(header, dict) else header!r})")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: the header's format version {version!r} is not an integer")
    if version > VERSION:
        raise CheckpointError(f"{path}: written in checkpoint format version {version} by a newer gpucnn; "
                              f"this gpucnn reads version {VERSION} and older: upgrade gpucnn to load it")
    if version < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format version {version}")
    if not isinstance(header.get("sha256"), str):
        raise CheckpointError(f"{path}: the header has no SHA-256 checksum")


# ----------------------------------------------------------------------------------------------
# a Sequential's tree: what gpucnn.model.Sequential saves (state, save) and rebuilds (load, fit's resume)

def model_state(model) -> dict:
    """The model as a checkpoint tree: architecture (class names + config), arrays, counters, statistics."""
    return {
        "input_shape": list(model.input_shape) if model.input_shape is not None else None,
        "dtype": model.dtype.name,
        "input_mean": model.input_mean,
        "input_std": model.input_std,
        "layers": [{"class": type(l).__name__, "config": l.config(), "params": dict(l.params),
                    "buffers": dict(l.buffers), "state": _int_state(l)} for l in model.layers],
    }


def load_model(cls, path, device=None):
    """Rebuild a Sequential (``cls``) saved by its save (or a checkpoint written by fit) on ``device`` (default:
    the current one). Custom layer classes must be defined or imported before loading."""
    tree = load(path)
    spec = model_spec(tree, path)
    layers = []
    for i, ls in enumerate(spec["layers"]):
        name = ls.get("class")
        klass = LAYER_TYPES.get(name)
        if klass is None:
            raise CheckpointError(
                f"{path}: layer {i} is of class {name!r}, which is not a known layer in this program. "
                f"If it is your own layer, define or import your Layer subclass named {name} (subclassing "
                "gpucnn.layers.Layer registers it by class name) before loading")
        try:
            layers.append(klass(**ls.get("config", {})))
        except Exception as e:
            raise CheckpointError(f"{path}: layer {i} ({name}) cannot be rebuilt from its saved config "
                                  f"{ls.get('config')}: {type(e).__name__}: {e}") from None
    try:
        model = cls(layers, input_shape=spec.get("input_shape"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the saved layers do not form a valid model: {e}") from None
    set_model_state(model, spec, path)
    if device is not None and device != backend.device():
        model.to(device)
    return model


def set_model_state(model, spec, where):
    """Copy saved arrays, counters and statistics into ``model``'s own arrays (keeping their devices)."""
    if len(spec["layers"]) != len(model.layers):
        raise CheckpointError(f"{where}: holds {len(spec['layers'])} layers, the model has {len(model.layers)}")
    for i, (layer, ls) in enumerate(zip(model.layers, spec["layers"])):
        for kind in ("params", "buffers"):
            mine, saved = getattr(layer, kind), ls.get(kind, {})
            if set(mine) != set(saved):
                raise CheckpointError(f"{where}: layer {i} ({layer.name}) has {kind} {sorted(mine)}, "
                                      f"the file holds {sorted(saved)}")
            for k, a in saved.items():
                p = mine[k]
                if not hasattr(a, "dtype") or tuple(a.shape) != tuple(p.shape) or a.dtype != p.dtype:
                    got = f"{a.dtype}{tuple(a.shape)}" if hasattr(a, "dtype") else type(a).__name__
                    raise CheckpointError(f"{where}: layer {i} ({layer.name}) {k} is {got} in the file, "
                                          f"{p.dtype}{tuple(p.shape)} in the model")
                p[...] = backend.asarray(a) if backend.is_cupy(p) else a
        for k, v in (ls.get("state") or {}).items():
            setattr(layer, k, int(v))
        layer.grads = {k: None for k in layer.params}
    mean, std = spec.get("input_mean"), spec.get("input_std")
    model.input_mean = None if mean is None else np.asarray(mean, np.float64)
    model.input_std = None if std is None else np.asarray(std, np.float64)
    model._norm = None


def training_tree(model, optimizer, epochs_done, history, seed, best) -> dict:
    """What fit writes after each epoch: the model, and the epoch, seed, history, best score and optimizer state."""
    return {"kind": "training", "model": model_state(model),
            "training": {"epoch": epochs_done, "seed": seed, "history": history, "best": best,
                         "optimizer": optimizer.state_dict()}}


def resume(model, path, optimizer) -> dict:
    """Load a training checkpoint into ``model`` and ``optimizer``; returns its "training" part."""
    tree = load(path)
    spec = model_spec(tree, path)
    if tree.get("kind") != "training" or "training" not in tree:
        raise CheckpointError(f"{path}: is a saved model, not a training checkpoint; resume takes the "
                              "last.npz or best.npz that fit(checkpoint_dir=...) writes")
    mine = [(type(l).__name__, as_json(l.config())) for l in model.layers]
    theirs = [(ls.get("class"), ls.get("config")) for ls in spec["layers"]]
    if mine != theirs:
        diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        show = lambda lst: f"{lst[diff][0]}({lst[diff][1]})" if diff < len(lst) else "nothing"
        raise CheckpointError(f"{path}: was written for a different model: layer {diff} is {show(theirs)} "
                              f"there and {show(mine)} here")
    set_model_state(model, spec, path)
    t = tree["training"]
    try:
        optimizer.load_state_dict(t["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit: {e}") from None
    return t


def _int_state(layer) -> dict:
    """A layer's public integer attributes beyond its config (Dropout's ``step``): saved so a resumed run
    draws the same random numbers."""
    cfg = layer.config()
    return {k: int(v) for k, v in vars(layer).items()
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and not k.startswith("_") and k not in cfg}


def model_spec(tree, path) -> dict:
    """The model part of a loaded tree, or a clear error when the file holds none."""
    spec = tree.get("model")
    if tree.get("kind") not in ("model", "training") or not isinstance(spec, dict) \
            or not isinstance(spec.get("layers"), list):
        raise CheckpointError(f"{path}: is a gpucnn file but holds no model (kind {tree.get('kind')!r})")
    return spec


def as_json(value):
    """``value`` as it comes back from JSON (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(value))
