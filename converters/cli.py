"""`sdonnx convert`: the torch-side command, registered with the sdonnx CLI through the
`sdonnx.commands` entry point (the runtime package never imports converters/)."""
import click

from sdonnx.cli import _fail, _user_errors


@click.command()
@click.argument("source")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--family", type=click.Choice(["sd1", "sd2"]), help="Override the family detected from the weights.")
@click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]), help="Override the prediction type.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: half-precision graphs for GPU providers (inputs/outputs stay fp32; the fp32 VAE stays "
                   "beside the fp16 one and decodes whenever the fp16 one overflows).")
@click.option("--optimize", is_flag=True, help="Fuse attention, LayerNorm, GELU... with ONNX Runtime's transformer "
                                               "optimizer at convert time (see --target).")
@click.option("--target", type=click.Choice(["cpu", "gpu", "dml"]), default=None,
              help="Provider the fusions are chosen for (implies --optimize): cpu, gpu (CUDA) or dml (DirectML: "
                   "onnxruntime's DirectML recipe, then a kernel-by-kernel check of the graphs) [default: gpu "
                   "with --dtype fp16, else cpu].")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="int8 (dynamic) UNet for the CPU provider (fp32, --target cpu): faster, slightly different images.")
def convert(source, outdir, force, family, prediction, dtype, optimize, target, quantize):
    """Convert SOURCE (diffusers folder, .safetensors/.ckpt file or hub id) to an sdonnx model folder.

    An upscaler file (.pth/.safetensors: ESRGAN, Real-ESRGAN, SwinIR) is recognised from its weights and
    converted to an upscaler folder; the diffusion options do not apply to it."""
    try:
        from .convert import convert as run_convert
    except ImportError as e:
        _fail(f"converting needs the torch side: pip install 'sdonnx[convert]' ({e})")
    try:
        from .postprocess import convert_postprocess, looks_like_postprocess

        if looks_like_postprocess(source):  # upscalers and face models: converters/postprocess
            return _echo_postprocess(convert_postprocess(source, outdir, force=force, progress=_progress))
        optimize = optimize or target is not None
        target = target or ("gpu" if dtype == "fp16" else "cpu")
        manifest = run_convert(source, outdir, force=force, family=family, prediction=prediction, dtype=dtype,
                               optimize=target if optimize else None, quantize=quantize,
                               progress=_progress)
    except _user_errors() as e:
        _fail(e)
    click.echo(f"converted {manifest.name} ({manifest.family}, {manifest.prediction_type}) to {outdir}")


def _progress(message):
    click.echo(message, err=True)


def _echo_postprocess(manifest):
    click.echo(f"converted {manifest.name} ({manifest.kind}, {manifest.architecture}, {manifest.scale}x)")


@click.command()
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--prompt", "prompts", multiple=True,
              help="A calibration prompt (repeatable) [default: four varied prompts].")
@click.option("--size", type=int, default=None, help="Calibration image size [default: the model's native size; "
                                                      "smaller is faster and covers the same noise levels].")
@click.option("--steps", type=int, default=12, show_default=True, help="Sampling steps per calibration prompt.")
def quantize(model, prompts, size, steps):
    """Add a statically quantized int8 UNet (QDQ) to MODEL, calibrated on its own sampling trajectory; run it
    with `sdonnx generate --precision int8` (CPU provider or OpenVINO)."""
    from .quantize import PROMPTS, quantize_unet

    try:
        variant = quantize_unet(model, prompts or PROMPTS, size=size, steps=steps,
                                progress=_progress)
    except _user_errors() as e:
        _fail(e)
    errors = ", ".join(f"t={t}: {e:.2%}" for t, e in variant["relative_error"].items())
    click.echo(f"wrote {variant['path']} (relative UNet error against fp32: {errors})")
