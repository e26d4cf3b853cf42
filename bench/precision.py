"""Lower precision on the CPU: sdonnx in fp32, bf16 and int8 (CPU provider and OpenVINO) against diffusers in
fp32 and with bf16 autocast, each engine in a fresh process, rounds interleaved.

    python bench/precision.py --size 512 --steps 20 --rounds 2          # the issue's table (hours on 2 cores)
    python bench/precision.py --size 256 --steps 10 --rounds 1 --engines diffusers-fp32 ov-bf16

The model is run.py's random-weight full-size SD 1.5 (built and converted into --work once, `--optimize cpu`
graphs); the int8 engines need its static int8 UNet (`sdonnx quantize`, made here when missing, calibrated
at --calibration-size). OpenVINO engines run in .venv-openvino (SDONNX_OPENVINO_PYTHON overrides), as
onnxruntime-openvino replaces the onnxruntime module.

Per engine: time to first image from process start (imports, sessions or compiled models, one image), a
warm generate, the UNet's time per call in it, peak RSS. Every sdonnx engine also writes its UNet output on
fixed inputs at t = 999/500/50 (real prompt context, CFG batch) and its first image: the relative error and
PSNR of each lower precision are taken against the sdonnx fp32 engine of the same run. `second-cli` is the
fastest sdonnx mode's (OpenVINO bf16) `sdonnx generate` run twice in fresh processes from empty caches: the
second one's wall time, with the compiled models cached by the first, against diffusers fp32's first image;
`second-cli-ort` the same for the CPU provider in fp32 with its optimized-graph cache. The other engines
run with both caches off (cold).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PROMPT, ROOT, peak_rss_bytes, prepare, save_image, timer  # noqa: E402

ENGINES = ("diffusers-fp32", "diffusers-bf16", "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8", "second-cli",
           "second-cli-ort")
SDONNX = {"ort-fp32": ("cpu", "fp32"), "ort-int8": ("cpu", "int8"), "ov-fp32": ("openvino", "fp32"),
          "ov-bf16": ("openvino", "bf16"), "ov-int8": ("openvino", "int8")}
COST_TIMESTEPS = (999, 500, 50)
RESULTS = ROOT / "bench" / "results"


def openvino_python():
    configured = os.environ.get("SDONNX_OPENVINO_PYTHON")
    return Path(configured) if configured else ROOT / ".venv-openvino" / "bin" / "python"


# ---------------------------------------------------------------- one engine, one fresh process

def child(args):
    timings = {}
    timed = timer(timings)
    if args.engine.startswith("diffusers"):
        generate = _diffusers(args, timed)
    else:
        generate, pipe = _sdonnx(args, timed)
    t = time.perf_counter()
    images = generate()
    first_image, cold_s = time.time() - args.t0, time.perf_counter() - t
    save_image(args, images[0])
    timings.clear()
    t = time.perf_counter()
    generate()
    warm_s = time.perf_counter() - t
    unet = timings.get("unet", [])
    result = {"engine": args.engine, "time_to_first_image_s": first_image, "first_generate_s": cold_s,
              "generate_s": warm_s, "unet_step_s": sum(unet) / max(1, len(unet)), "unet_calls": len(unet),
              "peak_rss_bytes": peak_rss_bytes()}
    if not args.engine.startswith("diffusers"):
        _unet_outputs(args, pipe)
    print("RESULT " + json.dumps(result), flush=True)


def _diffusers(args, timed):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.diffusers, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.forward = timed("unet", pipe.unet.forward)
    autocast = args.engine == "diffusers-bf16"

    def generate():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.0, height=args.size,
                        width=args.size, generator=torch.Generator().manual_seed(1), output_type="np").images

    return generate


def _sdonnx(args, timed):
    from sdonnx.pipeline import Pipeline
    from sdonnx.runtime import session as session_mod

    run = session_mod.Session.run
    session_mod.Session.run = lambda self, *a, **k: timed(self.name, lambda: run(self, *a, **k))()
    provider, precision = SDONNX[args.engine]
    pipe = Pipeline.load(args.model, provider=provider, device="CPU" if provider == "openvino" else None,
                         precision=precision, lowmem=False)

    def generate():
        return pipe.generate(PROMPT, steps=args.steps, cfg_scale=7.0, sampler="Euler", seed=1, width=args.size,
                             height=args.size).images

    return generate, pipe


def _unet_outputs(args, pipe):
    """The UNet's output at COST_TIMESTEPS on fixed inputs (seeded latents at that noise level, the prompt's
    real context, the CFG batch), saved for the parent's relative-error column."""
    import numpy as np

    conditioning, _ = pipe.encode_prompts(PROMPT, "")
    uncond, conds = conditioning.at(0)
    u, c = np.asarray(uncond, np.float32), np.asarray(conds[0][0], np.float32)
    context = np.concatenate([u, c]) if u.ndim == 3 else np.stack([u, c])
    rng = np.random.default_rng(0)
    unet, outputs = pipe._component("unet"), {}
    for t in COST_TIMESTEPS:
        sigma = float(pipe.model_sigmas[t])
        sample = rng.standard_normal((2, 4, args.size // 8, args.size // 8)).astype(np.float32)
        outputs[str(t)] = unet(sample * sigma / (sigma ** 2 + 1) ** 0.5, [t, t], context)
    np.savez(Path(args.images) / f"{args.engine}-{args.size}-unet.npz", **outputs)


# ---------------------------------------------------------------- the parent

def run_child(engine, args, model, diffusers):
    python = str(openvino_python()) if engine.startswith("ov-") else sys.executable
    cmd = [python, __file__, "--child", engine, "--model", str(model), "--diffusers", str(diffusers), "--size",
           str(args.size), "--steps", str(args.steps), "--images", str(args.work / "images"), "--t0", "T0"]
    # cold: no compiled-model or optimized-graph cache (second_cli measures what they give)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDONNX_OPENVINO_CACHE": "", "SDONNX_GRAPH_CACHE": ""}
    load = os.getloadavg()[0]
    cmd[-1] = repr(time.time())
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{engine} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "load_avg_1m_before": load}


def second_cli(args, model, engine):
    """`sdonnx generate` in one mode, twice in fresh processes from empty caches: the second one's wall time
    (compiled models or optimized graphs from the cache the first one wrote)."""
    provider, precision = SDONNX[engine]
    python = str(openvino_python()) if provider == "openvino" else sys.executable
    cmd = [python, "-m", "sdonnx.cli", "generate", "-m", str(model), PROMPT, "--steps", str(args.steps),
           "--cfg-scale", "7", "--sampler", "Euler", "--seed", "1", "-W", str(args.size), "-H", str(args.size),
           "--provider", provider, "--precision", precision, "-o", str(args.work / "images" / "cli")]
    if provider == "openvino":
        cmd += ["--device", "CPU"]
    caches = args.work / "caches"
    shutil.rmtree(caches, ignore_errors=True)  # the first process starts cold and fills them
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDONNX_OPENVINO_CACHE": str(caches / "openvino"),
           "SDONNX_GRAPH_CACHE": str(caches / "ort")}
    walls = []
    for _ in range(2):
        load = os.getloadavg()[0]
        t = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"sdonnx generate failed:\n{out.stderr[-3000:]}")
        walls.append(time.time() - t)
    return {"engine": "second-cli", "mode": engine, "time_to_first_image_s": walls[1], "first_process_s": walls[0],
            "load_avg_1m_before": load}


def costs(results, work, size):
    """Relative UNet error and image PSNR of each sdonnx engine against ort-fp32 (same inputs, same seed)."""
    import numpy as np

    images = work / "images"
    ref_unet = images / f"ort-fp32-{size}-unet.npz"
    ref_image = images / f"ort-fp32-{size}.npy"
    if not ref_unet.is_file():
        return
    want = np.load(ref_unet)
    for engine, rows in results.items():
        got_path = images / f"{engine}-{size}-unet.npz"
        if engine == "ort-fp32" or not got_path.is_file():
            continue
        got = np.load(got_path)
        errors = {t: float(np.linalg.norm(got[t] - want[t]) / np.linalg.norm(want[t])) for t in want.files}
        x, y = (np.load(p).astype(np.float64) for p in (images / f"{engine}-{size}.npy", ref_image))
        mse = float(np.mean((x - y) ** 2))
        for row in rows:
            row["unet_rel_error"] = errors
            row["image_psnr_db"] = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def fastest(rows, key="generate_s"):
    rows = [r for r in rows if r.get(key) is not None]
    return min(rows, key=lambda r: r[key]) if rows else None


def table(results, machine):
    best = {e: fastest(rows, "time_to_first_image_s" if e.startswith("second-cli") else "generate_s")
            for e, rows in results.items()}
    base = {k: best.get(k) or {} for k in ("diffusers-fp32", "diffusers-bf16", "ort-fp32")}
    lines = [f"CPU: {machine['cpu']}; features: {', '.join(machine['features'])}",
             "| engine | generate s | spread | x diffusers fp32 | x diffusers bf16 | UNet/step s (x sdonnx fp32) "
             "| first image s (x diffusers fp32) | peak RSS GB (x diffusers fp32) | UNet rel. error t=999/500/50 "
             "| PSNR dB vs fp32 | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(engine, r, results[engine], base) for engine, r in best.items() if r is not None]
    return "\n".join(lines)


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def _row(engine, r, rows, base):
    """One table row: the engine's fastest round, the spread of its rounds, ratios to the baselines."""
    gen, step, first = r.get("generate_s"), r.get("unet_step_s"), r["time_to_first_image_s"]
    runs = [x["generate_s"] for x in rows if x.get("generate_s")]
    err = r.get("unet_rel_error")
    cells = [f"{engine} ({r['mode']})" if "mode" in r else engine,
             f"{gen:.1f}" if gen else "-",
             f"{max(runs) / min(runs):.2f}" if len(runs) > 1 else "-",
             _ratio(gen, base["diffusers-fp32"].get("generate_s")),
             _ratio(gen, base["diffusers-bf16"].get("generate_s")),
             f"{step:.2f} ({_ratio(step, base['ort-fp32'].get('unet_step_s'))})" if step else "-",
             f"{first:.1f} ({_ratio(first, base['diffusers-fp32'].get('time_to_first_image_s'))})",
             (f"{r['peak_rss_bytes'] / 1e9:.2f} ({_ratio(r['peak_rss_bytes'], base['diffusers-fp32'].get('peak_rss_bytes'))})"
              if "peak_rss_bytes" in r else "-"),
             "/".join(f"{100 * err[t]:.1f}%" for t in sorted(err, key=int, reverse=True)) if err else "-",
             f"{r['image_psnr_db']:.1f}" if "image_psnr_db" in r else "-",
             f"{r['load_avg_1m_before']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def machine_facts():
    from sdonnx.runtime import cpu

    flags = cpu.cpu_flags()
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return {"cpu": name, "features": cpu.features(flags), "cores": os.cpu_count()}


def ensure_int8(model, args, log):
    from sdonnx.manifest import load_manifest

    if "int8" not in load_manifest(model).components["unet"].variants:
        from converters.quantize import PROMPTS, quantize_unet

        log(f"quantizing the UNet (calibration at {args.calibration_size}px)")
        quantize_unet(model, PROMPTS[:2], size=args.calibration_size, steps=8, progress=log)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdonnx-bench"))
    parser.add_argument("--model", type=Path, help="an sdonnx model folder (default: run.py's, in --work)")
    parser.add_argument("--diffusers", type=Path, help="its diffusers folder (default: run.py's, in --work)")
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--child")
    parser.add_argument("--images")
    parser.add_argument("--t0", type=float)
    args = parser.parse_args()
    if args.child:
        args.engine = args.child
        return child(args)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.model is None:
        args.diffusers, args.model, _ = prepare(args.work, [args.size], log, want_int8=False)
    if any(e.endswith("int8") for e in args.engines):
        ensure_int8(args.model, args, log)
    results, machine = {}, machine_facts()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"precision-{time.strftime('%Y%m%d-%H%M')}.json"
    for n in range(args.rounds):
        for engine in args.engines:
            if engine == "second-cli":
                row = second_cli(args, args.model, "ov-bf16")
            elif engine == "second-cli-ort":
                row = second_cli(args, args.model, "ort-fp32")
            else:
                row = run_child(engine, args, args.model, args.diffusers)
            log(f"round {n + 1} {engine}: {json.dumps(row)}")
            results.setdefault(engine, []).append(row)
            costs(results, args.work, args.size)
            # after every run: what finished survives a run cut short
            out.write_text(json.dumps({"machine": machine, "size": args.size, "steps": args.steps,
                                       "rounds": args.rounds, "results": results}, indent=1))
    print(table(results, machine))
    print(f"\n(results: {out.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
