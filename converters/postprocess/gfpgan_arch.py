"""GFPGAN v1.3/v1.4 ("clean" architecture): a U-Net encoder whose features modulate a StyleGAN2 decoder
through spatial feature transforms (SFT) on half of its channels.

Written from the published architecture (Wang et al. 2021, "GFP-GAN"); parameter and buffer names match
the released GFPGANv1.3.pth/GFPGANv1.4.pth `params_ema` dictionaries, so those load with strict=True.
Widths follow the released configuration (channel_multiplier 2, narrow 1, 512 style features); tests build
narrower, smaller instances of the same layout.

Noise: StyleGAN2 adds `strength * noise` after each style convolution. GFPGAN's own inference, and A1111
through spandrel, call the model with fresh random noise every time (unseeded, so a restored face differs
slightly run to run). The export uses the checkpoint's stored noise buffers instead (`noises.noise<i>`),
one fixed draw from the same distribution: deterministic, and what GFPGAN gives with randomize_noise=False.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


def _channels(narrow, multiplier):
    """Feature width per resolution (StyleGAN2's table)."""
    wide = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * multiplier, 128: 128 * multiplier,
            256: 64 * multiplier, 512: 32 * multiplier, 1024: 16 * multiplier}
    return {res: int(c * narrow) for res, c in wide.items()}


class ModulatedConv2d(nn.Module):
    """Convolution whose weight is scaled per input channel by the style and (optionally) demodulated."""

    def __init__(self, cin, cout, kernel, style_dim, demodulate=True, upsample=False):
        super().__init__()
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel // 2
        self.modulation = nn.Linear(style_dim, cin)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel) / math.sqrt(cin * kernel ** 2))

    def forward(self, x, style):
        b, cin = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, cin, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, -1, 1, 1, 1)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        cout = weight.shape[1]
        # one grouped convolution with a weight per sample
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight.reshape(b * cout, cin, *weight.shape[3:]),
                       padding=self.padding, groups=b)
        return out.view(b, cout, *out.shape[2:])


class StyleConv(nn.Module):
    def __init__(self, cin, cout, style_dim, upsample=False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, style_dim, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x, style, noise):
        out = self.modulated_conv(x, style) * 2 ** 0.5 + self.weight * noise + self.bias
        return F.leaky_relu(out, 0.2)


class ToRGB(nn.Module):
    def __init__(self, cin, style_dim, upsample=True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.modulated_conv(x, style) + self.bias
        if skip is None:
            return out
        if self.upsample:
            skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return out + skip


class NormStyleCode(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class ConstantInput(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, 4, 4))


class StyleGAN2DecoderSFT(nn.Module):
    """StyleGAN2 generator taking one latent per layer and SFT (scale, shift) pairs per resolution."""

    def __init__(self, out_size, style_dim, num_mlp, channels):
        super().__init__()
        self.log_size = int(math.log2(out_size))
        mlp = [NormStyleCode()]
        for _ in range(num_mlp):  # unused with latent input, but part of the checkpoint
            mlp += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)
        self.constant_input = ConstantInput(channels[4])
        self.style_conv1 = StyleConv(channels[4], channels[4], style_dim)
        self.to_rgb1 = ToRGB(channels[4], style_dim, upsample=False)
        self.style_convs, self.to_rgbs, self.noises = nn.ModuleList(), nn.ModuleList(), nn.Module()
        for i in range((self.log_size - 2) * 2 + 1):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, res, res))
        cin = channels[4]
        for i in range(3, self.log_size + 1):
            cout = channels[2 ** i]
            self.style_convs.append(StyleConv(cin, cout, style_dim, upsample=True))
            self.style_convs.append(StyleConv(cout, cout, style_dim))
            self.to_rgbs.append(ToRGB(cout, style_dim))
            cin = cout

    def forward(self, latent, conditions):
        """latent: [B, 2*log2(size)-2, style_dim]; conditions: [scale, shift] per resolution from 8 up."""
        noise = [getattr(self.noises, f"noise{i}") for i in range(len(self.style_convs) + 1)]
        out = self.constant_input.weight.repeat(latent.shape[0], 1, 1, 1)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1
            out = self.style_convs[2 * k](out, latent[:, i], noise[i])
            same, sft = torch.split(out, out.shape[1] // 2, dim=1)  # SFT on half of the channels
            out = torch.cat([same, sft * conditions[2 * k] + conditions[2 * k + 1]], dim=1)
            out = self.style_convs[2 * k + 1](out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


class ResBlock(nn.Module):
    """Residual block with bilinear down- or upsampling between its convolutions."""

    def __init__(self, cin, cout, scale):
        super().__init__()
        self.scale = scale
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        out = F.leaky_relu(self.conv1(x), 0.2)
        out = F.interpolate(out, scale_factor=self.scale, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), 0.2)
        x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + self.skip(x)


def _sft_branch(channels):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(channels, channels, 3, 1, 1))


class GFPGAN(nn.Module):
    """image [B, 3, size, size] RGB in [-1, 1] -> restored image, same layout (not clamped)."""

    def __init__(self, out_size=512, style_dim=512, channel_multiplier=2, narrow=1.0, num_mlp=8):
        super().__init__()
        self.log_size, self.style_dim = int(math.log2(out_size)), style_dim
        unet = _channels(narrow * 0.5, channel_multiplier)
        self.conv_body_first = nn.Conv2d(3, unet[out_size], 1)
        self.conv_body_down = nn.ModuleList(ResBlock(unet[2 ** i], unet[2 ** (i - 1)], 0.5)
                                            for i in range(self.log_size, 2, -1))
        self.final_conv = nn.Conv2d(unet[4], unet[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList(ResBlock(unet[2 ** (i - 1)], unet[2 ** i], 2)
                                          for i in range(3, self.log_size + 1))
        self.toRGB = nn.ModuleList(nn.Conv2d(unet[2 ** i], 3, 1) for i in range(3, self.log_size + 1))
        self.final_linear = nn.Linear(unet[4] * 16, (self.log_size * 2 - 2) * style_dim)
        self.stylegan_decoder = StyleGAN2DecoderSFT(out_size, style_dim, num_mlp,
                                                    _channels(narrow, channel_multiplier))
        self.condition_scale = nn.ModuleList(_sft_branch(unet[2 ** i]) for i in range(3, self.log_size + 1))
        self.condition_shift = nn.ModuleList(_sft_branch(unet[2 ** i]) for i in range(3, self.log_size + 1))

    def forward(self, x):
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)
        latent = self.final_linear(feat.flatten(1)).view(feat.shape[0], -1, self.style_dim)
        conditions = []
        for skip, up, scale, shift in zip(skips, self.conv_body_up, self.condition_scale, self.condition_shift):
            feat = up(feat + skip)
            conditions += [scale(feat), shift(feat)]
        return self.stylegan_decoder(latent, conditions)

    @classmethod
    def from_state_dict(cls, state):
        """The module the weights describe (sizes read from the tensors), loaded strictly."""
        log_size = len([k for k in state if k.startswith("toRGB.") and k.endswith(".weight")]) + 2
        narrow = state["stylegan_decoder.constant_input.weight"].shape[1] / 512
        multiplier = 2
        if log_size >= 6:  # the 64 px level is the first whose width carries the multiplier
            multiplier = state["stylegan_decoder.style_convs.6.bias"].shape[1] / (256 * narrow)
        mlp = len([k for k in state if k.startswith("stylegan_decoder.style_mlp.") and k.endswith(".weight")])
        style_dim = state["stylegan_decoder.style_mlp.1.weight"].shape[0]
        model = cls(2 ** log_size, style_dim, multiplier, narrow, mlp)
        model.load_state_dict(state, strict=True)
        return model.eval()
