"""LoRA / LyCORIS files applied at run time: parsed, matched to the model's layers, merged in numpy into
replacement initializers for the text-encoder and UNet graphs (no re-export).

    library = LoraLibrary(lora_dir)                 # files by stem, parsed once (cached by mtime)
    merger = LoraMerger(model_folder, manifest)     # base initializers read once, kept in memory
    applied = merger.apply([(library.get("x"), te_w, unet_w), ...])
    applied.replacements["unet"]                    # {ONNX initializer name: merged array}

Semantics follow A1111: W += multiplier * scale * delta, te multiplier for text-encoder layers, unet
multiplier for UNet layers, files applied in order. Keys that match no layer are reported and logged as a
warning; a file whose layers have other shapes (or SDXL-only keys on an SD 1/2 model) is a LoraError.
"""
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import limits
from ..infotext import addnet_hash, sha256_file
from . import networks
from .names import PREFIXES, SDXL_ONLY_PREFIXES, Resolver, modules
from .onnx_weights import OnnxWeights
from .torch_pickle import load_torch_file, widen_bfloat16

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pt", ".ckpt")
TEXT_HIDDEN_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}

# file key suffix -> tensor kind (networks.KINDS); kohya/LyCORIS, PEFT and old diffusers spellings
_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    **{f".{k}": k for k in networks.LOHA + networks.LOKR + networks.FULL + networks.EXTRA},
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
_PEFT_NAMED = re.compile(r"\.lora_([AB])\.[^.]+\.weight$")  # PEFT with the adapter name left in


class LoraError(ValueError):
    """A LoRA file that cannot be used with this model (missing, unreadable, or made for another model)."""


# ---------------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class LoraRequest:
    """One `<lora:name:te:unet>` tag: file stem and the two multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    @classmethod
    def from_args(cls, name, args=()):
        """A1111's rules: positional te then unet (unet defaults to te), or named `te=`, `unet=`."""
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        try:
            te = limits.finite("te", float(named.get("te", positional[0] if positional else 1.0)))
            unet = limits.finite("unet", float(named.get("unet", positional[1] if len(positional) > 1 else te)))
        except ValueError as e:
            raise LoraError(f"<lora:{name}:{':'.join(args)}>: multipliers must be numbers ({e})") from e
        return cls(name, te, unet)


def lora_requests(extra_networks):
    """ExtraNetwork(kind, name, args) items from the prompt parser -> LoraRequests (other kinds ignored)."""
    return [LoraRequest.from_args(n.name, list(n.args)) for n in extra_networks if n.kind == "lora"]


# ---------------------------------------------------------------------------------------------- files

@dataclass
class LoraFile:
    """A parsed file: {module key: {kind: float32 array}}, plus keys that are not LoRA tensors."""

    name: str
    path: Path
    modules: dict
    unknown: list
    metadata: dict
    shorthash: str
    stamp: tuple = ()  # (path, mtime_ns, size): identifies this version of the file in cache keys


def read_tensors(path):
    """(tensors as numpy arrays, metadata) from .safetensors, or .pt/.ckpt without running pickle code."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        data = load_torch_file(path)
    except LoraError:
        raise
    except Exception as e:  # safetensors and the unpickler raise several types for a damaged file
        raise LoraError(f"cannot read LoRA file {path}: {e}") from e
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) for v in data.values()):
        raise LoraError(f"{path} does not hold a flat dictionary of tensors")
    return data, {}


_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path):
    """(tensors, metadata) of a .safetensors file; bfloat16 widened to float32 (numpy has no bfloat16)."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 + size:
        raise ValueError("truncated header")
    header = json.loads(data[8:8 + size])
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size:]
    tensors = {}
    for key, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {key} has dtype {info['dtype']}; supported: {', '.join(_ST_DTYPES)}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(body):
            raise ValueError(f"tensor {key} lies outside the file")
        array = np.frombuffer(body[start:end], _ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = widen_bfloat16(array)
        tensors[key] = array
    return tensors, metadata


def parse_lora(tensors, metadata=None, name="lora", path=None):
    """Group a file's tensors by module. PEFT/diffusers files get their alpha from the adapter metadata
    diffusers writes (`lora_adapter_metadata`); without it alpha = rank (scale 1), as diffusers loads them."""
    mods, unknown = {}, []
    for key, value in tensors.items():
        module, kind = split_key(key)
        if module is None:
            unknown.append(key)
            continue
        mods.setdefault(module, {})[kind] = np.asarray(value, dtype=np.float32)
    _peft_alphas(mods, metadata or {})
    shorthash = (metadata or {}).get("sshs_model_hash") or (_file_hash(path) if path else "")
    stamp = (str(path), Path(path).stat().st_mtime_ns, Path(path).stat().st_size) if path else (name, id(mods))
    return LoraFile(name=name, path=Path(path) if path else None, modules=mods, unknown=unknown,
                    metadata=dict(metadata or {}), shorthash=shorthash[:12], stamp=stamp)


def load_lora(path, name=None):
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    tensors, metadata = read_tensors(path)
    if not tensors:
        raise LoraError(f"{path} holds no tensors")
    return parse_lora(tensors, metadata, name=name or path.stem, path=path)


def split_key(key):
    """'lora_unet_x.lora_down.weight' -> ('lora_unet_x', 'down'); (None, None) for other tensors."""
    match = _PEFT_NAMED.search(key)
    if match:
        return key[: match.start()], "down" if match.group(1) == "A" else "up"
    for suffix in _SUFFIX_ORDER:
        if key.endswith(suffix):
            return key[: -len(suffix)], _SUFFIXES[suffix]
    return None, None


def _peft_alphas(mods, metadata):
    raw = metadata.get("lora_adapter_metadata")
    config = json.loads(raw) if raw else {}
    for module, params in mods.items():
        if "alpha" in params or "down" not in params or module.startswith("lora_"):
            continue
        component = module.split(".", 1)[0]
        if f"{component}.lora_alpha" not in config:
            continue
        alpha = _pattern(config.get(f"{component}.alpha_pattern") or {}, module, config[f"{component}.lora_alpha"])
        rank = params["down"].shape[0]
        if config.get(f"{component}.use_rslora"):
            alpha = alpha * rank ** 0.5  # PEFT's rsLoRA scale alpha / sqrt(r), as alpha' / r
        params["alpha"] = np.float32(alpha)


def _pattern(patterns, module, default):
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _file_hash(path):
    path = Path(path)
    return addnet_hash(path) if path.suffix == ".safetensors" else sha256_file(path)


class LoraLibrary:
    """The LoRA folder: files found by stem (searching subfolders, as A1111), parsed once per mtime."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._cache = {}

    def find(self, name):
        if self.folder.is_dir():
            for ext in EXTENSIONS:
                found = sorted(p for p in self.folder.rglob(f"*{ext}") if p.stem == name)
                if found:
                    return found[0]
        available = self.names()
        hint = f"; available: {', '.join(available[:20])}" if available else " (the folder has no LoRA files)"
        raise LoraError(f"LoRA {name!r} not found in {self.folder}{hint}")

    def names(self):
        if not self.folder.is_dir():
            return []
        return sorted({p.stem for ext in EXTENSIONS for p in self.folder.rglob(f"*{ext}")})

    def get(self, name):
        path = self.find(name)
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            self._cache[path] = (stamp, load_lora(path, name))
        return self._cache[path][1]


# ---------------------------------------------------------------------------------------------- merging

@dataclass
class MatchReport:
    """Which of a file's modules found a layer of the model ({key: 'component.module'}) and which not
    ({key: why})."""

    name: str
    matched: dict = field(default_factory=dict)
    unmatched: dict = field(default_factory=dict)

    def summary(self):
        return f"LoRA {self.name}: {len(self.matched)} layers matched, {len(self.unmatched)} keys unmatched"


@dataclass
class Applied:
    """The result of one LoRA set: per component, a cache key and the replacement initializers."""

    keys: dict
    replacements: dict
    reports: list
    hashes: dict


class LoraMerger:
    """Merges LoRA files into a model's text-encoder and UNet weights. Base initializers are read from the
    external data once, on first use, and kept in memory; each merge starts from them."""

    def __init__(self, folder, manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self.components = [c for c in PREFIXES if c in manifest.components]
        self._weights = {}
        self._resolver = Resolver({c: modules(manifest.components[c].weights, c) for c in self.components})

    def base(self, component):
        if component not in self._weights:
            self._weights[component] = OnnxWeights(self.folder / self.manifest.components[component].path)
        return self._weights[component]

    def match(self, lora):
        """(MatchReport, {(component, module): params}) for one parsed file; raises LoraError for files
        made for another model family."""
        sdxl = [k for k in lora.modules if k.startswith(SDXL_ONLY_PREFIXES) and "text_encoder_2" not in self.components]
        if sdxl:
            raise LoraError(f"LoRA {lora.name} is for SDXL (it has keys such as {sdxl[0]}); "
                            f"the model {self.manifest.name} is {self.manifest.family}")
        report = MatchReport(lora.name, unmatched={k: "not a LoRA tensor" for k in lora.unknown})
        found = {}
        for key, params in lora.modules.items():
            if networks.network_type(params) is None:
                report.unmatched[key] = f"incomplete module (only {', '.join(sorted(params))})"
                continue
            target = self._resolver.resolve(key)
            if target is None:
                report.unmatched[key] = f"no such layer in {self.manifest.name}"
                continue
            report.matched[key] = ".".join(target)
            found[target] = params
        if not found:
            raise LoraError(f"none of the {len(lora.modules)} modules of LoRA {lora.name} matches a layer of "
                            f"{self.manifest.name} ({self.manifest.family}){self._family_hint(lora)}")
        if report.unmatched:
            log.warning("%s; unmatched: %s", report.summary(), _first_items(report.unmatched))
        return report, found

    def apply(self, loras):
        """loras: [(LoraFile, te multiplier, unet multiplier)] in tag order -> Applied."""
        current, keys, reports, hashes = {}, {}, [], {}
        for lora, te, unet in loras:
            report, found = self.match(lora)
            reports.append(report)
            hashes[lora.name] = lora.shorthash
            touched = set()
            for (component, module), params in found.items():
                multiplier = te if component.startswith("text_encoder") else unet
                if multiplier != 0:
                    self._add(current, lora, component, module, params, multiplier)
                    touched.add((component, multiplier))
            for component, multiplier in sorted(touched):
                keys.setdefault(component, []).append((lora.stamp, multiplier))
        replacements = {c: {name: array.astype(self.base(c).spec(name)[1]) for name, array in arrays.items()}
                        for c, arrays in current.items()}
        return Applied(keys={c: tuple(k) for c, k in keys.items()}, replacements=replacements,
                       reports=reports, hashes=hashes)

    def _add(self, current, lora, component, module, params, multiplier):
        weights = self.manifest.components[component].weights
        arrays = current.setdefault(component, {})
        weight_init = weights[f"{component}.{module}.weight"]
        weight = arrays.get(weight_init)
        if weight is None:
            weight = self.base(component).get(weight_init).astype(np.float32)
        try:
            updown, ex_bias = networks.delta(params, weight)
        except networks.ShapeMismatch as e:
            raise LoraError(f"LoRA {lora.name} does not fit {self.manifest.name} ({self.manifest.family}): layer "
                            f"{component}.{module}: {e}{self._family_hint(lora)}") from e
        if updown is not None:
            arrays[weight_init] = weight + np.float32(multiplier) * updown
        bias_name = weights.get(f"{component}.{module}.bias")
        if ex_bias is not None and bias_name:
            bias = arrays.get(bias_name)
            bias = self.base(component).get(bias_name).astype(np.float32) if bias is None else bias
            arrays[bias_name] = bias + np.float32(multiplier) * ex_bias.reshape(bias.shape)

    def _family_hint(self, lora):
        widths = {p["down"].shape[1] for k, p in lora.modules.items()
                  if "down" in p and re.search(r"(te|text_encoder)\w*[._]self_attn[._]q_proj$", k)}
        families = {TEXT_HIDDEN_FAMILY.get(w, f"hidden size {w}") for w in widths}
        return f"; it looks made for {', '.join(sorted(families))}" if families else ""


def _first_items(mapping, n=5):
    items = [f"{k} ({v})" for k, v in list(mapping.items())[:n]]
    return ", ".join(items) + (f" and {len(mapping) - n} more" if len(mapping) > n else "")


class Loras:
    """What a pipeline holds: the LoRA folder and the merger for its model. apply(requests) -> Applied,
    with no replacements for components no tag touches (those keep their base session)."""

    def __init__(self, model_folder, manifest, lora_dir):
        self.library = LoraLibrary(lora_dir)
        self.merger = LoraMerger(model_folder, manifest)

    def apply(self, requests):
        return self.merger.apply([(self.library.get(r.name), r.te, r.unet) for r in requests])
