"""Read torch `.pt`/`.ckpt` files (zip format) into numpy without torch and without running their code.

A pickle can name any callable; this unpickler resolves only the handful of names a saved tensor
dictionary uses (tensor rebuilders, storage types, OrderedDict) to local stand-ins, and refuses
everything else. Shared by LoRA and textual-inversion loading.
"""
import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

# torch storage class -> numpy dtype; bfloat16 is read as its upper float32 half
_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafePickleError(ValueError):
    """The file is not a plain tensor dictionary (or not a torch zip file at all)."""


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not size:
        return np.array(storage[offset])
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf, prefix, path):
        super().__init__(file)
        self._zf, self._prefix, self._path = zf, prefix, path
        self._storages = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafePickleError(f"{self._path}: refusing to load {module}.{name} (only tensor data is read "
                                f"from .pt files; convert the file to .safetensors if it is trusted)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self._path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if key not in self._storages:
            raw = self._zf.read(f"{self._prefix}data/{key}")
            self._storages[key] = _storage_array(raw, storage_type.name)
        return self._storages[key]


def widen_bfloat16(bits):
    """bfloat16 values given as their uint16 bit patterns -> float32 (bfloat16 is float32's upper half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _storage_array(raw, kind):
    dtype = _STORAGES[kind]
    if dtype == "bfloat16":
        return widen_bfloat16(np.frombuffer(raw, "<u2"))
    return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).astype(dtype)


def load_torch_file(path):
    """A torch zip-format pickle -> its object, tensors as numpy arrays. Raises UnsafePickleError for
    anything that is not plain data (the file's code is never run)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafePickleError(f"{path}: not a torch zip file (legacy pre-1.6 torch pickles are not read); "
                                f"convert it to .safetensors")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise UnsafePickleError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        order = zf.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in zf.namelist() else "little"
        if order != "little":
            raise UnsafePickleError(f"{path}: big-endian tensors are not supported")
        with zf.open(pickles[0]) as f:
            try:
                return _Unpickler(f, zf, prefix, path).load()
            except UnsafePickleError:
                raise
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
                raise UnsafePickleError(f"{path}: cannot read the pickle: {e}") from e
