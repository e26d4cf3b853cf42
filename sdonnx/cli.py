"""The `sdonnx` command: click commands only; the work happens in the library."""
import logging
import os
import sys
from pathlib import Path

import click

from .cli_upscale import folders_from, upscaler_folder_options
from .cli_controlnet import RAW_ARGS, UnitOrderCommand, controlnet_options


PRECISION_CHOICES = ("fp32", "bf16", "fp16", "int8", "auto")  # runtime/precision.py CHOICES (kept import-free)
PRECISION_HELP = ("Arithmetic precision: fp32, bf16 (OpenVINO on CPUs with AVX512-BF16/AMX), fp16, int8 (the model's "
                  "int8 UNet: sdonnx quantize) or auto (the fastest this provider and CPU run well; -v says which) "
                  "[default: each graph as converted]. `sdonnx providers` lists what is fast here.")
# the errors a user can cause; they print one line and exit non-zero, never a traceback. Running out of
# memory is one: the user chose the size
USER_ERRORS = (ValueError, OSError, MemoryError)


def _user_errors():
    return USER_ERRORS


def _fail(error):
    if isinstance(error, MemoryError):
        from .limits import out_of_memory

        error = out_of_memory("sdonnx", error)
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


# The request's fields on the command line. Each field is an option named after it (--hires-steps for
# hires_steps), with its help and choices from the request; only the flags that are spelled otherwise are
# listed here, so a new request field needs no edit in this file.
FLAGS = {
    "negative_prompt": ("-n", "--negative-prompt"),
    "width": ("-W", "--width"),
    "height": ("-H", "--height"),
    "strength": ("--strength", "--denoising-strength"),
    "inpaint_full_res": ("--only-masked/--whole-picture",),
    "inpaint_full_res_padding": ("--inpaint-padding",),
    "inpainting_mask_invert": ("--invert-mask/--no-invert-mask",),
    "sampler_options": ("--sampler-option",),
}


def _request_option(field):
    """The click option of one request field; default None, so the flags given can be told apart."""
    meta, name = field.metadata, field.name
    flag = "--" + name.replace("_", "-")
    kind = meta["kind"]
    hidden = field.default is None or field.default is False or field.default == ""
    default = "" if hidden else f" [default: {field.default}]"
    options = dict(default=None, help=meta["help"] + default)
    if meta["choices"]:
        options["type"] = click.Choice(meta["choices"])
    elif kind is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    elif kind is dict:
        options.update(multiple=True, metavar="KEY=VALUE", default=())
    elif name in ("init_image", "mask", "refiner"):
        options["type"] = click.Path()
    elif kind in (int, float):
        options["type"] = kind
    return click.option(*FLAGS.get(name, (flag,)), name, **options)


def _request_options(command):
    from .request import GenerationRequest

    for _, field in reversed(GenerationRequest.fields()):
        if field.metadata["cli"]:
            command = _request_option(field)(command)
    return command


def _option_value(text):
    """--sampler-option values: numbers and true/false as such, the rest as text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _given(fields):
    """The request keywords of the flags given on the command line, converted to the request's types."""
    from .request import GenerationRequest

    kinds = {f.name: f.metadata["kind"] for _, f in GenerationRequest.fields()}
    given = {}
    for name, value in fields.items():
        if value is None or value == ():
            continue
        if name == "sampler_options":
            pairs = [item.partition("=") for item in value]
            bad = [k for k, eq, _ in pairs if not eq]
            if bad:
                raise ValueError(f"--sampler-option {bad[0]!r}: give KEY=VALUE, e.g. order=3")
            value = {k.strip(): _option_value(v) for k, _, v in pairs}
        elif name == "crop_top_left":
            value = _pair("--crop-top-left", value)
        elif kinds[name] is int and isinstance(value, str):
            value = int(value)  # the numbered choices (resize mode, masked content)
        given[name] = value
    return given


def _pair(flag, text):
    try:
        top, left = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give two whole numbers TOP,LEFT") from None
    return top, left


def _infotext_settings(from_image, from_infotext):
    """The settings an image's (or a text's) A1111 infotext holds, as request keywords."""
    from .image import read_infotext
    from .request import GenerationRequest

    if from_image and from_infotext:
        raise ValueError("give --from-image or --from-infotext, not both")
    text = from_infotext
    if from_image:
        text = read_infotext(from_image)
        if not text:
            raise ValueError(f"{from_image} holds no generation parameters (no A1111 infotext)")
    return GenerationRequest.from_infotext(text).to_kwargs(changed_only=True) if text else {}


def _infotext_load_options(from_image, from_infotext):
    """The load options (precision) an image's or a text's infotext records."""
    from .image import read_infotext
    from .request import GenerationRequest

    text = read_infotext(from_image) if from_image else from_infotext
    return GenerationRequest.load_options_from_infotext(text) if text else {}


def _cli_request(prompt, model, from_image, from_infotext, outpaint, fields, raw_args=()):
    """The request of a generate command: the infotext's settings, then the flags given over them (raw_args: the
    arguments as typed, whose order groups the ControlNet unit flags)."""
    from .cli_controlnet import take_units
    from .request import GenerationRequest

    settings = _infotext_settings(from_image, from_infotext)
    units = take_units(fields, raw_args, settings.get("controlnet", ()))
    if units is not None:
        settings["controlnet"] = units
    given = _given(fields)
    if "sampler_options" in given:
        given["sampler_options"] = {**settings.get("sampler_options", {}), **given["sampler_options"]}
    settings.update(given)
    if prompt is not None:
        settings["prompt"] = prompt
    if "prompt" not in settings:
        raise ValueError("give a PROMPT, or --from-image / --from-infotext to take it from an image")
    refiner = settings.get("refiner")
    if refiner and not Path(refiner).exists() and (Path(model).parent / refiner).is_dir():
        settings["refiner"] = str(Path(model).parent / refiner)  # an infotext names the refiner's folder
    if outpaint:
        settings.update(_outpaint(outpaint, settings))
    return GenerationRequest.from_kwargs(**settings)


def _outpaint(spec, settings):
    """--outpaint L,R,U,D: the bigger canvas and its mask, made from the init image (strength 1 unless given)."""
    from .img2img import load_image, outpaint_canvas

    if not settings.get("init_image"):
        raise ValueError("--outpaint needs --init-image")
    try:
        left, right, up, down = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--outpaint {spec!r}: give four pixel counts L,R,U,D") from None
    image, mask = outpaint_canvas(load_image(settings["init_image"]), left, right, up, down)
    return {"init_image": image, "mask": mask, "strength": settings.get("strength", 1.0)}


class _Commands(click.Group):
    """The sdonnx group plus commands other packages register under the `sdonnx.commands` entry point,
    loaded only when used: the torch-side `convert` lives in converters/ and the runtime never imports it."""

    # commands in their own modules (they import this one), loaded like the plugins: name -> "module:object"
    MODULES = {
        "batch": "sdonnx.cli_batch:batch",
        "xyz": "sdonnx.cli_xyz:xyz",
        "prompt-matrix": "sdonnx.cli_xyz:prompt_matrix",
        "upscale": "sdonnx.cli_upscale:upscale",
        "cache": "sdonnx.cli_cache:cache",
    }

    @classmethod
    def _plugins(cls):
        from importlib.metadata import EntryPoint, entry_points

        own = {name: EntryPoint(name, value, "sdonnx.commands") for name, value in cls.MODULES.items()}
        return {**own, **{entry.name: entry for entry in entry_points(group="sdonnx.commands")}}

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


@main.command(cls=UnitOrderCommand)
@click.argument("prompt", required=False)
@click.option("-m", "--model", required=True, type=click.Path(),
              help="Converted model folder, checkpoint file, or (with --data-dir) a checkpoint's name, title or "
                   "hash as A1111 lists it; checkpoints are converted on first use and cached.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="An A1111 install's data folder: its checkpoints, VAEs, LoRAs, embeddings and hypernetworks by "
                   "A1111's folder names [default: $SDONNX_DATA_DIR].")
@click.option("--from-image", type=click.Path(), help="Take every setting from this image's A1111 infotext; "
              "flags given beside it override (give --init-image/--mask again for img2img).")
@click.option("--from-infotext", metavar="TEXT", help="As --from-image, from infotext TEXT.")
@click.option("--outpaint", metavar="L,R,U,D", help="Extend the init image's canvas by these pixels and paint there.")
@click.option("--embeddings-dir", type=click.Path(file_okay=False),
              help="Folder of textual inversion embeddings [default: models/embeddings].")
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, dml, migraphx, rocm or openvino.")
@click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device (adapter) index.")
@click.option("--device", default=None, help="OpenVINO device: CPU, GPU, GPU.1, NPU or AUTO [default: a GPU when "
                                              "OpenVINO finds one, else CPU].")
@click.option("--lora-dir", type=click.Path(file_okay=False), help="Folder of <lora:name:w> files [default: models/Lora].")
@click.option("--hypernetwork-dir", type=click.Path(file_okay=False),
              help="Folder of <hypernet:name:w> .pt files [default: models/hypernetworks].")
@click.option("--controlnet-dir", type=click.Path(file_okay=False),
              help="Folder of converted ControlNets that --controlnet names [default: models/ControlNet].")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES, case_sensitive=False), default=None,
              help=PRECISION_HELP)
@click.option("--gfpgan-models-path", type=click.Path(file_okay=False),
              help="Converted GFPGAN model, face detector and parser for --restore-faces [default: MODELS_ROOT/GFPGAN].")
@click.option("--codeformer-models-path", type=click.Path(file_okay=False),
              help="Converted CodeFormer model for --restore-faces [default: MODELS_ROOT/Codeformer].")
@click.option("-o", "--outdir", default="outputs", show_default=True, type=click.Path(file_okay=False))
@click.option("--lowmem/--no-lowmem", default=None,
              help="Create each stage's session when needed and free it after (A1111's --medvram idea): peak "
                   "memory follows the largest model, not all of them. Default: on for a single batch, where "
                   "every session is created once either way, so it costs nothing; off for --batch-count > 1, "
                   "where it would re-create the UNet and VAE sessions per batch.")
@upscaler_folder_options
@controlnet_options
@_request_options
def generate(prompt, model, data_dir, from_image, from_infotext, outpaint, embeddings_dir, provider, device_id, device,
             lora_dir, hypernetwork_dir, controlnet_dir, precision, gfpgan_models_path, codeformer_models_path, outdir,
             lowmem, models_root, esrgan_models_path, realesrgan_models_path, swinir_models_path, **fields):
    """Generate images from PROMPT with a converted model; PNGs carry A1111's infotext.

    Every setting of the generation request is an option below."""
    from .image import check_writable
    from .pipeline import Pipeline

    saved = []
    try:
        check_writable(outdir)  # before the model loads: an unwritable folder would lose every image
        raw_args = click.get_current_context().meta.get(RAW_ARGS, ())
        request = _cli_request(prompt, model, from_image, from_infotext, outpaint, fields, raw_args)
        if lowmem is None:
            lowmem = request.prompt.batch_count == 1
        if precision is None:  # an image made in bf16 is reproduced in bf16
            precision = _infotext_load_options(from_image, from_infotext).get("precision")
        upscaler_dirs = folders_from(models_root, esrgan_models_path, realesrgan_models_path, swinir_models_path)
        if _data_dir_given(data_dir) and models_root == "models" and not (esrgan_models_path or realesrgan_models_path
                                                                          or swinir_models_path):
            upscaler_dirs = None  # the data folder's models/ESRGAN, RealESRGAN, SwinIR
        pipe = Pipeline.load(model, provider=provider, device_id=device_id, lora_dir=lora_dir, lowmem=lowmem,
                             embeddings_dir=embeddings_dir, device=device, hypernetwork_dir=hypernetwork_dir,
                             upscaler_dirs=upscaler_dirs, controlnet_dir=controlnet_dir,
                             precision=precision, data_dir=data_dir, convert_progress=convert_report,
                             face_dirs=_face_dirs(models_root, gfpgan_models_path, codeformer_models_path,
                                                  _data_dir_given(data_dir)))
        _generate_and_save(pipe, request, outdir, saved)
    except _user_errors() as e:
        _fail(e)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {len(saved)} image(s) saved in {outdir}", err=True)
        sys.exit(130)  # the shell's code for a SIGINT


def _face_dirs(models_root, gfpgan_models_path, codeformer_models_path, data_given=False):
    """restore_faces' folders: A1111's --gfpgan-models-path and --codeformer-models-path, default MODELS_ROOT/GFPGAN
    and MODELS_ROOT/Codeformer (None, with a data folder and none of them given: the data folder's)."""
    if data_given and models_root in (None, "models") and not (gfpgan_models_path or codeformer_models_path):
        return None
    root = Path(models_root or "models")
    return {"gfpgan_dir": gfpgan_models_path or root / "GFPGAN", "codeformer_dir": codeformer_models_path or root / "Codeformer"}


def _data_dir_given(data_dir):
    from .datadir import ENV

    return bool(data_dir or os.environ.get(ENV))


def convert_report(progress):
    """A conversion on first use, told on stderr: what it does, stage n of N, and the time expected up front."""
    stage = f" [{progress.done}/{progress.total}]" if progress.total else ""
    click.echo(f"{progress.message}{stage}", err=True)


def _generate_and_save(pipe, request, outdir, saved):
    """Generate, saving each batch as soon as it is decoded, so that Ctrl-C or an error keeps the images
    already made."""
    from .image import save_png

    def save(images, seeds, infotexts):
        for image, seed, infotext in zip(images, seeds, infotexts):
            saved.append(save_png(image, outdir, infotext, seed=seed))
            click.echo(str(saved[-1]))

    with _Progress("sampling") as progress:
        pipe.generate(request, callback=progress.update, on_batch=save)


@main.command("png-info")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the infotext, its A1111 keys and the settings.")
def png_info(file, as_json):
    """Print the generation parameters (A1111 infotext) stored in an image, and the settings they give."""
    import json

    from .image import read_infotext
    from .infotext import parse_infotext
    from .request import GenerationRequest

    try:
        text = read_infotext(file)
        if not text:
            raise ValueError(f"{file} holds no generation parameters (no A1111 infotext)")
        settings = GenerationRequest.from_infotext(text).to_kwargs(changed_only=True)
    except _user_errors() as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"infotext": text, "parameters": parse_infotext(text), "settings": settings},
                              indent=2, ensure_ascii=False))
        return
    click.echo(text)
    click.echo("")
    for name, value in settings.items():
        click.echo(f"{name}: {value!r}" if isinstance(value, str) and "\n" in value else f"{name}: {value}")


@main.command()
@click.argument("model", type=click.Path())
def info(model):
    """Show what a converted model's (or ControlNet's) manifest says."""
    from .cli_controlnet import info as controlnet_info
    from .controlnet.model import is_controlnet_folder
    from .manifest import load_manifest

    if is_controlnet_folder(model):
        return controlnet_info(model)
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
@click.argument("model", type=click.Path(exists=True))
@click.option("--provider", default="dml", show_default=True,
              help="dml: the DirectML kernels of the onnxruntime-directml version the directml extra pins (shipped "
                   "table); cpu or cuda: the kernels of the installed onnxruntime.")
def doctor(model, provider):
    """List the nodes of MODEL (a converted model folder or an .onnx file) that PROVIDER has no kernel for and
    that would run on the CPU instead; exit status 1 when there are any."""
    from .kernels import check_model

    try:
        reports = check_model(model, provider)
    except _user_errors() as e:
        _fail(e)
    for line in doctor_lines(reports, provider):
        click.echo(line)
    if any(r.fallbacks for r in reports):
        sys.exit(1)


def doctor_lines(reports, provider):
    """The doctor's report, one graph per line and one indented line per node that falls back."""
    for report in reports:
        if not report.fallbacks:
            yield f"{report.graph}: all {report.nodes} nodes have {provider} kernels"
            continue
        elsewhere = "" if provider == "cpu" else " (they would run on the CPU provider)"
        yield f"{report.graph}: {len(report.fallbacks)} of {report.nodes} nodes have no {provider} kernel{elsewhere}"
        for f in report.fallbacks:
            yield f"  {f.node} ({f.domain}.{f.op}): {f.reason}: {f.detail}"


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
    for line in cpu_lines("openvino" in started):
        click.echo(line)
    if conflict:
        sys.exit(1)


def cpu_lines(openvino_started, flags=None, capabilities=None):
    """What `sdonnx providers` says about the CPU: the features that matter for lower precisions, the
    precisions it computes natively, and OpenVINO's own list for its CPU device."""
    from .runtime import cpu

    flags = cpu.cpu_flags() if flags is None else flags
    found = ", ".join(cpu.features(flags)) or (f"none of {', '.join(cpu.FEATURES.values())}" if flags
                                                else "unknown (no /proc/cpuinfo)")
    yield f"cpu features: {found}"
    yield (f"fast precisions here: {', '.join(cpu.fast_precisions(flags))} "
           f"(bf16: OpenVINO's inference precision hint; int8: a quantized UNet, `sdonnx quantize`)")
    if openvino_started:
        caps = cpu.openvino_capabilities("CPU") if capabilities is None else capabilities
        if caps:
            yield f"openvino CPU capabilities: {', '.join(sorted(caps))}"


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
@click.option("-m", "--models", "models", multiple=True, type=click.Path(exists=True),
              help="A converted model folder, or a folder of them (repeatable); needed without --data-dir.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="An A1111 install's data folder: its checkpoints are listed as A1111 lists them and converted on "
                   "their first request; its VAEs, LoRAs, embeddings, hypernetworks and styles.csv are used "
                   "[default: $SDONNX_DATA_DIR].")
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
@click.option("--controlnet-dir", multiple=True, type=click.Path(),
              help="Folder of converted ControlNets (default: MODELS/ControlNet).")
@click.option("--gfpgan-models-path", type=click.Path(file_okay=False),
              help="Converted GFPGAN model, face detector and parser for restore_faces [default: MODELS_ROOT/GFPGAN].")
@click.option("--codeformer-models-path", type=click.Path(file_okay=False),
              help="Converted CodeFormer model for restore_faces [default: MODELS_ROOT/Codeformer].")
@click.option("-o", "--outdir", default=None, type=click.Path(file_okay=False),
              help="Where requests with save_images go (default: not saved).")
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, dml, migraphx, rocm or openvino.")
@click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device (adapter) index.")
@click.option("--device", default=None, help="OpenVINO device: CPU, GPU, GPU.1, NPU or AUTO [default: a GPU when "
                                              "OpenVINO finds one, else CPU].")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES, case_sensitive=False), default=None,
              help=PRECISION_HELP)
@upscaler_folder_options
def serve(models, data_dir, listen, port, api_auth, cors_allow_origins, cors_allow_origins_regex, max_body_mb, lora_dir,
          embeddings_dir, hypernetwork_dir, controlnet_dir, gfpgan_models_path, codeformer_models_path, outdir, provider,
          device_id, device, models_root, esrgan_models_path, realesrgan_models_path, swinir_models_path, precision):
    """Serve A1111's HTTP API (/sdapi/v1) and a web page at / for the models in MODELS (and --data-dir)."""
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        _fail(f"serving needs the serve extra: pip install 'sdonnx[serve]' ({e})")
    from .datadir import DataDir

    try:
        data = DataDir.from_option(data_dir)
        if not models and data is None:
            raise ValueError("give -m MODELS (converted model folders) or --data-dir (an A1111 install)")
        app = create_app(models, provider=provider, device_id=device_id, device=device, precision=precision,
                         api_auth=api_auth,
                         cors_allow_origins=[o.strip() for o in cors_allow_origins.split(",") if o.strip()],
                         cors_allow_origins_regex=cors_allow_origins_regex, max_body_bytes=int(max_body_mb * 2**20),
                         lora_dirs=lora_dir or _served_folders(models, data, "Lora", "lora"),
                         embedding_dirs=embeddings_dir or _served_folders(models, data, "embeddings", "embeddings"),
                         hypernetwork_dirs=hypernetwork_dir or _served_folders(models, data, "hypernetworks",
                                                                               "hypernetworks"),
                         upscaler_dirs=_served_upscalers(data, models_root, esrgan_models_path,
                                                         realesrgan_models_path, swinir_models_path),
                         controlnet_dirs=controlnet_dir or _served_folders(models, data, "ControlNet", "controlnet"),
                         face_dirs=_face_dirs(models_root, gfpgan_models_path, codeformer_models_path,
                                              data is not None),
                         outdir=outdir, data_dir=data)
    except _user_errors() as e:
        _fail(e)
    host = "0.0.0.0" if listen else "127.0.0.1"
    click.echo(f"sdonnx serving on http://{host}:{port}/ (API at /sdapi/v1)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if logging.getLogger().level <= logging.INFO else "warning")


def _served_upscalers(data, models_root, esrgan, realesrgan, swinir):
    """Upscaler folders for serve: under --models-root and the per-folder flags; with --data-dir and none of
    them given, the data folder's models/ (A1111's ESRGAN, RealESRGAN, SwinIR)."""
    flagged = models_root != "models" or esrgan or realesrgan or swinir
    root = data.root / "models" if data is not None and not flagged else models_root
    return folders_from(root, esrgan, realesrgan, swinir)


def _served_folders(models, data, name, kind):
    """The default folders of one kind for serve: the data folder's (A1111's name), then MODELS/name."""
    return ([data.folder(kind)] if data is not None else []) + [Path(m) / name for m in models]


if __name__ == "__main__":
    main()
