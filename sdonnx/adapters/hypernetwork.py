"""A1111 hypernetworks: `<hypernet:name:multiplier>` tags, files from models/hypernetworks.

A file is a torch pickle (read by the weights-only reader: its code never runs) holding a dict whose integer
keys are widths, each mapping to two module state dicts (one for the attention's k input, one for its v
input), beside the settings A1111 saved with it. Each module is

    x + mlp(x) * multiplier

where mlp is the torch.nn.Sequential A1111 builds from the settings (Linear layers of `layer_structure`
times the width, an activation after each but the last unless `activate_output`, LayerNorm after each when
`is_layer_norm`, Dropout after those `dropout_structure` marks: it does nothing at inference but takes a
Sequential index, which shifts the state dict keys). Missing settings take A1111's defaults; old files use
`linear1`/`linear2` keys. How the modules enter the UNet: hypernetwork_graph.py.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import limits
from .torch_pickle import UnsafePickleError, load_torch_file

log = logging.getLogger(__name__)

EXTENSION = ".pt"  # A1111 lists only .pt files in its hypernetwork folder
DEFAULT_LAYER_STRUCTURE = (1, 2, 1)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which A1111 keeps
# the activations hypernetwork_graph.py builds; A1111 accepts any torch activation class by lower-case name,
# these are the ones that take no constructor arguments and act element-wise ("swish" is Hardswish there)
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "hardswish", "silu", "mish", "gelu",
               "celu", "selu", "relu6", "hardtanh", "hardsigmoid", "softplus", "softsign", "tanhshrink", "logsigmoid",
               "hardshrink", "softshrink", "rrelu", "prelu")
# A1111 builds them too but they cannot run on a hypernetwork's input: constructor arguments required, or
# an axis chosen by the input's rank (dim 0 of [batch, tokens, width] for softmax & co), or a halved width
_UNUSABLE = ("threshold", "glu", "softmax", "softmin", "softmax2d", "logsoftmax", "multiheadattention")


class HypernetworkError(ValueError):
    """A hypernetwork file that cannot be used: unreadable, refused by the safe reader, or inconsistent."""


# ---------------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class HypernetRequest:
    """One `<hypernet:name:multiplier>` tag (multiplier 1.0 when absent, as A1111)."""

    name: str
    multiplier: float = 1.0


def hypernet_requests(extra_networks):
    """ExtraNetwork(kind, name, args) items from the prompt parser -> HypernetRequests, in prompt order."""
    requests = []
    for network in extra_networks:
        if network.kind != "hypernet":
            continue
        try:
            multiplier = limits.finite("multiplier", float(network.args[0])) if network.args else 1.0
        except ValueError:
            raise HypernetworkError(f"<hypernet:{network.name}:{':'.join(network.args)}>: the multiplier "
                                    f"{network.args[0]!r} is not a number") from None
        requests.append(HypernetRequest(network.name, multiplier))
    return requests


# ---------------------------------------------------------------------------------------------- modules

@dataclass(frozen=True)
class Layer:
    """One entry of the Sequential that has an effect: kind "linear" (weight [out, in], bias [out]), "norm"
    (LayerNorm weight, bias) or an activation name (params: PReLU's slope, else none)."""

    kind: str
    params: tuple = ()


@dataclass(frozen=True)
class Module:
    """A1111's HypernetworkModule at inference: x + mlp(x) * multiplier, mlp the layers in order."""

    layers: tuple


@dataclass(frozen=True)
class Hypernetwork:
    """A parsed file. modules: {width: (k Module, v Module)}; stamp identifies this version of the file."""

    name: str
    modules: dict
    settings: dict
    path: Path | None = None
    stamp: tuple = ()

    @property
    def widths(self):
        return sorted(self.modules)


def settings_of(data):
    """The file's settings with A1111's defaults where a key is missing (as its Hypernetwork.load reads them)."""
    layer_structure = data.get("layer_structure") or DEFAULT_LAYER_STRUCTURE
    dropout = data.get("dropout_structure")
    use_dropout = bool(dropout is not None and any(dropout)) or bool(data.get("use_dropout", False))
    last_layer_dropout = bool(data.get("last_layer_dropout", False))
    if dropout is None:
        dropout = _dropout_structure(layer_structure, use_dropout, last_layer_dropout)
    return {"layer_structure": [float(x) for x in layer_structure], "activation_func": data.get("activation_func"),
            "is_layer_norm": bool(data.get("is_layer_norm", False)),
            "activate_output": bool(data.get("activate_output", True)),
            "dropout_structure": [float(x) for x in dropout]}


def _dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    """A1111's rule for files without a dropout_structure: 0.3 after every hidden layer but the last hidden
    one, which has it only with last_layer_dropout; never after the input or the output layer."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


def _plan(width, settings):
    """[(Sequential index, kind, parameter shapes)] of the Sequential A1111 builds for `width`, dropouts
    left out (they only take an index)."""
    structure, activation = settings["layer_structure"], settings["activation_func"]
    dropout = settings["dropout_structure"]
    plan, index = [], 0
    for i in range(len(structure) - 1):
        size_in, size_out = int(width * structure[i]), int(width * structure[i + 1])
        plan.append((index, "linear", {"weight": (size_out, size_in), "bias": (size_out,)}))
        index += 1
        last = i >= len(structure) - 2
        if activation not in (None, "linear") and not (last and not settings["activate_output"]):
            plan.append((index, activation, {"weight": (1,)} if activation == "prelu" else {}))
            index += 1
        if settings["is_layer_norm"]:
            plan.append((index, "norm", {"weight": (size_out,), "bias": (size_out,)}))
            index += 1
        if i + 1 < len(dropout) and dropout[i + 1] > 0:
            index += 1
    return plan


def _check_settings(name, settings):
    structure, activation = settings["layer_structure"], settings["activation_func"]
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise HypernetworkError(f"hypernetwork {name}: layer_structure {structure} must start and end with 1")
    if activation not in (None, *ACTIVATIONS):
        why = "it cannot act on a hypernetwork's input" if activation in _UNUSABLE else "unknown"
        raise HypernetworkError(f"hypernetwork {name}: activation function {activation!r} is not supported ({why}); "
                                f"supported: {', '.join(ACTIVATIONS)}")
    dropout = settings["dropout_structure"]
    if len(dropout) < len(structure) or any(p >= 1 for p in dropout[:len(structure)]):
        raise HypernetworkError(f"hypernetwork {name}: dropout_structure {dropout} must hold a probability below 1 "
                                f"for each of the {len(structure)} layers")


def _module(name, width, which, state, settings):
    """One HypernetworkModule's state dict (old linear1/linear2 keys renamed) -> Module."""
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise HypernetworkError(f"hypernetwork {name}: the {which} module of width {width} is not a state dict")
    renamed = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
    state = {renamed.get(k, k): v for k, v in state.items()}
    plan = _plan(width, settings)
    expected = {f"linear.{index}.{p}": shape for index, _, params in plan for p, shape in params.items()}
    if set(state) != set(expected):
        raise HypernetworkError(
            f"hypernetwork {name}: the {which} module of width {width} has keys {_keys(state)}, but its settings "
            f"(layer_structure {settings['layer_structure']}, activation {settings['activation_func']}, layer norm "
            f"{settings['is_layer_norm']}, dropout {settings['dropout_structure']}) make {_keys(expected)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise HypernetworkError(f"hypernetwork {name}: {which} module of width {width}: {key} has shape "
                                    f"{list(state[key].shape)}, expected {list(shape)}")
    layers = tuple(Layer(kind, tuple(np.asarray(state[f"linear.{index}.{p}"], np.float32) for p in params))
                   for index, kind, params in plan)
    return Module(layers)


def _keys(mapping):
    return ", ".join(sorted(mapping)) or "none"


def parse_hypernetwork(data, name, path=None, stamp=()):
    """The object A1111 saves (a dict: integer widths -> (k state dict, v state dict), plus settings) ->
    Hypernetwork. Raises HypernetworkError for anything A1111 could not load either."""
    if not isinstance(data, dict):
        raise HypernetworkError(f"hypernetwork {name}: the file holds a {type(data).__name__}, not a dictionary")
    settings = settings_of(data)
    _check_settings(name, settings)
    modules = {}
    for width, pair in data.items():
        if type(width) is not int:  # A1111 reads only integer keys as widths; the rest are settings
            continue
        if width <= 0 or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise HypernetworkError(f"hypernetwork {name}: width {width} must map to a (k, v) pair of state dicts")
        modules[width] = (_module(name, width, "k", pair[0], settings), _module(name, width, "v", pair[1], settings))
    if not modules:
        raise HypernetworkError(f"hypernetwork {name}: the file holds no modules (no integer width keys)")
    return Hypernetwork(name=name, modules=modules, settings=settings, path=Path(path) if path else None, stamp=stamp)


def load_hypernetwork(path, name=None):
    path = Path(path)
    try:
        stat = path.stat()
        data = load_torch_file(path)
    except UnsafePickleError as e:
        raise HypernetworkError(f"hypernetwork {name or path.stem}: {e}") from None
    except OSError as e:
        raise HypernetworkError(f"hypernetwork {name or path.stem}: cannot read {path} ({e.strerror or e})") from None
    return parse_hypernetwork(data, name or path.stem, path, (str(path), stat.st_mtime_ns, stat.st_size))


class HypernetworkLibrary:
    """The hypernetwork folder: `.pt` files found by stem in it and its subfolders (as A1111 lists them;
    "None" is never a name), parsed once per version of the file."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._cache = {}  # path -> ((mtime, size), Hypernetwork)

    def paths(self):
        """{name: path} in case-insensitive path order; where two files share a stem, the later path (A1111
        fills a dict in that order)."""
        found = {}
        if self.folder.is_dir():
            for path in sorted(self.folder.rglob(f"*{EXTENSION}"), key=lambda p: str(p).lower()):
                if path.is_file() and path.stem != "None":
                    found[path.stem] = path
        return found

    def names(self):
        return sorted(self.paths(), key=str.lower)

    def get(self, name):
        """The parsed file named `name`, or None when the folder has no such file."""
        path = self.paths().get(name)
        if path is None:
            return None
        st = path.stat()
        cached = self._cache.get(path)
        if cached is None or cached[0] != (st.st_mtime_ns, st.st_size):
            self._cache[path] = ((st.st_mtime_ns, st.st_size), load_hypernetwork(path, name))
        return self._cache[path][1]
