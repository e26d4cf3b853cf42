"""Torch references for the upscaler tests, written from the papers' and Real-ESRGAN's descriptions in
the newer (basicsr) layout, independently of converters/postprocess (which builds the old ESRGAN layout
and renames keys onto it). Also A1111's tiled upscale and blending, in PIL/numpy, for one model call.

The old ESRGAN and BSRGAN key layouts are made from a basicsr state dict by `old_layout`/`bsrgan_layout`,
written here from the layouts' descriptions (not by inverting the converter's renaming)."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


class RDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x):
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        x1 = act(self.conv1(x))
        x2 = act(self.conv2(torch.cat((x, x1), 1)))
        x3 = act(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = act(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class Block(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = RDB(nf, gc), RDB(nf, gc), RDB(nf, gc)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class BasicsrRRDBNet(nn.Module):
    """Real-ESRGAN's RRDBNet: scale 4 plain, scale 2 and 1 pixel-unshuffle by 2 and 4 first; the body
    always upsamples 4x (two nearest 2x steps)."""

    def __init__(self, scale=4, nf=8, nb=1, gc=4):
        super().__init__()
        self.scale = scale
        cin = 3 * {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = nn.Conv2d(cin, nf, 3, 1, 1)
        self.body = nn.Sequential(*[Block(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        factor = {4: 1, 2: 2, 1: 4}[self.scale]
        if factor > 1:  # reflect-pad to a multiple of the factor (Real-ESRGAN's mod padding), crop at the end
            x = F.pad(x, (0, -w % factor, 0, -h % factor), mode="reflect")
            x = F.pixel_unshuffle(x, factor)
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = act(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = act(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(act(self.conv_hr(feat)))
        return out[:, :, :h * self.scale, :w * self.scale]


def old_layout(state, nb):
    """The original ESRGAN key names of a scale-4 basicsr RRDBNet state dict."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "body":
            new = f"model.1.sub.{parts[1]}.RDB{parts[2][3:]}.{parts[3]}.0.{parts[4]}"
        else:
            where = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}", "conv_up1": "model.3",
                     "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}[parts[0]]
            new = f"{where}.{parts[1]}"
        out[new] = value
    return out


def bsrgan_layout(state):
    """BSRGAN/RealSR names: RRDB_trunk, trunk_conv, upconv1/2, HRconv (conv_first and conv_last kept)."""
    names = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "body":
            parts = ["RRDB_trunk", parts[1], parts[2].upper(), *parts[3:]]
        else:
            parts[0] = names.get(parts[0], parts[0])
        out[".".join(parts)] = value
    return out


class SRVGGNetCompact(nn.Module):
    def __init__(self, nf=8, num_conv=2, scale=4):
        super().__init__()
        self.scale = scale
        self.body = nn.ModuleList([nn.Conv2d(3, nf, 3, 1, 1), nn.PReLU(nf)])
        for _ in range(num_conv):
            self.body.extend([nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)])
        self.body.append(nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def randomize(module, seed=0):
    """Weights drawn so that every layer matters (PyTorch's default init leaves tiny outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(1, p[0].numel()))) + 0.01)
    return module.eval()


# ------------------------------------------------------------------ A1111's tiled upscale (one model call)

def a1111_model_upscale(model, image, tile=192, overlap=8):
    """A1111's upscale_with_model: the image cut into tile x tile crops (the last flush with the edge,
    crops past a small image padded black), each run through the model as BGR in [0, 1], rounded to
    uint8, and the tiles pasted back with linear alpha ramps over the overlap (PIL paste with a mask)."""
    if tile <= 0:
        return _run_tile(model, image)
    w, h = image.size
    rows = []
    for y in _starts(h, tile, overlap):
        row = []
        for x in _starts(w, tile, overlap):
            out = _run_tile(model, image.crop((x, y, x + tile, y + tile)))
            s = out.width // tile
            row.append((x * s, out))
        rows.append((y * s, row))
    return _combine(rows, w * s, h * s, tile * s, overlap * s)


def _starts(size, tile, overlap):
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [size - tile if int(i * step) + tile >= size else int(i * step) for i in range(count)]


def _run_tile(model, tile):
    bgr = np.asarray(tile.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1) / 255.0
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(bgr)).float()[None])[0]
    out = (255.0 * out.clamp(0, 1).numpy().transpose(1, 2, 0)).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]), "RGB")


def _combine(rows, width, height, tile, overlap):
    ramp = np.arange(overlap, dtype=np.float32) * 255 / overlap
    mask_w = Image.fromarray(np.repeat(ramp[None, :], tile, 0).astype(np.uint8), "L")
    mask_h = Image.fromarray(np.repeat(ramp[:, None], width, 1).astype(np.uint8), "L")
    image = Image.new("RGB", (width, height))
    for y, row in rows:
        line = Image.new("RGB", (width, tile))
        for x, out in row:
            if x == 0:
                line.paste(out, (0, 0))
                continue
            line.paste(out.crop((0, 0, overlap, tile)), (x, 0), mask=mask_w)
            line.paste(out.crop((overlap, 0, tile, tile)), (x + overlap, 0))
        if y == 0:
            image.paste(line, (0, 0))
            continue
        image.paste(line.crop((0, 0, width, overlap)), (0, y), mask=mask_h)
        image.paste(line.crop((0, overlap, width, tile)), (0, y + overlap))
    return image


# ------------------------------------------------------------------ SwinIR

def swinir_mask(h, w, ws, shift):
    """The shifted-window attention mask as SwinIR computes it: nine regions by slicing, then windows."""
    img = torch.zeros((1, h, w, 1))
    count = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = count
            count += 1
    windows = img.view(1, h // ws, ws, w // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def a1111_swinir_upscale(model, image, scale, window, tile=192, overlap=8):
    """A1111's SwinIR upscale: BGR in [0, 1], mirrored to the next multiple of the window (at least one
    more row/column), tiled_upscale_2 (tiles of min(tile, H, W), outputs averaged), crop, clamp, round."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1) / 255))
    x = x.float()[None]
    h, w = x.shape[2:]
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :(h // window + 1) * window]
    x = torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, :(w // window + 1) * window]
    size = min(tile, x.shape[2], x.shape[3])
    stride = size - overlap
    out = torch.zeros(1, 3, x.shape[2] * scale, x.shape[3] * scale)
    weight = torch.zeros_like(out)
    with torch.no_grad():
        for top in list(range(0, x.shape[2] - size, stride)) + [x.shape[2] - size]:
            for left in list(range(0, x.shape[3] - size, stride)) + [x.shape[3] - size]:
                piece = model(x[..., top:top + size, left:left + size])
                out[..., top * scale:(top + size) * scale, left * scale:(left + size) * scale] += piece
                weight[..., top * scale:(top + size) * scale, left * scale:(left + size) * scale] += 1
    out = (out / weight)[0, :, :h * scale, :w * scale].clamp(0, 1).numpy()
    out = (out[[2, 1, 0]].transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(out, "RGB")
