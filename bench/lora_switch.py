"""How long switching LoRAs between generations takes (merge in numpy + ONNX Runtime session creation).

    python bench/lora_switch.py                                   # tiny SD 1.x built here, synthetic LoRAs
    python bench/lora_switch.py --model models/sd15 --lora-dir models/Lora --loras add_detail,ink

Synthetic LoRAs are kohya files with rank-16 up/down for every attention, feed-forward and resnet conv layer
of the model (what a LoCon trained on "all layers" carries). Each row is one load_networks call plus the sessions; "merge" is
the numpy part (files are parsed on first use and cached), the rest builds the sessions.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sdonnx import Pipeline
from sdonnx.adapters.lora import LoraRequest
from sdonnx.adapters.names import modules

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
           "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def tiny_model(folder):
    import tiny_models

    from converters.convert import convert

    tiny_models.save_pipeline(folder / "diffusers", "sd1")
    convert(folder / "diffusers", folder / "model")
    return folder / "model"


def synthetic_lora(pipe, path, rank, seed):
    """kohya LoRA/LoCon for every TARGETS layer of the model, random nonzero up/down."""
    from safetensors.numpy import save_file

    from sdonnx.adapters.onnx_weights import OnnxWeights

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        spec = pipe.manifest.components[component]
        weights = OnnxWeights(pipe.folder / spec.path)
        for module, params in modules(spec.weights, component).items():
            if not module.endswith(TARGETS) or "weight" not in params:
                continue
            shape, _ = weights.spec(spec.weights[f"{component}.{module}.weight"])
            down_shape = (rank, shape[1], *shape[2:])
            up_shape = (shape[0], rank, *[1] * (len(shape) - 2))
            key = prefix + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = rng.standard_normal(down_shape).astype(np.float16) * 0.01
            tensors[f"{key}.lora_up.weight"] = rng.standard_normal(up_shape).astype(np.float16) * 0.01
            tensors[f"{key}.alpha"] = np.array(rank / 2, np.float16)
    save_file(tensors, str(path))
    return path.stem


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(pipe, names):
    a, b = names[0], names[-1]
    steps = [
        ("base (first sessions)", []),
        (f"+ {a} (first use: read file + base layers)", [LoraRequest(a, 1.0, 1.0)]),
        (f"{a} weight 1.0 -> 0.5", [LoraRequest(a, 0.5, 0.5)]),
        (f"{a} -> {b}", [LoraRequest(b, 1.0, 1.0)]),
        (f"{b} -> {a} + {b}", [LoraRequest(a, 1.0, 1.0), LoraRequest(b, 0.7, 0.7)]),
        (f"{a} + {b}: unet weight only", [LoraRequest(a, 1.0, 0.3), LoraRequest(b, 0.7, 0.7)]),
        ("same set again (cached)", [LoraRequest(a, 1.0, 0.3), LoraRequest(b, 0.7, 0.7)]),
        ("remove tags (base, cached)", []),
    ]
    rows = []
    for label, requests in steps:
        total, _ = timed(lambda r=requests: _sessions(pipe, pipe.load_networks(r)))
        merge, _ = timed(lambda r=requests: pipe._loras.apply(r)) if requests else (0.0, None)
        rows.append((label, merge, total))
    return rows


def _sessions(pipe, networks):
    return pipe._component("text_encoder", networks=networks), pipe._component("unet", networks=networks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted model folder (default: a tiny SD 1.x built here)")
    parser.add_argument("--lora-dir", help="LoRA folder (with --model)")
    parser.add_argument("--loras", help="two comma-separated LoRA names from --lora-dir (default: synthetic)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the synthetic LoRAs")
    parser.add_argument("--provider", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tiny_model(tmp)
        lora_dir = Path(args.lora_dir) if args.lora_dir else tmp / "Lora"
        lora_dir.mkdir(exist_ok=True)
        pipe = Pipeline.load(model, provider=args.provider, lora_dir=lora_dir)
        if args.loras:
            names = args.loras.split(",")
        else:
            names = [synthetic_lora(pipe, lora_dir / f"synthetic_{i}.safetensors", args.rank, i) for i in range(2)]
        rows = run(pipe, names)
    print(f"model {model.name} ({pipe.manifest.family}), provider {pipe.providers[0]}; times in seconds")
    print(f"{'switch':<48} {'merge':>8} {'total':>8}")
    for label, merge, total in rows:
        print(f"{label:<48} {merge:8.3f} {total:8.3f}")


if __name__ == "__main__":
    main()
