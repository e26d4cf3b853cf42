"""`sdonnx convert` for the face-restoration models A1111 uses (GFPGAN v1.3/1.4, CodeFormer) and its face
helpers from facexlib (RetinaFace ResNet-50 detector, ParseNet parser).

Each kind is recognised from the weights' names (the signatures spandrel and facexlib rely on), never
from the file name; the module is built from the tensors' shapes and loaded strictly. Graph contracts
(batch 1: faces are restored one at a time, as A1111 does):
- restorers: image [1, 3, S, S] RGB in [-1, 1] -> restored (same layout, not clamped); CodeFormer also
  takes its fidelity `weight` [1] as a graph input;
- detector: BGR image minus (104, 117, 123), [1, 3, H, W] -> loc, conf (softmax), landmarks per prior;
- parser: image [1, 3, 512, 512] RGB in [-1, 1] -> parsing logits [1, 19, 512, 512].
"""
import torch

from .base import Recognised, Tiling
from .codeformer_arch import CodeFormer
from .gfpgan_arch import GFPGAN
from .parsenet_arch import ParseNet
from .retinaface_arch import RetinaFace

SIGNATURES = {
    "GFPGAN": ("toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight", "condition_scale.0.0.weight"),
    "CodeFormer": ("position_emb", "idx_pred_layer.1.weight", "quantize.embedding.weight",
                   "ft_layers.0.self_attn.in_proj_weight", "encoder.blocks.0.weight"),
    "RetinaFace": ("body.conv1.weight", "fpn.output1.0.weight", "ssh1.conv3X3.0.weight", "LandmarkHead.0.conv1x1.weight"),
    "ParseNet": ("encoder.0.conv2d.weight", "out_mask_conv.conv2d.weight", "body.0.conv1.conv2d.weight"),
}
PARSE_SIZE = 512  # facexlib resizes the restored face to 512 for the parser
DETECTOR_MEAN = (104.0, 117.0, 123.0)  # BGR, subtracted before the detector
# fp32 graph against torch, relative to max(1, |output|): the deep restorers accumulate rounding over
# 60-odd layers (measured ~1e-5 at full width); the argmax of CodeFormer's code lookup makes any larger
# disagreement visible at once
TOLERANCE = 1e-3


class _Image(torch.nn.Module):
    """The graph's callable: the first output only (ParseNet also returns an image)."""

    def __init__(self, model, first_only=False):
        super().__init__()
        self.model, self.first_only = model, first_only

    def forward(self, *inputs):
        out = self.model(*inputs)
        return out[0] if self.first_only else out


def claimed(state):
    """The face architecture whose signature keys the weights hold, or None."""
    names = {k[len("module."):] if k.startswith("module.") else k for k in state}
    return next((arch for arch, keys in SIGNATURES.items() if all(k in names for k in keys)), None)


def recognise(state, name):
    """Recognised for a face model's weights, or None when they are not one."""
    from .base import PostprocessConvertError

    arch = claimed(state)
    if arch is None:
        return None
    builder = {"GFPGAN": GFPGAN, "CodeFormer": CodeFormer, "RetinaFace": RetinaFace, "ParseNet": ParseNet}[arch]
    try:
        module = builder.from_state_dict(state)
    except (RuntimeError, KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        lines = str(e).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__).strip()
        hint = " (GFPGAN: only the clean architecture of v1.2-1.4 is supported)" if arch == "GFPGAN" else ""
        raise PostprocessConvertError(f"{name}: looks like {arch} but its weights do not fit{hint} "
                                      f"({detail[:300]})") from None
    return _RECOGNISED[arch](module)


def _checks(size, seed=0):
    """A random RGB image in [-1, 1], [1, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1


def _gfpgan(module):
    size = 2 ** module.log_size
    return Recognised("face_restorer", "GFPGAN", _Image(module), {"image": [1, 3, size, size]},
                      {"restored": [1, 3, size, size]}, [(_checks(size),)], channel_order="RGB",
                      value_range=(-1.0, 1.0), input_size=[size, size], tiling=Tiling(size=size),
                      facts={"noise": "stored", "size": size}, tolerance=TOLERANCE)


def _codeformer(module):
    size = module.img_size
    image = _checks(size)
    checks = [(image, torch.tensor([w])) for w in (0.5, 0.0, 1.0)]
    return Recognised("face_restorer", "CodeFormer", _Image(module), {"image": [1, 3, size, size], "weight": [1]},
                      {"restored": [1, 3, size, size]}, checks, channel_order="RGB", value_range=(-1.0, 1.0),
                      input_size=[size, size], tiling=Tiling(size=size),
                      facts={"size": size, "weight_input": "weight", "default_weight": 0.5}, tolerance=TOLERANCE)


def _retinaface(module):
    g = torch.Generator().manual_seed(0)
    checks = [(torch.randn(1, 3, 96, 128, generator=g) * 60,), (torch.randn(1, 3, 70, 52, generator=g) * 60,)]
    return Recognised("face_detector", "RetinaFace", _Image(module), {"image": [1, 3, "height", "width"]},
                      {"loc": [1, "priors", 4], "conf": [1, "priors", 2], "landmarks": [1, "priors", 10]}, checks,
                      channel_order="BGR", value_range=(0.0, 255.0),
                      facts={"mean": list(DETECTOR_MEAN), "min_sizes": [[16, 32], [64, 128], [256, 512]],
                             "steps": [8, 16, 32], "variance": [0.1, 0.2]}, tolerance=TOLERANCE)


def _parsenet(module):
    size = PARSE_SIZE
    return Recognised("face_parser", "ParseNet", _Image(module, first_only=True), {"image": [1, 3, "size", "size"]},
                      {"parsing": [1, 19, "size", "size"]}, [(_checks(64),), (_checks(80, 1),)], channel_order="RGB",
                      value_range=(-1.0, 1.0), facts={"size": size}, tolerance=TOLERANCE)


_RECOGNISED = {"GFPGAN": _gfpgan, "CodeFormer": _codeformer, "RetinaFace": _retinaface, "ParseNet": _parsenet}
