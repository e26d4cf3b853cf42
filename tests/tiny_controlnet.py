"""Tiny random ControlNets made from the tiny UNets (never downloaded), in the layouts users have them.

`ControlNetModel.from_unet` copies the UNet's encoder and zero-initializes the zero convolutions; every
weight is then perturbed (tiny_models._perturb), so the residuals are not zero and differ per layer, as in a
trained model.
"""
from pathlib import Path

from tiny_models import _perturb


def make(unet, seed=0):
    """A ControlNetModel shaped after `unet` (a UNet2DConditionModel), random weights, eval mode."""
    from diffusers import ControlNetModel

    return _perturb(ControlNetModel.from_unet(unet), seed, scale=0.05)


def save(controlnet, path, layout):
    """Write `controlnet` as a diffusers folder ("folder"), one diffusers-layout file ("diffusers") or an
    original-layout file ("original": .safetensors, or a torch pickle for .pth) -> the path."""
    path = Path(path)
    if layout == "folder":
        controlnet.save_pretrained(path, safe_serialization=True)
        return path
    if layout == "original":
        from converters.original_layout import controlnet_to_original

        state = controlnet_to_original(controlnet)
    else:
        state = {k: v.detach().clone().contiguous() for k, v in controlnet.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        import torch

        torch.save(state, str(path))
    return path
