"""Read torch `.pt`/`.ckpt` files (zip format) into numpy without torch and without running their code.

A pickle can name any callable; this unpickler resolves only the handful of names a saved tensor
dictionary uses (tensor rebuilders, storage types, OrderedDict) to local stand-ins, and refuses
everything else. Shared by LoRA and textual-inversion loading.

The file is hostile until proven otherwise: each storage must be exactly the bytes its pickle
declares, each tensor view must lie inside its storage (offsets, sizes and strides non-negative), and
the bytes unpacked and built may not exceed a multiple of the file's size on disk (zip bombs, and
stride-0 views that would expand one number into gigabytes), all checked before anything is read
or allocated.
"""
import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..limits import TORCH_FILE_MAX_EXPANSION, TORCH_FILE_MIN_BUDGET

# torch storage class -> numpy dtype; bfloat16 is read as its upper float32 half
_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafePickleError(ValueError):
    """The file is not a plain tensor dictionary (or not a well-formed torch zip file at all)."""


@dataclass(frozen=True, slots=True)
class _StorageType:  # frozen with slots: a pickle's BUILD opcode cannot rename it
    name: str

    @property
    def itemsize(self):
        return 2 if self.name == "BFloat16Storage" else np.dtype(_STORAGES[self.name]).itemsize


class _Budget:
    """Bytes this file may still unpack or build."""

    def __init__(self, path, file_size):
        self.path, self.left = path, max(TORCH_FILE_MAX_EXPANSION * file_size, TORCH_FILE_MIN_BUDGET)
        self.file_size = file_size

    def spend(self, nbytes, what):
        if nbytes > self.left:
            raise UnsafePickleError(
                f"{self.path}: {what} needs {nbytes} bytes, more than this {self.file_size}-byte file may unpack "
                f"to (at most {TORCH_FILE_MAX_EXPANSION}x its size: torch stores tensors uncompressed)")
        self.left -= nbytes


def _rebuild_parameter(data, *_):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf, prefix, path, budget):
        super().__init__(file)
        self._zf, self._prefix, self._path, self._budget = zf, prefix, path, budget
        self._storages = {}  # record key -> storage array
        self._storage_ids = set()  # id() of those arrays: what a tensor may be built from
        self._allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        }

    def _refuse(self, why):
        return UnsafePickleError(f"{self._path}: {why}")

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise self._refuse(f"refusing to load {module}.{name} (only tensor data is read from .pt files; convert "
                           f"the file to .safetensors if it is trusted)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_count(pid[4])):
            raise self._refuse("unexpected persistent id (not a torch storage reference)")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type, numel)
            self._storage_ids.add(id(self._storages[key]))
        storage = self._storages[key]
        if storage.size != numel:
            raise self._refuse(f"storage {key} is declared with {numel} and {storage.size} elements")
        return storage

    def _read_storage(self, key, storage_type, numel):
        """The storage's record, read only once its size is what the pickle declares and fits the budget."""
        name = f"{self._prefix}data/{key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise self._refuse(f"storage {key} is missing from the archive") from None
        nbytes = numel * storage_type.itemsize
        if info.file_size != nbytes:
            raise self._refuse(f"storage {key} holds {info.file_size} bytes; its tensors declare {nbytes} "
                               f"({numel} x {storage_type.itemsize})")
        self._budget.spend(nbytes, f"storage {key}")
        raw = self._zf.read(name)
        if len(raw) != nbytes:
            raise self._refuse(f"storage {key} is truncated ({len(raw)} of {nbytes} bytes)")
        return _storage_array(raw, storage_type.name)

    def _rebuild_tensor(self, storage, offset, size, stride, *_):
        """A tensor view (offset, size, stride in elements) of one of this file's storages, copied out."""
        if id(storage) not in self._storage_ids:
            raise self._refuse("a tensor is built from something that is not one of the file's storages")
        if not (_is_count(offset) and _is_counts(size) and _is_counts(stride) and len(size) == len(stride)):
            raise self._refuse(f"a tensor view has a bad offset, size or stride ({_brief(offset)}, {_brief(size)}, "
                               f"{_brief(stride)}): each must be a non-negative integer, size and stride as long")
        numel = math.prod(size)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
        if last >= storage.size:
            raise self._refuse(f"a tensor view of shape {tuple(size)} (offset {offset}, strides {tuple(stride)}) "
                               f"reaches element {last} of a storage of {storage.size}")
        self._budget.spend(numel * storage.itemsize, f"a tensor of shape {tuple(size)}")
        if not numel:
            return np.zeros(tuple(size), storage.dtype)
        item = storage.itemsize
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                               strides=tuple(s * item for s in stride), writeable=False)
        return np.array(view)


def _is_count(value):
    return type(value) is int and value >= 0


def _is_counts(values):
    return isinstance(values, (tuple, list)) and len(values) <= 64 and all(_is_count(v) for v in values)


def _brief(value):
    """A short, repr-free description of a pickled value for an error message."""
    if isinstance(value, (tuple, list)) and len(value) <= 8:
        return "(" + ", ".join(_brief(v) for v in value) + ")"
    return str(value) if type(value) is int and abs(value) < 1 << 64 else type(value).__name__


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
    anything that is not plain, well-formed tensor data (the file's code is never run)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafePickleError(f"{path}: not a torch zip file (legacy pre-1.6 torch pickles are not read); "
                                f"convert it to .safetensors")
    try:
        with zipfile.ZipFile(path) as zf:
            return _load_archive(zf, path, _Budget(path, path.stat().st_size))
    except UnsafePickleError:
        raise
    except OSError as e:  # a file that vanished or cannot be read: say so plainly
        raise UnsafePickleError(f"{path}: cannot read the file ({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001 - a crafted pickle or zip raises anything; it all means "bad file"
        raise UnsafePickleError(f"{path}: damaged or not a torch file ({type(e).__name__}: {str(e)[:200]})") from e


def _load_archive(zf, path, budget):
    pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise UnsafePickleError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in zf.namelist():
        budget.spend(zf.getinfo(f"{prefix}byteorder").file_size, "the byteorder record")
        if zf.read(f"{prefix}byteorder") != b"little":
            raise UnsafePickleError(f"{path}: big-endian tensors are not supported")
    budget.spend(zf.getinfo(pickles[0]).file_size, "the pickle")
    data = zf.read(pickles[0])
    try:
        return _Unpickler(io.BytesIO(data), zf, prefix, path, budget).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise UnsafePickleError(f"{path}: cannot read the pickle: {e}") from e
