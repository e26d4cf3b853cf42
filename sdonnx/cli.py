"""The `sdonnx` command: click commands only; the work happens in the library."""
import logging
import sys
from pathlib import Path

import click

from .schedules import SCHEDULER_NAMES

# the errors a user can cause; they print one line and exit non-zero, never a traceback
USER_ERRORS = (ValueError, OSError)


def _user_errors():
    return USER_ERRORS


def _fail(error):
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


class _Progress:
    """A terminal progress bar that appears with the first step, so errors before sampling print alone."""

    def __init__(self, label):
        self.label, self.bar = label, None

    def update(self, done, total):
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _image_options(command):
    """img2img / inpaint / outpaint / hires fix / tiling flags of `generate`."""
    options = [
        click.option("--init-image", type=click.Path(), help="img2img: start from this image."),
        click.option("--strength", "--denoising-strength", "strength", default=0.75, show_default=True, type=float,
                     help="img2img denoising strength in (0, 1]."),
        click.option("--resize-mode", type=click.Choice(["0", "1", "2", "3"]), default="0", show_default=True,
                     help="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale."),
        click.option("--mask", type=click.Path(), help="Inpainting mask (white = repaint), the init image's size."),
        click.option("--mask-blur", default=4, show_default=True, type=int),
        click.option("--inpainting-fill", type=click.Choice(["0", "1", "2", "3"]), default="1", show_default=True,
                     help="Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing."),
        click.option("--only-masked", "inpaint_full_res", is_flag=True, help="Inpaint area: only the masked part."),
        click.option("--inpaint-padding", "inpaint_full_res_padding", default=32, show_default=True, type=int),
        click.option("--invert-mask", "inpainting_mask_invert", is_flag=True),
        click.option("--outpaint", metavar="L,R,U,D", help="Extend the init image's canvas by these pixels and paint there."),
        click.option("--hires", is_flag=True, help="Hires fix: a second pass at a larger size."),
        click.option("--hires-scale", default=2.0, show_default=True, type=float),
        click.option("--hires-width", default=0, type=int),
        click.option("--hires-height", default=0, type=int),
        click.option("--hires-upscaler", default="Latent", show_default=True,
                     help="Latent, Latent (bicubic), Latent (nearest), Latent (nearest-exact), Lanczos, Nearest or None."),
        click.option("--hires-steps", default=0, type=int, help="0: as many as --steps."),
        click.option("--hires-denoising", default=0.7, show_default=True, type=float),
        click.option("--hires-sampler", default=None),
        click.option("--hires-prompt", default=None),
        click.option("--tiling", type=click.Choice(["xy", "x", "y"]), default=None, help="Seamless tiling."),
        click.option("--tiled-vae/--no-tiled-vae", default=None, help="VAE in tiles [default: for large images]."),
        click.option("--refiner", default=None, type=click.Path(), help="SDXL refiner model folder (A1111's switch)."),
        click.option("--refiner-switch-at", default=0.8, show_default=True, type=float,
                     help="Fraction of the steps after which the refiner takes over."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _image_args(opts):
    """CLI flags -> generate keywords; the outpaint canvas and mask are made here from the init image."""
    args = {k: v for k, v in opts.items() if k != "outpaint"}
    args["resize_mode"], args["inpainting_fill"] = int(args["resize_mode"]), int(args["inpainting_fill"])
    if opts.get("outpaint"):
        from .img2img import load_image, outpaint_canvas

        if not opts.get("init_image"):
            raise ValueError("--outpaint needs --init-image")
        try:
            left, right, up, down = (int(v) for v in opts["outpaint"].split(","))
        except ValueError:
            raise ValueError(f"--outpaint {opts['outpaint']!r}: give four pixel counts L,R,U,D") from None
        args["init_image"], args["mask"] = outpaint_canvas(load_image(opts["init_image"]), left, right, up, down)
        args["strength"] = opts["strength"] if opts["strength"] != 0.75 else 1.0
    return args


class _Commands(click.Group):
    """The sdonnx group plus commands other packages register under the `sdonnx.commands` entry point,
    loaded only when used: the torch-side `convert` lives in converters/ and the runtime never imports it."""

    @staticmethod
    def _plugins():
        from importlib.metadata import entry_points

        return {entry.name: entry for entry in entry_points(group="sdonnx.commands")}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        entry = None if command else self._plugins().get(name)
        return entry.load() if entry else command


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(package_name="sdonnx")
def main(verbose):
    """Stable Diffusion through ONNX Runtime on any GPU vendor, without torch at run time."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", required=True, type=click.Path(), help="Converted model folder.")
@click.option("-n", "--negative-prompt", default="", help="Negative prompt.")
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--cfg-scale", default=7.0, show_default=True, type=float)
@click.option("--sampler", default="Euler a", show_default=True, help="A1111 sampler name, e.g. 'DPM++ 2M Karras'.")
@click.option("--scheduler", default="Automatic", show_default=True, help="Schedule type: " + ", ".join(SCHEDULER_NAMES))
@click.option("--seed", default=-1, show_default=True, type=int, help="-1 draws a random seed.")
@click.option("-W", "--width", type=int, help="Image width (multiple of 8); default: the model's native size.")
@click.option("-H", "--height", type=int, help="Image height (multiple of 8); default: the model's native size.")
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--batch-count", default=1, show_default=True, type=int)
@click.option("--clip-skip", default=1, show_default=True, type=int)
@click.option("--emphasis", type=click.Choice(["Original", "No norm", "Ignore", "None"]), default="Original",
              show_default=True, help="How (word:1.2) weights apply (A1111's emphasis modes).")
@click.option("--embeddings-dir", type=click.Path(file_okay=False),
              help="Folder of textual inversion embeddings [default: models/embeddings].")
@click.option("--rng", type=click.Choice(["nv", "cpu"]), default="nv", show_default=True,
              help="Random number source: nv reproduces A1111's GPU seeds, cpu its CPU seeds.")
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, dml, migraphx, rocm or openvino.")
@click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device (adapter) index.")
@click.option("--device", default=None, help="OpenVINO device: CPU, GPU, GPU.1, NPU or AUTO [default: a GPU when "
                                              "OpenVINO finds one, else CPU].")
@click.option("--lora-dir", type=click.Path(file_okay=False), help="Folder of <lora:name:w> files [default: models/Lora].")
@click.option("-o", "--outdir", default="outputs", show_default=True, type=click.Path(file_okay=False))
@click.option("--lowmem/--no-lowmem", default=None,
              help="Create each stage's session when needed and free it after (A1111's --medvram idea): peak "
                   "memory follows the largest model, not all of them. Default: on for a single batch, where "
                   "every session is created once either way, so it costs nothing; off for --batch-count > 1, "
                   "where it would re-create the UNet and VAE sessions per batch.")
@_image_options
def generate(prompt, model, negative_prompt, steps, cfg_scale, sampler, scheduler, seed, width, height,
             batch_size, batch_count, clip_skip, emphasis, embeddings_dir, rng, provider, device_id, device, lora_dir,
             outdir, lowmem, **image_opts):
    """Generate images from PROMPT with a converted model; PNGs carry A1111's infotext."""
    from .image import save_png
    from .pipeline import Pipeline

    try:
        if lowmem is None:
            lowmem = batch_count == 1
        pipe = Pipeline.load(model, provider=provider, device_id=device_id, lora_dir=lora_dir, lowmem=lowmem,
                             embeddings_dir=embeddings_dir, device=device)
        args = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
                    sampler=sampler, scheduler=scheduler, seed=seed, width=width, height=height,
                    batch_size=batch_size, batch_count=batch_count, clip_skip=clip_skip, rng=rng,
                    emphasis=emphasis, **_image_args(image_opts))
        with _Progress("sampling") as progress:
            result = pipe.generate(**args, callback=progress.update)
        for image, seed_used, infotext in zip(result.images, result.seeds, result.infotexts):
            path = save_png(image, outdir, infotext, seed=seed_used)
            click.echo(str(path))
    except _user_errors() as e:
        _fail(e)


@main.command()
@click.argument("model", type=click.Path())
def info(model):
    """Show what a converted model's manifest says."""
    from .manifest import load_manifest

    try:
        m = load_manifest(model)
    except _user_errors() as e:
        _fail(e)
    click.echo(f"name:            {m.name}")
    click.echo(f"family:          {m.family}")
    click.echo(f"prediction:      {m.prediction_type}")
    click.echo(f"native size:     {m.native_size}x{m.native_size}")
    click.echo(f"latent:          {m.latent_channels} channels, 1/{m.vae_scale_factor} scale, "
               f"scaling factor {m.vae_scaling_factor}")
    click.echo(f"unet inputs:     {m.unet_in_channels} channels{' (inpainting)' if m.is_inpaint else ''}")
    click.echo(f"model hash:      {m.model_hash or '-'}")
    for te in m.text_encoders:
        click.echo(f"text encoder:    {te.hidden_size} wide, {te.num_layers} layers (clip skip 1..{te.num_layers})")
    for name, c in m.components.items():
        click.echo(f"{name + ':':16} {c.path} [{c.dtype}] parity max abs err {c.parity_max_abs_err:.3g}, "
                   f"{len(c.weights)} named weights")
    click.echo(f"converted with:  {', '.join(f'{k} {v}' for k, v in m.converter.items() if v)}")


@main.command()
@click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device to start on.")
@click.option("--device", default=None, help="OpenVINO device to start on [default: a GPU when found, else CPU].")
def providers(device_id, device):
    """Show the execution providers that start here (each on a one-node graph) and their devices."""
    from .runtime import providers as p

    try:
        offered = p.available()
    except p.ProviderError as e:
        _fail(e)
    import onnxruntime

    flavours = p.installed_flavours()
    click.echo(f"onnxruntime {onnxruntime.__version__} ({', '.join(flavours) or 'no package found'})")
    conflict = p.flavour_conflict()
    if conflict:
        click.echo(f"warning: {conflict}", err=True)
    started = []
    for name in p.AUTO_ORDER:
        status, found = _provider_status(p, name, offered, device_id, device)
        if status.startswith("starts"):
            started.append(name)
        click.echo(f"{name:9} {p.PROVIDERS[name]:26} {status}")
        if found:
            click.echo(f"{'':9} devices: {', '.join(found)}")
    click.echo(f"auto picks: {started[0] if started else 'nothing starts'}")
    if conflict:
        sys.exit(1)


def _provider_status(p, name, offered, device_id, device):
    """("starts" | "not in this onnxruntime build" | "does not start: reason", devices found)."""
    if name not in offered:
        return "not in this onnxruntime build", []
    try:
        options = p.provider_options(name, device_id, device if name == "openvino" else None)
    except p.ProviderError as e:
        return f"does not start: {e}", []
    reason = None if name == "cpu" else p.probe(name, options)
    detail = f" (device {options['device_type']})" if name == "openvino" else ""
    return ("starts" + detail if not reason else f"does not start{detail}: {reason}"), p.devices(name)


@main.command()
@click.option("-m", "--models", "models", required=True, multiple=True, type=click.Path(exists=True),
              help="A converted model folder, or a folder of them (repeatable).")
@click.option("--listen", is_flag=True, help="Bind all interfaces (default: 127.0.0.1 only).")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--api-auth", envvar="SDONNX_API_AUTH", help="user:pass[,user2:pass2]: HTTP basic auth on every route.")
@click.option("--cors-allow-origins", default="", help="Comma-separated origins allowed to call the API from a browser.")
@click.option("--cors-allow-origins-regex", default=None, help="Origins allowed, as a regular expression.")
@click.option("--max-body-mb", default=64.0, show_default=True, type=float, help="Largest request body accepted.")
@click.option("--lora-dir", multiple=True, type=click.Path(), help="LoRA folder (default: MODELS/Lora).")
@click.option("--embeddings-dir", multiple=True, type=click.Path(), help="Embeddings folder (default: MODELS/embeddings).")
@click.option("--hypernetwork-dir", multiple=True, type=click.Path(),
              help="Hypernetwork folder (default: MODELS/hypernetworks).")
@click.option("-o", "--outdir", default=None, type=click.Path(file_okay=False),
              help="Where requests with save_images go (default: not saved).")
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, dml, migraphx, rocm or openvino.")
@click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device (adapter) index.")
@click.option("--device", default=None, help="OpenVINO device: CPU, GPU, GPU.1, NPU or AUTO [default: a GPU when "
                                              "OpenVINO finds one, else CPU].")
def serve(models, listen, port, api_auth, cors_allow_origins, cors_allow_origins_regex, max_body_mb, lora_dir,
          embeddings_dir, hypernetwork_dir, outdir, provider, device_id, device):
    """Serve A1111's HTTP API (/sdapi/v1) and a web page at / for the models in MODELS."""
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        _fail(f"serving needs the serve extra: pip install 'sdonnx[serve]' ({e})")
    roots = [Path(m) for m in models]
    try:
        app = create_app(models, provider=provider, device_id=device_id, device=device, api_auth=api_auth,
                         cors_allow_origins=[o.strip() for o in cors_allow_origins.split(",") if o.strip()],
                         cors_allow_origins_regex=cors_allow_origins_regex, max_body_bytes=int(max_body_mb * 2**20),
                         lora_dirs=lora_dir or [r / "Lora" for r in roots],
                         embedding_dirs=embeddings_dir or [r / "embeddings" for r in roots],
                         hypernetwork_dirs=hypernetwork_dir or [r / "hypernetworks" for r in roots], outdir=outdir)
    except _user_errors() as e:
        _fail(e)
    host = "0.0.0.0" if listen else "127.0.0.1"
    click.echo(f"sdonnx serving on http://{host}:{port}/ (API at /sdapi/v1)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if logging.getLogger().level <= logging.INFO else "warning")


if __name__ == "__main__":
    main()
