"""Images per minute of `run_jobs` here (the plain local loop) against 1 and 2 local Ray workers, same machine,
same run, and what Ray costs per image.

    python bench/batch_ray.py                                   # tiny SD 1.x built here (Ray's overhead shows)
    python bench/batch_ray.py --model models/sd15 --size 256 --steps 10 --images 8

Each engine runs the same jobs (distinct prompts, fixed seeds) into its own folder; the files are checked to
be byte-identical to the local loop's. Reported per engine: wall time of the whole run_jobs call (actor
start and model load included), the steady rate (images after the first, over the time from the first image
written to the last: what a long batch sees), and Ray's overhead per image: its steady seconds per image
with one worker minus the local loop's (dispatch, pickling the request and the image, the object store, the
driver's write), and the peak resident memory of the process tree (psutil, every 0.1 s: the bench process
and, with Ray, its raylet, GCS and worker processes; the idle Ray instance's own share printed apart). Ray starts once (ray.init, not counted; printed apart). CPU workers get an equal share of
the CPUs as ONNX Runtime threads (sdonnx/jobs_ray.py), the local loop one thread per physical core. The
engines take turns for --repeats rounds and the medians are reported.

A probe then times what surrounds a generate call that costs nothing (a stand-in pipeline returns a finished
512x512 image of noise), steady seconds per image: the local loop's (the request check and the PNG write: what
the driver spends on every image of a cluster run) and one Ray worker's (dispatch, pickling, the object store,
the same write; the driver writes one image while the worker sends the next, so it can come out below the
local figure: Ray's cost is then hidden behind the write).

The 1-minute load average before and after is printed and saved: on a shared machine compare the ratios of
one run only. Results: bench/results/batch_ray-<date>.json. Needs ray and psutil (the test environment has both).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sdonnx import GenerationRequest  # noqa: E402
from sdonnx.jobs import Job, run_jobs  # noqa: E402


def tiny_model(folder):
    import tiny_models

    from converters.convert import convert

    tiny_models.save_pipeline(folder / "diffusers", "sd1")
    convert(folder / "diffusers", folder / "model")
    return folder / "model"


def jobs_for(model, count, size, steps):
    return [Job(GenerationRequest.from_kwargs(prompt=f"a photo of item {n}, studio light", seed=1000 + n,
                                              steps=steps, width=size, height=size), str(model), f"{n:04}")
            for n in range(count)]


class TreeMemory:
    """Peak resident memory of this process and all its descendants (with a local Ray: its raylet, GCS and
    workers), sampled every 0.1 s on a thread while in the `with` block."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self):
        import psutil

        me = psutil.Process()
        total = 0
        for process in (me, *me.children(recursive=True)):
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass  # gone between the listing and the reading
        return total

    def _sample(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(jobs, outdir, **options):
    """(wall seconds, steady images per minute, peak MB of the process tree) of one run_jobs call."""
    stamps = []
    with TreeMemory() as memory:
        start = time.perf_counter()
        run_jobs(jobs, outdir, resume=False, on_image=lambda job, path: stamps.append(time.perf_counter()),
                 **options)
        wall = time.perf_counter() - start
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60 if len(stamps) > 1 else float("nan")
    return wall, steady, memory.peak / 2**20


class _Made:
    """A generate result of the probe below (images, infotexts)."""

    def __init__(self, image):
        self.images, self.infotexts = [image], [""]


class ReadyImage:
    """A stand-in pipeline for the overhead probe: generate returns a finished 512x512 image of noise (PNG's
    worst case) at once, so what is timed is what surrounds a generate call: dispatch, transfer, the write."""

    def __init__(self, model):
        import numpy as np
        from PIL import Image

        self.image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))

    def generate(self, request):
        return _Made(self.image)


def probe(model, outdir, count, **options):
    """Steady seconds per image (first image written to the last: worker start left out) around a generate
    call that costs nothing."""
    import logging

    stamps = []
    logging.getLogger("sdonnx.jobs").setLevel(logging.ERROR)  # the stand-in writes no infotext: no warning each
    run_jobs(jobs_for(model, count, 64, 1), outdir, resume=False, load=ReadyImage,
             on_image=lambda job, path: stamps.append(time.perf_counter()), **options)
    logging.getLogger("sdonnx.jobs").setLevel(logging.NOTSET)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).glob("*.png")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="converted model folder [a tiny SD 1.x built here]")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--probe", type=int, default=60, help="jobs of the overhead probe (512x512, no model run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or tiny_model(tmp)
        jobs = jobs_for(model, args.images, args.size, args.steps)
        before = TreeMemory().now()
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - start
        time.sleep(2)
        ray_idle = (TreeMemory().now() - before) / 2**20  # what a local Ray instance holds with no worker
        engines = {"local loop": {}, "ray, 1 worker": {"ray": "", "workers": 1},
                   "ray, 2 workers": {"ray": "", "workers": 2}}
        runs = {name: [] for name in engines}
        for _ in range(args.repeats):  # alternating rounds: load that comes and goes hits every engine alike
            for n, (name, options) in enumerate(engines.items()):
                runs[name].append(timed(jobs, tmp / str(n), **options))
                assert files(tmp / str(n)) == files(tmp / "0"), "Ray's files differ from the local loop's"
        probes = {"local loop": probe(model, tmp / "p0", args.probe),
                  "ray, 1 worker": probe(model, tmp / "p1", args.probe, ray="", workers=1)}
        ray.shutdown()
    load_after = os.getloadavg()[0]
    rows = {name: tuple(statistics.median(column) for column in zip(*r)) for name, r in runs.items()}
    report(args, rows, probes, ray_start, ray_idle, load_before, load_after)


def report(args, rows, probes, ray_start, ray_idle, load_before, load_after):
    local_steady = rows["local loop"][1]
    print(f"{args.images} images {args.size}x{args.size}, {args.steps} steps, model {args.model or 'tiny SD 1.x'}, "
          f"medians of {args.repeats} alternating rounds; "
          f"{os.cpu_count()} CPUs; load {load_before:.2f} before, {load_after:.2f} after; ray.init {ray_start:.1f} s")
    print(f"{'engine':20} {'wall s':>8} {'img/min (wall)':>15} {'img/min (steady)':>17} {'vs local':>9} "
          f"{'peak MB':>8}")
    for name, (wall, steady, peak) in rows.items():
        print(f"{name:20} {wall:8.1f} {args.images / wall * 60:15.1f} {steady:17.1f} {steady / local_steady:8.2f}x "
              f"{peak:8.0f}")
    print(f"peak MB: resident memory of the bench process and its descendants, Ray's raylet, GCS and workers "
          f"included; every row holds the idle local Ray instance, started first ({ray_idle:.0f} MB)")
    overhead = 60 / rows["ray, 1 worker"][1] - 60 / local_steady
    print(f"Ray's overhead per image (1 worker, steady): {overhead * 1000:.0f} ms")
    print(f"probe, a 512x512 image made at no cost, {args.probe} jobs, steady: the local loop "
          f"{probes['local loop'] * 1000:.0f} ms per image (request check + PNG write), 1 Ray worker "
          f"{probes['ray, 1 worker'] * 1000:.0f} ms (+ dispatch, pickling, object store; overlapped with the write)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"images": args.images, "size": args.size, "steps": args.steps, "model": str(args.model or "tiny"),
              "repeats": args.repeats,
              "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
              "ray_init_s": ray_start, "overhead_per_image_s": overhead,
              "probe_s_per_image": probes, "probe_jobs": args.probe,
              "ray_idle_mb": ray_idle,
              "runs": {name: {"wall_s": wall, "steady_images_per_min": steady, "peak_tree_mb": peak}
                       for name, (wall, steady, peak) in rows.items()}}
    path = args.out / f"batch_ray-{time.strftime('%Y-%m-%d-%H%M')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
