"""`sdonnx convert`: a checkpoint (diffusers folder, single file, or hub id) -> an sdonnx model folder.

The folder is built beside the target under a temporary name and moved into place only when every
component has passed its parity check; the manifest is written last, so an interrupted convert never
leaves anything that loads.
"""
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sdonnx.controlnet.model import FORMAT as CONTROLNET_FORMAT
from sdonnx.infotext import model_hash
from sdonnx.limits import MAX_MANIFEST_BYTES
from sdonnx.manifest import (COMPONENTS, FAMILIES, FORMAT, MANIFEST_NAME, PREDICTIONS, Component, Manifest,
                             NoiseSchedule, TextEncoderInfo, relative_path)

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = ("fp32", "fp16")
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


class ConvertError(ValueError):
    """A convert that cannot go ahead; the message says why and what to do."""


@dataclass
class Loaded:
    """A source loaded into torch modules plus the facts the manifest needs."""

    text_encoder: object
    unet: object
    vae: object
    tokenizer: object
    family: str
    prediction_type: str
    noise_schedule: NoiseSchedule
    name: str
    model_hash: str | None
    source: dict
    # SDXL: the second (bigG) encoder, and manifest facts of the family (converters/sdxl.py); the refiner
    # has no first encoder (text_encoder None)
    text_encoder_2: object = None
    tokenizer_2: object = None
    manifest_extra: dict = field(default_factory=dict)

    def text_encoders(self):
        """{component name: (model, tokenizer)} of the encoders present."""
        pairs = {"text_encoder": (self.text_encoder, self.tokenizer),
                 "text_encoder_2": (self.text_encoder_2, self.tokenizer_2)}
        return {name: pair for name, pair in pairs.items() if pair[0] is not None}


def convert(source, outdir, *, force=False, family=None, prediction=None, dtype="fp32", tolerance=None,
            progress=None, optimize=None, quantize=None):
    """Convert `source` into `outdir`; returns the Manifest. `progress(message)` reports each stage.

    optimize: None or the target provider kind ("cpu"/"gpu") of ONNX Runtime's fusions; dtype "fp16"
    and quantize "int8" likewise write a derived graph beside each fp32 base graph (converters/optimize.py)."""
    from .optimize import OptimizeError, Plan

    report = progress or (lambda message: log.info(message))
    from .controlnet import convert_controlnet, is_controlnet

    if is_controlnet(source):  # told from its keys: a ControlNet goes to its own, smaller folder layout
        if dtype != "fp32" or optimize or quantize or family or prediction:
            raise ConvertError(f"{source} is a ControlNet: it converts to fp32 as it is (no --dtype, --optimize, "
                               f"--quantize, --family or --prediction)")
        return convert_controlnet(source, outdir, force=force, tolerance=tolerance or DEFAULT_TOLERANCE["fp32"],
                                  report=report)
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    try:
        plan = Plan(optimize=optimize, dtype=dtype, quantize=quantize)
    except OptimizeError as e:
        raise ConvertError(str(e)) from e
    if family is not None and family not in FAMILIES:
        raise ConvertError(f"family {family!r} is not supported; choose one of {', '.join(FAMILIES)}")
    if prediction is not None and prediction not in PREDICTIONS:
        raise ConvertError(f"prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")
    outdir = Path(outdir).absolute()
    if outdir.exists() and not outdir.is_dir():
        raise ConvertError(f"output {str(outdir)!r} exists and is not a folder")
    _check_replaceable(outdir, force)
    report(f"loading {source}")
    loaded = load_source(source, family=family, prediction=prediction)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(outdir, report)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-{os.getpid()}-", dir=outdir.parent))
    try:
        manifest = _build(loaded, staging, tolerance or DEFAULT_TOLERANCE["fp32"], report, plan)
        _publishable(staging)
        _check_replaceable(outdir, force)  # again: the folder may have changed during a long convert
        _replace_folder(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report(f"wrote {outdir}")
    return manifest


def _build(loaded, staging, tolerance, report, plan=None):
    from sdonnx.runtime.session import return_freed_memory

    from .components import component_specs
    from .export import export_component, parity_check, weight_map
    from .optimize import Plan, derive_checked

    components = {}
    encoders = loaded.text_encoders()
    for spec in component_specs({name: model for name, (model, _) in encoders.items()}, loaded.unet, loaded.vae):
        report(f"exporting {spec.name}")
        path = export_component(spec, staging)
        report(f"checking {spec.name} against torch")
        err = parity_check(spec, path, tolerance)
        return_freed_memory()
        derived = derive_checked(spec, path, plan or Plan(), staging, tolerance, report)
        # the exports, fusions and parity sessions free GBs in blocks glibc keeps for reuse (measured on the
        # full-size SD 1.5 with --optimize: 11.6 GB kept after the UNet, 18.8 GB peak anonymous memory);
        # handing them back before the next component keeps the convert's peak at the largest single step
        return_freed_memory()
        c = spec.contract
        components[spec.name] = Component(
            path=relative_path(path, staging), inputs={k: list(v) for k, v in c.inputs.items()},
            outputs={k: list(v) for k, v in c.outputs.items()}, input_dtypes=dict(c.input_dtypes),
            weights={_canonical_weight_name(spec.weight_namespace, k): v for k, v in weight_map(spec, path).items()},
            parity_max_abs_err=err, **derived)
    text_info = [_save_tokenizer(name, model, tokenizer, staging, loaded.family)
                 for name, (model, tokenizer) in encoders.items()]
    manifest = _manifest(loaded, components, text_info, plan or Plan())
    # last: a folder without its manifest is not a model
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def _canonical_weight_name(namespace, name):
    """diffusers-style names; the text encoder's always under `text_model.` (transformers 5 drops it),
    as LoRA files name them (lora_te_text_model_encoder_...)."""
    if namespace.startswith("text_encoder") and not name.startswith(("text_model.", "text_projection.")):
        name = "text_model." + name
    return f"{namespace}.{name}"


def _publishable(folder):
    """mkdtemp makes a private folder; give the model the usual permissions (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _save_tokenizer(name, model, tokenizer, staging, family):
    """The encoder's token-embedding table and tokenizer beside its graph -> its TextEncoderInfo."""
    from safetensors.torch import save_file

    from .components import token_embedding
    from .sdxl import text_encoder_facts

    table = token_embedding(model).weight.detach().float().contiguous()
    save_file({"weight": table}, str(staging / name / "token_embeddings.safetensors"))
    folder = name.replace("text_encoder", "tokenizer")  # tokenizer, tokenizer_2 as in diffusers folders
    (staging / folder).mkdir()
    tokenizer.backend_tokenizer.save(str(staging / folder / "tokenizer.json"))
    te = model.config
    return TextEncoderInfo(
        component=name, tokenizer=f"{folder}/tokenizer.json",
        token_embeddings=f"{name}/token_embeddings.safetensors", hidden_size=te.hidden_size,
        num_layers=te.num_hidden_layers, max_length=te.max_position_embeddings,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        **text_encoder_facts(family, model))


def _manifest(loaded, components, text_info, plan):
    import diffusers
    import torch
    import transformers

    from sdonnx import __version__

    unet, vae = loaded.unet.config, loaded.vae.config
    return Manifest(
        name=loaded.name, family=loaded.family, prediction_type=loaded.prediction_type,
        components=components, text_encoders=text_info, noise_schedule=loaded.noise_schedule,
        latent_channels=vae.latent_channels, unet_in_channels=unet.in_channels,
        vae_scale_factor=2 ** (len(vae.block_out_channels) - 1),
        vae_scaling_factor=float(vae.scaling_factor), sample_size=int(unet.sample_size),
        model_hash=loaded.model_hash, source=loaded.source, **loaded.manifest_extra,
        converter={"sdonnx": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                   "transformers": transformers.__version__, "dtype": plan.dtype, "optimize": plan.optimize,
                   "quantize": plan.quantize, "tolerance_rel": None})


# what a converted model folder may hold besides the files its manifest names (the converter's own folders,
# and what file browsers leave behind)
_MODEL_NAMES = frozenset({MANIFEST_NAME, *COMPONENTS, "tokenizer", "tokenizer_2", ".DS_Store", "Thumbs.db",
                          "desktop.ini"})


def _check_replaceable(outdir, force):
    """The output may be replaced: it is missing, empty, or (with force) a converted model folder and
    nothing else. Any other folder is refused whatever the flags: --force once replaced a folder of photos."""
    if not outdir.is_dir() or not any(outdir.iterdir()):
        return
    why = _not_a_model(outdir)
    if why:
        raise ConvertError(f"output folder {str(outdir)!r} {why}; convert writes only into an empty folder or "
                           f"replaces a converted model (--force), never other files: choose another folder")
    if not force:
        raise ConvertError(f"output folder {str(outdir)!r} holds a converted model; pass --force to replace it")


def _not_a_model(folder):
    """Why `folder` is not a converted model folder (None when it is one)."""
    path = folder / MANIFEST_NAME
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, CONTROLNET_FORMAT):
        return f"is not empty and is not an sdonnx model (no readable {MANIFEST_NAME})"
    named = {str(p).replace("\\", "/").split("/")[0] for p in _manifest_paths(manifest)}
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _MODEL_NAMES | named)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds files that are not part of a converted model ({listed})"
    return None


def _manifest_paths(manifest):
    """The file paths a raw manifest dict names, whatever its shape."""
    components = manifest.get("components")
    encoders = manifest.get("text_encoders")
    entries = [*(components.values() if isinstance(components, dict) else ()),
               *(encoders if isinstance(encoders, list) else ()), manifest.get("graph")]  # a ControlNet's
    keys = ("path", "optimized_path", "tokenizer", "token_embeddings")
    return [e[k] for e in entries if isinstance(e, dict) for k in keys if isinstance(e.get(k), str) and e[k]]


# staging and moved-aside folders of a convert: .NAME.partial-PID-XXXX and .NAME.old-PID (older versions
# wrote .NAME.partial-XXXX without the PID)
def _leftover_pattern(name):
    return re.compile(rf"\.{re.escape(name)}\.(?:partial-(?:(\d+)-)?[^/]*|old-(\d+))")


def _remove_leftovers(outdir, report):
    """Staging folders of earlier converts of this name that were killed (kill -9, power loss): their
    process is gone, so nothing else will remove them. A live convert's folder is left alone."""
    pattern = _leftover_pattern(outdir.name)
    for path in outdir.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and path.is_dir() and not path.is_symlink():
            pid = m.group(1) or m.group(2)
            if pid is None or not _running(int(pid)):
                report(f"removing {path.name}, left by a convert that did not finish")
                shutil.rmtree(path, ignore_errors=True)


def _running(pid):
    """Whether process `pid` exists (this one counts)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return _running_windows(pid)
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the existence check
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _running_windows(pid):
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _replace_folder(staging, outdir):
    """Move the finished staging folder to outdir; an old outdir is moved aside first and then removed."""
    old = None
    if outdir.exists():
        old = outdir.with_name(f".{outdir.name}.old-{os.getpid()}")
        # the old manifest goes first, so a crash between the two renames leaves no stale model loading
        (outdir / MANIFEST_NAME).unlink(missing_ok=True)
        outdir.rename(old)
    staging.rename(outdir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- sources

def load_source(source, *, family=None, prediction=None):
    """Load a diffusers folder, a single-file checkpoint or a hub id into torch modules."""
    path = Path(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ConvertError(f"{source!r} is a folder but not a diffusers model (no model_index.json); "
                               f"give a diffusers folder, a .safetensors/.ckpt file or a hub id")
        return _load_diffusers(path, family, prediction, name=path.name, source={"kind": "diffusers", "path": str(path)})
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise ConvertError(f"checkpoint file {source!r} does not exist")
        return _load_single_file(path, family, prediction)
    if _looks_like_hub_id(source):
        return _load_diffusers(_download(source), family, prediction, name=source.split("/")[-1],
                               source={"kind": "hub", "id": source})
    raise ConvertError(f"{source!r} is not a folder, a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)}) "
                       f"or a hub id like 'org/name'")


def _looks_like_hub_id(source):
    parts = str(source).split("/")
    return len(parts) == 2 and all(parts) and not str(source).startswith((".", "/", "~"))


def _download(repo_id):
    """Fetch a diffusers repo from the hub (weights as safetensors only); clear error when offline."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[
            "model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*",
            "text_encoder/*.safetensors", "text_encoder_2/*.safetensors", "unet/*.safetensors",
            "vae/*.safetensors"],
            ignore_patterns=["*fp16*", "*non_ema*", "*.ckpt", "*.bin"]))
    except Exception as e:  # the hub client raises many kinds (offline mode, DNS, 404, auth)
        raise ConvertError(f"could not download {repo_id!r} from the model hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no details'}); check the network and the id, "
                           f"or convert a local folder or checkpoint file instead") from e


def _scheduler_facts(config):
    return NoiseSchedule(beta_start=float(config.get("beta_start", 0.00085)),
                         beta_end=float(config.get("beta_end", 0.012)),
                         beta_schedule=config.get("beta_schedule", "scaled_linear"),
                         num_train_timesteps=int(config.get("num_train_timesteps", 1000)))


def _family_of_diffusers(unet, text_encoder):
    return "sd2" if unet.config.use_linear_projection or text_encoder.config.hidden_act == "gelu" else "sd1"


def _load_diffusers(path, family, prediction, *, name, source):
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizerFast

    from . import sdxl

    extra = {}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        if sdxl.is_sdxl_unet(unet):
            encoders, zeros = sdxl.load_diffusers_encoders(path)
            detected = sdxl.family_of(unet, encoders["text_encoder_2"])
            extra = sdxl.manifest_extra(unet, detected, zeros)
        else:
            encoders = {"text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True,
                                                                      attn_implementation="eager").eval(),
                        "tokenizer": CLIPTokenizerFast.from_pretrained(path / "tokenizer", local_files_only=True)}
            detected = _family_of_diffusers(unet, encoders["text_encoder"])
    except (OSError, ValueError, KeyError) as e:
        raise ConvertError(f"cannot load the diffusers model in {str(path)!r}: {e}") from e
    sched_path = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text()) if sched_path.is_file() else {}
    return Loaded(
        unet=unet.eval(), vae=vae.eval(), **encoders,
        family=family or detected, prediction_type=prediction or sched.get("prediction_type", "epsilon"),
        noise_schedule=_scheduler_facts(sched), name=name, model_hash=None,
        source={**source, "detected_family": detected}, manifest_extra=extra)


def _apply_resolution_hint(parts, metadata):
    """A file's `modelspec.resolution` ("WxH", the model-spec metadata convention) sets its native size,
    which the weights cannot tell (the demo model is 64x64; real SD 1.x files carry 512x512 or nothing)."""
    value = str((metadata or {}).get("modelspec.resolution", ""))
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        return
    factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    if width == height and width % factor == 0:
        parts["unet"].register_to_config(sample_size=width // factor)


def _load_single_file(path, family, prediction):
    import dataclasses

    from .checkpoint import CheckpointError, load_state_dict, read_metadata
    from .single_file import detect, load_components, probe_v_prediction

    try:
        state = load_state_dict(path)
        metadata = read_metadata(path)
        guess = detect(state, metadata)
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    except ValueError as e:
        raise ConvertError(f"{path.name}: {e}") from e
    if family and family != guess.family:
        log.warning("--family %s overrides the detected family %s", family, guess.family)
        guess = dataclasses.replace(guess, family=family)
    parts = load_components(state, guess, prediction=prediction or guess.prediction)
    _apply_resolution_hint(parts, metadata)
    del state
    pred = prediction or guess.prediction
    if pred is None:
        pred = "v_prediction" if probe_v_prediction(parts["unet"]) else "epsilon"
        log.info("prediction type probed from the UNet: %s", pred)
    sdxl_parts = {}
    if "text_encoder_2" in parts:
        from . import sdxl

        # A1111 conditions an empty negative prompt as zeros for every SDXL model, refiner included
        sdxl_parts = dict(text_encoder_2=parts["text_encoder_2"].eval(), tokenizer_2=parts["tokenizer_2"],
                          manifest_extra=sdxl.manifest_extra(parts["unet"], guess.family, True))
    return Loaded(
        text_encoder=parts["text_encoder"] and parts["text_encoder"].eval(), unet=parts["unet"].eval(),
        vae=parts["vae"].eval(), tokenizer=parts["tokenizer"], **sdxl_parts, family=guess.family, prediction_type=pred,
        noise_schedule=_scheduler_facts(parts.get("scheduler_config", {})), name=path.stem,
        model_hash=model_hash(path),
        source={"kind": "single_file", "path": str(path), "detected_family": guess.family,
                "detected_prediction": guess.prediction})
