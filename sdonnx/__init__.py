"""sdonnx: Stable Diffusion through ONNX Runtime on any GPU vendor, without torch at run time.

Importing this package is cheap: no ONNX Runtime session is created and no model file is touched
until `Pipeline.load`.
"""
__version__ = "0.1.0"

__all__ = ["GenerationRequest", "Pipeline", "load", "randn", "__version__"]


def __getattr__(name):
    # lazy: `import sdonnx` must not import onnxruntime
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "load":
        from .pipeline import Pipeline

        return Pipeline.load
    if name == "GenerationRequest":
        from .request import GenerationRequest

        return GenerationRequest
    if name == "randn":
        from .diffusion.rng import randn

        return randn
    raise AttributeError(f"module 'sdonnx' has no attribute {name!r}")
