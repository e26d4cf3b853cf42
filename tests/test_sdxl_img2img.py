"""SDXL through generate's other stages (smoke tests on the tiny models): img2img, inpainting with the base
model, hires fix (second pass conditioned on the hires size), and the 9-channel SDXL inpainting model,
detected from the diffusers folder and from a single file."""
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from sdonnx import Pipeline  # noqa: E402

ARGS = dict(steps=4, cfg_scale=5.0, sampler="Euler", scheduler="Karras", seed=7)


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    return Pipeline.load(tiny_sdxl("base")[2], provider="cpu")


def _picture(size=64):
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256], -1).astype(np.uint8))


def _mask(size=64):
    mask = np.zeros((size, size), np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def _spy_time_ids(pipe):
    seen = []
    unet = pipe._component("unet")
    call = unet.__call__

    class Spy:
        session = unet.session  # the pipeline reports the provider each component's session ran on

        def __call__(self, *args, **added):
            seen.append(added["time_ids"].copy())
            return call(*args, **added)

    pipe._components[next(k for k in pipe._components if k[0] == "unet")] = Spy()
    return seen


def test_img2img(base):
    init = _picture()
    out = base.generate("a house", "blurry", init_image=init, strength=0.5, **ARGS).images[0]
    assert out.size == (64, 64)
    close = np.abs(np.asarray(out, np.int16) - np.asarray(init, np.int16)).mean()
    far = np.abs(np.asarray(base.generate("a house", "blurry", **ARGS).images[0], np.int16) - np.asarray(init, np.int16)).mean()
    assert 0 < close < far  # img2img keeps more of the picture than txt2img


def test_inpaint_with_the_base_model_keeps_the_unmasked_area(base):
    init = _picture()
    out = np.asarray(base.generate("a house", "blurry", init_image=init, mask=_mask(), mask_blur=0, strength=0.9,
                                   **ARGS).images[0], np.int16)
    outside = np.asarray(_mask()) == 0
    assert np.abs(out - np.asarray(init, np.int16))[outside].mean() < np.abs(out - np.asarray(init, np.int16))[~outside].mean()


def test_hires_second_pass_uses_the_hires_size_in_its_time_ids(base):
    seen = _spy_time_ids(base)
    out = base.generate("a house", "blurry", hires=True, hires_scale=1.5, hires_steps=2, hires_denoising=0.5,
                        **ARGS).images[0]
    assert out.size == (96, 96)
    assert {tuple(t[0]) for t in seen} == {(64, 64, 0, 0, 64, 64), (96, 96, 0, 0, 96, 96)}
    base._components.clear()


@pytest.fixture(scope="module")
def inpaint_model(tiny_sdxl):
    _, torch_pipe, folder = tiny_sdxl("inpaint")
    return torch_pipe, Pipeline.load(folder, provider="cpu")


def test_sdxl_inpainting_model(inpaint_model):
    _, pipe = inpaint_model
    assert pipe.manifest.family == "sdxl" and pipe.manifest.is_inpaint and pipe.manifest.unet_in_channels == 9
    out = pipe.generate("a house", "blurry", init_image=_picture(), mask=_mask(), **ARGS).images[0]
    assert out.size == (64, 64) and np.asarray(out).std() > 1


def test_sdxl_inpainting_single_file_is_detected(inpaint_model):
    from converters.original_layout import to_original
    from converters.single_file import detect

    torch_pipe, _ = inpaint_model
    guess = detect(to_original(torch_pipe))
    assert (guess.family, guess.inpaint, guess.in_channels) == ("sdxl", True, 9)
