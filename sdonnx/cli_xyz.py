"""`sdonnx xyz` and `sdonnx prompt-matrix`: A1111's X/Y/Z plot and prompt matrix scripts on the command line."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .cli import _cli_request, _fail, _request_options
from .cli_upscale import folders_from, upscaler_folder_options


@dataclass(frozen=True)
class ModelRef:
    """A model a Checkpoint axis names: its folder."""

    name: str
    path: Path


def model_finder(model):
    """(find_model, choices) for Checkpoint axes: a model folder by path, or by name beside MODEL's folder."""
    from .manifest import MANIFEST_NAME

    root = Path(model).resolve().parent
    choices = sorted(p.name for p in root.iterdir() if (p / MANIFEST_NAME).is_file()) if root.is_dir() else []

    def find(name):
        for path in (Path(name), root / name):
            if (path / MANIFEST_NAME).is_file():
                return ModelRef(path.name, path.resolve())
        raise ValueError(f"model {name!r} not found (a model folder, or one of: {', '.join(choices) or 'none'} "
                         f"in {root})")

    return find, tuple(choices)


def read_styles(path):
    """{name: (prompt, negative prompt)} from an A1111 styles.csv ({} when the file is absent)."""
    from .server.models import _read_styles

    return {row[0]: row[1:] for row in _read_styles(Path(path))} if path and Path(path).is_file() else {}


def _shared_options(command):
    """The options of loading and saving that xyz and prompt-matrix share with generate."""
    options = [
        click.option("-m", "--model", required=True, type=click.Path(), help="Converted model folder."),
        click.option("--provider", default="auto", show_default=True,
                     help="auto, cpu, cuda, dml, migraphx, rocm or openvino."),
        click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device index."),
        click.option("--device", default=None, help="OpenVINO device: CPU, GPU, GPU.1, NPU or AUTO."),
        click.option("--lora-dir", type=click.Path(file_okay=False), help="Folder of <lora:name:w> files."),
        click.option("--embeddings-dir", type=click.Path(file_okay=False), help="Folder of embeddings."),
        click.option("--hypernetwork-dir", type=click.Path(file_okay=False), help="Folder of hypernetworks."),
        click.option("-o", "--outdir", default="outputs", show_default=True, type=click.Path(file_okay=False)),
        click.option("--margin", default=0, show_default=True, type=click.IntRange(0, 500),
                     help="Pixels between the grid's cells (A1111's grid margins)."),
    ]
    for option in reversed(options):
        command = option(command)
    return upscaler_folder_options(_request_options(command))


def _manifests(model):
    from .manifest import load_manifest

    found = {}

    def manifest_for(ref):
        if ref not in found:
            found[ref] = load_manifest(ref.path if ref else model)
        return found[ref]

    return manifest_for


def run_cells(cells, model, outdir, load, ray=None):
    """Generate the cells with the job runner (sdonnx.jobs: here, or on a Ray cluster), written as numbered PNGs
    in OUTDIR as they finish (printed); -> the cells' CellResults, read back from the files, grid order."""
    from .image import next_sequence_number, read_infotext
    from .jobs import Job, run_jobs
    from .plots.xyz import CellResult

    first = next_sequence_number(outdir) if Path(outdir).is_dir() else 0
    base = Path(model).resolve()
    jobs = [Job(cell.request, cell.model.path if cell.model else base, f"{first + i:05}",
                {"cell": (cell.ix, cell.iy, cell.iz)}) for i, cell in enumerate(cells)]
    results = run_jobs(jobs, outdir, load=load, ray=ray, resume=False,
                       on_image=lambda job, path: click.echo(str(path)))
    return [CellResult([_rgb(path) for path in r.paths], [read_infotext(path) for path in r.paths]) for r in results]


def _rgb(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _loader(provider, device_id, device, lora_dir, embeddings_dir, hypernetwork_dir, upscaler_dirs):
    """load(model) for the job runner: picklable, with absolute folders (Ray workers may run elsewhere)."""
    import functools

    from .cli_batch import _absolute, _load

    return functools.partial(_load, provider=provider, device_id=device_id, device=device,
                             upscaler_dirs=[str(Path(d).resolve()) for d in upscaler_dirs],
                             **_absolute(lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                                         hypernetwork_dir=hypernetwork_dir))


def _upscaler_folders(fields):
    """The upscaler folders the folder flags give (taken out of the request's flags)."""
    names = ("models_root", "esrgan_models_path", "realesrgan_models_path", "swinir_models_path")
    return folders_from(*(fields.pop(name) for name in names))


def _upscaler_names(folders):
    from .postprocess.upscale import Upscalers

    return tuple(m.name for m in Upscalers(folders).models())


def _save_grids(result, outdir, prefix):
    from .image import save_png

    for image, text in zip(result.images[:result.grids], result.infotexts[:result.grids]):
        click.echo(str(save_png(image, outdir, text, prefix=prefix)))


def _axis(spec, context, name):
    from .plots.axes import NOTHING, parse_axis

    if not spec:
        return NOTHING
    kind, sep, values = spec.partition(":")
    if not sep:
        raise ValueError(f"--{name} {spec!r}: give TYPE: VALUES, e.g. --{name} \"Steps: 10-30 [3]\"")
    return parse_axis(kind.strip(), values.strip(), context, name.upper())


def _vary(text):
    if set(text) - set("xyz,"):
        raise ValueError(f"--vary-seeds {text!r}: give the axes, e.g. x or xy")
    return tuple(a in text for a in "xyz")


@click.command()
@click.argument("prompt")
@click.option("--x", "x_spec", metavar="'TYPE: VALUES'", help="X axis, e.g. 'Sampler: Euler a, DPM++ 2M'.")
@click.option("--y", "y_spec", metavar="'TYPE: VALUES'", help="Y axis, e.g. 'Steps: 10-30 [3]'.")
@click.option("--z", "z_spec", metavar="'TYPE: VALUES'", help="Z axis: one grid per value, side by side.")
@click.option("--legend/--no-legend", default=True, show_default=True, help="Draw the axis labels.")
@click.option("--include-images", is_flag=True, help="A1111's Include Sub Images (the cells are saved either way; "
                                                     "this is for the API's answer).")
@click.option("--include-sub-grids", is_flag=True, help="Also save one grid per Z value.")
@click.option("--keep-random-seeds", is_flag=True, help="A1111's Keep -1 for seeds: each cell draws its own seed.")
@click.option("--vary-seeds", default="", metavar="AXES", help="x, y, z or several (xy): seed + the cell's index "
                                                                "along them.")
@click.option("--styles-file", type=click.Path(dir_okay=False),
              help="A1111 styles.csv for the Styles axis [default: styles.csv beside the model folder].")
@click.option("--ray", default=None, is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Run the cells on a Ray cluster: ADDRESS (auto, ray://head:10001) or, alone, a local Ray "
                   "instance (pip install 'sdonnx[ray]'); the grid is made here from the written images.")
@_shared_options
def xyz(prompt, x_spec, y_spec, z_spec, legend, include_images, include_sub_grids, keep_random_seeds, vary_seeds,
        styles_file, ray, model, provider, device_id, device, lora_dir, embeddings_dir, hypernetwork_dir, outdir,
        margin, **fields):
    """A1111's X/Y/Z plot: PROMPT's request with the axis values applied, one image per cell, and a grid PNG
    (prefix xyz_grid) with A1111's legend and infotext. Every generate option applies to every cell.

    Axis types are A1111's (Seed, Steps, CFG Scale, Prompt S/R, Sampler, Schedule type, Checkpoint name, ...);
    values: comma lists (CSV quoting), ranges 1-5, 1-5 (+2), 10-30 [3], 8-32 (*2). Every axis and cell is
    checked before the first image."""
    from .image import check_writable
    from .plots import xyz as plot_mod
    from .plots.axes import Context

    try:
        check_writable(outdir)
        upscalers = _upscaler_folders(fields)
        request = _cli_request(prompt, model, None, None, None, fields)
        find, choices = model_finder(model)
        styles = read_styles(styles_file or Path(model).resolve().parent / "styles.csv")
        context = Context("img2img" if request.init.init_image is not None else "txt2img", styles, find, choices,
                          _upscaler_names(upscalers))
        plot = plot_mod.XYZPlot(_axis(x_spec, context, "x"), _axis(y_spec, context, "y"), _axis(z_spec, context, "z"),
                                legend, include_images, include_sub_grids, keep_random_seeds, _vary(vary_seeds), margin)
        plot, request = plot_mod.fix_seeds(plot, request)
        cells = plot_mod.expand(plot, request, context)
        plot_mod.check_cells(cells, _manifests(model))
        load = _loader(provider, device_id, device, lora_dir, embeddings_dir, hypernetwork_dir, upscalers)
        results = run_cells(cells, model, outdir, load, _ray_or_here(ray))
        _save_grids(plot_mod.finish(plot, cells, results), outdir, "xyz_grid")
    except _errors() as e:
        _fail(e)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished cells are in {outdir}, no grid", err=True)
        sys.exit(130)


def _errors():
    from .cli_batch import _batch_errors

    return _batch_errors()  # the user's errors, and Ray workers lost for good


def _ray_or_here(address):
    from .cli_batch import _ray_or_here

    return _ray_or_here(address)


@click.command("prompt-matrix")
@click.argument("prompt")
@click.option("--put-at-start", is_flag=True, help="Put the variable parts at the start of the prompt.")
@click.option("--different-seeds", is_flag=True, help="A different seed for each prompt (seed + its index).")
@click.option("--prompt-type", type=click.Choice(["positive", "negative"]), default="positive", show_default=True,
              help="Which prompt holds the a|b|c parts.")
@click.option("--delimiter", type=click.Choice(["comma", "space"]), default="comma", show_default=True,
              help="What joins the chosen parts.")
@_shared_options
def prompt_matrix(prompt, put_at_start, different_seeds, prompt_type, delimiter, model, provider, device_id, device,
                  lora_dir, embeddings_dir, hypernetwork_dir, outdir, margin, **fields):
    """A1111's prompt matrix: PROMPT as 'base|part 1|part 2|...' makes every combination of the parts (one image
    each, same seed unless --different-seeds) and a grid PNG (prefix prompt_matrix) labelled with the parts."""
    from .image import check_writable
    from .plots import matrix as matrix_mod
    from .plots.xyz import XYZPlot, check_cells, fix_seeds

    try:
        check_writable(outdir)
        upscalers = _upscaler_folders(fields)
        request = _cli_request(prompt, model, None, None, None, fields)
        options = matrix_mod.PromptMatrix(put_at_start, different_seeds, prompt_type, delimiter, margin)
        _, request = fix_seeds(XYZPlot(), request)
        parts, cells = matrix_mod.expand(options, request)
        check_cells(cells, _manifests(model))
        load = _loader(provider, device_id, device, lora_dir, embeddings_dir, hypernetwork_dir, upscalers)
        results = run_cells(cells, model, outdir, load)
        _save_grids(matrix_mod.finish(options, parts, results), outdir, "prompt_matrix")
    except _errors() as e:
        _fail(e)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished cells are in {outdir}, no grid", err=True)
        sys.exit(130)
