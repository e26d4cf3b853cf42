"""A1111's X/Y/Z plot and prompt matrix: axis syntax, cells, grid layout and infotext (no model needed).

The expected values are A1111's behaviour as its scripts/xyz_grid.py, scripts/prompt_matrix.py and
modules/images.py (v1.10) define it, worked out by hand from those rules; where sdonnx differs on purpose
the case says so.
"""
import numpy as np
import pytest
from PIL import Image

from sdonnx import limits
from sdonnx.infotext import format_infotext, parse_infotext
from sdonnx.plots import matrix
from sdonnx.plots.axes import NOTHING, Cell, Context, axis_types, find_axis_type, parse_axis, reorder
from sdonnx.plots.grid import Label, image_grid, labels, layout
from sdonnx.plots.values import expand_numbers, split_values
from sdonnx.plots.xyz import CellResult, XYZPlot, assemble, expand, finish, fix_seeds, script_params, with_params
from sdonnx.request import GenerationRequest

RANGES = [  # (text, kind, values)
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-5 (+2)", int, [1, 3, 5]),
    ("1-6 (+2)", int, [1, 3, 5]),  # the step stops before passing the end
    ("10-30 [3]", int, [10, 20, 30]),
    ("1-10 [5]", int, [1, 3, 5, 7, 10]),  # numpy.linspace truncated by int(), as A1111
    ("1-3 [1]", int, [1]),
    ("-5--1", int, [-5, -4, -3, -2, -1]),
    (" 2 - 4 ", int, [2, 3, 4]),
    ("10-1 (-3)", int, [10, 7, 4, 1]),  # A1111 stops at 2 here (its end + 1): sdonnx keeps the end inclusive
    ("5-1", int, [5, 4, 3, 2, 1]),  # sdonnx: counts down; A1111 gives no values
    ("8-32 (*2)", int, [8, 16, 32]),  # sdonnx extension
    ("1-5 (2)", int, [1, 3, 5]),  # sdonnx: the sign may be left out
    ("42", int, [42]),
    ("-1", int, [-1]),
    ("+7", int, [7]),
    ("0.5-1.5 (+0.25)", float, [0.5, 0.75, 1.0, 1.25, 1.5]),
    ("0.1-0.3 (+0.1)", float, [0.1, 0.2, 0.3]),  # no 0.30000000000000004, no missing end
    ("4-8 [5]", float, [4.0, 5.0, 6.0, 7.0, 8.0]),
    ("1-2", float, [1.0, 2.0]),
    ("7", float, [7.0]),
    ("7.5", float, [7.5]),
    ("1e-3", float, [0.001]),
    ("2-1 (*0.5)", float, [2.0, 1.0]),
]


@pytest.mark.parametrize("text, kind, values", RANGES)
def test_ranges_as_a1111(text, kind, values):
    assert expand_numbers([text], kind, "X") == values
    assert all(type(v) is kind for v in expand_numbers([text], kind, "X"))


@pytest.mark.parametrize("text, values", [
    ("Euler a, DPM++ 2M", ["Euler a", "DPM++ 2M"]),
    ('a, "b, c" , d', ["a", "b, c", "d"]),
    ('"x ""quoted"" y", z', ['x "quoted" y', "z"]),
    ("one\ntwo, three", ["one", "two", "three"]),
    ("dog, cat, ", ["dog", "cat", ""]),  # an empty value stays: Prompt S/R may replace with nothing
    ("", []),
])
def test_values_are_csv(text, values):
    assert split_values(text) == values


@pytest.mark.parametrize("kind, text, words", [
    (int, "abc", ["'abc' is not a whole number", "1-5"]),
    (int, "1.5", ["not a whole number"]),
    (int, "1-5 (+0.5)", ["whole step"]),
    (int, "1-5 (-1)", ["never goes from 1 to 5"]),
    (int, "1-5 (+0)", ["never"]),
    (int, "0-8 (*2)", ["never reaches"]),
    (float, "1-inf", ["not a number"]),
    (float, "nan", ["finite"]),
])
def test_bad_values_are_named(kind, text, words):
    with pytest.raises(ValueError) as e:
        expand_numbers([text], kind, "X axis (Steps)")
    assert "X axis (Steps)" in str(e.value) and all(w in str(e.value) for w in words)


@pytest.mark.parametrize("text", ["1-100000000", "0-1 [100000000]", "1-1000000 (*1.001)"])
def test_huge_ranges_are_refused_before_they_are_made(text):
    with pytest.raises(limits.LimitError, match=f"limit of {limits.MAX_PLOT_CELLS}"):
        expand_numbers([text], float, "X")


def test_axis_types_follow_a1111_indices_and_names():
    txt = [t.label for t in axis_types("txt2img")]
    img = [t.label for t in axis_types("img2img")]
    # A1111 1.10's dropdowns: API clients send these indices (e.g. 7 for Prompt S/R in txt2img)
    assert txt[:11] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale",
                        "Prompt S/R", "Prompt order", "Sampler", "Hires sampler"]
    assert img[:10] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale", "Image CFG Scale",
                        "Prompt S/R", "Prompt order", "Sampler"]
    assert len(txt) == 43 and txt[-1] == "Size"
    assert find_axis_type(7).label == find_axis_type("7").label == "Prompt S/R"
    assert find_axis_type("cfg scale").label == "CFG Scale"
    assert find_axis_type("Hires. steps").label == "Hires steps"  # A1111's older spelling
    assert find_axis_type(9, "img2img").label == "Sampler"


@pytest.mark.parametrize("name, mode, words", [
    ("Bogus", "txt2img", ["unknown axis type 'Bogus'", "Steps", "Prompt S/R", "Checkpoint name"]),
    ("Token merging ratio", "txt2img", ["token merging", "valid: Nothing, Seed"]),
    ("Hires steps", "img2img", ["unknown axis type", "for img2img"]),
    (6, "img2img", ["instruct-pix2pix"]),
    (43, "txt2img", ["outside A1111's txt2img list (0-42)"]),
])
def test_bad_axis_types_name_the_choices(name, mode, words):
    with pytest.raises(ValueError) as e:
        find_axis_type(name, mode)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("kind, text, words", [
    ("Sampler", "Euler a, Eulr", ["X axis (Sampler)", "'Eulr'", "DPM++ 2M", "Euler a"]),
    ("Schedule type", "Karras, Karas", ["'Karas'", "Exponential"]),
    ("Hires upscaler", "Latent, Sharp", ["'Sharp'", "Latent (bicubic)", "Lanczos"]),
    ("RNG source", "GPU, Quantum", ["'Quantum'", "GPU, CPU, NV"]),
    ("Steps", "", ["has no values"]),
    ("CFG Scale", "5,,7", ["empty value"]),
    ("Prompt order", "a, b, c, d, e, f, g", ["5040 orders", "limit"]),
])
def test_bad_axis_values_are_refused(kind, text, words):
    with pytest.raises(ValueError) as e:
        parse_axis(kind, text, Context(), "X")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_hires_upscaler_models_found_are_choices():
    context = Context(upscalers=("4x-UltraSharp", "R-ESRGAN 4x+"))
    axis = parse_axis("Hires upscaler", "Latent (bicubic), Lanczos, R-ESRGAN 4x+", context)
    assert axis.values == ("Latent (bicubic)", "Lanczos", "R-ESRGAN 4x+")
    with pytest.raises(ValueError, match="'4x-Other' is not one of .*4x-UltraSharp, R-ESRGAN 4x\\+"):
        parse_axis("Hires upscaler", "4x-Other", context)


def test_face_restore_and_vae_axes_set_their_request_fields(tmp_path):
    vae_file = tmp_path / "mine.vae.safetensors"
    vae_file.write_bytes(b"")
    ctx = Context(vaes=("sdxl_vae.safetensors",))
    plot = XYZPlot(parse_axis("Face restore", "CodeFormer, gfpgan, false, yes", ctx),
                   parse_axis("VAE", f"Automatic, None, sdxl_vae.safetensors, {vae_file}", ctx))
    cells = expand(plot, _request(), ctx)
    assert [c.request.faces.restore_faces for c in cells[:4]] == ["CodeFormer", "GFPGAN", None, "CodeFormer"]
    assert [cells[4 * i].request.vae.vae for i in range(4)] == ["Automatic", "None", "sdxl_vae.safetensors",
                                                               str(vae_file)]
    with pytest.raises(ValueError, match="'maybe' is not one of CodeFormer, GFPGAN"):
        parse_axis("Face restore", "maybe", ctx)
    with pytest.raises(ValueError, match="'other.pt' is neither a file nor one of Automatic, None, sdxl_vae"):
        parse_axis("VAE", "other.pt", ctx)


def _request(**kw):
    return GenerationRequest.from_kwargs(**{"prompt": "a cat in the snow", "negative_prompt": "blurry", "seed": 5,
                                            **kw})


def test_cells_in_a1111_order_with_every_axis_applied():
    ctx = Context()
    plot = XYZPlot(parse_axis("Sampler", "Euler a, DPM++ 2M Karras", ctx), parse_axis("Steps", "10-30 [3]", ctx),
                   parse_axis("Prompt S/R", "cat, dog", ctx))
    cells = expand(plot, _request(), ctx)
    assert [(c.ix, c.iy, c.iz) for c in cells] == [(x, y, z) for z in range(2) for y in range(3) for x in range(2)]
    c = cells[1 + 2 * 2 + 1 * 6]  # x=1, y=2, z=1
    s = c.request.sampling
    # a legacy combined name sets the schedule too, as A1111's samplers map
    assert (s.sampler, s.scheduler, s.steps, c.request.prompt.prompt) == ("DPM++ 2M", "Karras", 30, "a dog in the snow")
    assert cells[0].request.prompt.prompt == "a cat in the snow" and cells[0].request.seeds.seed == 5
    assert all(c.model is None for c in cells)


def test_prompt_sr_and_lora_strengths():
    ctx = Context()
    request = _request(prompt="a cat <lora:detail:0.4>", hires=True, hires_prompt="a cat <lora:detail:0.4>, sharp")
    plot = XYZPlot(parse_axis("Prompt S/R", "detail:0.4, detail:0.8, detail:1.2", ctx))
    cells = expand(plot, request, ctx)
    assert [c.request.prompt.prompt for c in cells] == [f"a cat <lora:detail:{w}>" for w in ("0.4", "0.8", "1.2")]
    assert cells[2].request.hires.hires_prompt == "a cat <lora:detail:1.2>, sharp"
    assert plot.x.labels == ["detail:0.4", "detail:0.8", "detail:1.2"]  # Prompt S/R shows the value alone
    with pytest.raises(ValueError, match="Prompt S/R did not find 'horse'"):
        expand(XYZPlot(parse_axis("Prompt S/R", "horse, cow", ctx)), request, ctx)


def test_prompt_order_as_a1111():
    assert reorder("a, b, c, d", ("c", "a", "b")) == "c, a, b, d"
    ctx = Context()
    plot = XYZPlot(parse_axis("Prompt order", "cat, snow", ctx))
    assert [c.request.prompt.prompt for c in expand(plot, _request(), ctx)] == ["a cat in the snow", "a snow in the cat"]
    assert plot.x.labels == ["cat, snow", "snow, cat"]


def test_seeds_fixed_kept_and_varied():
    ctx = Context()
    plot = XYZPlot(parse_axis("Seed", "-1, 7, -1", ctx), parse_axis("CFG Scale", "5, 7", ctx))
    draws = iter([100, 200, 300, 400])
    fixed, request = fix_seeds(plot, _request(seed=-1), lambda: next(draws))
    assert (request.seeds.seed, request.seeds.subseed) == (100, 200)
    assert fixed.x.values == (300, 7, 400) and fixed.x.text == "-1, 7, -1"
    assert script_params(fixed)["Fixed X Values"] == "300, 7, 400"
    kept = XYZPlot(plot.x, plot.y, no_fixed_seeds=True)
    assert fix_seeds(kept, _request(seed=-1))[1].seeds.seed == -1 and "Fixed X Values" not in script_params(kept)
    varied = XYZPlot(parse_axis("Steps", "1, 2", ctx), parse_axis("CFG Scale", "5, 6, 7", ctx),
                     vary_seeds=(True, True, False))
    assert [c.request.seeds.seed for c in expand(varied, _request(), ctx)] == [5, 6, 7, 8, 9, 10]


def test_sampler_options_only_where_the_sampler_has_them():
    ctx = Context()
    plot = XYZPlot(parse_axis("Sampler", "Euler, Euler a", ctx), parse_axis("Sigma Churn", "0.5", ctx))
    euler, euler_a = expand(plot, _request(), ctx)
    assert euler.request.sampling.s_churn == 0.5 and euler_a.request.sampling.s_churn is None  # A1111 ignores it


def test_models_styles_size_and_denoising():
    styles = {"framed": ("a photo of {prompt}, framed", "ugly"), "oil": ("oil painting", "")}

    def find(name):
        if name not in ("sd15", "sdxl"):
            raise ValueError(f"model {name!r} not found; available: sd15, sdxl")
        return f"models/{name}"

    ctx = Context(styles=styles, find_model=find, model_choices=("sd15", "sdxl"))
    plot = XYZPlot(parse_axis("Checkpoint name", "sd15, sdxl", ctx), parse_axis("Styles", 'framed, "framed,oil"', ctx),
                   parse_axis("Size", "64x96", ctx))
    cells = expand(plot, _request(), ctx)
    assert [c.model for c in cells] == ["models/sd15", "models/sdxl"] * 2
    assert cells[0].request.prompt.prompt == "a photo of a cat in the snow, framed"
    assert cells[2].request.prompt.prompt == "a photo of a cat in the snow, framed, oil painting"
    assert cells[2].request.prompt.negative_prompt == "blurry, ugly"
    assert (cells[0].request.prompt.width, cells[0].request.prompt.height) == (64, 96)
    for kind, text, words in (("Checkpoint name", "sd3", "available: sd15, sdxl"), ("Styles", "nope", "styles: framed")):
        with pytest.raises(ValueError, match=words):
            expand(XYZPlot(parse_axis(kind, text, ctx)), _request(), ctx)
    denoise = expand(XYZPlot(parse_axis("Denoising", "0.3", ctx)), _request(), ctx)[0].request
    assert denoise.init.strength == denoise.hires.hires_denoising == 0.3  # A1111's one denoising_strength


def test_too_many_cells_are_refused():
    ctx = Context()
    axis = parse_axis("Steps", "1-20", ctx)
    plot = XYZPlot(axis, axis, parse_axis("CFG Scale", "1-3", ctx))
    with pytest.raises(limits.LimitError, match="1200 cells"):
        expand(plot, _request(), ctx)


# ---------------------------------------------------------------------------------------------- grids


def _cells(n, size=(64, 48)):
    return [Image.new("RGB", size, (i * 20, 100, 0)) for i in range(n)]


def test_legend_layout_is_a1111s():
    lay = layout(2, 3, 64, 48, labels(["Euler a", "DPM++ 2M"]), labels(["Steps: 10", "Steps: 20", "Steps: 30"]))
    assert lay.fontsize == (64 + 48) // 25 == 4
    assert lay.pad_left == 64 * 3 // 4
    spacing = lay.fontsize // 2
    assert lay.pad_top == max(line.size[1] for line in lay.lines[:2]) + 2 * spacing
    assert lay.size == (2 * 64 + lay.pad_left, 3 * 48 + lay.pad_top)
    assert [line.text for line in lay.lines] == ["Euler a", "DPM++ 2M", "Steps: 10", "Steps: 20", "Steps: 30"]
    # column labels centred over their cells, row labels in the middle of the left band
    assert [line.x for line in lay.lines[:2]] == [lay.pad_left + 32, lay.pad_left + 96]
    assert all(line.x == lay.pad_left / 2 for line in lay.lines[2:])
    with_margin = layout(2, 3, 64, 48, labels("ab"), labels("cde"), margin=10)
    assert with_margin.size == (2 * 64 + with_margin.pad_left + 10, 3 * 48 + with_margin.pad_top + 20)
    blank = layout(2, 1, 64, 48, labels(["", ""]), [[Label()]])
    assert (blank.pad_left, blank.pad_top, blank.size) == (0, 0, (128, 48))


def test_long_labels_wrap_to_the_cell_width():
    lay = layout(1, 1, 512, 512, labels(["masterpiece best quality " * 8]), [[Label()]])
    lines = [line for line in lay.lines if line.text]
    assert len(lines) > 1 and all(line.width == 512 and line.size[0] <= 512 for line in lines)
    assert " ".join(line.text for line in lines) == ("masterpiece best quality " * 8).strip()


def test_grid_sizes_and_drawn_labels():
    ctx = Context()
    plot = XYZPlot(parse_axis("Steps", "1, 2", ctx), parse_axis("CFG Scale", "5, 6, 7", ctx),
                   parse_axis("Prompt S/R", "cat, dog", ctx))
    main, subgrids = assemble(plot, _cells(12))
    lay = layout(2, 3, 64, 48, labels(plot.x.labels), labels(plot.y.labels))
    assert [g.size for g in subgrids] == [lay.size] * 2
    z = layout(2, 1, *lay.size, labels(["cat", "dog"]), [[Label()]])
    assert main.size == z.size == (2 * lay.size[0], lay.size[1] + z.pad_top)
    # the legend band is drawn on (dark text on white), the cells are pasted where the layout puts them
    band = subgrids[0].crop((lay.pad_left, 0, lay.size[0], lay.pad_top))
    assert np.asarray(band.convert("L")).min() < 128
    assert subgrids[1].getpixel((lay.pad_left + 64 + 5, lay.pad_top + 48 + 5)) == (60 + 6 * 20, 100, 0)
    bare, _ = assemble(XYZPlot(plot.x, plot.y, plot.z, draw_legend=False), _cells(12))
    assert bare.size == (4 * 64, 3 * 48)
    assert image_grid(_cells(5), rows=2).size == (3 * 64, 2 * 48)


def test_grid_infotext_as_a1111():
    text = format_infotext("a cat", "blurry", {"Steps": 2, "Sampler": "Euler a", "Seed": 5, "Size": (64, 48),
                                               "Lora hashes": {"detail": "0123456789ab"}, "Version": "sdonnx 0.1.0"})
    assert with_params(text, {}) == text  # read back and written again unchanged
    ctx = Context()
    plot = XYZPlot(parse_axis("Seed", "1, 2", ctx), parse_axis("Sampler", "Euler a, DPM++ 2M", ctx),
                   parse_axis("CFG Scale", "5, 7", ctx))
    grid_text = with_params(text, script_params(plot, "xyz"))
    params = parse_infotext(grid_text)
    keys = list(params)
    assert keys[keys.index("Lora hashes") + 1:] == ["Script", "X Type", "X Values", "Fixed X Values", "Y Type",
                                                    "Y Values", "Z Type", "Z Values", "Version"]
    assert (params["Script"], params["Y Values"], params["Z Values"]) == ("X/Y/Z plot", "Euler a, DPM++ 2M", "5, 7")
    assert grid_text.splitlines()[:2] == ["a cat", "Negative prompt: blurry"]


def test_answer_order_grid_sub_grids_then_images():
    ctx = Context()
    plot = XYZPlot(parse_axis("Steps", "1, 2", ctx), z=parse_axis("CFG Scale", "5, 7", ctx),
                   include_sub_grids=True, include_lone_images=True)
    text = format_infotext("p", "", {"Steps": 1, "Seed": 3})
    results = [CellResult([image], [text + f" {i}"]) for i, image in enumerate(_cells(4))]
    done = finish(plot, expand(plot, _request(), ctx), results)
    assert (done.grids, len(done.images), len(done.infotexts)) == (3, 7, 7)
    assert "Z Type: CFG Scale" in done.infotexts[0] and "Z Type" not in done.infotexts[1]
    assert done.infotexts[3:] == [r.infotexts[0] for r in results]
    only = finish(XYZPlot(plot.x, z=plot.z), expand(plot, _request(), ctx), results)
    assert (only.grids, len(only.images)) == (1, 1)


# ---------------------------------------------------------------------------------------------- prompt matrix


@pytest.mark.parametrize("text, start, delimiter, prompts", [
    ("a cat|in snow|at night", False, ", ", ["a cat", "a cat, in snow", "a cat, at night", "a cat, in snow, at night"]),
    ("a cat|in snow|at night", True, " ", ["a cat", "in snow a cat", "at night a cat", "in snow at night a cat"]),
    ("a cat| snow,|night", False, ", ", ["a cat", "a cat, snow", "a cat, night", "a cat, snow, night"]),
    ("plain", False, ", ", ["plain"]),
])
def test_prompt_matrix_combinations(text, start, delimiter, prompts):
    assert matrix.combinations(text, start, delimiter)[1] == prompts


def test_prompt_matrix_cells_seeds_and_legend():
    options = matrix.PromptMatrix(different_seeds=True)
    parts, cells = matrix.expand(options, _request(prompt="a cat|snow|night|fog", batch_size=3))
    assert [c.request.seeds.seed for c in cells] == list(range(5, 13))
    assert all(c.request.prompt.batch_size == 1 for c in cells)
    x, y = matrix.legends(parts)
    assert len(x) == 4 and len(y) == 2  # snow and night across, fog down
    assert [[label.active for label in col] for col in x] == [[False, False], [True, False], [False, True], [True, True]]
    negative = matrix.expand(matrix.PromptMatrix(prompt_type="negative"), _request(negative_prompt="ugly|blurry"))[1]
    assert [c.request.prompt.negative_prompt for c in negative] == ["ugly", "ugly, blurry"]
    results = [CellResult([image], [f"text {i}"]) for i, image in enumerate(_cells(8))]
    done = matrix.finish(options, parts, results)
    lay = layout(4, 2, 64, 48, *matrix.legends(parts))
    assert done.images[0].size == lay.size and done.infotexts[:2] == ["text 0", "text 0"] and len(done.images) == 9
    with pytest.raises(limits.LimitError, match="limit"):
        matrix.combinations("|".join("abcdefghijkl"))
    with pytest.raises(ValueError, match="choose positive or negative"):
        matrix.PromptMatrix(prompt_type="both")


def test_nothing_axis():
    assert NOTHING.labels == [""] and len(NOTHING) == 1
    assert parse_axis("Nothing", "ignored").type.label == "Nothing"
    cell = Cell(0, 0, 0, _request())
    assert NOTHING.type.apply(cell, 0, (0,), Context()) is cell
