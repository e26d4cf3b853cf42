"""The generation request: keywords, validation before any session, infotext both ways, and the
pipeline bugs fixed with it (issue 15: hires noise stream, hires on inpainting models, hires names
checked up front, latents with several batches, the public randn, no state left on the pipeline)."""
import numpy as np
import pytest
from PIL import Image

import sdonnx
from sdonnx import GenerationRequest, Pipeline
from sdonnx.diffusion.rng import ImageRNG
from sdonnx.infotext import format_infotext
from sdonnx.manifest import load_manifest
from sdonnx.samplers import SAMPLERS


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return tiny_onnx("sd1")


@pytest.fixture(scope="module")
def pipe(model):
    return Pipeline.load(model, provider="cpu")


def _px(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(int)


# ------------------------------------------------------------------ the request alone

def test_keywords_group_into_parts_and_unknown_ones_are_sampler_options():
    r = GenerationRequest.from_kwargs(prompt="a", steps=3, hires=True, hires_steps=2, eta=0.5, order=3, rng="cpu")
    assert (r.prompt.prompt, r.sampling.steps, r.hires.hires, r.hires.hires_steps) == ("a", 3, True, 2)
    assert r.sampling.options() == {"eta": 0.5, "order": 3} and r.seeds.rng == "cpu"
    assert r.to_kwargs(changed_only=True) == {"prompt": "a", "steps": 3, "hires": True, "hires_steps": 2,
                                              "eta": 0.5, "sampler_options": {"order": 3}, "rng": "cpu"}
    assert GenerationRequest.from_kwargs(**r.to_kwargs()) == r
    with pytest.raises(AttributeError):
        r.sampling.steps = 4  # frozen


def test_legacy_sampler_names_split_and_a1111_defaults_when_read():
    text = "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x768"
    r = GenerationRequest.from_infotext(text)
    assert (r.sampling.sampler, r.sampling.scheduler) == ("DPM++ 2M", "Karras")
    assert (r.prompt.width, r.prompt.height, r.seeds.seed, r.seeds.rng) == (512, 768, 5, "nv")
    r = GenerationRequest.from_infotext(text.replace("DPM++ 2M Karras", "Euler a, Schedule type: Exponential"))
    assert (r.sampling.sampler, r.sampling.scheduler) == ("Euler a", "Exponential")


def test_a1111_hires_and_img2img_infotexts_read_back():
    hires = ("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.45, "
             "Hires upscale: 2, Hires steps: 12, Hires upscaler: Latent (nearest-exact), Version: v1.10.1")
    r = GenerationRequest.from_infotext(hires)
    assert r.hires == type(r.hires)(hires=True, hires_scale=2.0, hires_steps=12, hires_denoising=0.45,
                                    hires_upscaler="Latent (nearest-exact)")
    assert r.init.strength == 0.75  # the denoising strength is the hires pass's
    inpaint = ("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.6, "
               "Mask blur: 8, Masked content: latent noise, Inpaint area: Only masked, Masked area padding: 16, "
               "Mask mode: Inpaint not masked")
    r = GenerationRequest.from_infotext(inpaint)
    assert not r.hires.hires and r.init.strength == 0.6
    assert (r.init.mask_blur, r.init.inpainting_fill, r.init.inpaint_full_res, r.init.inpaint_full_res_padding,
            r.init.inpainting_mask_invert) == (8, 2, True, 16, True)


def test_validation_names_the_bad_value_before_any_session(model):
    manifest = load_manifest(model)
    bad = [
        (dict(hires=True, hires_sampler="Nope"), "unknown sampler 'Nope'"),
        (dict(hires=True, hires_scheduler="Fancy"), "unknown schedule type 'Fancy'"),
        (dict(hires=True, hires_denoising=0), "strength"),
        (dict(width=100), "width 100"),
        (dict(steps=0), "steps must be a positive whole number"),
        (dict(sampler="Euler", eta=0.3), "takes no option eta"),
        (dict(clip_skip=99), "clip_skip 99"),
        (dict(subseed_strength=2), "subseed_strength"),
        (dict(rng="gpu"), "RNG source 'gpu'"),
        (dict(mask=Image.new("L", (8, 8))), "a mask needs an init_image"),
        (dict(tiling="z"), "tiling 'z'"),
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
        (dict(sigma_min=2.0, sigma_max=1.0), "sigma_min 2.0 must be below sigma_max"),
        (dict(refiner="somewhere", refiner_switch_at=1.5), "refiner_switch_at 1.5"),
        (dict(steps="many"), "steps must be a positive whole number, got 'many'"),
        (dict(seed=1.5), "seed must be a whole number, got 1.5"),
        (dict(eta=-1.0), "eta must be 0 or more"),
        (dict(sampler="Euler", s_noise=float("inf")), "s_noise must be a finite number"),
        (dict(hires=True, hires_width=-8), "hires_width must be 0 or more"),
        (dict(cfg_scale="high"), "cfg_scale must be a number, got 'high'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            GenerationRequest.from_kwargs(prompt="x", **kwargs).validate(manifest)


def test_bug4_wrong_hires_names_fail_before_the_first_pass(model):
    pipe = Pipeline.load(model, provider="cpu")
    # an upscaler name outside the latent modes is a model's: looked up in the upscaler folders, still before any
    # session starts
    for kwargs in (dict(hires_sampler="Nope"), dict(hires_scheduler="Fancy"), dict(hires_upscaler="Magic")):
        with pytest.raises(ValueError, match="Nope|Fancy|unknown upscaler 'Magic'"):
            pipe.generate("x", steps=2, width=64, height=64, hires=True, **kwargs)
        assert pipe._components == {}  # no session was created: nothing ran


def test_bug11_public_randn():
    a = sdonnx.randn(42, (2, 3), source="cpu")
    assert a.dtype == np.float32 and a.shape == (2, 3)
    assert np.array_equal(sdonnx.randn(42, (2, 3), source="nv"), sdonnx.randn(42, (2, 3)))
    assert not np.array_equal(a, sdonnx.randn(42, (2, 3), source="nv"))
    torch = pytest.importorskip("torch")
    assert np.array_equal(a, torch.randn((2, 3), generator=torch.Generator().manual_seed(42)).numpy())


# ------------------------------------------------------------------ through the pipeline

def test_request_and_keywords_give_the_same_image(pipe):
    kwargs = dict(prompt="a cat", steps=3, sampler="Euler a", seed=5, width=64, height=64)
    request = GenerationRequest.from_kwargs(**kwargs)
    by_request, by_keywords = pipe.generate(request), pipe.generate(**kwargs)
    assert np.array_equal(_px(by_request), _px(by_keywords)) and by_request.infotext == by_keywords.infotext
    other = pipe.generate(request, seed=6)  # keywords beside a request replace its values
    assert "Seed: 6" in other.infotext


def test_infotext_round_trips_through_the_request(pipe):
    kwargs = dict(prompt="a (cat)", negative_prompt="dog, x: y", steps=4, sampler="DPM++ 2M SDE", seed=11,
                  subseed=99, subseed_strength=0.25, ensd=31337, eta=0.5, rng="cpu", clip_skip=2,
                  emphasis="No norm", seed_resize_from_w=48, seed_resize_from_h=56, width=64, height=64,
                  sigma_max=12.0, hires=True, hires_width=80, hires_height=72, hires_steps=2,
                  hires_sampler="Euler", hires_upscaler="Lanczos", hires_prompt="p, q", tiling="x",
                  tiled_vae=False)
    result = pipe.generate(**kwargs)
    back = GenerationRequest.from_infotext(result.infotext)
    # the schedules come back resolved: "Automatic" is Exponential for DPM++ 2M SDE, Uniform for Euler
    assert back == GenerationRequest.from_kwargs(**kwargs, scheduler="Exponential", hires_scheduler="Uniform")
    again = pipe.generate(back)
    assert np.array_equal(_px(again), _px(result)) and again.infotext == result.infotext


def test_bug1_hires_step_noise_continues_the_hires_stream(pipe, monkeypatch):
    """A1111's hires pass makes one ImageRNG at the target size: its first draw is the initial noise, the
    per-step noise continues that stream (processing.py sample_hr_pass: self.rng = ImageRNG(...);
    noise = self.rng.next(); the sampler's randn_like calls p.rng.next())."""
    draws = []
    euler_a = SAMPLERS["Euler a"]

    def spy(denoise, x, sigmas, noise_sampler=None, **kw):
        calls = []
        draws.append(calls)
        return euler_a(denoise, x, sigmas, noise_sampler=lambda s, t: calls.append(noise_sampler(s, t)) or calls[-1],
                       **kw)

    monkeypatch.setitem(SAMPLERS, "Euler a", spy)
    pipe.generate("x", steps=3, sampler="Euler a", seed=9, width=64, height=64, hires=True, hires_scale=1.5,
                  hires_steps=3, hires_denoising=0.8)
    hires_rng = ImageRNG((4, 12, 12), [9])
    initial = hires_rng.first()
    assert len(draws) == 2 and draws[1]
    assert not np.array_equal(draws[1][0], initial)  # before the fix: the initial noise again
    np.testing.assert_array_equal(draws[1][0], hires_rng.next())
    np.testing.assert_array_equal(draws[1][1], hires_rng.next())


def test_bug10_latents_with_several_batches_are_refused(pipe):
    latents = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="batch_count 2"):
        pipe.generate("x", steps=2, width=64, height=64, latents=latents, batch_count=2)
    assert pipe.generate("x", steps=2, width=64, height=64, latents=latents).images[0].size == (64, 64)


def test_no_state_is_left_on_the_pipeline(pipe):
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    before = np.asarray(pipe.decode(latents)[0])
    pipe.generate("x", steps=2, sampler="Euler", seed=1, width=64, height=64, tiling=True)
    assert np.array_equal(np.asarray(pipe.decode(latents)[0]), before)  # not the tiled decoder
    tiled = np.asarray(pipe.decode(latents, tiling="xy")[0])
    assert not np.array_equal(tiled, before)


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    """A tiny 9-channel inpainting model (diffusers layout, converted)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import tiny_models
    from converters.convert import convert

    torch_pipe = tiny_models.make_pipeline("sd1", seed=5)
    config = dict(tiny_models._unet("sd1", 6).config, in_channels=9)
    torch.manual_seed(6)
    torch_pipe.unet = tiny_models._perturb(diffusers.UNet2DConditionModel.from_config(config), 6)
    folder = tmp_path_factory.mktemp("inpaint-diffusers")
    torch_pipe.save_pretrained(folder, safe_serialization=True)
    out = tmp_path_factory.mktemp("inpaint-onnx") / "model"
    assert convert(folder, out).is_inpaint
    return out


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_bug2_hires_fix_on_an_inpainting_model(inpaint_model, upscaler):
    pipe = Pipeline.load(inpaint_model, provider="cpu")
    result = pipe.generate("x", steps=2, sampler="Euler", seed=2, width=64, height=64, hires=True,
                           hires_scale=1.5, hires_upscaler=upscaler, hires_steps=2)
    assert result.images[0].size == (96, 96) and np.asarray(result.images[0]).std() > 1


def test_writer_keeps_a1111_key_order():
    """The request writes through format_infotext: known keys in A1111's order, Version last."""
    r = GenerationRequest.from_kwargs(prompt="p", steps=3, seed=4, ensd=5)
    from sdonnx.request import Plan
    from sdonnx.samplers import resolve

    plan = Plan(64, 64, (4, 8, 8), 4, None, resolve("Euler a"), None)
    text = r.infotext(plan, facts={"Model": "m"})
    assert text == format_infotext("p", "", {"Steps": 3, "Sampler": "Euler a", "Schedule type": "Uniform",
                                             "CFG scale": 7.0, "Seed": 4, "Size": (64, 64), "Model": "m",
                                             "RNG": "NV", "ENSD": 5, "Version": f"sdonnx {sdonnx.__version__}"})


def test_variation_seeds_keep_the_seed_and_count_the_variation_seed(pipe):
    """A1111: image i uses seed + i, but with a variation strength every image keeps the seed and the
    variation seed counts up (all_seeds / all_subseeds)."""
    plain = pipe.generate("a cat", steps=1, seed=9, width=64, height=64, batch_size=2, batch_count=2)
    assert plain.seeds == [9, 10, 11, 12]
    varied = pipe.generate("a cat", steps=1, seed=9, width=64, height=64, batch_size=2, batch_count=2, subseed=4,
                           subseed_strength=0.3)
    assert varied.seeds == [9, 9, 9, 9]
    assert [t.count("Seed: 9,") for t in varied.infotexts] == [1] * 4
    assert ["Variation seed: %d," % s in t for s, t in zip((4, 5, 6, 7), varied.infotexts)] == [True] * 4
    assert len({im.tobytes() for im in varied.images}) == 4  # the variation seeds differ, so do the images
