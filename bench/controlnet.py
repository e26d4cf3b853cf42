"""What ControlNet units cost per step: one CFG-batched denoiser call with 0, 1 and 2 units, and what the UNet with
residual inputs itself costs against the plain graph (no unit active: zeros fed).

    python bench/controlnet.py                       # tiny SD 1.x and a tiny ControlNet built here
    python bench/controlnet.py --model models/onnx/sd15 --controlnet-dir models/ControlNet \\
        --controlnets control_v11p_sd15_canny,control_v11f1p_sd15_depth --size 512

Rows: "plain UNet" is the model's graph as converted; "UNet, residual inputs" the rewritten graph fed zeros
(a step outside every guidance window); "n units" one denoiser call with n ControlNets active (each ControlNet
runs on the whole [uncond, cond] batch, Balanced mode). Median of --repeats calls after one warm-up call;
sessions are created before timing. The machine's load is printed: compare ratios within one run.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sdonnx import Pipeline  # noqa: E402
from sdonnx.controlnet.apply import ControlledUNet, PassUnit, StepClock  # noqa: E402
from sdonnx.controlnet.model import ControlNetModel  # noqa: E402


def tiny(folder):
    """A tiny SD 1.x model and a tiny ControlNet from its UNet (as the tests build them)."""
    import tiny_controlnet
    import tiny_models

    from converters.convert import convert

    pipe = tiny_models.save_pipeline(folder / "diffusers", "sd1")
    convert(folder / "diffusers", folder / "model")
    source = tiny_controlnet.save(tiny_controlnet.make(pipe.unet, 3), folder / "tiny_controlnet.pth", "original")
    convert(source, folder / "ControlNet" / "tiny_controlnet")
    return folder / "model", folder / "ControlNet", ["tiny_controlnet", "tiny_controlnet"]


def _input_width(pipe, name):
    import onnx

    graph = onnx.load(str(pipe.folder / pipe.manifest.components["unet"].path), load_external_data=False).graph
    return next(i for i in graph.input if i.name == name).type.tensor_type.shape.dim[1].dim_value


def median_seconds(fn, repeats):
    fn()  # warm-up: first-run allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--controlnet-dir")
    parser.add_argument("--controlnets", help="two converted ControlNet names, comma-separated")
    parser.add_argument("--size", type=int, default=None, help="image side [the model's native size]")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, library, names = Path(args.model), Path(args.controlnet_dir), args.controlnets.split(",")
        else:
            model, library, names = tiny(Path(tmp))
        run(model, library, names, args.size, args.repeats)


def run(model, library, names, size, repeats):
    pipe = Pipeline.load(model, provider="cpu", controlnet_dir=library)
    m = pipe.manifest
    size = size or m.native_size
    latent = size // m.vae_scale_factor
    g = np.random.default_rng(0)
    x = g.standard_normal((2, m.latent_channels, latent, latent)).astype(np.float32)
    t = np.array([500.0, 500.0], np.float32)
    width = sum(te.hidden_size for te in m.text_encoders) if m.has_added_conditions else m.text_encoders[0].hidden_size
    context = g.standard_normal((2, 77, width)).astype(np.float32)
    added = {}
    if m.has_added_conditions:  # SDXL: pooled text of the graph's own width, and the size/crop time ids
        added = {"text_embeds": g.standard_normal((2, _input_width(pipe, "text_embeds"))).astype(np.float32),
                 "time_ids": np.tile(np.array([size, size, 0, 0, size, size], np.float32), (2, 1))}
    plain = pipe._component("unet")
    residual = pipe._component("unet", residuals=True)
    nets = [ControlNetModel(pipe.controlnet_library.find(n), pipe.plan) for n in names]
    hint = g.random((1, 3, size, size)).astype(np.float32)
    units = [PassUnit(net, hint, 1.0, 0.0, 1.0, False, False, False) for net in nets]
    clock = StepClock(1)
    rows = [("plain UNet", lambda: plain(x, t, context, **added))]
    zero = ControlledUNet(residual, (), clock, nets[0].manifest.residuals, m.latent_channels)
    rows.append(("UNet, residual inputs (no unit active)", lambda: zero(x, t, context, **added)))
    for n in (1, 2):
        controlled = ControlledUNet(residual, units[:n], clock, nets[0].manifest.residuals, m.latent_channels)
        rows.append((f"{n} unit{'s' * (n > 1)}", lambda c=controlled: c(x, t, context, **added)))
    print(f"model {m.name} ({m.family}), {size}x{size}, batch [uncond, cond], load {os.getloadavg()[0]:.2f}")
    base = None
    for label, fn in rows:
        seconds = median_seconds(fn, repeats)
        base = base or seconds
        print(f"{label:42} {seconds * 1000:9.1f} ms   x{seconds / base:5.2f}")


if __name__ == "__main__":
    main()
