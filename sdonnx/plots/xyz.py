"""A1111's X/Y/Z plot on the generation request: axes -> cells (requests) -> images -> grids with a legend.

The steps are separate so that every runner (the local loop, the server's worker, a Ray cluster) shares them:

1. `fix_seeds`: A1111 draws the seeds once for the whole plot (unless "Keep -1 for seeds").
2. `expand` (pure): one `Cell` per (x, y, z), each the base request with the axis values applied in x, y, z
   order, as A1111 applies them; index ix + iy * len(x) + iz * len(x) * len(y).
3. `check_cells`: every cell validated against its model and the plot against sdonnx's limits, before any
   image is generated.
4. a runner generates the cells (`run_cells` here: one Pipeline per model, slow axes outermost).
5. `finish`: the grids (A1111's draw_xyz_grid: one sub-grid per Z value, side by side under the Z legend),
   their infotexts, and A1111's answer order: the grid, then the sub-grids ("Include Sub Grids"), then the cell
   images ("Include Sub Images").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import limits
from ..infotext import format_infotext, parse_infotext
from ..request import random_seed
from .axes import NOTHING, SEED_TYPES, Axis, Cell
from .grid import Label, annotate, image_grid, labels

TITLE = "X/Y/Z plot"


@dataclass(frozen=True)
class XYZPlot:
    """A plot's axes and A1111's options (the script's checkboxes and margin slider)."""

    x: Axis = NOTHING
    y: Axis = NOTHING
    z: Axis = NOTHING
    draw_legend: bool = True
    include_lone_images: bool = False  # "Include Sub Images": the cells' own images after the grids
    include_sub_grids: bool = False  # one grid per Z value after the main grid
    no_fixed_seeds: bool = False  # "Keep -1 for seeds": each cell draws its own random seed
    vary_seeds: tuple = (False, False, False)  # "Vary seeds" along X, Y, Z: seed + the cell's index along them
    margin_size: int = 0  # pixels between cells ("Grid margins (px)", 0-500)

    def __post_init__(self):
        if not 0 <= int(self.margin_size) <= 500:
            raise ValueError(f"margin size {self.margin_size} is outside 0..500 pixels")

    @property
    def axes(self):
        return self.x, self.y, self.z

    @property
    def shape(self):
        return len(self.x), len(self.y), len(self.z)

    @property
    def cell_count(self):
        nx, ny, nz = self.shape
        return nx * ny * nz


# ---------------------------------------------------------------------------------------------- cells


def fix_seeds(plot, request, draw=random_seed):
    """A1111's fix_seed: -1 seeds (the request's, and Seed / Var. seed axis values) drawn once for the plot, so
    the cells differ only by their axis values. With no_fixed_seeds, -1 stays and each cell draws its own."""
    if plot.no_fixed_seeds:
        return plot, request
    s = request.seeds
    request = request.replace(seed=draw() if s.seed == -1 else s.seed, subseed=draw() if s.subseed == -1 else s.subseed)
    axes = {name: _fixed(axis, draw) for name, axis in zip("xyz", plot.axes)}
    return dataclasses.replace(plot, **axes), request


def _fixed(axis, draw):
    if axis.type.label not in SEED_TYPES:
        return axis
    return dataclasses.replace(axis, values=tuple(draw() if v == -1 else v for v in axis.values))


def expand(plot, request, context):
    """Every cell of the plot, in grid index order. Pure: the same plot and request give the same cells."""
    cells = []
    if plot.cell_count > limits.MAX_PLOT_CELLS:
        raise limits.LimitError(f"the plot has {plot.cell_count} cells ({'x'.join(map(str, plot.shape))}), over the "
                                f"limit of {limits.MAX_PLOT_CELLS}")
    for iz, z in enumerate(plot.z.values):
        for iy, y in enumerate(plot.y.values):
            for ix, x in enumerate(plot.x.values):
                cell = Cell(ix, iy, iz, request)
                for axis, value in zip(plot.axes, (x, y, z)):
                    cell = axis.type.apply(cell, value, axis.values, context)
                cells.append(_foreign_options_dropped(_varied_seed(cell, plot), plot, request))
    return cells


def _varied_seed(cell, plot):
    """A1111's "Vary seeds for X/Y/Z": seed + ix (+ iy * len(x) (+ iz * len(x) * len(y)))."""
    vx, vy, vz = plot.vary_seeds
    seed = cell.request.seeds.seed
    if seed == -1 or not any(plot.vary_seeds):
        return cell
    nx = len(plot.x) if vx else 1
    ny = len(plot.y) if vy else 1
    seed += (cell.ix if vx else 0) + (cell.iy * nx if vy else 0) + (cell.iz * nx * ny if vz else 0)
    return dataclasses.replace(cell, request=cell.request.replace(seed=seed))


def _foreign_options_dropped(cell, plot, base):
    """A sampler option an axis sets (Eta, Sigma churn, ...) is dropped where the cell's sampler has no such option,
    as A1111's samplers ignore it; a base request that sets one keeps the request's own error."""
    from ..request import check_sampler_options
    from ..samplers import resolve

    options = [axis.type.sampler_option for axis in plot.axes if axis.type.sampler_option]
    if not options:
        return cell
    sampler = resolve(cell.request.sampling.sampler, cell.request.sampling.scheduler).sampler
    dropped = {}
    for name in options:
        try:
            check_sampler_options(sampler, {name: 0.0})
        except ValueError:
            dropped[name] = getattr(base.sampling, name)
    return dataclasses.replace(cell, request=cell.request.replace(**dropped)) if dropped else cell


def check_cells(cells, manifest_for):
    """Validate every cell against its model (manifest_for(cell.model)) and the plot against the limits, before
    anything runs. Returns the cells' plans. A ValueError names the cell and the bad value."""
    if len(cells) > limits.MAX_PLOT_CELLS:
        raise limits.LimitError(f"{len(cells)} cells are over the limit of {limits.MAX_PLOT_CELLS} for one plot")
    plans, pixels = [], 0
    for cell in cells:
        try:
            plan = cell.request.validate(manifest_for(cell.model))
        except ValueError as e:
            raise type(e)(f"cell {cell_name(cell)}: {e}") from None
        plans.append(plan)
        width, height = (plan.hires.width, plan.hires.height) if plan.hires else (plan.width, plan.height)
        p = cell.request.prompt
        pixels += width * height * p.batch_size * p.batch_count
    if pixels > limits.MAX_JOB_PIXELS:
        raise limits.LimitError(f"the plot's images are {pixels} pixels, over the limit of {limits.MAX_JOB_PIXELS} "
                                f"for one job: fewer cells, a smaller size or fewer images per cell")
    return plans


def cell_name(cell):
    return f"({cell.ix + 1}, {cell.iy + 1}, {cell.iz + 1})"


# ---------------------------------------------------------------------------------------------- running


@dataclass
class CellResult:
    """What a runner hands back for one cell."""

    images: list
    infotexts: list
    seeds: list = field(default_factory=list)


def run_order(cells):
    """The order to generate cells in: grouped by model (A1111 puts its costly Checkpoint axis outermost), so each
    model loads once; the grid order is kept apart from it."""
    models = []
    for cell in cells:
        if cell.model not in models:
            models.append(cell.model)
    return sorted(range(len(cells)), key=lambda i: models.index(cells[i].model))


def run_cells(cells, generate_cell, on_cell=None):
    """Generate each cell with generate_cell(cell) -> CellResult, grouped by model; results in grid order.
    on_cell(index, cell, result) after each one (the CLI saves its images then)."""
    results = [None] * len(cells)
    for i in run_order(cells):
        results[i] = generate_cell(cells[i])
        if on_cell is not None:
            on_cell(i, cells[i], results[i])
    return results


# ---------------------------------------------------------------------------------------------- grids


@dataclass
class PlotResult:
    """A finished plot in A1111's answer order: `grids` grid images first, then the cells' images if asked."""

    images: list
    infotexts: list
    grids: int = 1
    cells: list = field(default_factory=list)  # CellResult per cell, grid order


def assemble(plot, cell_images):
    """(main grid, sub-grids): one sub-grid per Z value (X across, Y down, legend on top and left), and the main
    grid with the sub-grids side by side under the Z legend. cell_images: one image per cell, grid order."""
    nx, ny, nz = plot.shape
    size = cell_images[0].size
    images = [image if image.size == size else image.resize(size) for image in cell_images]  # a Size axis
    subgrids = []
    for iz in range(nz):
        grid = image_grid(images[iz * nx * ny:(iz + 1) * nx * ny], rows=ny)
        if plot.draw_legend:
            grid = annotate(grid, size[0], size[1], labels(plot.x.labels), labels(plot.y.labels), plot.margin_size)
        subgrids.append(grid)
    main = image_grid(subgrids, rows=1)
    if plot.draw_legend:
        main = annotate(main, subgrids[0].width, subgrids[0].height, labels(plot.z.labels), [[Label()]])
    return main, subgrids


def script_params(plot, axes="xy"):
    """The infotext keys A1111's X/Y/Z script adds to a grid's text: Script, and per axis its type, its values
    as written and, for seed axes whose -1 were drawn, the values used."""
    params = {"Script": TITLE}
    for name in axes:
        axis = getattr(plot, name)
        if axis.type.label == "Nothing":
            continue
        key = name.upper()
        params[f"{key} Type"] = axis.type.label
        params[f"{key} Values"] = axis.text
        if axis.type.label in SEED_TYPES and not plot.no_fixed_seeds:
            params[f"Fixed {key} Values"] = ", ".join(str(v) for v in axis.values)
    return params


def with_params(infotext, extra):
    """An infotext with more keys (before Version), re-written as A1111 writes it."""
    params = parse_infotext(infotext)
    prompt, negative = params.pop("Prompt"), params.pop("Negative prompt")
    for key in [k for k in params if k[-2:] in ("-1", "-2") and k[:-2] in params]:
        del params[key]  # the reader's width/height split of "WxH" values
    return format_infotext(prompt, negative, {**params, **extra})


def finish(plot, cells, results):
    """The grids, their infotexts and A1111's answer order from the cells' results (grid order)."""
    nx, ny, nz = plot.shape
    main, subgrids = assemble(plot, [r.images[0] for r in results])
    first = [results[iz * nx * ny].infotexts[0] for iz in range(nz)]  # cell (0, 0, z) of each sub-grid
    main_text = with_params(first[0], script_params(plot, "xyz"))
    images, infotexts = [main], [main_text]
    if plot.include_sub_grids:
        images += subgrids
        infotexts += [with_params(text, script_params(plot, "xy")) for text in first]
    grids = len(images)
    if plot.include_lone_images:
        for result in results:
            images += result.images
            infotexts += result.infotexts
    return PlotResult(images, infotexts, grids, results)


def pipeline_runner(pipeline_for, callback=None, preview=None):
    """generate_cell for run_cells on Pipelines: pipeline_for(cell.model) -> the Pipeline to generate it with."""
    def generate(cell):
        result = pipeline_for(cell.model).generate(cell.request, callback=callback, preview=preview)
        return CellResult(result.images, result.infotexts, result.seeds)
    return generate
