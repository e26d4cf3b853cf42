"""A1111's scripts through the API: `script_name` and its positional `script_args` on txt2img and img2img.

- "x/y/z plot": A1111 1.10's 18 arguments (x_type, x_values, x_values_dropdown, y_..., z_..., draw_legend,
  include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z,
  margin_size, csv_mode), or the 14-15 of A1111 1.5-1.6 (no vary_seeds). An axis type is A1111's dropdown
  index (txt2img and img2img have their own lists) or its name ("Steps"); values come from the dropdown list
  where A1111 takes them from it (an axis with choices, csv_mode off), else from the text.
- "prompt matrix": put_at_start, different_seeds, prompt_type, variations_delimiter, margin_size.
- "prompts from file or textbox": checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt (A1111
  1.10), or the three without prompt_position.

script_args may also be an object with these names. Every cell (or line) is checked before the job queues; the
answer is A1111's: the grid first (info.index_of_first_image says how many grids lead), then the images.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
from pathlib import Path

from .. import __version__, limits
from ..infotext import parse_infotext
from ..plots import matrix
from ..plots.axes import Cell, Context, find_axis_type, parse_axis
from ..plots.xyz import CellResult, XYZPlot, check_cells, expand, finish, fix_seeds, run_order
from ..request import GenerationRequest, random_seed

log = logging.getLogger(__name__)

XYZ = "x/y/z plot"
MATRIX = "prompt matrix"
FROM_FILE = "prompts from file or textbox"
SCRIPTS = (MATRIX, FROM_FILE, XYZ)

XYZ_ARGS = ("x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown", "z_type", "z_values",
            "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds",
            "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode")
XYZ_ARGS_OLD = (*XYZ_ARGS[:13], "margin_size", "csv_mode")
XYZ_DEFAULTS = {"x_type": "Nothing", "y_type": "Nothing", "z_type": "Nothing", "draw_legend": True}
MATRIX_ARGS = ("put_at_start", "different_seeds", "prompt_type", "variations_delimiter", "margin_size")
FROM_FILE_ARGS = ("checkbox_iterate", "checkbox_iterate_batch", "prompt_position", "prompt_txt")
FROM_FILE_ARGS_OLD = ("checkbox_iterate", "checkbox_iterate_batch", "prompt_txt")


class ScriptError(ValueError):
    """A script request that cannot run; the message names the bad argument and the valid ones."""


# ---------------------------------------------------------------------------------------------- listing


def script_lists():
    """A1111's GET /scripts: the selectable scripts of each tab, by lower-case title."""
    return {"txt2img": list(SCRIPTS), "img2img": list(SCRIPTS)}


def script_info(mode_choices):
    """A1111's GET /script-info: each script's arguments with label, default and choices."""
    def arg(label, value, choices=None, minimum=None, maximum=None):
        return {"label": label, "value": value, "minimum": minimum, "maximum": maximum, "step": None,
                "choices": choices}

    out = []
    for mode in ("txt2img", "img2img"):
        types = mode_choices(mode)
        axes = [arg(f"{a.upper()} type", "Seed" if a == "x" else "Nothing", types) for a in "xyz"]
        xyz_args = [x for a, t in zip("xyz", axes) for x in (t, arg(f"{a.upper()} values", ""),
                                                              arg(f"{a.upper()} values", []))]
        xyz_args += [arg("Draw legend", True), arg("Include Sub Images", False), arg("Include Sub Grids", False),
                     arg("Keep -1 for seeds", False), arg("Vary seeds for X", False), arg("Vary seeds for Y", False),
                     arg("Vary seeds for Z", False), arg("Grid margins (px)", 0, None, 0, 500),
                     arg("Use text inputs instead of dropdowns", False)]
        matrix_args = [arg("Put variable parts at start of prompt", False),
                       arg("Use different seed for each picture", False),
                       arg("Select prompt", "positive", list(matrix.PROMPT_TYPES)),
                       arg("Select joining char", "comma", list(matrix.DELIMITERS)),
                       arg("Grid margins (px)", 0, None, 0, 500)]
        file_args = [arg("Iterate seed every line", False), arg("Use same random seed for all lines", False),
                     arg("Insert prompts at the", "start", ["start", "end"]), arg("List of prompt inputs", "")]
        for name, args in ((MATRIX, matrix_args), (FROM_FILE, file_args), (XYZ, xyz_args)):
            out.append({"name": name, "is_alwayson": False, "is_img2img": mode == "img2img", "args": args})
    return out


# ---------------------------------------------------------------------------------------------- arguments


def find_script(name):
    key = (name or "").strip().lower()
    if key not in SCRIPTS:
        raise ScriptError(f"script {name!r} not found; this server has: {', '.join(SCRIPTS)}")
    return key


def named_args(script, args, names, old_names=None):
    """Positional script_args (or an object) -> {name: value}; a list as long as the older layout reads as it."""
    if isinstance(args, dict):
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise ScriptError(f"{script}: unknown script_args {', '.join(unknown)}; valid: {', '.join(names)}")
        return dict(args)
    if not isinstance(args, list):
        raise ScriptError(f"{script}: script_args must be a list (A1111's order) or an object")
    layout = old_names if old_names and len(args) <= len(old_names) else names
    if len(args) > len(layout):
        raise ScriptError(f"{script}: {len(args)} script_args, A1111's script takes {len(layout)}: {', '.join(layout)}")
    return dict(zip(layout, args))


def _flag(script, name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise ScriptError(f"{script}: {name} must be true or false, got {value!r}")


def _margin(script, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 500:
        raise ScriptError(f"{script}: margin_size must be a number of pixels from 0 to 500, got {value!r}")
    return int(value)


def _csv(values):
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


def _axis(args, name, context, csv_mode):
    """One axis: the dropdown list where A1111 reads it (an axis type with choices, csv_mode off), else the text."""
    kind = args.get(f"{name}_type", "Nothing")
    text, dropdown = args.get(f"{name}_values") or "", args.get(f"{name}_values_dropdown") or []
    if not isinstance(kind, (int, str)) or isinstance(kind, bool):
        raise ScriptError(f"{XYZ}: {name}_type must be an axis index or name, got {kind!r}")
    if not isinstance(text, str) or not isinstance(dropdown, list):
        raise ScriptError(f"{XYZ}: {name}_values must be text and {name}_values_dropdown a list")
    if find_axis_type(kind, context.mode).choices and dropdown and not csv_mode:
        text = _csv([str(v) for v in dropdown])
    return parse_axis(kind, text, context, name.upper())


def xyz_plot(script_args, context):
    """A1111's X/Y/Z script_args -> XYZPlot, every axis checked (ValueError naming the axis and the choices)."""
    args = {**XYZ_DEFAULTS, **named_args(XYZ, script_args, XYZ_ARGS, XYZ_ARGS_OLD)}
    flags = {k: _flag(XYZ, k, args.get(k, False)) for k in XYZ_ARGS[9:16] + ("csv_mode",)}
    axes = [_axis(args, name, context, flags["csv_mode"]) for name in "xyz"]
    return XYZPlot(*axes, flags["draw_legend"], flags["include_lone_images"], flags["include_sub_grids"],
                   flags["no_fixed_seeds"], (flags["vary_seeds_x"], flags["vary_seeds_y"], flags["vary_seeds_z"]),
                   _margin(XYZ, args.get("margin_size", 0)))


def prompt_matrix(script_args):
    args = named_args(MATRIX, script_args, MATRIX_ARGS)
    return matrix.PromptMatrix(_flag(MATRIX, "put_at_start", args.get("put_at_start", False)),
                               _flag(MATRIX, "different_seeds", args.get("different_seeds", False)),
                               args.get("prompt_type") or "positive", args.get("variations_delimiter") or "comma",
                               _margin(MATRIX, args.get("margin_size", 0)))


# ---------------------------------------------------------------------------------------------- cells


@dataclasses.dataclass
class ScriptPlan:
    """What a script request runs: its cells, and how their results become A1111's answer."""

    name: str
    cells: list
    finish: object  # results -> PlotResult


def plan_script(name, script_args, request, kept_random_seed, context, manifest_for, find_model):
    """-> ScriptPlan with every cell validated. request: the base request with its seed drawn (the API draws
    -1 at once); kept_random_seed: the client asked for seed -1."""
    if name == XYZ:
        plot = xyz_plot(script_args, context)
        if plot.no_fixed_seeds and kept_random_seed:
            request = request.replace(seed=-1)
        plot, request = fix_seeds(plot, request)
        cells = expand(plot, request, context)
        check_cells(cells, manifest_for)
        return ScriptPlan(name, cells, lambda results: finish(plot, cells, results))
    if name == MATRIX:
        options = prompt_matrix(script_args)
        parts, cells = matrix.expand(options, request)
        check_cells(cells, manifest_for)
        return ScriptPlan(name, cells, lambda results: matrix.finish(options, parts, results))
    cells = prompt_lines(script_args, request, kept_random_seed, find_model)
    check_cells(cells, manifest_for)
    return ScriptPlan(name, cells, _all_images)


def _all_images(results):
    from ..plots.xyz import PlotResult

    images = [image for r in results for image in r.images]
    return PlotResult(images, [text for r in results for text in r.infotexts], 0, results)


def prompt_lines(script_args, request, kept_random_seed, find_model):
    """A1111's "Prompts from file or textbox": one cell per line (sdonnx.jobs.parse_prompts_file), the line's
    prompt put at the start (or end) of the request's, seeds iterated or shared as its two checkboxes say."""
    from ..jobs import line_requests, parse_prompts_file

    args = named_args(FROM_FILE, script_args, FROM_FILE_ARGS, FROM_FILE_ARGS_OLD)
    iterate = _flag(FROM_FILE, "checkbox_iterate", args.get("checkbox_iterate", False))
    same_seed = _flag(FROM_FILE, "checkbox_iterate_batch", args.get("checkbox_iterate_batch", False))
    position = args.get("prompt_position") or "start"
    if position not in ("start", "end"):
        raise ScriptError(f"{FROM_FILE}: prompt_position {position!r}: choose start or end")
    text = args.get("prompt_txt") or ""
    if not isinstance(text, str):
        raise ScriptError(f"{FROM_FILE}: prompt_txt must be text")
    lines = parse_prompts_file(text)
    if not lines:
        raise ScriptError(f"{FROM_FILE}: prompt_txt has no prompts (one per line)")
    if len(lines) > limits.MAX_PLOT_CELLS:
        raise limits.LimitError(f"{FROM_FILE}: {len(lines)} lines are over the limit of {limits.MAX_PLOT_CELLS}")
    # A1111 keeps seed -1 (a new random seed per line) unless a checkbox asks to start from one seed
    base = request.replace(seed=-1) if kept_random_seed and not (iterate or same_seed) else request
    pairs = line_requests(lines, base, position=position, iterate_seed=iterate, same_seed=same_seed)
    cells = []
    for i, (line_request, model) in enumerate(pairs):
        if line_request.seeds.seed == -1:
            line_request = line_request.replace(seed=random_seed())
        cells.append(Cell(i, 0, 0, line_request, find_model(model) if model is not None else None))
    return cells


def run_script_job(job, pipeline_for, plan, entry_for):
    """Worker side: generate the cells (grouped by model), stopping at an interrupt; cells not reached are
    blank, as in A1111's grid. -> PlotResult"""
    cells, results = plan.cells, [None] * len(plan.cells)
    job.job_count = len(cells)
    for n, i in enumerate(run_order(cells)):
        if job.stop:
            break
        job.next_iteration(n)
        result = pipeline_for(entry_for(cells[i].model)).generate(cells[i].request, callback=job.callback,
                                                                  preview=job.preview)
        if result.images:
            results[i] = CellResult(result.images, result.infotexts, result.seeds)
    done = [r for r in results if r is not None]
    if not done:
        return None
    from PIL import Image

    blank = CellResult([Image.new("RGB", done[0].images[0].size)], [done[0].infotexts[0]], [])
    return plan.finish([r if r is not None else blank for r in results])


def save_script_images(result, outdir, mode, name):
    """Grids under <mode>-grids, images under <mode>-images, as A1111 saves them; the error is returned, not
    raised (the client still gets its images)."""
    from ..image import save_png

    prefix = {XYZ: "xyz_grid", MATRIX: "prompt_matrix"}.get(name, "grid")
    try:
        for k, (image, text) in enumerate(zip(result.images, result.infotexts)):
            grid = k < result.grids
            save_png(image, Path(outdir) / f"{mode}-{'grids' if grid else 'images'}", text,
                     prefix=prefix if grid else "")
    except OSError as e:
        log.warning("saving %s images to %s failed: %s", mode, outdir, e)
        return f"images not saved to {outdir}: {e.strerror or e}"
    return None


def info_fields(result):
    """The `info` fields that differ for a script: every image's infotext, prompt and seed, and how many grids
    lead (A1111's index_of_first_image)."""
    params = [parse_infotext(text) for text in result.infotexts]
    return {"infotexts": result.infotexts, "all_prompts": [p.get("Prompt", "") for p in params],
            "all_negative_prompts": [p.get("Negative prompt", "") for p in params],
            "all_seeds": [int(p["Seed"]) if p.get("Seed", "").lstrip("-").isdigit() else -1 for p in params],
            "index_of_first_image": result.grids, "version": f"sdonnx {__version__}"}


def context_for(store, mode, upscalers=None):
    """The axis context of a served request: its mode, the served styles, models and upscaler models."""
    names = tuple(m.name for m in upscalers.models()) if upscalers is not None else ()
    return Context(mode, store.styles(), store.find, tuple(m.title for m in store.models), names,
                   tuple(store.vaes()))


def base_request(kwargs, seed, batch_size, batch_count):
    return GenerationRequest.from_kwargs(**kwargs, seed=seed, batch_size=batch_size, batch_count=batch_count)

