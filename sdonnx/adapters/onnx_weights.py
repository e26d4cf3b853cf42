"""A component's ONNX initializers read straight from its external data, without the onnx package.

The runtime must not depend on `onnx`; all a merge needs from the graph file is each initializer's
name, dtype, shape and where its bytes lie. A minimal protobuf walk finds those (ModelProto.graph ->
GraphProto.initializer -> TensorProto), skipping the nodes without decoding them.
"""
from pathlib import Path

import numpy as np

# onnx TensorProto.DataType -> numpy
_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}


class OnnxWeightsError(ValueError):
    """The graph file is not one this reader understands."""


def _varint(buf, pos):
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start=0, end=None):
    """(field number, wire type, value) of one protobuf message; length-delimited values as memoryview."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise OnnxWeightsError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _packed_varints(view):
    pos, out = 0, []
    while pos < len(view):
        value, pos = _varint(view, pos)
        out.append(value)
    return out


class _Tensor:
    __slots__ = ("dtype", "length", "location", "name", "offset", "raw", "shape")

    def __init__(self, view):
        self.name, self.dtype, self.location, self.offset, self.length, self.raw = "", None, None, 0, None, None
        dims = []
        for number, wire, value in _fields(view):
            if number == 1:
                dims += _packed_varints(value) if wire == 2 else [value]
            elif number == 2:
                self.dtype = value
            elif number == 8:
                self.name = bytes(value).decode()
            elif number == 9:
                self.raw = value
            elif number == 13:
                entry = {k: bytes(v).decode() for k, _, v in _fields(value)}
                self._external(entry.get(1), entry.get(2))
        self.shape = tuple(dims)

    def _external(self, key, value):
        if key == "location":
            self.location = value
        elif key == "offset":
            self.offset = int(value)
        elif key == "length":
            self.length = int(value)


def read_initializer_index(model_path):
    """model.onnx -> {initializer name: _Tensor} (bytes of external tensors are not read)."""
    buf = memoryview(Path(model_path).read_bytes())
    graph = next((v for n, w, v in _fields(buf) if n == 7 and w == 2), None)
    if graph is None:
        raise OnnxWeightsError(f"{model_path}: no graph")
    index = {}
    for number, wire, value in _fields(graph):
        if number == 5 and wire == 2:
            tensor = _Tensor(value)
            index[tensor.name] = tensor
    return index


class OnnxWeights:
    """get(name) -> the initializer as a numpy array, read from disk once and kept in memory.

    Arrays handed out are read-only: merges must copy before they add.
    """

    def __init__(self, model_path):
        self.path = Path(model_path)
        self._index = read_initializer_index(self.path)
        self._cache = {}

    def __contains__(self, name):
        return name in self._index

    def spec(self, name):
        """(shape, numpy dtype) of an initializer without reading it."""
        t = self._index[name]
        return t.shape, np.dtype(_dtype(t, self.path))

    def names(self):
        return list(self._index)

    def read(self, name):
        """The initializer as a fresh array, not kept (for one pass over all weights)."""
        return self._read(self._index[name])

    def get(self, name):
        if name not in self._cache:
            array = self._read(self._index[name])
            array.flags.writeable = False
            self._cache[name] = array
        return self._cache[name]

    def _read(self, t):
        dtype = _dtype(t, self.path)
        if t.location is not None:
            with open(self.path.parent / t.location, "rb") as f:
                f.seek(t.offset)
                data = f.read(t.length if t.length is not None else -1)
        elif t.raw is not None:
            data = bytes(t.raw)
        else:
            raise OnnxWeightsError(f"{self.path}: initializer {t.name!r} keeps its values in typed fields, "
                                   f"which this reader does not handle; re-convert the model")
        count = int(np.prod(t.shape, dtype=np.int64))
        array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), count=count).reshape(t.shape)
        return array.astype(dtype, copy=True)


def _dtype(t, path):
    if t.dtype not in _DTYPES:
        raise OnnxWeightsError(f"{path}: initializer {t.name!r} has ONNX data type {t.dtype}; "
                               f"supported: float32, float16, float64, int32, int64")
    return _DTYPES[t.dtype]
