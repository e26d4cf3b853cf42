"""`sdonnx upscale`: A1111's Extras tab on image files (upscale, then GFPGAN and CodeFormer face restoration)."""
import re

import click

DEFAULT_OUTDIR = "outputs/extras-images"  # A1111's outdir_extras_samples


def upscaler_folder_options(command):
    """--models-root and A1111's per-folder flags, shared by the commands that find upscaler models."""
    options = [
        click.option("--models-root", default="models", show_default=True, type=click.Path(file_okay=False),
                     help="A1111's models folder: upscalers are found in its ESRGAN, RealESRGAN and SwinIR folders."),
        click.option("--esrgan-models-path", type=click.Path(file_okay=False), help="ESRGAN models [MODELS_ROOT/ESRGAN]."),
        click.option("--realesrgan-models-path", type=click.Path(file_okay=False),
                     help="Real-ESRGAN models [MODELS_ROOT/RealESRGAN]."),
        click.option("--swinir-models-path", type=click.Path(file_okay=False), help="SwinIR models [MODELS_ROOT/SwinIR]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def folders_from(models_root, esrgan_models_path, realesrgan_models_path, swinir_models_path):
    from .postprocess.upscale import upscaler_folders

    return upscaler_folders(models_root, esrgan_models_path, realesrgan_models_path, swinir_models_path)


def _size(text):
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise click.BadParameter(f"{text!r}: give WIDTHxHEIGHT, e.g. 2048x2048")
    return int(m.group(1)), int(m.group(2))


@click.command("upscale")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--upscaler", "upscaler_1", default="None", show_default=True,
              help="Upscaler 1: None, Lanczos, Nearest or a model by A1111's name (e.g. 'R-ESRGAN 4x+', "
                   "'4x-UltraSharp'); `sdonnx upscale --list` shows them.")
@click.option("--scale", "upscaling_resize", default=2.0, show_default=True, type=float, help="Scale by (A1111's Resize).")
@click.option("--resize-to", default=None, metavar="WxH", help="Scale to this size instead of --scale.")
@click.option("--crop/--no-crop", "upscaling_crop", default=True, show_default=True,
              help="With --resize-to: crop the result to exactly WxH (A1111's Crop to fit).")
@click.option("--upscaler-2", "upscaler_2", default="None", show_default=True, help="Upscaler 2, blended over upscaler 1.")
@click.option("--upscaler-2-visibility", "extras_upscaler_2_visibility", default=0.0, show_default=True, type=float,
              help="How much of upscaler 2 shows (0 to 1).")
@click.option("--tile", default=None, type=int, help="Tile size in input pixels, 0 for none [the model's: 192].")
@click.option("--tile-overlap", default=None, type=int, help="Tile overlap in input pixels [the model's: 8].")
@click.option("--list", "list_only", is_flag=True, help="List the upscalers found and exit (IMAGES may be omitted).")
@click.option("--restore-faces", type=click.Choice(["GFPGAN", "CodeFormer"]), default=None,
              help="Restore faces after the upscale: that restorer at visibility 1 (A1111's Extras checkboxes).")
@click.option("--gfpgan-visibility", "gfpgan_visibility", default=0.0, type=float, help="How much of GFPGAN shows (0 to 1).")
@click.option("--codeformer-visibility", "codeformer_visibility", default=0.0, type=float,
              help="How much of CodeFormer shows (0 to 1).")
@click.option("--codeformer-weight", "codeformer_weight", default=0.0, show_default=True, type=float,
              help="CodeFormer fidelity: 0 its codebook's face, 1 the input's (A1111's Extras default 0).")
@click.option("--gfpgan-models-path", type=click.Path(file_okay=False),
              help="Converted GFPGAN model, face detector and parser [MODELS_ROOT/GFPGAN].")
@click.option("--codeformer-models-path", type=click.Path(file_okay=False), help="Converted CodeFormer [MODELS_ROOT/Codeformer].")
@upscaler_folder_options
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, dml, migraphx, rocm or openvino.")
@click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device (adapter) index.")
@click.option("-o", "--outdir", default=DEFAULT_OUTDIR, show_default=True, type=click.Path(file_okay=False))
def upscale(images, resize_to, tile, tile_overlap, list_only, restore_faces, gfpgan_models_path, codeformer_models_path,
            models_root, esrgan_models_path, realesrgan_models_path, swinir_models_path, provider, device_id, outdir,
            **fields):
    """Upscale IMAGES as A1111's Extras tab does; the PNGs keep the source's infotext and add A1111's
    "postprocessing" text (Postprocess upscale by: 2, Postprocess upscaler: ...)."""
    from .cli import _fail, _user_errors  # here: sdonnx.cli registers this command at its import
    from .cli import _face_dirs
    from .postprocess.extras import ExtrasModels, ExtrasRequest
    from .postprocess.faces import FaceRestorers, face_folders
    from .postprocess.upscale import Upscalers
    from .runtime import providers

    try:
        folders = folders_from(models_root, esrgan_models_path, realesrgan_models_path, swinir_models_path)
        if list_only:
            return _list(Upscalers(folders))
        if resize_to:
            fields.update(zip(("upscaling_resize_w", "upscaling_resize_h"), _size(resize_to)), resize_mode=1)
        if restore_faces:
            fields[f"{restore_faces.lower()}_visibility"] = 1.0
        request = ExtrasRequest(**fields)
        plan = providers.plan(provider, device_id)
        upscalers = Upscalers(folders, plan, tile, tile_overlap)
        faces = FaceRestorers(face_folders(**_face_dirs(models_root, gfpgan_models_path, codeformer_models_path)), plan)
        request.validate(upscalers, faces)  # names, ranges and models before the first image is read
        for path in images:
            click.echo(str(_one(path, request, ExtrasModels(upscalers, faces), outdir)))
    except click.BadParameter:
        raise
    except _user_errors() as e:
        _fail(e)


def _list(upscalers):
    for name in upscalers.names():
        found = next((m for m in upscalers.models() if m.name == name), None)
        note = "" if found is None else f"  ({found.folder if found.converted else f'{found.source}: not converted'})"
        click.echo(f"{name}{note}")


def _one(path, request, models, outdir):
    from .image import check_writable, open_image, save_png
    from .postprocess.extras import run_extras

    check_writable(outdir)
    source = open_image(path, f"image {path}")
    parameters = source.info.get("parameters")
    result = run_extras(source, request, models)
    text = result.infotext
    return save_png(result.image, outdir, parameters, texts={"postprocessing": text, "extras": text})
