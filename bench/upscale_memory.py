"""Peak memory and time of a 512 -> 2048 upscale (4x model, A1111's 192 px tiles with 8 px overlap) against
the same upscale in one piece (tile 0), on the CPU provider.

    python bench/upscale_memory.py                       # R-ESRGAN 4x+'s architecture (RRDBNet 64nf 23nb)
    python bench/upscale_memory.py --arch compact        # R-ESRGAN General 4xV3's (SRVGGNet 64nf 32 convs)
    python bench/upscale_memory.py --arch rrdb --blocks 6   # R-ESRGAN 4x+ Anime6B's

The model has random weights in the real architecture's shape (nothing is downloaded): its cost is the
real model's. It is converted once into /tmp/sdonnx-bench-upscale/; each measurement runs in a fresh
process (no torch loaded) and reports the process's peak resident memory (ru_maxrss) above its resident
memory before the upscale, and the wall time of the upscale. Heavy: minutes of CPU for the full RRDBNet.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WORK = Path("/tmp/sdonnx-bench-upscale")


def convert(arch, blocks):
    import torch

    from converters.postprocess import convert_postprocess
    from upscaler_reference import BasicsrRRDBNet, SRVGGNetCompact

    folder = WORK / f"{arch}-{blocks}"
    if (folder / "sdonnx.json").is_file():
        return folder
    torch.manual_seed(0)  # PyTorch's default init: finite through 23 blocks (the tests' heavier draw is not)
    module = BasicsrRRDBNet(4, nf=64, nb=blocks, gc=32) if arch == "rrdb" else SRVGGNetCompact(64, blocks, 4)
    WORK.mkdir(parents=True, exist_ok=True)
    source = WORK / f"{arch}-{blocks}.pth"
    torch.save(module.eval().state_dict(), source)
    convert_postprocess(source, folder, force=True)
    return folder


def measure(folder, tile):
    """Child process: one 512x512 -> 2048x2048 upscale; prints JSON."""
    import numpy as np
    from PIL import Image

    from sdonnx.postprocess.manifest import load_postprocess_manifest
    from sdonnx.postprocess.upscale import ModelUpscaler, upscale
    from sdonnx.runtime import providers

    manifest = load_postprocess_manifest(folder)
    model = ModelUpscaler("bench", folder, manifest, providers.plan("cpu"), tile=tile, overlap=8)
    model.session()  # the session's weights are not the upscale's working memory
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    before = _rss_mb()
    start = time.perf_counter()
    out = upscale(image, 4, model)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tile": tile, "size": out.size, "seconds": round(seconds, 1),
                      "peak_above_start_mb": round(peak - before), "peak_rss_mb": round(peak)}))


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("rrdb", "compact"), default="rrdb")
    parser.add_argument("--blocks", type=int, default=None, help="RRDB blocks (23) or compact convs (32)")
    parser.add_argument("--tiles", default="192,0", help="tile sizes to measure, 0 = in one piece")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(Path(args.measure[0]), int(args.measure[1]))
    blocks = args.blocks or (23 if args.arch == "rrdb" else 32)
    folder = convert(args.arch, blocks)
    print(f"model: {args.arch}, {blocks} blocks/convs, 64 features ({folder})")
    print(f"{'tile':>6} {'output':>10} {'seconds':>8} {'peak above start MB':>20} {'peak RSS MB':>12}")
    for tile in (int(t) for t in args.tiles.split(",")):
        line = subprocess.run([sys.executable, __file__, "--measure", str(folder), str(tile)], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        print(f"{r['tile']:>6} {'x'.join(map(str, r['size'])):>10} {r['seconds']:>8} {r['peak_above_start_mb']:>20} "
              f"{r['peak_rss_mb']:>12}")


if __name__ == "__main__":
    main()
