"""Peak memory of one generate with and without lowmem, each in a fresh process.

    python bench/lowmem.py MODEL_DIR [--size 256] [--steps 2]

lowmem creates each stage's session when the stage starts and releases it after (text encoder before
the UNet loop, UNet before the VAE), so the peak should follow the largest component (the UNet)
instead of the sum of all sessions. Peak RSS is the child's own (run.py's peak_rss_bytes: VmHWM).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[5])
from run import peak_rss_bytes
import sdonnx
pipe = sdonnx.Pipeline.load(sys.argv[1], provider="cpu", lowmem=sys.argv[2] == "1")
t = time.perf_counter()
pipe.generate("a photo of a cat", steps=int(sys.argv[4]), sampler="Euler", seed=1,
              width=int(sys.argv[3]), height=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mib": peak_rss_bytes() / 2**20}))
"""


def run(model, lowmem, size, steps):
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), "1" if lowmem else "0", str(size), str(steps),
                          str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    load = open("/proc/loadavg").read().split()[0]
    results = {mode: run(args.model, mode == "lowmem", args.size, args.steps) for mode in ("default", "lowmem")}
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, load {load}, {time.strftime('%Y-%m-%d')}")
    print("| mode | peak RSS (MiB) | generate (s) |\n|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |")
    ratio = results["lowmem"]["peak_rss_mib"] / results["default"]["peak_rss_mib"]
    print(f"lowmem / default peak RSS: {ratio:.2f}")


if __name__ == "__main__":
    main()
