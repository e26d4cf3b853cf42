"""An external VAE file (A1111's models/VAE, or MODEL.vae.* beside a checkpoint) -> its decoder and encoder graphs
and `vae.json`, the small manifest sdonnx/vae.py reads.

The file holds the autoencoder alone: in the original (ldm) layout as A1111 loads it (`encoder.down.N...`, maybe
under `first_stage_model.`, maybe wrapped in `state_dict`, with `loss.*` and `model_ema.*` entries A1111 drops),
or in diffusers' layout (`encoder.down_blocks.N...`, e.g. sdxl-vae-fp16-fix's diffusion_pytorch_model files).
"""
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from sdonnx.manifest import Component, relative_path
from sdonnx.vae import VAE_FORMAT, VAE_MANIFEST

from .checkpoint import CheckpointError, load_state_dict
from .convert import DEFAULT_TOLERANCE

log = logging.getLogger(__name__)

IGNORED = ("loss", "model_ema.")  # A1111 drops these before loading a VAE


def vae_state(state):
    """The VAE's weights in diffusers' names, from either layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .single_file import VAE_PREFIX, _count_indices

    state = {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if not k.startswith(IGNORED)}
    if "decoder.up_blocks.0.resnets.0.norm1.weight" in state:  # diffusers layout already
        return state
    if "decoder.up.0.block.0.norm1.weight" not in state:
        raise CheckpointError(f"not a VAE: no decoder weights (decoder.up.* or decoder.up_blocks.*) among "
                              f"{len(state)} tensors")
    levels = _count_indices(state, "encoder.down.")
    blocks = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    return convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in state.items()}, blocks)


def convert_vae(source, out, options, report):
    """Write out/vae_decoder, out/vae_encoder and out/vae.json (last). options["family"]: the latent space the VAE
    is for ("sd": SD 1.x/2.x, "sdxl"), decided by the runtime (sdonnx/vae.py vae_family)."""
    from sdonnx.runtime.session import return_freed_memory

    from .components import vae_specs
    from .export import export_component, parity_check, weight_map
    from .single_file import _build_vae

    report(f"loading {source.name}", 1, 6)
    model = _build_vae(vae_state(load_state_dict(source)), sample_size=512)
    out.mkdir(parents=True)
    components, done = {}, 1
    with torch.no_grad():
        for spec in vae_specs(model, torch.Generator().manual_seed(0)):
            report(f"exporting {spec.name}", done + 1, 6)
            path = export_component(spec, out)
            report(f"checking {spec.name} against torch", done + 2, 6)
            err = parity_check(spec, path, DEFAULT_TOLERANCE["fp32"])
            done += 2
            return_freed_memory()
            c = spec.contract
            components[spec.name] = asdict(Component(
                path=relative_path(path, out), inputs={k: list(v) for k, v in c.inputs.items()},
                outputs={k: list(v) for k, v in c.outputs.items()}, input_dtypes=dict(c.input_dtypes),
                weights={f"vae.{k}": v for k, v in weight_map(spec, path).items()}, parity_max_abs_err=err))
    config = model.config
    manifest = {"format": VAE_FORMAT, "format_version": 1, "name": Path(source).name, "family": options["family"],
                "latent_channels": int(config.latent_channels),
                "vae_scale_factor": 2 ** (len(config.block_out_channels) - 1), "components": components}
    (out / VAE_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")  # last: the folder is whole
