"""SwinIR (Liang et al. 2021, "Image Restoration Using Swin Transformer") in plain torch, for its super-
resolution models: `nearest+conv` (real-world SR, A1111's "SwinIR 4x"), `pixelshuffle` (classical SR) and
`pixelshuffledirect` (lightweight SR), 1conv or 3conv residual connections.

The shifted-window attention mask depends on the image size; the original computes it in Python for each
size. Here it is computed from the input's traced height and width with tensor operations, so the graph
takes any size that is a multiple of the window (the runtime pads to one, as A1111 does) instead of one
fixed tile. The conversion checks two sizes to make sure no size was frozen into the graph.
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from sdonnx.postprocess.manifest import Tiling

from .base import PostprocessConvertError, Recognised, check_loaded

ARCHITECTURE = "SwinIR"
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean, subtracted before the network and added after


def _partition(x, ws):
    """[B, H, W, C] -> [B * windows, ws * ws, C]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _merge(windows, ws, b, h, w):
    """Inverse of _partition."""
    c = windows.shape[-1]
    x = windows.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _shift_mask(h, w, ws, shift):
    """[windows, ws*ws, ws*ws]: 0 within a region of the rolled image, -100 across regions (SW-MSA)."""
    def regions(n):
        i = torch.arange(n)
        return (i >= n - ws).long() + (i >= n - shift).long()

    region = regions(h)[:, None] * 3 + regions(w)[None, :]
    windows = _partition(region[None, :, :, None].float(), ws)[..., 0]
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim, ws, heads):
        super().__init__()
        self.ws, self.heads, self.scale = ws, heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        n_windows_b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(n_windows_b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.reshape(-1, windows, self.heads, n, n) + mask[None, :, None]).reshape(-1, self.heads, n, n)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n_windows_b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, ws, shift, hidden):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, heads)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x, h, w):
        b, _, c = x.shape
        y = self.norm1(x).reshape(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        mask = _shift_mask(h, w, self.ws, self.shift) if self.shift else None
        y = _merge(self.attn(_partition(y, self.ws), mask), self.ws, b, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


def _residual_conv(dim, kind):
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim // 4, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim, 3, 1, 1))


class ResidualGroup(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class RSTB(nn.Module):
    """Residual Swin Transformer block: Swin blocks, then a conv on the image, plus the input."""

    def __init__(self, dim, depth, heads, ws, hidden, resi):
        super().__init__()
        self.residual_group = ResidualGroup([SwinBlock(dim, heads, ws, 0 if i % 2 == 0 else ws // 2, hidden)
                                             for i in range(depth)])
        self.conv = _residual_conv(dim, resi)

    def forward(self, x, h, w):
        y = x
        for block in self.residual_group.blocks:
            y = block(y, h, w)
        b, _, c = y.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, h, w))
        return y.flatten(2).transpose(1, 2) + x


class PatchNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class SwinIR(nn.Module):
    """x: [B, 3, H, W] in [0, 1] -> [B, 3, H*scale, W*scale]; pads by reflection to the window internally."""

    def __init__(self, embed_dim, depths, heads, ws, hidden, upsampler, scale, resi, patch_norm, img_range, feat):
        super().__init__()
        self.ws, self.upsampler, self.scale, self.img_range = ws, upsampler, scale, img_range
        self.register_buffer("mean", torch.tensor(RGB_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = PatchNorm(embed_dim) if patch_norm else nn.Module()
        self.layers = nn.ModuleList(RSTB(embed_dim, d, h, ws, hidden, resi) for d, h in zip(depths, heads))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _residual_conv(embed_dim, resi)
        if upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, feat, 3, 1, 1), nn.LeakyReLU())  # slope 0.01
        if upsampler == "pixelshuffle":
            steps = [m for _ in range(int(math.log2(scale))) for m in (nn.Conv2d(feat, 4 * feat, 3, 1, 1), nn.PixelShuffle(2))]
            self.upsample = nn.Sequential(*steps)
            self.conv_last = nn.Conv2d(feat, 3, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))
        else:  # nearest+conv
            for i in range(1, int(math.log2(scale)) + 1):
                setattr(self, f"conv_up{i}", nn.Conv2d(feat, feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(feat, 3, 3, 1, 1)

    def features(self, x):
        b, c, h, w = x.shape
        y = x.flatten(2).transpose(1, 2)
        if hasattr(self.patch_embed, "norm"):
            y = self.patch_embed.norm(y)
        for layer in self.layers:
            y = layer(y, h, w)
        return self.norm(y).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        x = F.pad(x, (0, (self.ws - w % self.ws) % self.ws, 0, (self.ws - h % self.ws) % self.ws), mode="reflect")
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.features(x)) + x
        if self.upsampler == "pixelshuffledirect":
            x = self.upsample(x)
        else:
            x = self.conv_before_upsample(x)
            x = self.conv_last(self.upsample(x)) if self.upsampler == "pixelshuffle" else self._nearest(x)
        x = x / self.img_range + self.mean
        return x[:, :, :h * self.scale, :w * self.scale]

    def _nearest(self, x):
        for i in range(1, int(math.log2(self.scale)) + 1):
            x = F.leaky_relu(getattr(self, f"conv_up{i}")(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(x), 0.2))


def _count(state, prefix):
    return len({int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", k)] if m})


def hyperparameters(state, name):
    if "conv_first.weight" not in state:
        raise PostprocessConvertError(f"{name}: a SwinIR that unshuffles its input first (conv_first.1), not supported")
    if "absolute_pos_embed" in state:
        raise PostprocessConvertError(f"{name}: a SwinIR with absolute position embeddings (fixed size), not supported")
    if "conv_up1.weight" in state:
        upsampler, scale = "nearest+conv", 2 ** sum(1 for k in state if re.fullmatch(r"conv_up\d\.weight", k))
    elif "conv_before_upsample.0.weight" in state:
        upsampler, scale = "pixelshuffle", 2 ** sum(1 for k in state if re.fullmatch(r"upsample\.\d+\.weight", k))
    elif "upsample.0.weight" in state:
        upsampler, scale = "pixelshuffledirect", math.isqrt(state["upsample.0.weight"].shape[0] // 3)
    else:
        raise PostprocessConvertError(f"{name}: a SwinIR denoising/JPEG model (no upsampler); only upscalers are "
                                      f"supported")
    embed_dim = state["conv_first.weight"].shape[0]
    layers = _count(state, "layers")
    depths = [_count(state, f"layers.{i}.residual_group.blocks") for i in range(layers)]
    heads = [state[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(layers)]
    ws = math.isqrt(state["layers.0.residual_group.blocks.0.attn.relative_position_index"].shape[0])
    hidden = state["layers.0.residual_group.blocks.0.mlp.fc1.bias"].shape[0]
    resi = "1conv" if "conv_after_body.weight" in state else "3conv"
    feat = state["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in state else 64
    img_range = 255.0 if ws == 7 else 1.0  # the only window-7 models (JPEG) work in 0..255, as spandrel assumes
    return dict(embed_dim=embed_dim, depths=depths, heads=heads, ws=ws, hidden=hidden, upsampler=upsampler,
                scale=scale, resi=resi, patch_norm="patch_embed.norm.weight" in state, img_range=img_range, feat=feat)


def recognise(state, name):
    keys = ("layers.0.residual_group.blocks.0.norm1.weight", "layers.0.residual_group.blocks.0.mlp.fc1.bias",
            "layers.0.residual_group.blocks.0.attn.relative_position_index")
    if not all(k in state for k in keys):
        return None
    hp = hyperparameters(state, name)
    weights = {k: v for k, v in state.items() if not k.endswith(".attn_mask")}  # made per size in the graph
    module = check_loaded(SwinIR(**hp), weights, name, ARCHITECTURE)
    w = hp["ws"]
    # two sizes: a size frozen into the graph (a mask, a reshape) fails the second; one not a multiple of the window
    checks = [(torch.rand(1, 3, 2 * w, 2 * w),), (torch.rand(1, 3, 3 * w, 2 * w - 3),)]
    return Recognised(
        kind="upscaler", architecture=ARCHITECTURE, module=module,
        inputs={"image": ["batch", None, "height", "width"]},
        outputs={"upscaled": ["batch", None, "out_height", "out_width"]}, checks=checks,
        scale=hp["scale"], channel_order="BGR", value_range=(0.0, 1.0),
        tiling=Tiling(multiple=w, mode="average"), facts={k: v for k, v in hp.items()}, tolerance=1e-4)
