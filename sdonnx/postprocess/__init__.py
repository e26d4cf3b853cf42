"""Post-processing models on ONNX Runtime: upscalers (ESRGAN family) and the face-restoration models.

manifest.py: the manifest of a converted post-processing model (kind, architecture, scale, layout,
channel order, value range, tiling); models.py: finding converted models by kind and name in a list of
folders; upscale.py: A1111's tiled upscale and its upscaler names; extras.py: A1111's Extras tab
(upscale, then the face restorers). Torch-free, as the rest of sdonnx/.
"""
from .manifest import KINDS, PostprocessManifest, PostprocessManifestError, load_postprocess_manifest
from .models import Found, ModelNotFound, NotConverted, find, scan

__all__ = ["KINDS", "Found", "ModelNotFound", "NotConverted", "PostprocessManifest", "PostprocessManifestError",
           "find", "load_postprocess_manifest", "scan"]
