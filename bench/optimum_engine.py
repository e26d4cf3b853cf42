"""optimum's ONNX Runtime pipeline (`ORTStableDiffusionPipeline`) as one more bench/run.py engine.

optimum's exporter pins older transformers (<4.58) and so diffusers (0.39: newer ones need huggingface_hub 1.x),
so it lives in its own virtual environment, never in the project's:

    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install "optimum-onnx[onnxruntime]" diffusers torch   # a CPU torch
    /tmp/optimum-venv/bin/python bench/optimum_engine.py --export /tmp/sdonnx-bench/sd15-random \
        /tmp/sdonnx-bench/optimum-onnx                                                # ~9 min, ~11 GB peak
    /tmp/optimum-venv/bin/python bench/optimum_engine.py --model /tmp/sdonnx-bench/optimum-onnx \
        --size 256 --steps 10 --t0 "$(date +%s.%N)"

The engine runs the same job as run.py's child (txt2img, Euler, CFG 7, batch 1, seed 1 through a torch
generator) and prints the same `RESULT {json}` line. Model time is the time inside the ONNX Runtime session
calls; everything else in a warm generate (the diffusers loop, torch <-> numpy copies, the scheduler) is
`outside_model_calls_s`. This module imports nothing outside the standard library at import time, so
run.py (project venv) can import `optimum_python()` from it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"  # the same as run.py's
VENV = Path("/tmp/optimum-venv")


def optimum_python():
    """The optimum venv's python: $SDONNX_OPTIMUM_PYTHON, else /tmp/optimum-venv's, else None."""
    override = os.environ.get("SDONNX_OPTIMUM_PYTHON")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"SDONNX_OPTIMUM_PYTHON={override!r} is not a file")
        return override
    return str(VENV / "bin" / "python") if VENV.is_dir() else None


# ---------------------------------------------------------------- export (optimum venv)

def optimum_source(diffusers_dir, out_dir):
    """A copy of a diffusers folder saved by transformers 5 that transformers 4.5x loads unchanged: the
    tokenizer gets the slow CLIPTokenizer's vocab.json/merges.txt (the folder has only tokenizer.json), and the
    text encoder's weights get back the `text_model.` prefix (transformers 5 saves CLIPTextModel without it;
    4.5x would silently leave the encoder randomly initialized). UNet, VAE and scheduler are symlinks."""
    from safetensors.numpy import load_file, save_file

    src, out = Path(diffusers_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "scheduler"):
        if not (out / name).exists():
            (out / name).symlink_to(src / name)
    shutil.copy(src / "model_index.json", out)
    shutil.copytree(src / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    bpe = json.loads((src / "tokenizer" / "tokenizer.json").read_text())["model"]
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    # CLIPTokenizer skips the first line of merges.txt
    merges = "".join(f"{a} {b}\n" for a, b in (m.split() if isinstance(m, str) else m for m in bpe["merges"]))
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + merges)
    (out / "text_encoder").mkdir(exist_ok=True)
    shutil.copy(src / "text_encoder" / "config.json", out / "text_encoder")
    weights = load_file(src / "text_encoder" / "model.safetensors")
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()},
              out / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    return out


def export(diffusers_dir, out_dir):
    """optimum-cli's plain export (no --optimize) of the loadable copy made next to `out_dir`."""
    out = Path(out_dir)
    source = optimum_source(diffusers_dir, out.with_name(out.name + "-source"))
    cli = Path(sys.executable).with_name("optimum-cli")
    t = time.perf_counter()
    subprocess.run([str(cli), "export", "onnx", "--model", str(source), "--task", "text-to-image", str(out)],
                   check=True)
    print(f"exported to {out} in {time.perf_counter() - t:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------- one engine, one fresh process

def child(args):
    import torch
    from diffusers import EulerDiscreteScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from run import measure, timer  # bench/run.py: the same protocol and RESULT line (standard library only)

    args.engine = "optimum"
    timings = {}
    timed = timer(timings)
    pipe = ORTStableDiffusionPipeline.from_pretrained(args.model, provider="CPUExecutionProvider")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for key, part in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae_decoder", pipe.vae_decoder)):
        # instance attributes shadow InferenceSession's methods; io binding (off on the CPU EP) is covered too
        part.session.run = timed(key, part.session.run)
        part.session.run_with_iobinding = timed(key, part.session.run_with_iobinding)

    def generate():
        return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size,
                    generator=torch.Generator().manual_seed(1), output_type="np").images

    measure(args, timings, generate)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", nargs=2, metavar=("DIFFUSERS_DIR", "OUT_DIR"),
                        help="export a diffusers folder with optimum-cli instead of running the engine")
    parser.add_argument("--child", choices=["optimum"], help="accepted for run.py's command line")
    parser.add_argument("--model", help="an optimum ONNX export (optimum-cli export onnx --task text-to-image)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--t0", type=float, help="time.time() when the parent started this process")
    parser.add_argument("--images", type=Path, help="folder for the first image (uint8 .npy)")
    args = parser.parse_args()
    if args.export:
        return export(*args.export)
    if not args.model:
        parser.error("--model is required unless --export is given")
    args.t0 = time.time() if args.t0 is None else args.t0
    child(args)


if __name__ == "__main__":
    main()
