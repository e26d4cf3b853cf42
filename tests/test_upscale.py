"""A1111's upscale on ONNX Runtime: the tiled model pass against A1111's tiling and blending computed in
torch + PIL on the same model (tests/upscaler_reference.py), the upscale loop, names and folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from sdonnx.postprocess.upscale import (Builtin, Upscalers, resize_with, tile_starts, tiled, upscale, upscaler_folders,
                                        upscaler_name)
from upscaler_reference import BasicsrRRDBNet, SRVGGNetCompact, a1111_model_upscale, randomize


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: torch reference} and the folders they were converted into (A1111's layout)."""
    from converters.postprocess import convert_postprocess

    root = tmp_path_factory.mktemp("models")
    refs = {"4x-Tiny": (randomize(BasicsrRRDBNet(4), 3), "ESRGAN"),
            "RealESRGAN_x2plus": (randomize(BasicsrRRDBNet(2), 4), "RealESRGAN"),
            "realesr-animevideov3": (randomize(SRVGGNetCompact(8, 1, 4), 5), "RealESRGAN")}
    for stem, (module, folder) in refs.items():
        (root / folder).mkdir(exist_ok=True)
        torch.save({"params_ema": module.state_dict()}, root / folder / f"{stem}.pth")
        convert_postprocess(root / folder / f"{stem}.pth", root / folder / stem)
    (root / "ESRGAN" / "4x_NotYet.pth").write_bytes(b"not converted")
    return {upscaler_name(stem): module for stem, (module, _) in refs.items()}, root


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    smooth = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)  # edges and flats, like a photo
    return Image.fromarray(np.clip(np.asarray(smooth).astype(int) + rng.integers(-20, 21, (h, w, 3)), 0, 255)
                           .astype(np.uint8))


def _levels(a, b):
    """Largest per-pixel difference in 8-bit levels, and the share of pixels that differ at all."""
    d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    return d.max(), (d > 0).mean()


@pytest.mark.parametrize("name, size, tile, overlap", [
    ("4x-Tiny", (90, 60), 40, 8),  # 3 x 2 tiles, the last ones flush with the edges
    ("R-ESRGAN 2x+", (80, 50), 32, 12),  # unshuffling model, wider overlap: 4 x 2 tiles
    ("R-ESRGAN AnimeVideo", (50, 40), 64, 8),  # smaller than one tile: padded black, as A1111
    ("R-ESRGAN AnimeVideo", (61, 45), 0, 0),  # tile 0: the whole image at once
])
def test_tiled_pass_matches_a1111(models, name, size, tile, overlap):
    refs, root = models
    upscalers = Upscalers(upscaler_folders(root), tile=tile, overlap=overlap)
    image = _image(*size)
    got = upscalers.get(name).do_upscale(image, 4)
    expected = a1111_model_upscale(refs[name], image, tile, overlap)
    assert got.size == expected.size
    # ONNX Runtime and torch differ by ~1e-6 before rounding to 8 bits: a pixel on a rounding boundary may
    # land one level off; a tiling or blending error is tens of levels over whole bands
    worst, share = _levels(got, expected)
    assert worst <= 1 and share < 0.01


def test_blend_ramps_are_a1111s():
    """With a run that returns the tile's own position as colour, the seams show the ramps exactly."""
    def run(tile):
        return tile.resize((tile.width * 2, tile.height * 2), Image.Resampling.NEAREST)

    image = _image(100, 60, 3)
    got = tiled(image, run, 40, 8)
    expected = a1111_model_upscale(_Nearest2x(), image, 40, 8)
    assert np.array_equal(np.asarray(got), np.asarray(expected))


class _Nearest2x(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_tile_starts():
    assert tile_starts(500, 192, 8) == [0, 154, 308]
    assert tile_starts(192, 192, 8) == [0]
    assert tile_starts(100, 192, 8) == [-92]


def test_the_loop_runs_the_model_until_the_target_then_lanczos(models):
    refs, root = models
    model = Upscalers(upscaler_folders(root), tile=0).get("4x-Tiny")
    image = _image(20, 14)
    out = upscale(image, 6, model)  # 4x then 4x again (16x), then Lanczos down to 120x80 (84 -> 80: multiple of 8)
    twice = a1111_model_upscale(refs["4x-Tiny"], a1111_model_upscale(refs["4x-Tiny"], image, 0), 0)
    expected = twice.resize((120, 80), Image.Resampling.LANCZOS)
    assert out.size == (120, 80)
    assert _levels(out, expected)[0] <= 2
    assert upscale(image, 2, model).size == (40, 24)  # one pass (80x56), Lanczos to 40x(28 // 8 * 8)


def test_builtins_follow_a1111():
    image = _image(33, 20)
    assert upscale(image, 2, Builtin("None")).size == (64, 40)  # None: Lanczos to the rounded target
    nearest = upscale(image, 2, Builtin("Nearest"))
    assert np.array_equal(np.asarray(nearest),
                          np.asarray(image.resize((66, 40), Image.Resampling.NEAREST).resize((64, 40), Image.Resampling.LANCZOS)))
    hires = resize_with(image, 64, 48, Builtin("Lanczos"))
    assert hires.size == (64, 48)


def test_names_and_unconverted_files(models):
    _, root = models
    upscalers = Upscalers(upscaler_folders(root))
    assert upscalers.names() == ["None", "Lanczos", "Nearest", "4x-Tiny", "4x_NotYet", "R-ESRGAN 2x+",
                                 "R-ESRGAN AnimeVideo"]
    with pytest.raises(ValueError, match=r"upscaler '4x_NotYet' .* is not converted yet; convert it once with "
                                         r"`sdonnx convert"):
        upscalers.get("4x_NotYet")
    with pytest.raises(ValueError, match="unknown upscaler 'R-ESRGAN 4x\\+'; choose one of None, Lanczos, Nearest, "
                                         "4x-Tiny"):
        upscalers.get("R-ESRGAN 4x+")


def test_folders_follow_a1111(tmp_path):
    assert upscaler_folders(tmp_path) == [tmp_path / "ESRGAN", tmp_path / "RealESRGAN", tmp_path / "SwinIR"]
    assert upscaler_folders(tmp_path, esrgan="/x")[0].as_posix() == "/x"
    assert upscaler_name("RealESRGAN_x4plus") == "R-ESRGAN 4x+" and upscaler_name("4x-UltraSharp") == "4x-UltraSharp"


def test_swinir_pass_matches_a1111(tmp_path):
    """SwinIR as A1111 runs it: mirrored to the window, float tiles averaged (not blended), BGR."""
    from converters.postprocess import convert_postprocess
    from converters.postprocess.swinir import SwinIR
    from upscaler_reference import a1111_swinir_upscale

    torch.manual_seed(0)
    module = SwinIR(embed_dim=12, depths=[2], heads=[2], ws=4, hidden=24, upsampler="nearest+conv", scale=2,
                    resi="1conv", patch_norm=True, img_range=1.0, feat=8).eval()
    (tmp_path / "SwinIR").mkdir()
    torch.save(module.state_dict(), tmp_path / "SwinIR" / "SwinIR_4x.pth")
    convert_postprocess(tmp_path / "SwinIR" / "SwinIR_4x.pth", tmp_path / "SwinIR" / "SwinIR_4x")
    upscaler = Upscalers(upscaler_folders(tmp_path), tile=24, overlap=8).get("SwinIR 4x")
    image = _image(45, 30)
    got = upscaler.do_upscale(image, 2)
    expected = a1111_swinir_upscale(module, image, 2, 4, tile=24, overlap=8)
    assert got.size == expected.size == (90, 60)
    worst, share = _levels(got, expected)
    assert worst <= 1 and share < 0.01
