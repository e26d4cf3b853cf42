"""RetinaFace with a ResNet-50 backbone (Deng et al. 2019), the detector A1111 uses through facexlib
(detection_Resnet50_Final.pth): ResNet stages 2-4 -> feature pyramid -> SSH context modules -> per level
box, score and five-landmark heads with two anchors per cell.

Names match the released file once its DataParallel "module." prefix is removed (torchvision's ResNet
layout under "body."). The backbone's base width and depth are parameters so tests can build a small one.
Graph contract: BGR image minus (104, 117, 123), [1, 3, H, W] -> loc [1, N, 4], conf [1, N, 2] (softmax),
landmarks [1, N, 10]; the priors, decoding and NMS are numpy (sdonnx/postprocess/retinaface.py).
"""
import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 convolution)."""

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if hasattr(self, "downsample") else x))


class ResNetBody(nn.Module):
    def __init__(self, width=64, depths=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        cin = width
        for i, depth in enumerate(depths):
            w = width * 2 ** i
            blocks = [Bottleneck(cin, w, 1 if i == 0 else 2)] + [Bottleneck(w * 4, w, 1) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w * 4

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return c2, c3, self.layer4(c3)


def _conv_bn(cin, cout, kernel, leaky=None):
    """Conv (no bias) + BatchNorm, then a leaky ReLU of that slope when `leaky` is given."""
    layers = [nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.LeakyReLU(leaky)) if leaky is not None else nn.Sequential(*layers)


class FPN(nn.Module):
    def __init__(self, cins, cout, leaky):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, cout, 1, leaky) for c in cins)
        self.merge1, self.merge2 = _conv_bn(cout, cout, 3, leaky), _conv_bn(cout, cout, 3, leaky)

    def forward(self, c2, c3, c4):
        p3 = self.output3(c4)
        p2 = self.merge2(self.output2(c3) + F.interpolate(p3, size=c3.shape[2:], mode="nearest"))
        p1 = self.merge1(self.output1(c2) + F.interpolate(p2, size=c2.shape[2:], mode="nearest"))
        return p1, p2, p3


class SSH(nn.Module):
    def __init__(self, cin, cout, leaky):
        super().__init__()
        self.conv3X3 = _conv_bn(cin, cout // 2, 3)
        self.conv5X5_1 = _conv_bn(cin, cout // 4, 3, leaky)
        self.conv5X5_2 = _conv_bn(cout // 4, cout // 4, 3)
        self.conv7X7_2 = _conv_bn(cout // 4, cout // 4, 3, leaky)
        self.conv7x7_3 = _conv_bn(cout // 4, cout // 4, 3)

    def forward(self, x):
        c5 = self.conv5X5_1(x)
        c7 = self.conv7X7_2(c5)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5), self.conv7x7_3(c7)], dim=1))


class Head(nn.Module):
    def __init__(self, cin, per_anchor, anchors=2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(cin, anchors * per_anchor, 1)

    def forward(self, x):
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    def __init__(self, width=64, depths=(3, 4, 6, 3), out_channels=256):
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0  # the released configuration's rule
        self.body = ResNetBody(width, depths)
        self.fpn = FPN([width * 8, width * 16, width * 32], out_channels, leaky)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(out_channels, out_channels, leaky) for _ in range(3))
        self.ClassHead = nn.ModuleList(Head(out_channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(out_channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(out_channels, 10) for _ in range(3))

    def forward(self, x):
        features = [ssh(p) for ssh, p in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(*self.body(x)))]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, features)], dim=1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, features)], dim=1)
        landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, F.softmax(conf, dim=-1), landmarks

    @classmethod
    def from_state_dict(cls, state):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        width = state["body.conv1.weight"].shape[0]
        depths = tuple(len({k.split(".")[2] for k in state if k.startswith(f"body.layer{i}.")}) for i in range(1, 5))
        model = cls(width, depths, state["fpn.output1.0.weight"].shape[0])
        model.load_state_dict(state, strict=True)
        return model.eval()
