"""ParseNet, the face parser A1111 uses through facexlib (parsing_parsenet.pth, from PSFR-GAN, Chen et al.
2021): residual encoder/body/decoder with reflection-padded convolutions; 19 face-part logits and an
image. Names match the released file. Its layout in the released file: 64 base channels clipped to
[32, 256], four downsampling and four upsampling blocks, ten body blocks, 512 px in and out.
"""
from torch import nn
from torch.nn import functional as F


class ConvLayer(nn.Module):
    """Reflection pad, convolution (stride 2 for "down", nearest x2 before it for "up"), then optional
    BatchNorm and leaky ReLU (no parameters of their own beyond the norm's)."""

    def __init__(self, cin, cout, scale="none", norm=False, relu=False):
        super().__init__()
        self.up, self.relu_on = scale == "up", relu
        self.conv2d = nn.Conv2d(cin, cout, 3, 2 if scale == "down" else 1, bias=not norm)
        if norm:
            self.norm = nn.Module()
            self.norm.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        if hasattr(self, "norm"):
            x = self.norm.norm(x)
        return F.leaky_relu(x, 0.2) if self.relu_on else x


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout, scale="none"):
        super().__init__()
        if scale != "none" or cin != cout:
            self.shortcut_func = ConvLayer(cin, cout, scale)
        first, second = {"down": ("none", "down"), "up": ("up", "none"), "none": ("none", "none")}[scale]
        self.conv1 = ConvLayer(cin, cout, first, norm=True, relu=True)
        self.conv2 = ConvLayer(cout, cout, second, norm=True)

    def forward(self, x):
        identity = self.shortcut_func(x) if hasattr(self, "shortcut_func") else x
        return identity + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """image [B, 3, S, S] RGB in [-1, 1] -> (parsing logits [B, classes, S, S], image)."""

    def __init__(self, base_ch=64, down=4, up=4, depth=10, max_ch=256, classes=19):
        super().__init__()
        clip = lambda c: max(base_ch, min(c, max_ch))  # noqa: E731 - the released layout's channel rule
        head = base_ch
        encoder = [ConvLayer(3, base_ch)]
        for _ in range(down):
            encoder.append(ResidualBlock(clip(head), clip(head * 2), "down"))
            head *= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*(ResidualBlock(clip(head), clip(head)) for _ in range(depth)))
        decoder = []
        for _ in range(up):
            decoder.append(ResidualBlock(clip(head), clip(head // 2), "up"))
            head //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = ConvLayer(clip(head), 3)
        self.out_mask_conv = ConvLayer(clip(head), classes)

    def forward(self, x):
        feat = self.encoder(x)
        x = self.decoder(feat + self.body(feat))
        return self.out_mask_conv(x), self.out_img_conv(x)

    @classmethod
    def from_state_dict(cls, state):
        def count(prefix):
            return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})
        widths = [v.shape[0] for k, v in state.items() if k.endswith("conv2d.weight")]
        model = cls(state["encoder.0.conv2d.weight"].shape[0], count("encoder") - 1, count("decoder"),
                    count("body"), max(widths), state["out_mask_conv.conv2d.weight"].shape[0])
        model.load_state_dict(state, strict=True)
        return model.eval()
