"""The torch side of sdonnx's conversion on first use (sdonnx/cache.py), run in a child process:

    python -m converters.first_use MODULE:FUNCTION SOURCE OUT OPTIONS_JSON

FUNCTION(source, out, options, report) writes the converted copy into OUT (which must not exist), the file its
cache kind names as `complete` last. Progress goes to stdout as JSON lines {"message", "done", "total"}; an
error ends the process with status 2 and its one-line message as the last line on stderr.
"""
import importlib
import json
import sys
from pathlib import Path

# the stages convert() reports for a model: loading, then an export and a parity check per graph, then the move
_STAGES = ("loading", "exporting", "checking", "wrote")


def checkpoint(source, out, options, report):
    """A single-file checkpoint -> an sdonnx model folder (converters/convert.py), with the prediction type
    and family a `.yaml` config beside the file gave (options)."""
    from .convert import convert

    graphs = {"count": 4}

    def progress(message):
        if message.startswith("exporting text_encoder_2"):
            graphs["count"] = 5  # SDXL base: two text encoders
        done = progress.done = progress.done + message.startswith(_STAGES)
        if message.startswith("wrote"):
            message = "checked and written"  # not the staging path: the cache moves the folder into place
        report(message, done, 2 + 2 * graphs["count"])

    progress.done = 0
    convert(source, out, family=options.get("family"), prediction=options.get("prediction"), progress=progress)


def vae(source, out, options, report):
    """An external VAE file (A1111's models/VAE: original or diffusers layout) -> a folder with its decoder and
    encoder graphs and `vae.json` (sdonnx/vae.py reads it); options["family"] is the latent space it is for."""
    from .vae import convert_vae

    convert_vae(Path(source), Path(out), options, report)


def controlnet(source, out, options, report):
    """A ControlNet file from models/ControlNet (any layout converters/controlnet.py reads) -> its folder."""
    from .controlnet import convert_controlnet

    stages = iter(range(1, 100))
    convert_controlnet(source, out, report=lambda message: report(message, next(stages), 0))


def postprocess(source, out, options, report):
    """An upscaler or face-restoration model file (models/ESRGAN, RealESRGAN, SwinIR, GFPGAN, Codeformer) -> its
    converted folder (converters/postprocess: graph + post-processing manifest)."""
    from .postprocess.base import convert_postprocess

    stages = iter(range(1, 100))
    convert_postprocess(source, out, progress=lambda message: report(message, next(stages), 0))


def _resolve(target):
    module, _, name = target.partition(":")
    if not module.startswith("converters."):  # only this package's converters run here
        raise ValueError(f"converter {target!r} is not in the converters package")
    return getattr(importlib.import_module(module), name)


def main(argv):
    target, source, out, options = argv

    def report(message, done=0, total=0):
        print(json.dumps({"message": message, "done": done, "total": total}), flush=True)

    try:
        _resolve(target)(Path(source), Path(out), json.loads(options), report)
    except (ValueError, OSError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
