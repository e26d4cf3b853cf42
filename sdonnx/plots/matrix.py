"""A1111's prompt matrix: ``a cat|in the snow|at night`` makes every combination of the parts after the first
(a cat; a cat, in the snow; a cat, at night; a cat, in the snow, at night), one image each, and a grid with
the parts as legends (struck through where left out): the first half of the parts across, the rest down.

A1111's options: put the variable parts at the start of the prompt, a different seed per prompt (seed + its
index), the prompt the parts are in (positive or negative), and the joining text (comma: ", ", space: " ").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import limits
from .axes import Cell
from .grid import Label, annotate, image_grid
from .xyz import PlotResult

TITLE = "Prompt matrix"
PROMPT_TYPES = ("positive", "negative")
DELIMITERS = {"comma": ", ", "space": " "}


@dataclass(frozen=True)
class PromptMatrix:
    """A1111's prompt matrix options (its script_args, in order)."""

    put_at_start: bool = False
    different_seeds: bool = False
    prompt_type: str = "positive"
    variations_delimiter: str = "comma"
    margin_size: int = 0

    def __post_init__(self):
        if self.prompt_type not in PROMPT_TYPES:
            raise ValueError(f"prompt type {self.prompt_type!r}: choose {' or '.join(PROMPT_TYPES)}")
        if self.variations_delimiter not in DELIMITERS:
            raise ValueError(f"joining character {self.variations_delimiter!r}: choose {' or '.join(DELIMITERS)}")
        if not 0 <= int(self.margin_size) <= 500:
            raise ValueError(f"margin size {self.margin_size} is outside 0..500 pixels")


def combinations(text, put_at_start=False, delimiter=", "):
    """(parts, prompts): the text split at ``|``, and the prompt of each combination; combination n holds part
    i + 1 when bit i of n is set (A1111's order)."""
    parts = text.split("|")
    count = 2 ** (len(parts) - 1)
    if count > limits.MAX_PLOT_CELLS:
        raise limits.LimitError(f"{len(parts) - 1} variable parts make {count} prompts, over the limit of "
                                f"{limits.MAX_PLOT_CELLS} cells")
    prompts = []
    for n in range(count):
        chosen = [part.strip().strip(",") for i, part in enumerate(parts[1:]) if n & (1 << i)]
        prompts.append(delimiter.join(chosen + [parts[0]] if put_at_start else [parts[0]] + chosen))
    return parts, prompts


def expand(matrix, request):
    """One cell per combination (ix = its index): the request with that prompt, one image, the same seed (or
    seed + index). The request's seed must be fixed already (`xyz.fix_seeds`)."""
    key = "prompt" if matrix.prompt_type == "positive" else "negative_prompt"
    parts, prompts = combinations(getattr(request.prompt, key), matrix.put_at_start,
                                  DELIMITERS[matrix.variations_delimiter])
    seed = request.seeds.seed
    base = request.replace(batch_size=1, batch_count=1)
    cells = [Cell(i, 0, 0, base.replace(**{key: prompt, "seed": seed + i if matrix.different_seeds else seed}))
             for i, prompt in enumerate(prompts)]
    return parts, cells


def legends(parts):
    """A1111's draw_prompt_matrix legends: every variable part on every column (first half) and row (second
    half), active where the combination holds it."""
    variable = parts[1:]
    half = math.ceil(len(variable) / 2)
    across, down = variable[:half], variable[half:]
    x = [[Label(text, bool(pos & (1 << i))) for i, text in enumerate(across)] for pos in range(1 << len(across))]
    y = [[Label(text, bool(pos & (1 << i))) for i, text in enumerate(down)] for pos in range(1 << len(down))]
    return x, y


def finish(matrix, parts, results):
    """[grid, every image] with their infotexts (the grid takes the first image's), A1111's answer."""
    images = [r.images[0] for r in results]
    width, height = images[0].size
    grid = image_grid(images, rows=1 << ((len(parts) - 1) // 2))
    x, y = legends(parts)
    grid = annotate(grid, width, height, x, y, matrix.margin_size)
    texts = [r.infotexts[0] for r in results]
    return PlotResult([grid, *images], [texts[0], *texts], 1, results)

