"""Real-ESRGAN's SRVGGNetCompact ("R-ESRGAN General 4xV3", "General WDN 4xV3", "AnimeVideo") in plain torch.

`body` is a flat list: conv, PReLU, then num_conv x (conv, PReLU), then a conv to out_nc * scale^2
channels; the output is that pixel-shuffled plus the input upsampled (nearest) by the scale. The
activation is known from the weights only when it has some (PReLU, as all released models); files
without `body.1.weight` (ReLU/LeakyReLU variants) cannot be told apart and are refused.
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from sdonnx.postprocess.manifest import Tiling

from .base import PostprocessConvertError, Recognised, check_loaded

ARCHITECTURE = "RealESRGAN-compact"


class Compact(nn.Module):
    """x: [B, in_nc, H, W] in [0, 1] -> [B, out_nc, H*scale, W*scale]."""

    def __init__(self, in_nc=3, out_nc=3, nf=64, num_conv=16, scale=4):
        super().__init__()
        self.scale = scale
        body = [nn.Conv2d(in_nc, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(num_conv):
            body += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        body.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(body)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def recognise(state, name):
    indices = {int(m.group(1)) for k in state for m in [re.fullmatch(r"body\.(\d+)\.weight", k)] if m}
    if not indices or 0 not in indices or any(not re.fullmatch(r"body\.\d+\.(weight|bias)", k) for k in state):
        return None
    first = state["body.0.weight"]
    if first.ndim != 4:
        return None
    if "body.1.weight" not in state or state["body.1.weight"].ndim != 1:
        raise PostprocessConvertError(f"{name}: a compact SRVGGNet without PReLU weights; its activation "
                                      f"(ReLU or LeakyReLU) cannot be told from the file, so it is not supported")
    top = max(indices)
    num_conv, odd = divmod(top - 2, 2)
    in_nc, nf = first.shape[1], first.shape[0]
    out_nc = in_nc
    scale = math.isqrt(state[f"body.{top}.weight"].shape[0] // out_nc)
    if odd or num_conv < 0 or scale * scale * out_nc != state[f"body.{top}.weight"].shape[0]:
        raise PostprocessConvertError(f"{name}: looks like a compact SRVGGNet but its last layer (body.{top}) "
                                      f"fits no scale")
    if in_nc != 3:
        raise PostprocessConvertError(f"{name}: a compact SRVGGNet with {in_nc} channels; only RGB (3) is supported")
    module = check_loaded(Compact(in_nc, out_nc, nf, num_conv, scale), state, name, ARCHITECTURE)
    return Recognised(
        kind="upscaler", architecture=ARCHITECTURE, module=module,
        inputs={"image": ["batch", None, "height", "width"]},
        outputs={"upscaled": ["batch", None, "out_height", "out_width"]},
        checks=[(torch.rand(1, 3, 16, 16),), (torch.rand(1, 3, 13, 10),)], scale=scale, channel_order="BGR",
        value_range=(0.0, 1.0), tiling=Tiling(), facts={"num_filters": nf, "num_conv": num_conv})
