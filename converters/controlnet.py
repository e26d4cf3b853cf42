"""ControlNet models as users have them -> an sdonnx ControlNet folder (graph + sdonnx.json).

Sources, told apart by their keys, offline:
- lllyasviel's original layout: `control_v11p_sd15_canny.pth/.safetensors` (`control_model.input_hint_block...`,
  `zero_convs`, `middle_block_out`), the 1.0 files `control_sd15_*.pth` that hold a whole SD checkpoint beside
  `control_model.*` (only the ControlNet is taken), and unprefixed files (`input_hint_block...` at the top);
- diffusers' layout as one file (`controlnet_cond_embedding...`, `controlnet_down_blocks...`: most SDXL
  ControlNets are published so) or as a folder with config.json (`_class_name: ControlNetModel`).
Original-layout keys are renamed with diffusers' own single-file converter (`convert_controlnet_checkpoint`, a
pure dict transform); the architecture is inferred from the tensor shapes and the family rules of
converters/single_file.py, and the weights are loaded strictly.

The graph: (sample, timestep, encoder_hidden_states, controlnet_cond [, text_embeds, time_ids]) -> the
unscaled residuals down_block_res_0..N-2 and mid_block_res; checked against torch like every other graph.
"""
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdonnx.controlnet.model import CONTROL_IMAGE_INPUT, ControlNetManifest, residual_names
from sdonnx.manifest import MANIFEST_NAME, Component, relative_path

from .checkpoint import CheckpointError, load_state_dict
from .components import ComponentSpec, Contract
from .single_file import SD1_UNET_HEADS, SD2_UNET_HEAD_DIM, _count_indices, _first, _has, _load_assigned

log = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
SDXL_TIME_IDS = 6
SDXL_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim: no weight carries it (a sinusoidal embedding)
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


@dataclass
class LoadedControlNet:
    model: object  # diffusers ControlNetModel, fp32, eval
    family: str
    name: str
    model_hash: str | None
    global_average_pooling: bool
    source: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- detection

def layout_of(keys):
    """"original" (control_model.* or bare input_hint_block/zero_convs), "diffusers", or None: not a ControlNet."""
    keys = set(keys)
    if any(k.startswith(CONTROL_PREFIX + "input_hint_block.") for k in keys):
        return "original"
    if "input_hint_block.0.weight" in keys and "zero_convs.0.0.weight" in keys:
        return "original"
    if "controlnet_cond_embedding.conv_in.weight" in keys and "controlnet_mid_block.weight" in keys:
        return "diffusers"
    return None


def _file_keys(path):
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception:  # noqa: BLE001 - the main loader reports an unreadable file with its own words
            return []
    try:
        return list(load_state_dict(path))  # pickles are memory-mapped: the keys cost little
    except CheckpointError:
        return []


def is_controlnet(source):
    """Whether `source` (a path) is a ControlNet file or diffusers ControlNet folder."""
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        try:
            return config.is_file() and json.loads(config.read_text("utf-8")).get("_class_name") == "ControlNetModel"
        except (OSError, ValueError, AttributeError):
            return False
    return path.is_file() and path.suffix.lower() in SUFFIXES and layout_of(_file_keys(path)) is not None


# ------------------------------------------------------------------------------------------- loading

def load_controlnet(source):
    """A ControlNet file or diffusers folder -> LoadedControlNet."""
    path = Path(source)
    if path.is_dir():
        return _load_folder(path)
    state = load_state_dict(path)
    layout = layout_of(state)
    if layout is None:
        raise CheckpointError(f"{path}: not a ControlNet (no input_hint_block / controlnet_cond_embedding weights)")
    converted = _from_original(state) if layout == "original" else dict(state)
    del state
    config = controlnet_config(converted)
    model = _build(converted, config, path.name)
    return LoadedControlNet(model, family_of(model.config), path.stem, legacy_hash(path),
                            "shuffle" in path.stem.lower(), {"kind": "single_file", "path": str(path), "layout": layout})


def _load_folder(path):
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(path, local_files_only=True).float().eval()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the diffusers ControlNet in {str(path)!r}: {e}") from e
    weights = next((p for p in sorted(path.glob("diffusion_pytorch_model*.safetensors"))), None)
    return LoadedControlNet(model, family_of(model.config), path.name, legacy_hash(weights) if weights else None,
                            bool(model.config.global_pool_conditions), {"kind": "diffusers", "path": str(path)})


def _from_original(state):
    """Original-layout keys -> diffusers names, through diffusers' converter; SDXL's label_emb (which that
    converter leaves out) as add_embedding."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if any(k.startswith(CONTROL_PREFIX) for k in state):  # 1.0 files hold a whole SD model beside it: drop that
        state = {k[len(CONTROL_PREFIX):]: v for k, v in state.items() if k.startswith(CONTROL_PREFIX)}
    converted = convert_controlnet_checkpoint(state, {"layers_per_block": _layers_per_block(state)})
    for i, n in (("0", "1"), ("2", "2")):
        for kind in ("weight", "bias"):
            if f"label_emb.0.{i}.{kind}" in state:
                converted[f"add_embedding.linear_{n}.{kind}"] = state[f"label_emb.0.{i}.{kind}"]
    return {k: v for k, v in converted.items() if v is not None}


def _layers_per_block(state):
    """Input blocks = conv_in + levels * layers + (levels - 1) downsamplers."""
    blocks = _count_indices(state, "input_blocks.")
    levels = 1 + sum(k.startswith("input_blocks.") and k.endswith(".0.op.weight") for k in state)
    layers, rest = divmod(blocks - 1 - (levels - 1), levels)
    if rest or layers < 1:
        raise CheckpointError(f"ControlNet has {blocks} input blocks for {levels} levels: not a ControlNet layout")
    return layers


def family_of(config):
    """sdxl (added text_time embedding), sd2 (linear attention projections), else sd1 (the UNets' own rules)."""
    if config.addition_embed_type == "text_time":
        return "sdxl"
    return "sd2" if config.use_linear_projection else "sd1"


def controlnet_config(converted):
    """ControlNetModel arguments from a diffusers-named state dict's shapes and the family's head rule."""
    levels = _count_indices(converted, "down_blocks.")
    channels = [int(converted[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0]) for b in range(levels)]
    attention = [_has(converted, f"down_blocks.{b}.attentions.") for b in range(levels)]
    depth = [_count_indices(converted, f"down_blocks.{b}.attentions.0.transformer_blocks.") or None
             for b in range(levels)]
    uniform = {d for d in depth if d} or {1}
    linear = _first(converted, "", ".proj_in.weight").ndim == 2
    added = "add_embedding.linear_1.weight" in converted
    hint = [converted["controlnet_cond_embedding.conv_in.weight"]] + [
        converted[f"controlnet_cond_embedding.blocks.{i}.weight"]
        for i in range(_count_indices(converted, "controlnet_cond_embedding.blocks."))]
    config = dict(
        in_channels=int(converted["conv_in.weight"].shape[1]),
        conditioning_channels=int(hint[0].shape[1]),
        conditioning_embedding_out_channels=tuple(int(w.shape[0]) for w in hint[::2]),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        block_out_channels=tuple(channels),
        layers_per_block=_count_indices(converted, "down_blocks.0.resnets."),
        cross_attention_dim=int(_first(converted, "", ".attn2.to_k.weight").shape[1]),
        transformer_layers_per_block=uniform.pop() if len(uniform) == 1 else tuple(d or 1 for d in depth),
        attention_head_dim=tuple(c // SD2_UNET_HEAD_DIM for c in channels) if linear else SD1_UNET_HEADS,
        use_linear_projection=linear,
        norm_num_groups=32,
    )
    if added:
        total = int(converted["add_embedding.linear_1.weight"].shape[1])
        if total <= SDXL_TIME_IDS * SDXL_TIME_EMBED_DIM:
            raise CheckpointError(f"the ControlNet's added embedding takes {total} inputs: not SDXL's pooled text + "
                                  f"{SDXL_TIME_IDS} time ids of {SDXL_TIME_EMBED_DIM}")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=total)
    return config


def _build(converted, config, what):
    from diffusers import ControlNetModel

    return _load_assigned(lambda: ControlNetModel(**config), converted, f"ControlNet {what}")


def legacy_hash(path):
    """A1111's old short model hash (sd_models.model_hash): sha256 of 64 KiB at 1 MiB, 8 hex digits; the
    extension lists ControlNets as "name [hash]" with it."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# ------------------------------------------------------------------------------------------- export

class ControlNetExport(torch.nn.Module):
    """The ControlNet with unit scale: (sample, timestep, context, image[, text_embeds, time_ids]) -> residuals."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
        down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                               return_dict=False, **kwargs)
        return (*down, mid)


def contract(model):
    """The ControlNet graph's I/O: the UNet's inputs plus the control image; one output per residual."""
    count = len(model.controlnet_down_blocks) + 1
    inputs = {"sample": ("batch", None, "height", "width"), "timestep": ("batch",),
              "encoder_hidden_states": ("batch", "sequence", None),
              CONTROL_IMAGE_INPUT: ("batch", None, "image_height", "image_width")}
    if model.config.addition_embed_type == "text_time":
        inputs.update(text_embeds=("batch", None), time_ids=("batch", None))
    outputs = {name: ("batch", None, f"{name}_height", f"{name}_width") for name in residual_names(count)}
    return Contract(inputs=inputs, outputs=outputs, input_dtypes={k: "float32" for k in inputs})


def spec(model, seed=0):
    """The ComponentSpec of the ControlNet graph: example and check inputs at odd latent sizes, so the graph
    takes any multiple-of-8 image size (as the UNet's)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    odd = 2 ** (len(c.block_out_channels) - 1) * 2 + 1

    def inputs(batch, h, w, tokens):
        out = (torch.randn(batch, c.in_channels, h, w, generator=g), torch.rand(batch, generator=g) * 999,
               torch.randn(batch, tokens, c.cross_attention_dim, generator=g),
               torch.rand(batch, c.conditioning_channels, 8 * h, 8 * w, generator=g))
        if c.addition_embed_type != "text_time":
            return out
        pooled = c.projection_class_embeddings_input_dim - SDXL_TIME_IDS * c.addition_time_embed_dim
        return out + (torch.randn(batch, pooled, generator=g),
                      torch.randint(0, 1025, (batch, SDXL_TIME_IDS), generator=g).float())

    return ComponentSpec("controlnet", ControlNetExport(model), contract(model), inputs(2, odd, odd + 2, 77),
                         [inputs(1, 8, 8, 77), inputs(2, odd + 4, 6, 154)], "model.", "controlnet")


# ------------------------------------------------------------------------------------------- convert

def convert_controlnet(source, outdir, *, force=False, tolerance=1e-3, report=None):
    """Convert a ControlNet into outdir (built under a temporary name, moved into place when its graph has
    passed the parity check; the manifest last) -> ControlNetManifest."""
    from . import convert as conv

    report = report or log.info
    outdir = Path(outdir).absolute()
    if outdir.exists() and not outdir.is_dir():
        raise conv.ConvertError(f"output {str(outdir)!r} exists and is not a folder")
    conv._check_replaceable(outdir, force)
    report(f"loading ControlNet {source}")
    try:
        loaded = load_controlnet(source)
    except CheckpointError as e:
        raise conv.ConvertError(str(e)) from e
    outdir.parent.mkdir(parents=True, exist_ok=True)
    conv._remove_leftovers(outdir, report)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-{os.getpid()}-", dir=outdir.parent))
    try:
        manifest = _export(loaded, staging, tolerance, report)
        conv._publishable(staging)
        conv._check_replaceable(outdir, force)
        conv._replace_folder(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report(f"wrote {outdir}")
    return manifest


def _export(loaded, staging, tolerance, report):
    import diffusers

    from sdonnx import __version__

    from .export import export_component, parity_check

    model = loaded.model
    # pooling is the runtime's (after the unit's scale, cond rows only, as the extension): export full residuals
    model.register_to_config(global_pool_conditions=False)
    component = spec(model)
    report("exporting controlnet")
    path = export_component(component, staging)
    report("checking controlnet against torch")
    err = parity_check(component, path, tolerance)
    c = component.contract
    graph = Component(path=relative_path(path, staging), inputs={k: list(v) for k, v in c.inputs.items()},
                      outputs={k: list(v) for k, v in c.outputs.items()}, input_dtypes=dict(c.input_dtypes),
                      parity_max_abs_err=err)
    manifest = ControlNetManifest(
        name=_safe_name(loaded.name), family=loaded.family, graph=graph, residuals=len(c.outputs),
        context_dim=int(model.config.cross_attention_dim), latent_channels=int(model.config.in_channels),
        conditioning_channels=int(model.config.conditioning_channels),
        global_average_pooling=loaded.global_average_pooling, model_hash=loaded.model_hash, source=loaded.source,
        converter={"sdonnx": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__})
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def _safe_name(name):
    return re.sub(r"[\x00-\x1f]", "", str(name)) or "controlnet"
