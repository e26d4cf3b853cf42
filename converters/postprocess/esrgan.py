"""ESRGAN's RRDBNet in plain torch, in the original ("old") key layout, and the renaming of the newer
layouts onto it: basicsr/Real-ESRGAN (`conv_first`, `body.N.rdbM`, `conv_up1`, ...) and BSRGAN/RealSR
(`RRDB_trunk`, `upconv1`, `HRconv`). Real-ESRGAN's x2plus/x1 models pixel-unshuffle the input first
(their first conv takes 4x or 16x the channels): the graph pads by reflection to a multiple of the
factor, unshuffles, and crops the output back, as spandrel (A1111's loader) does.

Layers of the old layout (`model.N`): 0 first conv; 1 the RRDB trunk (`sub.0..nb-1`) plus its closing
conv (`sub.nb`) inside a residual shortcut; then per 2x step [nearest upsample, conv, LeakyReLU]; then
HR conv, LeakyReLU, last conv.
"""
import re

import torch
import torch.nn.functional as F
from torch import nn

from sdonnx.postprocess.manifest import Tiling

from .base import PostprocessConvertError, Recognised, check_loaded

ARCHITECTURE = "ESRGAN"
SLOPE = 0.2  # LeakyReLU negative slope throughout ESRGAN


def _conv(cin, cout):
    return nn.Conv2d(cin, cout, 3, 1, 1)


class DenseBlock(nn.Module):
    """Five convs, each seeing the input and every earlier output; residual scaled by 0.2."""

    def __init__(self, nf, gc):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Sequential(_conv(nf + (i - 1) * gc, gc), nn.LeakyReLU(SLOPE)))
        self.conv5 = nn.Sequential(_conv(nf + 4 * gc, nf))

    def forward(self, x):
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(conv(torch.cat(features, 1)))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = DenseBlock(nf, gc), DenseBlock(nf, gc), DenseBlock(nf, gc)

    def forward(self, x):
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class Shortcut(nn.Module):
    def __init__(self, sub):
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return x + self.sub(x)


class RRDBNet(nn.Module):
    """x: [B, in_nc/shuffle^2, H, W] in [0, 1] -> [B, out_nc, H*scale, W*scale]."""

    def __init__(self, in_nc=3, out_nc=3, nf=64, nb=23, gc=32, upsamples=2, shuffle=1):
        super().__init__()
        self.shuffle, self.scale = shuffle, 2 ** upsamples // shuffle
        layers = [_conv(in_nc, nf), Shortcut(nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)], _conv(nf, nf)))]
        for _ in range(upsamples):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(nf, nf), nn.LeakyReLU(SLOPE)]
        layers += [_conv(nf, nf), nn.LeakyReLU(SLOPE), _conv(nf, out_nc)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        if self.shuffle == 1:
            return self.model(x)
        h, w = x.shape[2], x.shape[3]
        s = self.shuffle
        x = F.pad(x, (0, (s - w % s) % s, 0, (s - h % s) % s), mode="reflect")
        y = self.model(F.pixel_unshuffle(x, s))
        return y[:, :, :h * self.scale, :w * self.scale]


# newer layouts -> the old one; "{nb}" is the trunk's closing conv
_BLOCK_KEYS = (re.compile(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)"),
               re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)"))
_SIMPLE = {"conv_first": "model.0", "conv_body": "model.1.sub.{nb}", "trunk_conv": "model.1.sub.{nb}"}


def to_old_layout(state):
    """A basicsr/BSRGAN-layout state dict renamed to the old ESRGAN layout (old ones pass unchanged)."""
    if "conv_first.weight" not in state:
        return dict(state)
    blocks = {int(m.group(1)) for k in state for p in _BLOCK_KEYS for m in [p.fullmatch(k)] if m}
    nb = max(blocks) + 1 if blocks else 0
    ups = sorted({int(m.group(2)) for k in state for m in [re.fullmatch(r"(conv_up|upconv)(\d)\.weight", k)] if m})
    n = len(ups)
    out = {}
    for key, value in state.items():
        out[_rename(key, nb, n)] = value
    return out


def _rename(key, nb, n):
    for pattern in _BLOCK_KEYS:
        m = pattern.fullmatch(key)
        if m:
            return f"model.1.sub.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.0.{m.group(4)}"
    stem, _, param = key.rpartition(".")
    if stem in _SIMPLE:
        return f"{_SIMPLE[stem].format(nb=nb)}.{param}"
    m = re.fullmatch(r"(?:conv_up|upconv)(\d)", stem)
    if m:
        return f"model.{3 * int(m.group(1))}.{param}"
    if stem in ("conv_hr", "HRconv"):
        return f"model.{3 * n + 2}.{param}"
    if stem == "conv_last":
        return f"model.{3 * n + 4}.{param}"
    return key  # left for the strict load to name


def _claims(state):
    old = "model.0.weight" in state and "model.1.sub.0.RDB1.conv1.0.weight" in state
    new = "conv_first.weight" in state and ("body.0.rdb1.conv1.weight" in state
                                            or "RRDB_trunk.0.RDB1.conv1.weight" in state)
    return old or new


def hyperparameters(state, name):
    """(in_nc, out_nc, nf, nb, gc, upsamples, shuffle) of an old-layout state dict."""
    if any(".conv1x1." in k for k in state):
        raise PostprocessConvertError(f"{name}: an ESRGAN+ model (conv1x1 in its dense blocks), not supported")
    top = max(int(m.group(1)) for k in state for m in [re.fullmatch(r"model\.(\d+)\.weight", k)] if m)
    upsamples, rest = divmod(top - 4, 3)
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"model\.1\.sub\.(\d+)\.RDB", k)] if m}
    if rest or upsamples < 0 or not blocks:
        raise PostprocessConvertError(f"{name}: looks like ESRGAN but its layer numbering (last layer model.{top}) "
                                      f"fits no ESRGAN scale")
    first, last = state["model.0.weight"], state[f"model.{top}.weight"]
    in_nc, out_nc, nf = first.shape[1], last.shape[0], first.shape[0]
    gc = state["model.1.sub.0.RDB1.conv1.0.weight"].shape[0]
    shuffle = next((s for s in (2, 4) if in_nc == out_nc * s * s), 1)  # Real-ESRGAN x2plus / x1
    if shuffle > 2 ** upsamples:
        raise PostprocessConvertError(f"{name}: unshuffles by {shuffle} but upsamples only {2 ** upsamples}x")
    return in_nc, out_nc, nf, max(blocks) + 1, gc, upsamples, shuffle


def recognise(state, name):
    if not _claims(state):
        return None
    old = to_old_layout(state)
    in_nc, out_nc, nf, nb, gc, upsamples, shuffle = hyperparameters(old, name)
    module = check_loaded(RRDBNet(in_nc, out_nc, nf, nb, gc, upsamples, shuffle), old, name, ARCHITECTURE)
    channels = in_nc // shuffle ** 2
    if channels != 3 or out_nc != 3:
        raise PostprocessConvertError(f"{name}: an ESRGAN model with {channels} input and {out_nc} output channels; "
                                      f"only RGB models (3 and 3) are supported")
    # odd sizes check the reflection padding of unshuffling models
    checks = [(torch.rand(1, 3, 16, 16),), (torch.rand(1, 3, 13, 10),)]
    return Recognised(
        kind="upscaler", architecture=ARCHITECTURE, module=module,
        inputs={"image": ["batch", None, "height", "width"]},
        outputs={"upscaled": ["batch", None, "out_height", "out_width"]}, checks=checks,
        scale=module.scale, channel_order="BGR", value_range=(0.0, 1.0), tiling=Tiling(multiple=1),
        facts={"num_filters": nf, "num_blocks": nb, "growth_channels": gc, "upsamples": upsamples,
               "pixel_unshuffle": shuffle, "layout": "old" if "model.0.weight" in state else "new"})
