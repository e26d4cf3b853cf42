"""A1111's latent upscale modes against torch.nn.functional.interpolate, which A1111 calls with
size=(h, w), align_corners left at its default (False) and the mode's antialias flag.

Tolerance: nearest modes are exact (they copy values); the filtering modes agree to 1.5e-5 on unit-normal
data. torch computes positions and weights in float32, and so does sdonnx, but the order of the float32
sums differs; the exact (float64) result is itself up to 2e-5 away from torch's.
"""
import itertools

import numpy as np
import pytest

from sdonnx.img2img import LATENT_UPSCALERS, upscale_latents

torch = pytest.importorskip("torch")

A1111_MODES = {  # A1111 modules/shared.py latent_upscale_modes
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
SIZES = [(8, 8), (7, 13), (64, 48)]
TARGETS = [(16, 16), (12, 12), (13, 7), (96, 72), (3, 2), (100, 150)]  # x2, x1.5, odd ratios, shrinking


def test_every_a1111_mode_is_offered():
    assert set(LATENT_UPSCALERS) == set(A1111_MODES)


@pytest.mark.parametrize("name", A1111_MODES)
def test_latent_upscale_matches_torch_interpolate(name):
    mode, antialias = A1111_MODES[name]
    rng = np.random.default_rng(0)
    worst = 0.0
    for size, target in itertools.product(SIZES, TARGETS):
        latents = rng.standard_normal((2, 4, *size)).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(latents), size=target, mode=mode,
                                              antialias=antialias).numpy()
        ours = upscale_latents(latents, target, name)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"{name}: max abs error vs torch {worst:.2e}")
    assert worst == 0.0 if mode.startswith("nearest") else worst <= 1.5e-5


def test_nearest_is_not_nearest_exact():
    """torch's legacy "nearest" takes floor(i * in / out); "nearest-exact" samples pixel centres."""
    latents = np.arange(5, dtype=np.float32).reshape(1, 1, 1, 5)
    assert upscale_latents(latents, (1, 7), "Latent (nearest)")[0, 0, 0].tolist() == [0, 0, 1, 2, 2, 3, 4]
    assert upscale_latents(latents, (1, 7), "Latent (nearest-exact)")[0, 0, 0].tolist() == [0, 1, 1, 2, 3, 3, 4]


def test_unknown_latent_upscaler():
    with pytest.raises(ValueError, match="Latent \\(bicubic antialiased\\)"):
        upscale_latents(np.zeros((1, 4, 8, 8), np.float32), (16, 16), "Latent (lanczos)")


def test_the_hires_upscaler_help_names_every_upscaler():
    import dataclasses

    from sdonnx.img2img import IMAGE_UPSCALERS
    from sdonnx.request import HiresPart

    text = next(f.metadata["help"] for f in dataclasses.fields(HiresPart) if f.name == "hires_upscaler")
    builtin = text.split(". Or ")[0]  # then the upscaler models, by name
    named = {name.strip() for name in builtin.rstrip(".").replace(" or ", ", ").split(", ")}
    assert named == {*LATENT_UPSCALERS, *IMAGE_UPSCALERS}
