"""One short GPU check (issue 17): sdonnx on ONNX Runtime's CUDA provider against the CPU provider, and a
512x512 generate timed against diffusers on the same GPU.

    bash bench/device_check.sh            # on a machine with an NVIDIA GPU and an onnxruntime offering CUDA

Stages (each reported; one failing does not stop the others):
  env    GPU, onnxruntime version and providers (no CUDA provider: the check says so and stops)
  tiny   tiny random SD 1.x, SD 2.x-v and SDXL (tests/tiny_*.py) converted here; fp32 (and fp16 for SD 1.x)
         generated on CUDA and on the CPU; max pixel difference; the provider each session really ran on
  full   full-size random-weight SD 1.5 (bench/run.py's model), converted fp32 + fp16; CUDA vs CPU images at
         256x256 (4 steps); 512x512, 20 steps Euler, CFG 7, batch 1: warm generate time of sdonnx CUDA fp32/fp16
         and of diffusers fp32/fp16 on the same GPU
Writes $OUT/device_check.json (or /tmp/device_check/) and ends with one line `device_check: ...`.
"""
import json
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
WORK = Path(os.environ.get("DEVICE_CHECK_WORK", "/tmp/device_check_work"))
PROMPT = "a photograph of an astronaut riding a horse"


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def env():
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages beside torch
        ort.preload_dlls()

    info = {"python": platform.python_version(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "cpu": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def session_providers(pipe):
    """{component: provider the session really runs on first} for the sessions the pipeline created."""
    found = {}
    for key, component in pipe._components.items():
        session = getattr(component.session, "_session", None)
        if session is not None:
            found[key[0]] = session.get_providers()[0]
    return found


def generate(folder, provider, size, steps, seed=1):
    import numpy as np
    from sdonnx.pipeline import Pipeline

    pipe = Pipeline.load(folder, provider=provider)
    result = pipe.generate(PROMPT, steps=steps, cfg_scale=7.0, sampler="Euler", seed=seed, width=size, height=size)
    return pipe, np.asarray(result.images[0]).astype(np.int16)


def compare(folder, size, steps):
    """CUDA vs CPU on the same model: max and mean pixel difference (0-255) and CUDA's session providers."""
    _, cpu = generate(folder, "cpu", size, steps)
    pipe, gpu = generate(folder, "cuda", size, steps)
    diff = abs(cpu - gpu)
    return {"max_px": int(diff.max()), "mean_px": round(float(diff.mean()), 3), "ran_on": session_providers(pipe)}


def fp32_twin(folder):
    """The same converted folder read as its fp32 base graphs (derived fp16 paths dropped from the manifest)."""
    twin = Path(str(folder) + "-fp32view")
    if twin.exists():
        shutil.rmtree(twin)
    twin.mkdir()
    for item in Path(folder).iterdir():
        if item.name != "sdonnx.json":
            (twin / item.name).symlink_to(item.resolve())

    def strip(node):
        if isinstance(node, dict):
            return {k: (None if k == "optimized_path" else {} if k == "optimized" else strip(v)) for k, v in node.items()}
        return [strip(v) for v in node] if isinstance(node, list) else node

    manifest = json.loads((Path(folder) / "sdonnx.json").read_text())
    (twin / "sdonnx.json").write_text(json.dumps(strip(manifest)))
    return twin


def tiny():
    from converters.convert import convert
    import tiny_models
    import tiny_sdxl

    results = {}
    for name, save in (("sd1", lambda p: tiny_models.save_pipeline(p, "sd1")),
                       ("sd2-v", lambda p: tiny_models.save_pipeline(p, "sd2")),
                       ("sdxl", lambda p: tiny_sdxl.save(p, "base"))):
        src = WORK / f"tiny-{name}"
        if not src.exists():
            save(src)
        for dtype in ("fp32", "fp16") if name == "sd1" else ("fp32",):
            out = WORK / f"tiny-{name}-{dtype}"
            convert(src, out, force=True, dtype=dtype)
            results[f"{name}-{dtype}"] = compare(out, 64, 8)
            log(f"tiny {name} {dtype}: {results[f'{name}-{dtype}']}")
    return results


def timed_warm(fn, repeats=2):
    fn()  # cold: session creation, cuDNN autotuning
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best, 3)


def diffusers_time(folder, dtype, size, steps):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def run():
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
                 generator=torch.Generator("cuda").manual_seed(1), output_type="np")
        torch.cuda.synchronize()

    seconds = timed_warm(run)
    del pipe
    torch.cuda.empty_cache()
    return seconds


def full():
    import torch
    from converters.convert import convert
    from run import sd15_pipeline
    from sdonnx.pipeline import Pipeline

    src, onnx16 = WORK / "sd15-random", WORK / "sd15-random-fp16"
    if not (src / "model_index.json").is_file():
        log("building the random-weight SD 1.5 pipeline")
        sd15_pipeline().save_pretrained(src, safe_serialization=True)
    t = time.perf_counter()
    convert(src, onnx16, force=True, dtype="fp16", progress=log)
    results = {"convert_fp16_s": round(time.perf_counter() - t, 1)}
    onnx32 = fp32_twin(onnx16)
    results["fp32_cuda_vs_cpu_256"] = compare(onnx32, 256, 4)
    log(f"full fp32 256: {results['fp32_cuda_vs_cpu_256']}")
    _, cpu = generate(onnx32, "cpu", 256, 4)
    pipe16, gpu16 = generate(onnx16, "cuda", 256, 4)
    results["fp16_cuda_vs_fp32_cpu_256"] = {"max_px": int(abs(cpu - gpu16).max()),
                                            "mean_px": round(float(abs(cpu - gpu16).mean()), 3),
                                            "ran_on": session_providers(pipe16)}
    log(f"full fp16 256: {results['fp16_cuda_vs_fp32_cpu_256']}")
    for label, folder in (("sdonnx_cuda_fp32_512_s", onnx32), ("sdonnx_cuda_fp16_512_s", onnx16)):
        pipe = Pipeline.load(folder, provider="cuda")
        results[label] = timed_warm(lambda: pipe.generate(PROMPT, steps=20, cfg_scale=7.0, sampler="Euler", seed=1,
                                                          width=512, height=512))
        log(f"{label}: {results[label]}")
        del pipe
    for label, dtype in (("diffusers_cuda_fp32_512_s", torch.float32), ("diffusers_cuda_fp16_512_s", torch.float16)):
        results[label] = diffusers_time(src, dtype, 512, 20)
        log(f"{label}: {results[label]}")
    return results


def stage(results, name, fn):
    t = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as error:  # a failed stage is reported, and the next one still runs
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    log(f"stage {name} done in {time.perf_counter() - t:.0f} s")


def summary(results):
    e = results.get("env", {})
    if "CUDAExecutionProvider" not in e.get("providers", []):
        return f"device_check: SKIP no CUDA provider in onnxruntime {e.get('onnxruntime')} ({e.get('providers')})"
    parts = [f"gpu={e.get('gpu')}", f"ort={e.get('onnxruntime')}"]
    for key, value in results.get("tiny", {}).items():
        parts.append(f"tiny {key} max {value['max_px']}px" if isinstance(value, dict) and "max_px" in value
                     else f"tiny {key} {value}")
    f = results.get("full", {})
    if "error" in f:
        parts.append(f"full ERROR {f['error'][:120]}")
    else:
        ratio = lambda a, b: f"{f[a] / f[b]:.2f}x" if f.get(a) and f.get(b) else "n/a"  # noqa: E731
        parts += [f"full fp32 max {f['fp32_cuda_vs_cpu_256']['max_px']}px",
                  f"fp16 max {f['fp16_cuda_vs_fp32_cpu_256']['max_px']}px",
                  f"512x512x20 sdonnx fp32 {f.get('sdonnx_cuda_fp32_512_s')} s / diffusers {f.get('diffusers_cuda_fp32_512_s')} s"
                  f" = {ratio('sdonnx_cuda_fp32_512_s', 'diffusers_cuda_fp32_512_s')}",
                  f"fp16 {f.get('sdonnx_cuda_fp16_512_s')} s / {f.get('diffusers_cuda_fp16_512_s')} s"
                  f" = {ratio('sdonnx_cuda_fp16_512_s', 'diffusers_cuda_fp16_512_s')}"]
    return "device_check: " + "; ".join(parts)


def main():
    out = Path(os.environ.get("OUT") or "/tmp/device_check")
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    results = {}
    stage(results, "env", env)
    log(f"env: {results['env']}")
    if "CUDAExecutionProvider" in results["env"].get("providers", []):
        stage(results, "tiny", tiny)
        if "--tiny-only" not in sys.argv:
            stage(results, "full", full)
    (out / "device_check.json").write_text(json.dumps(results, indent=1))
    print(summary(results), flush=True)


if __name__ == "__main__":
    main()
