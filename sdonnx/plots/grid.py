"""Grids of images with A1111's legend layout (modules/images.py image_grid and draw_grid_annotations).

The layout is A1111's: the font size is (cell width + cell height) // 25, lines are spaced by half of it; the
column labels sit in a band above the grid as high as the tallest label plus a line space above and below; the
row labels in a band on the left three quarters of a cell wide (none when every row label is empty); labels
wrap at word boundaries to their band's width and a word still too wide is drawn smaller; cells are `margin`
pixels apart. Labels are drawn with Pillow's default font (a scalable font since Pillow 10.1; the fixed bitmap
font before), black on white; an inactive label (prompt matrix) is grey and struck through.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
ACTIVE = (0, 0, 0)
INACTIVE = (153, 153, 153)  # A1111's grid_text_inactive_color #999999


@dataclass
class Label:
    """One line of a legend (A1111's GridAnnotation)."""

    text: str = ""
    active: bool = True


@dataclass(frozen=True)
class Placed:
    """A legend line where it is drawn: centred on (x, y), at most `width` wide."""

    x: float
    y: float
    text: str
    active: bool
    width: int
    size: tuple


def font(size):
    """Pillow's default font at `size` pixels (its fixed bitmap font where Pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size=max(int(size), 1))
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def image_grid(images, rows):
    """`images` (all one size) in `rows` rows, filled row by row on black (A1111's image_grid)."""
    rows = max(1, min(rows, len(images)))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, image in enumerate(images):
        grid.paste(image, (i % cols * w, i // cols * h))
    return grid


def _wrap(draw, text, fnt, width):
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=fnt) <= width:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def _measure(draw, labels, fnt, width):
    """Each label wrapped to `width` -> [(text, active, (w, h))]."""
    out = []
    for label in labels:
        for line in _wrap(draw, label.text, fnt, width):
            box = draw.multiline_textbbox((0, 0), line, font=fnt)
            out.append((line, label.active, (box[2] - box[0], box[3] - box[1])))
    return out


@dataclass(frozen=True)
class Layout:
    """Where a legend's cells and lines go: the annotated image's size, the bands and the placed lines."""

    size: tuple
    pad_left: int
    pad_top: int
    fontsize: int
    lines: tuple  # Placed


def layout(cols, rows, width, height, x_labels, y_labels, margin=0):
    """A1111's legend geometry for a cols x rows grid of width x height cells.

    x_labels: per column a list of Label; y_labels: per row."""
    if len(x_labels) != cols or len(y_labels) != rows:
        raise ValueError(f"{len(x_labels)} column and {len(y_labels)} row labels for a {cols}x{rows} grid")
    fontsize = (width + height) // 25
    spacing = fontsize // 2
    fnt = font(fontsize)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad_left = 0 if not any(label.text for labels in y_labels for label in labels) else width * 3 // 4
    x_lines = [_measure(draw, labels, fnt, width) for labels in x_labels]
    y_lines = [_measure(draw, labels, fnt, pad_left) for labels in y_labels]
    x_heights = [sum(s[1] + spacing for _, _, s in lines) - spacing for lines in x_lines]
    # A1111 subtracts a spacing per line here: the row labels' block is centred on its lines' heights alone
    y_heights = [sum(s[1] + spacing for _, _, s in lines) - spacing * len(lines) for lines in y_lines]
    pad_top = 0 if sum(x_heights) == 0 else max(x_heights) + spacing * 2
    placed = []
    for col, lines in enumerate(x_lines):
        x = pad_left + (width + margin) * col + width / 2
        placed += _stack(x, pad_top / 2 - x_heights[col] / 2, lines, width, spacing)
    for row, lines in enumerate(y_lines):
        y = pad_top + (height + margin) * row + height / 2 - y_heights[row] / 2
        placed += _stack(pad_left / 2, y, lines, pad_left, spacing)
    size = (cols * width + pad_left + margin * (cols - 1), rows * height + pad_top + margin * (rows - 1))
    return Layout(size, pad_left, pad_top, fontsize, tuple(placed))


def _stack(x, y, lines, width, spacing):
    placed = []
    for text, active, size in lines:
        placed.append(Placed(x, y + size[1] / 2, text, active, width, size))
        y += size[1] + spacing
    return placed


def annotate(grid, width, height, x_labels, y_labels, margin=0):
    """The grid with A1111's legend: column labels on top, row labels on the left, cells `margin` apart."""
    cols, rows = grid.width // width, grid.height // height
    lay = layout(cols, rows, width, height, x_labels, y_labels, margin)
    result = Image.new("RGB", lay.size, BACKGROUND)
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (lay.pad_left + (width + margin) * col, lay.pad_top + (height + margin) * row))
    draw = ImageDraw.Draw(result)
    for line in lay.lines:
        _draw_line(draw, line, lay.fontsize)
    return result


def _draw_line(draw, line, fontsize):
    """One legend line centred on its place; drawn smaller while wider than its band (A1111's draw_texts)."""
    fnt = font(fontsize)
    while draw.multiline_textbbox((0, 0), line.text, font=fnt)[2] > line.width and fontsize > 1:
        fontsize -= 1
        fnt = font(fontsize)
    box = draw.multiline_textbbox((0, 0), line.text, font=fnt)
    left, top = line.x - (box[0] + box[2]) / 2, line.y - (box[1] + box[3]) / 2
    colour = ACTIVE if line.active else INACTIVE
    draw.multiline_text((left, top), line.text, font=fnt, fill=colour, align="center")
    if not line.active:
        half_w, mid = line.size[0] // 2, line.y
        draw.line((line.x - half_w, mid, line.x + half_w, mid), fill=INACTIVE, width=4)


def labels(texts):
    """[[Label(text)] for each text]: one-line legends."""
    return [[Label(str(text))] for text in texts]
