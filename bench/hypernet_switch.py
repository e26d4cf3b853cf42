"""How long switching hypernetworks (and their strengths) between generations takes, and what they add per UNet call.

    python bench/hypernet_switch.py                                   # tiny SD 1.x built here, synthetic files
    python bench/hypernet_switch.py --model models/sd15 --hypernetwork-dir models/hypernetworks --names anime,aini

Synthetic files are A1111 hypernetworks (torch.save, A1111's layout) with a module for every attention
context width of the model (what A1111's "create hypernetwork" writes with every size ticked), layer
structure 1, 2, 1, relu, random weights. Each row of the first table is one load_networks call plus the
UNet facade it needs: "rewrite" is the graph rewrite (file parsing on first use included), the rest is ONNX
Runtime's session creation. The second table times one CFG-batched UNet call at the model's native size.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sdonnx import Pipeline
from sdonnx.adapters.hypernetwork import HypernetRequest
from sdonnx.adapters.hypernetwork_graph import UnetHypernetworks


def tiny_model(folder):
    import tiny_models

    from converters.convert import convert

    tiny_models.save_pipeline(folder / "diffusers", "sd1")
    convert(folder / "diffusers", folder / "model")
    return folder / "model"


def synthetic(path, widths, seed):
    """An A1111 file: [1, 2, 1] relu modules (k and v) for each width, random weights."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def module(w):
        return {"linear.0.weight": torch.randn(2 * w, w, generator=g) / w ** 0.5, "linear.0.bias": torch.zeros(2 * w),
                "linear.2.weight": torch.randn(w, 2 * w, generator=g) / (2 * w) ** 0.5, "linear.2.bias": torch.zeros(w)}

    data = {w: (module(w), module(w)) for w in widths}
    data.update(layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=False, activate_output=False,
                use_dropout=False, name=path.stem)
    torch.save(data, str(path))
    return path.stem


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def unet(pipe, requests):
    """The UNet facade a generate call with these hypernetwork tags runs (rewritten and created if not cached)."""
    return pipe._component("unet", networks=pipe.load_networks(hypernets=requests))


def switch_rows(pipe, a, b):
    steps = [
        ("base (first session)", []),
        (f"+ {a} (first use: read file, rewrite)", [HypernetRequest(a, 1.0)]),
        (f"{a} strength 1.0 -> 0.5", [HypernetRequest(a, 0.5)]),
        (f"{a} -> {b}", [HypernetRequest(b, 1.0)]),
        (f"{b} -> {a} + {b} (chained)", [HypernetRequest(a, 1.0), HypernetRequest(b, 0.7)]),
        (f"{a} + {b}: strengths only", [HypernetRequest(a, 0.3), HypernetRequest(b, 1.2)]),
        ("remove tags (base, cached)", []),
        (f"{a} again (file cached, rewrite + session)", [HypernetRequest(a, 1.0)]),
    ]
    rows = []
    for label, requests in steps:
        spent = {"rewrite": 0.0}
        holder = pipe._hypernetworks
        graph = holder.graph

        def counted(*args, **kwargs):
            seconds, out = timed(lambda: graph(*args, **kwargs))
            spent["rewrite"] += seconds
            return out

        holder.graph = counted  # the bench's stopwatch around the rewrite, for this row only
        total, _ = timed(lambda r=requests: unet(pipe, r))
        del holder.graph
        rows.append((label, spent["rewrite"], total))
    return rows


def call_rows(pipe, a, b, repeats):
    m = pipe.manifest
    size = m.native_size // m.vae_scale_factor
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, m.latent_channels, size, size)).astype(np.float32)
    context = rng.standard_normal((2, 77, m.text_encoders[0].hidden_size)).astype(np.float32)
    rows = []
    for label, requests in [("base", []), (a, [HypernetRequest(a, 1.0)]),
                            (f"{a} + {b}", [HypernetRequest(a, 1.0), HypernetRequest(b, 1.0)])]:
        call = unet(pipe, requests)
        call(sample, np.array([500.0, 500.0]), context)  # warm-up
        seconds = min(timed(lambda: call(sample, np.array([500.0, 500.0]), context))[0] for _ in range(repeats))
        rows.append((label, seconds))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted SD 1.x/2.x model folder (default: a tiny SD 1.x built here)")
    parser.add_argument("--hypernetwork-dir", help="hypernetwork folder (with --names)")
    parser.add_argument("--names", help="two comma-separated hypernetwork names (default: synthetic files)")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="UNet calls timed per row (the fastest counts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tiny_model(tmp)
        folder = Path(args.hypernetwork_dir) if args.hypernetwork_dir else tmp / "hypernetworks"
        folder.mkdir(exist_ok=True)
        pipe = Pipeline.load(model, provider=args.provider, hypernetwork_dir=folder)
        # made here rather than on the first tag, so that the rewrite column sees every rewrite; reading the
        # base graph's structure (once per pipeline) is then left out of the first-use row
        pipe._hypernetworks = UnetHypernetworks(pipe.folder, pipe.manifest, folder)
        seconds, widths = timed(lambda: sorted(pipe._hypernetworks.attention_widths()))
        print(f"reading the UNet graph's structure (once per pipeline): {seconds:.3f} s; attention widths {widths}")
        if args.names:
            a, b = args.names.split(",")
        else:
            a, b = (synthetic(folder / f"synthetic_{i}.pt", widths, i) for i in range(2))
        switches = switch_rows(pipe, a, b)
        calls = call_rows(pipe, a, b, args.repeats)
    print(f"model {model.name} ({pipe.manifest.family}), provider {pipe.providers[0]}; times in seconds")
    print(f"{'switch':<52} {'rewrite':>8} {'total':>8}")
    for label, rewrite, total in switches:
        print(f"{label:<52} {rewrite:8.3f} {total:8.3f}")
    print(f"\n{'UNet call (batch 2, native size)':<52} {'seconds':>8} {'x base':>8}")
    for label, seconds in calls:
        print(f"{label:<52} {seconds:8.4f} {seconds / calls[0][1]:8.2f}")


if __name__ == "__main__":
    main()
