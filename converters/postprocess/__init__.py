"""`sdonnx convert` for post-processing models: upscalers (ESRGAN/RRDBNet, Real-ESRGAN's compact
SRVGGNet) and, from their own modules, the face-restoration models.

Each architecture module offers `recognise(state, name) -> Recognised | None`: it looks at the state
dict's keys and shapes only, and returns the torch module with the weights loaded plus the manifest
facts. RECOGNISERS is the list they are tried in; a new architecture adds one entry. The architectures
are written here in plain torch (spandrel, which A1111 uses, imports torchvision at package import).
"""
from .base import PostprocessConvertError, Recognised, convert_postprocess, looks_like_postprocess, recognise
from .compact import recognise as _compact
from .esrgan import recognise as _esrgan
from .faces import recognise as _faces
from .swinir import recognise as _swinir

# tried in order; the first that claims the state dict converts it
RECOGNISERS = (_esrgan, _compact, _swinir, _faces)
KNOWN = ("ESRGAN/RRDBNet (old and new layouts, Real-ESRGAN x4plus/x2plus)",
         "Real-ESRGAN compact SRVGGNet (General 4xV3, AnimeVideo)", "SwinIR (super-resolution models)",
         "GFPGAN v1.3/1.4", "CodeFormer", "RetinaFace ResNet-50 (facexlib)", "ParseNet (facexlib)")

__all__ = ["KNOWN", "RECOGNISERS", "PostprocessConvertError", "Recognised", "convert_postprocess", "looks_like_postprocess",
           "recognise"]
