"""img2img, inpainting, outpainting, hires fix and lowmem on the tiny models.

A1111 and diffusers differ in img2img's step count: A1111 runs the last int(min(s, 0.999) * steps) + 1
steps of a `steps`-step schedule, diffusers int(steps * s). sdonnx follows A1111, so the parity test
compares strength 0.5 here with diffusers' 0.6 (both: the last 6 of 10 steps from the same sigma).
Inpainting follows A1111 (the known region's x0 is pinned to the init latent at every step, and the
result is pasted over the original through the blurred mask); diffusers blends noised latents instead,
so inpainting is checked by A1111's invariants rather than against diffusers.
"""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdonnx import Pipeline
from sdonnx.img2img import outpaint_canvas

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return Pipeline.load(tiny_onnx("sd1"), provider="cpu")


@pytest.fixture(scope="module")
def init_image(pipe):
    return pipe.generate("a red circle", steps=4, sampler="Euler", seed=1, width=64, height=64).images[0]


def _px(image):
    return np.asarray(image).astype(int)


def _square_mask(size=64, box=(16, 16, 48, 48)):
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def test_img2img_matches_diffusers(pipe, init_image, tiny_diffusers):
    _, torch_pipe = tiny_diffusers("sd1")
    latents = pipe.encode_images(np.asarray(init_image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    ours = pipe.generate("a blue square", "blurry", steps=10, sampler="Euler", scheduler="Karras", seed=1,
                         init_image=init_image, strength=0.5, latents=noise.numpy()).images[0]
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**torch_pipe.components)
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        torch_pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace")
    with torch.no_grad():
        ref = ref_pipe("a blue square", negative_prompt="blurry", image=torch.from_numpy(latents), strength=0.6,
                       num_inference_steps=10, guidance_scale=7.0, generator=torch.Generator().manual_seed(0),
                       output_type="np").images[0]
    diff = np.abs(_px(ours) - (ref * 255).round().astype(int))
    print(f"img2img vs diffusers: max {diff.max()} mean {diff.mean():.4f}")
    assert diff.max() <= 2 and diff.mean() <= 0.05
    assert np.abs(_px(ours) - _px(init_image)).mean() > 1  # it did change the image


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_keeps_the_unmasked_area(pipe, init_image, fill):
    mask = _square_mask()
    result = pipe.generate("a green triangle", steps=5, sampler="Euler a", seed=2, init_image=init_image,
                           mask=mask, strength=0.9, inpainting_fill=fill, mask_blur=2)
    out, src = _px(result.images[0]), _px(init_image)
    outside = np.asarray(mask.filter(ImageFilter.GaussianBlur(2))) == 0
    assert np.array_equal(out[outside], src[outside])
    assert np.abs(out - src)[~outside].mean() > 1
    assert f"Masked content: {['fill', 'original', 'latent noise', 'latent nothing'][fill]}" in result.infotext
    assert "Denoising strength: 0.9" in result.infotext and "Mask blur: 2" in result.infotext


def test_inverted_and_only_masked(pipe, init_image):
    mask = _square_mask()
    inverted = _px(pipe.generate("x", steps=3, sampler="Euler", seed=2, init_image=init_image, mask=mask,
                                 inpainting_mask_invert=True, mask_blur=0).images[0])
    assert np.array_equal(inverted[16:48, 16:48], _px(init_image)[16:48, 16:48])
    small = _square_mask(box=(24, 24, 40, 40))
    result = pipe.generate("x", steps=3, sampler="Euler", seed=2, init_image=init_image, mask=small,
                           inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur=0)
    out = _px(result.images[0])
    assert result.images[0].size == (64, 64) and "Inpaint area: Only masked" in result.infotext
    assert np.array_equal(out[:20], _px(init_image)[:20])  # far from the crop: untouched
    assert np.abs(out[24:40, 24:40] - _px(init_image)[24:40, 24:40]).mean() > 1


def test_outpaint_extends_the_canvas(pipe, init_image):
    canvas, mask = outpaint_canvas(init_image, left=16, up=8)
    out = pipe.generate("x", steps=3, sampler="Euler", seed=2, init_image=canvas, mask=mask, strength=1.0,
                        mask_blur=0).images[0]
    assert out.size == (80, 72)
    assert np.array_equal(_px(out)[8:, 16:], _px(init_image))


def test_inpainting_model_from_single_file(tmp_path):
    """A 9-channel inpainting UNet converts from an original-layout file and paints inside the mask."""
    import tiny_models
    from converters.convert import convert
    from original_layout import save_checkpoint

    torch_pipe = tiny_models.make_pipeline("sd1", seed=5)
    unet = tiny_models._unet("sd1", 6)
    config = dict(unet.config)
    config["in_channels"] = 9
    torch.manual_seed(6)
    torch_pipe.unet = tiny_models._perturb(diffusers.UNet2DConditionModel.from_config(config), 6)
    save_checkpoint(torch_pipe, tmp_path / "inpaint.safetensors")
    manifest = convert(tmp_path / "inpaint.safetensors", tmp_path / "model")
    assert manifest.is_inpaint and manifest.unet_in_channels == 9
    inpaint = Pipeline.load(tmp_path / "model", provider="cpu")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = _square_mask()
    out = _px(inpaint.generate("x", steps=3, sampler="Euler", seed=2, init_image=init, mask=mask, mask_blur=0,
                               strength=1.0, width=64, height=64).images[0])
    assert np.array_equal(out[mask_outside(mask)], _px(init)[mask_outside(mask)])
    assert inpaint.generate("x", steps=2, sampler="Euler", seed=2, width=64, height=64).images[0].size == (64, 64)


def mask_outside(mask):
    return np.asarray(mask) == 0


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix(pipe, upscaler):
    result = pipe.generate("x", steps=4, sampler="DPM++ 2M", seed=3, width=64, height=64, hires=True,
                           hires_scale=1.5, hires_upscaler=upscaler, hires_steps=3, hires_denoising=0.6)
    assert result.images[0].size == (96, 96)
    for key in ("Size: 64x64", "Hires upscale: 1.5", "Hires steps: 3", f"Hires upscaler: {upscaler}",
                "Denoising strength: 0.6"):
        assert key in result.infotext
    sized = pipe.generate("x", steps=2, sampler="Euler", seed=3, width=64, height=64, hires=True,
                          hires_width=80, hires_height=72, hires_steps=2)
    assert sized.images[0].size == (80, 72) and "Hires resize: 80x72" in sized.infotext


def test_lowmem_gives_the_same_images_and_frees_sessions(tiny_onnx, pipe, init_image):
    low = Pipeline.load(tiny_onnx("sd1"), provider="cpu", lowmem=True)
    args = dict(prompt="x", steps=3, sampler="Euler", seed=4, width=64, height=64, batch_count=2)
    assert all(np.array_equal(_px(a), _px(b)) for a, b in
               zip(low.generate(**args).images, pipe.generate(**args).images))
    low.generate("x", steps=2, sampler="Euler", seed=4, init_image=init_image, strength=0.5)
    assert low._components == {}


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=_square_mask(32)), "the mask is 32x32 but the image is 64x64"),
    (dict(strength=0.0), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(resize_mode=7), "resize_mode 7"),
    (dict(inpainting_fill="blur", mask=_square_mask()), "inpainting_fill 'blur'"),
])
def test_bad_img2img_input(pipe, init_image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("x", steps=2, init_image=init_image, **kwargs)


def test_unreadable_image_and_cli_error(pipe, tiny_onnx, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"init image {bad} is not a PNG, JPEG, WebP, BMP or GIF image"):
        pipe.generate("x", steps=2, init_image=bad)
    from click.testing import CliRunner

    from sdonnx.cli import main

    result = CliRunner().invoke(main, ["generate", "-m", str(tiny_onnx("sd1")), "x", "--init-image", str(bad),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and result.stderr.strip().startswith(f"error: init image {bad} is not a PNG")
    assert not (tmp_path / "out").exists()


def test_tiling_through_the_pipeline(pipe):
    plain = pipe.generate("x", steps=3, sampler="Euler", seed=6, width=64, height=64)
    tiled = pipe.generate("x", steps=3, sampler="Euler", seed=6, width=64, height=64, tiling=True)
    assert "Tiling: True" in tiled.infotext and "Tiling" not in plain.infotext
    assert np.abs(_px(tiled.images[0]) - _px(plain.images[0])).mean() > 1
    with pytest.raises(ValueError, match="tiling"):
        pipe.generate("x", steps=2, tiling="z")
    # sessions for the plain graphs are still there and unchanged
    again = pipe.generate("x", steps=3, sampler="Euler", seed=6, width=64, height=64)
    assert np.array_equal(_px(again.images[0]), _px(plain.images[0]))


def _a1111_flatten(rgba):
    """A1111's images.flatten with its default img2img background "#ffffff": a paste through the alpha."""
    background = Image.new("RGBA", rgba.size, "#ffffff")
    background.paste(rgba, mask=rgba)
    return background.convert("RGB")


def _with_alpha(init_image):
    """The init image, red under a fully transparent left half and a half-transparent bottom-right quarter."""
    pixels = np.asarray(init_image.convert("RGBA")).copy()
    pixels[:, :32] = (255, 0, 0, 0)
    pixels[32:, 32:, 3] = 128
    return Image.fromarray(pixels, "RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_init_image_is_flattened_onto_white(pipe, init_image, mode):
    rgba = _with_alpha(init_image)
    if mode == "LA":
        rgba = Image.fromarray(np.asarray(rgba.convert("LA")), "LA").convert("RGBA")
    given = rgba if mode == "RGBA" else rgba.convert(mode)
    if mode == "P":  # a palette image with one transparent index: the left half
        given = rgba.convert("RGB").quantize(16)
        index = np.asarray(given).copy()
        index[:, :32] = 15
        given = Image.fromarray(index, "P")
        given.putpalette(rgba.convert("RGB").quantize(16).getpalette())
        given.info["transparency"] = 15
        rgba = given.convert("RGBA")
    expected = _a1111_flatten(rgba)
    assert np.asarray(expected)[:, :32].min() == 255  # white where it was transparent
    args = dict(steps=4, sampler="Euler", seed=3, strength=0.5)
    ours = pipe.generate("a cat", init_image=given, **args).images[0]
    reference = pipe.generate("a cat", init_image=expected, **args).images[0]
    assert np.array_equal(_px(ours), _px(reference))


@pytest.mark.parametrize("size", [(40, 48), (45, 37)])  # W x H; 45 x 37 floors to 5 x 4 latents in the VAE
def test_latent_upscale_resize_mode_encodes_at_the_image_size(pipe, tiny_diffusers, size, monkeypatch):
    """A1111's resize mode 3: the init image is encoded at its own size, then the latents are resized to the
    output's with torch's bilinear interpolate. Checked on the sampler's starting latent with zero noise,
    against diffusers' VAE (posterior mean) and torch; tolerance 1e-5 (ONNX vs torch VAE, ~3e-7 here)."""
    from sdonnx.samplers import SAMPLERS

    _, torch_pipe = tiny_diffusers("sd1")
    starts, euler = [], SAMPLERS["Euler"]
    monkeypatch.setitem(SAMPLERS, "Euler", lambda d, x, s, **k: starts.append(x.copy()) or euler(d, x, s, **k))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    zeros = np.zeros((1, 4, 8, 8), np.float32)  # no noise: the sampler starts from the init latent itself
    args = dict(steps=2, sampler="Euler", seed=1, init_image=image, width=64, height=64, latents=zeros)
    pipe.generate("x", resize_mode=3, **args)
    pipe.generate("x", resize_mode=0, **args)
    pixels = torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 255.0 * 2 - 1)
    with torch.no_grad():
        latent = torch_pipe.vae.encode(pixels).latent_dist.mean * torch_pipe.vae.config.scaling_factor
        ref = torch.nn.functional.interpolate(latent, size=(8, 8), mode="bilinear").numpy()
    assert latent.shape[2:] == (size[1] // 8, size[0] // 8)
    assert np.abs(starts[0] - ref).max() < 1e-5
    assert np.abs(starts[1] - ref).max() > 0.01  # "just resize" resizes the pixels instead


def test_latent_upscale_with_a_mask_needs_the_output_size(pipe, init_image):
    small = init_image.resize((48, 48))
    with pytest.raises(ValueError, match="resize_mode 3 .* needs the init image at the output size \\(64x64\\), not 48x48"):
        pipe.generate("x", steps=2, init_image=small, mask=Image.new("L", (48, 48), 255), resize_mode=3,
                      width=64, height=64)
    same = pipe.generate("x", steps=2, sampler="Euler", seed=1, init_image=init_image, mask=_square_mask(),
                         resize_mode=3)  # at the output size mode 3 works, and keeps the unmasked area
    assert np.abs(_px(same.images[0])[:4] - _px(init_image)[:4]).max() <= 1


def _a1111_overlay_mask(mask, size, blur=4):
    """A1111's mask_for_overlay for the whole picture: blurred at the image's size, resized with the image
    ("just resize": Lanczos), then doubled and clipped."""
    resized = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)).resize(size, Image.Resampling.LANCZOS), np.float32)
    return Image.fromarray(np.clip(resized * 2, 0, 255).astype(np.uint8), "L")


def test_inpaint_overlay_is_a1111s_doubled_mask_at_the_output_size():
    from sdonnx.img2img import InitPlan

    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (30, 20, 70, 60))
    init = InitPlan.make(image, mask, 64, 48, resize_mode=0, mask_blur=4, invert=False, only_masked=False,
                         padding=32, fill=1, strength=0.5, factor=8)
    generated = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    resized = image.resize((64, 48), Image.Resampling.LANCZOS)
    expected = Image.composite(generated, resized, _a1111_overlay_mask(mask, (64, 48)))
    assert np.array_equal(_px(init.finish(generated)), _px(expected))


@pytest.mark.parametrize("fill", [0, 1])
def test_inpaint_at_another_size_than_the_init_image(pipe, init_image, fill):
    """The mask is resized with the image (A1111); this failed with 'images do not match' / a broadcast error."""
    big = init_image.resize((80, 80), Image.Resampling.LANCZOS)
    mask = Image.new("L", (80, 80), 0)
    mask.paste(255, (30, 30, 60, 60))
    out = pipe.generate("a cat", steps=3, sampler="Euler", seed=1, init_image=big, mask=mask, inpainting_fill=fill,
                        width=64, height=64).images[0]
    resized = _px(big.resize((64, 64), Image.Resampling.LANCZOS))
    assert out.size == (64, 64)
    assert np.array_equal(_px(out)[:12], resized[:12])  # far from the mask: the resized init image exactly
    assert np.abs(_px(out)[28:44, 28:44] - resized[28:44, 28:44]).mean() > 1  # inside: generated


def test_masks_at_latent_size_are_a1111s():
    """The blend mask: A1111 resizes the processed mask as RGB with PIL's default filter (bicubic) and
    rounds; the inpainting model's mask channel: the pixel mask rounded, then torch's interpolate (nearest)."""
    from sdonnx.img2img import InitPlan

    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (25, 19, 44, 30))  # a box where bicubic and Lanczos round one latent pixel differently
    init = InitPlan.make(Image.new("RGB", (64, 48), "gray"), mask, 64, 48, resize_mode=0, mask_blur=4, invert=False,
                         only_masked=False, padding=32, fill=1, strength=0.5, factor=8)
    blurred = mask.filter(ImageFilter.GaussianBlur(4))
    blend = np.around(np.asarray(blurred.convert("RGB").resize((8, 6)), np.float32)[..., 0] / 255)
    assert np.array_equal(init.latent_mask((6, 8))[0, 0], blend)
    pixels = torch.round(torch.from_numpy(np.asarray(blurred, np.float32)[None, None] / 255))
    channel = torch.nn.functional.interpolate(pixels, size=(6, 8)).numpy()
    assert np.array_equal(init.conditioning_mask((6, 8)), channel)
    assert not np.array_equal(init.latent_mask((6, 8)), channel)  # the two are not the same mask
