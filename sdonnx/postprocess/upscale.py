"""A1111's upscalers on ONNX Runtime: its names, its tiled model pass and its "upscale toward the target,
then Lanczos to the exact size" loop. Torch-free (numpy and Pillow).

One model pass (A1111's upscale_with_model): the image is cut into tile x tile crops overlapping by
`overlap` pixels, the last crop of a row or column flush with the edge (crops past a smaller image are
padded black); each crop runs through the graph in the model's channel order and value range, comes
back as 8-bit, and the crops are pasted with linear alpha ramps across the overlaps, first along each
row, then row onto row. Memory: the output image plus one row of output tiles and one tile's activations.

The loop (A1111's Upscaler.upscale): the target is the image size times the scale, rounded down to a
multiple of 8; the model runs up to three times while the image is smaller than the target (a 4x model
asked for 8x runs twice), then Lanczos resizes to the target.
"""
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .models import ModelNotFound, NotConverted, find, scan

log = logging.getLogger(__name__)

KIND = "upscaler"
LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
BUILTIN = ("None", "Lanczos", "Nearest")  # A1111's upscalers that need no model
# A1111's Real-ESRGAN entries: the name it lists -> the file it downloads into models/RealESRGAN
REALESRGAN_FILES = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3", "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3", "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B", "R-ESRGAN 2x+": "RealESRGAN_x2plus",
}
# A1111's other downloads are saved under the name they are listed by, spaces as underscores
NAMED_FILES = {"SwinIR 4x": "SwinIR_4x"}
FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR")  # A1111's folders under the models root
MAX_PASSES = 3


def upscaler_name(stem):
    """The name A1111 lists a model file of this stem under (file stem, or its built-in entry's name)."""
    by_file = {file: name for name, file in {**REALESRGAN_FILES, **NAMED_FILES}.items()}
    return by_file.get(stem, stem)


def upscaler_folders(models_root="models", esrgan=None, realesrgan=None, swinir=None):
    """A1111's upscaler folders: models/ESRGAN, models/RealESRGAN and models/SwinIR under the models
    root, each replaceable by its own flag (--esrgan-models-path, --realesrgan-models-path, ...)."""
    root = Path(models_root)
    given = (esrgan, realesrgan, swinir)
    return [Path(g) if g else root / name for g, name in zip(given, FOLDERS)]


# ------------------------------------------------------------------------------------------ tiles

def tile_starts(size, tile, overlap):
    """Where the crops along one axis start (A1111's split_grid): as many as cover `size` with steps of
    tile - overlap, spread evenly, the last flush with the end (negative when the image is smaller)."""
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    starts = [int(i * step) for i in range(count)]
    return [size - tile if s + tile >= size else s for s in starts]


def _ramp(length, across, vertical):
    """The alpha ramp pasted over an overlap: 0 .. 255 * (n-1)/n along `length`, as 8-bit."""
    ramp = (np.arange(length, dtype=np.float32) * 255 / length).astype(np.uint8)
    grid = np.repeat(ramp[:, None], across, 1) if vertical else np.repeat(ramp[None, :], across, 0)
    return Image.fromarray(grid, "L")


def tiled(image, run, tile=192, overlap=8):
    """One model pass over `image` (PIL RGB) in tiles; run(tile image) -> the upscaled tile image (all
    tiles come back `s` times larger). tile 0: the whole image in one call."""
    image = image.convert("RGB")
    if tile <= 0:
        return run(image)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be from 0 to below the tile size {tile}")
    w, h = image.size
    out = line_mask = None
    for y in tile_starts(h, tile, overlap):
        line = None
        for x in tile_starts(w, tile, overlap):
            up = run(image.crop((x, y, x + tile, y + tile)))
            s = up.width // tile
            if line is None:
                line = Image.new("RGB", (w * s, tile * s))
            _paste(line, up, x * s, overlap * s, vertical=False)
        if out is None:
            out, line_mask = Image.new("RGB", (w * s, h * s)), _ramp(overlap * s, w * s, True) if overlap else None
        _paste(out, line, y * s, overlap * s, vertical=True, mask=line_mask)
    return out


def _paste(target, piece, at, overlap, vertical, mask=None):
    """Paste `piece` at offset `at` along one axis; past the first piece its first `overlap` pixels are
    blended over what is there with a linear ramp (A1111's combine_grid)."""
    pos = (0, at) if vertical else (at, 0)
    if at == 0 or overlap == 0:
        target.paste(piece, pos)
        return
    w, h = piece.size
    if vertical:
        target.paste(piece.crop((0, 0, w, overlap)), pos, mask=mask)
        target.paste(piece.crop((0, overlap, w, h)), (0, at + overlap))
    else:
        target.paste(piece.crop((0, 0, overlap, h)), pos, mask=_ramp(overlap, h, False))
        target.paste(piece.crop((overlap, 0, w, h)), (at + overlap, 0))


def tiled_average(x, run, tile, overlap, scale):
    """A1111's second tiling (tiled_upscale_2, SwinIR's): square tiles of min(tile, H, W) every tile -
    overlap pixels plus one flush with the end, outputs summed and divided by how many covered each pixel.
    x: [C, H, W] float32 -> [C, H*scale, W*scale]. tile 0: the whole image at once."""
    c, h, w = x.shape
    tile = min(tile, h, w)
    if tile <= 0:
        return run(x)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be from 0 to below the tile size {tile}")
    stride = tile - overlap
    out = np.zeros((c, h * scale, w * scale), np.float32)
    count = np.zeros((1, h * scale, w * scale), np.float32)
    for top in [*range(0, h - tile, stride), h - tile]:
        for left in [*range(0, w - tile, stride), w - tile]:
            piece = run(np.ascontiguousarray(x[:, top:top + tile, left:left + tile]))
            rows, cols = slice(top * scale, (top + tile) * scale), slice(left * scale, (left + tile) * scale)
            out[:, rows, cols] += piece
            count[:, rows, cols] += 1
    return out / count


# ------------------------------------------------------------------------------------------ models

class ModelUpscaler:
    """A converted upscaler model: one pass is `tiled` with its session (created on first use)."""

    def __init__(self, name, folder, manifest, plan, tile=None, overlap=None):
        self.name, self.folder, self.manifest, self._plan = name, Path(folder), manifest, plan
        fixed = manifest.tiling.size
        self.tile = fixed or (manifest.tiling.default if tile is None else int(tile))
        self.overlap = manifest.tiling.overlap if overlap is None else int(overlap)
        if fixed and tile not in (None, fixed):
            log.info("%s: its graph takes %d px tiles only; tile %s ignored", name, fixed, tile)
        self._session = None

    @property
    def scale(self):
        return self.manifest.scale

    def session(self):
        if self._session is None:
            from ..runtime.session import Session

            self._session = Session(self.folder / self.manifest.graph, self._plan, name=f"upscaler {self.name}",
                                    dims=self.manifest.inputs)
        return self._session

    def run_tile(self, tile):
        """One crop (PIL RGB) through the graph -> 8-bit PIL RGB, `scale` times larger."""
        m = self.manifest
        x = np.asarray(tile.convert("RGB"))
        if m.channel_order == "BGR":
            x = x[:, :, ::-1]
        low, high = m.value_range
        # A1111 divides the uint8 pixels in float64, then hands the model float32
        x = (low + (x.transpose(2, 0, 1) / 255.0) * (high - low)).astype(np.float32)[None]
        y = self.session().run({m.image_input: x}, [m.image_output])[m.image_output][0]
        y = (np.clip(y, low, high) - np.float32(low)) / np.float32(high - low)
        y = np.round(np.float32(255.0) * y.transpose(1, 2, 0)).astype(np.uint8)
        if m.channel_order == "BGR":
            y = y[:, :, ::-1]
        return Image.fromarray(np.ascontiguousarray(y), "RGB")

    def do_upscale(self, image, scale):
        """One pass of the model (the scale is the model's own)."""
        if self.manifest.tiling.mode == "average":
            return self._averaged(image)
        return tiled(image, self.run_tile, self.tile, self.overlap)

    def _averaged(self, image):
        """A1111's SwinIR pass: BGR in [0, 1], mirrored to the next multiple of the window (always adding at
        least one row and column), float tiles averaged, cropped, rounded to 8 bits once."""
        m = self.manifest
        x = np.asarray(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1) / 255.0
        h, w = x.shape[1:]
        k = m.tiling.multiple
        x = np.pad(x, ((0, 0), (0, (h // k + 1) * k - h), (0, (w // k + 1) * k - w)), mode="symmetric")
        out = tiled_average(x.astype(np.float32), self._run_array, self.tile, self.overlap, m.scale)
        out = np.clip(out[:, :h * m.scale, :w * m.scale], 0, 1)[::-1].transpose(1, 2, 0)
        return Image.fromarray(np.ascontiguousarray(np.round(out * np.float32(255.0)).astype(np.uint8)), "RGB")

    def _run_array(self, x):
        """[3, h, w] float32 -> [3, h*s, w*s] float32 through the graph."""
        m = self.manifest
        return self.session().run({m.image_input: x[None]}, [m.image_output])[m.image_output][0]


@dataclass(frozen=True)
class Builtin:
    """None, Lanczos and Nearest: A1111's upscalers without a model (None keeps the image as it is)."""

    name: str

    def do_upscale(self, image, scale):
        if self.name == "None":
            return image
        size = (int(image.width * scale), int(image.height * scale))
        return image.resize(size, resample=LANCZOS if self.name == "Lanczos" else NEAREST)


def upscale(image, scale, upscaler):
    """A1111's Upscaler.upscale: passes of `upscaler` toward image size x scale (rounded down to a multiple
    of 8), at most three, stopping when a pass changes nothing, then Lanczos to that size exactly."""
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    if min(dest) < 1:
        raise ValueError(f"upscaling {image.width}x{image.height} by {scale} gives an empty image")
    for i in range(MAX_PASSES):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        before = image.size
        image = upscaler.do_upscale(image, scale)
        if image.size == before:
            break
    return image if image.size == dest else image.resize(dest, resample=LANCZOS)


def resize_with(image, width, height, upscaler):
    """A1111's resize_image "just resize" with an upscaler (the hires fix's image upscale): upscale by the
    larger of the two ratios when enlarging, then Lanczos to width x height. "None" is Lanczos only."""
    if upscaler.name != "None":
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = upscale(image, scale, upscaler)
    return image if image.size == (width, height) else image.resize((width, height), resample=LANCZOS)


class Upscalers:
    """The upscalers a session may use, by A1111's names: the built-in ones, then the models in the
    folders (converted, or waiting for a convert). Sessions are made on first use and kept."""

    def __init__(self, folders, plan=None, tile=None, overlap=None, cache=None):
        self.folders = [Path(f) for f in folders]
        self._plan, self.tile, self.overlap = plan, tile, overlap
        self.cache = cache  # sdonnx.cache.ConversionCache (--data-dir): model files are converted on first use
        self._loaded = {}  # name -> ModelUpscaler (a cache: nothing a call asks for is kept for the next)

    def models(self):
        """[Found] of the upscaler models in the folders (converted or not)."""
        return scan(self.folders, KIND, upscaler_name)

    def names(self):
        return [*BUILTIN, *(m.name for m in self.models())]

    def get(self, name):
        """The upscaler `name`; ValueError naming the choices, or saying how to convert a model file."""
        if name in BUILTIN:
            return Builtin(name)
        if name not in self._loaded:
            try:
                found = find(self.folders, KIND, name, upscaler_name)
            except NotConverted:
                if self.cache is None:
                    raise
                found = self._convert_first(name)
            except ModelNotFound:  # (a file not converted yet raises NotConverted, with the command to run)
                raise ValueError(f"unknown upscaler {name!r}; choose one of {', '.join(self.names())} "
                                 f"(models from {', '.join(str(f) for f in self.folders)})") from None
            self._loaded[name] = ModelUpscaler(name, found.folder, found.manifest, self._provider_plan(),
                                               self.tile, self.overlap)
        return self._loaded[name]

    def _convert_first(self, name):
        """A model file not converted yet -> its copy in the conversion cache (sdonnx/cache.py, made once)."""
        from .manifest import load_postprocess_manifest
        from .models import Found

        source = next(m.source for m in self.models() if m.name == name)
        folder = self.cache.get("postprocess", source)
        return Found(name, KIND, folder=folder, manifest=load_postprocess_manifest(folder, KIND))

    def _provider_plan(self):
        if self._plan is None:
            from ..runtime import providers

            self._plan = providers.plan("auto")
        return self._plan
