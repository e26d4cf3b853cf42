"""ControlNet: the converter (every file layout), the UNet graph with residual inputs, and units at sampling time
against diffusers' ControlNet pipeline (where the semantics agree) and a torch restatement of sd-webui-controlnet's
UNet hook (guidance windows, control modes, several units).

Tolerances: images in 8-bit pixel units as tests/test_parity.py (the graphs agree with torch to ~1e-6 per call;
sampling and the VAE amplify that to a few 1e-5 in [-1, 1]: one unit of rounding either way, max <= 2,
mean <= 0.05); graphs against torch modules 1e-4 of the output's scale.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_controlnet  # noqa: E402
from converters.controlnet import is_controlnet, load_controlnet  # noqa: E402
from converters.convert import convert  # noqa: E402
from sdonnx import Pipeline  # noqa: E402
from sdonnx.controlnet.apply import StepClock, layer_scales  # noqa: E402
from sdonnx.controlnet.model import ControlNetError, load_controlnet_manifest  # noqa: E402

PROMPT, NEGATIVE, STEPS, CFG = "a red circle", "blurry", 6, 7.0
TIGHT = dict(max=2, mean=0.05)


@pytest.fixture(scope="module")
def setup(tiny_diffusers, tiny_onnx, tmp_path_factory):
    """(torch SD pipeline, torch ControlNet, Pipeline with models/ControlNet, the ControlNet folder, folder of files)."""
    _, torch_pipe = tiny_diffusers("sd1")
    controlnet = tiny_controlnet.make(torch_pipe.unet, seed=3)
    files = tmp_path_factory.mktemp("controlnet-files")
    library = tmp_path_factory.mktemp("ControlNet")
    source = tiny_controlnet.save(controlnet, files / "control_v11p_sd15_tiny.pth", "original")
    convert(source, library / "control_v11p_sd15_tiny")
    pipe = Pipeline.load(tiny_onnx("sd1"), provider="cpu", controlnet_dir=library)
    return torch_pipe, controlnet, pipe, library / "control_v11p_sd15_tiny", files


def _hint(seed, size=64):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _noise(batch=1, size=64):
    return np.random.default_rng(0).standard_normal((batch, 4, size // 8, size // 8)).astype(np.float32)


def _compare(ours, reference, limits, label):
    ours = np.stack([np.asarray(im) for im in ours]).astype(np.int16)
    diff = np.abs(ours - reference.astype(np.int16))
    print(f"{label}: max {diff.max()} mean {diff.mean():.4f} (pixel units; image std {reference.std():.1f})")
    assert reference.std() > 5, "reference image is flat: the test would not see differences"
    assert diff.max() <= limits["max"] and diff.mean() <= limits["mean"], label


# ------------------------------------------------------------------------------------------- converter

@pytest.mark.parametrize("layout, name", [("original", "cn.safetensors"), ("diffusers", "cn.safetensors"),
                                          ("folder", "cn-folder"), ("original", "cn.pth")])
def test_every_layout_loads_the_same_weights(setup, tmp_path, layout, name):
    _, controlnet, *_ = setup
    path = tiny_controlnet.save(controlnet, tmp_path / name, layout)
    assert is_controlnet(path)
    loaded = load_controlnet(path)
    assert loaded.family == "sd1"
    expected = controlnet.state_dict()
    got = loaded.model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert loaded.model.config.layers_per_block == controlnet.config.layers_per_block


def test_whole_sd_file_with_control_model_is_a_controlnet(setup, tmp_path):
    """ControlNet 1.0 files (control_sd15_canny.pth) hold a whole SD checkpoint beside control_model.*."""
    torch_pipe, controlnet, *_ = setup
    from converters.original_layout import controlnet_to_original, to_original

    state = {**to_original(torch_pipe), **controlnet_to_original(controlnet)}
    torch.save({"state_dict": state}, tmp_path / "control_sd15_tiny.pth")
    loaded = load_controlnet(tmp_path / "control_sd15_tiny.pth")
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in controlnet.state_dict().items())


def test_sd_checkpoint_is_not_a_controlnet(tiny_diffusers, tmp_path):
    folder, _ = tiny_diffusers("sd1")
    assert not is_controlnet(folder)
    assert not is_controlnet(folder / "unet")


def test_manifest(setup):
    *_, folder, _ = setup
    m = load_controlnet_manifest(folder)
    assert (m.family, m.residuals, m.context_dim, m.conditioning_channels) == ("sd1", 7, 64, 3)
    assert m.graph.parity_max_abs_err < 1e-4
    assert m.title == f"control_v11p_sd15_tiny [{m.model_hash}]" and len(m.model_hash) == 8


# ------------------------------------------------------------------------------------------- UNet residuals

def test_unet_with_residual_inputs_matches_diffusers(setup, tiny_onnx):
    """The rewritten graph adds the residuals where diffusers does; zeros of [1, 1, 1, 1] give the plain UNet."""
    torch_pipe, controlnet, pipe, *_ = setup
    unet = pipe._component("unet", residuals=True)
    plain = pipe._component("unet")
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 9, 11, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        down, mid = controlnet(x, t, c, torch.rand(2, 3, 72, 88, generator=g), return_dict=False)
        expected = torch_pipe.unet(x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    names = [f"down_block_res_{i}" for i in range(len(down))] + ["mid_block_res"]
    residuals = {n: r.numpy() for n, r in zip(names, [*down, mid])}
    out = unet(x.numpy(), t.numpy(), c.numpy(), residuals=residuals)
    assert np.abs(out - expected.numpy()).max() < 1e-4 * max(1.0, float(expected.abs().max()))
    zero = {n: np.zeros((1, 1, 1, 1), np.float32) for n in names}
    assert np.abs(unet(x.numpy(), t.numpy(), c.numpy(), residuals=zero) - plain(x.numpy(), t.numpy(), c.numpy())).max() < 1e-5


# ------------------------------------------------------------------------------------------- sampling

def test_one_unit_matches_diffusers_controlnet_pipeline(setup):
    from PIL import Image

    from torch_reference import diffusers_images

    torch_pipe, controlnet, pipe, *_ = setup
    latents, hint = _noise(), _hint(1)
    ours = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1,
                         latents=latents, controlnet=[dict(model="control_v11p_sd15_tiny", image=hint, weight=0.8)])
    cn_pipe = diffusers.StableDiffusionControlNetPipeline(**{k: getattr(torch_pipe, k) for k in (
        "vae", "text_encoder", "tokenizer", "unet", "scheduler")}, controlnet=controlnet, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(torch_pipe.scheduler.config, use_karras_sigmas=True,
                                                              timestep_spacing="linspace")
    ref = diffusers_images(cn_pipe, scheduler, PROMPT, NEGATIVE, latents, STEPS, CFG,
                           image=Image.fromarray(hint), controlnet_conditioning_scale=0.8)
    _compare(ours.images, ref, TIGHT, "one ControlNet unit vs diffusers StableDiffusionControlNetPipeline")
    assert 'ControlNet 0: "Module: none, Model: control_v11p_sd15_tiny [' in ours.infotext
    plain = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1,
                          latents=latents).images
    assert np.abs(np.asarray(plain[0], np.int16) - ref[0]).mean() > 2, "the ControlNet changed nothing"


def test_layer_scales_and_step_clock():
    """Soft injection as the extension: weight * 0.825 ** (12 - i); the window reads the last finished step."""
    assert layer_scales(0.5, False, 13) == [0.5] * 13
    soft = layer_scales(2.0, True, 13)
    assert soft[12] == 2.0 and soft[0] == pytest.approx(2.0 * 0.825 ** 12)
    assert layer_scales(1.0, True, 10) == pytest.approx([0.825 ** (12 - i) for i in range(10)])  # SDXL's 10
    clock = StepClock(10)
    seen = []
    for i in range(10):
        seen.append(clock.fraction)  # what the model calls of step i see
        clock({"i": i})
    assert seen == [0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def _extension_reference(torch_pipe, units, latents, sigmas):
    """sd-webui-controlnet's hook restated in torch over k-diffusion's Euler: per model call, each unit inside
    its window (step = the last finished step's index) adds its residuals scaled by weight, or by weight *
    0.825 ** (12 - i) for the two non-Balanced modes; "ControlNet is more important" only on the cond rows."""
    from kdiffusion_ref import load

    sampling, external = load()
    clock = {"step": 0}

    class Shim(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", torch_pipe.scheduler.alphas_cumprod.float())

        def apply_model(self, x, t, cond):
            mark = torch.tensor([0.0] * (len(x) // 2) + [1.0] * (len(x) // 2))[:, None, None, None]
            total = None
            for net, hint, weight, start, end, mode in units:
                if not start <= clock["step"] / STEPS <= end:
                    continue
                down, mid = net(x, t, cond, hint.expand(len(x), -1, -1, -1), return_dict=False)
                outs = [*down, mid]
                scales = [weight * 0.825 ** (12 - i) if mode != "Balanced" else weight for i in range(len(outs))]
                outs = [o * s * (mark if mode == "ControlNet is more important" else 1) for o, s in zip(outs, scales)]
                total = outs if total is None else [a + b for a, b in zip(total, outs)]
            extra = {} if total is None else dict(down_block_additional_residuals=total[:-1],
                                                  mid_block_additional_residual=total[-1])
            return torch_pipe.unet(x, t, cond, **extra).sample

    model = external.CompVisDenoiser(Shim(), quantize=False)
    with torch.no_grad():
        cond, uncond = torch_pipe.encode_prompt([PROMPT], "cpu", 1, True, [NEGATIVE])

        def denoise(x, sigma, **_):
            u, c = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond])).chunk(2)
            return u + CFG * (c - u)

        sig = torch.tensor(np.asarray(sigmas), dtype=torch.float32)
        x = sampling.sample_euler(denoise, torch.from_numpy(latents) * sig[0], sig, disable=True,
                                  callback=lambda info: clock.update(step=info["i"]))
        image = torch_pipe.vae.decode(x / torch_pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_two_units_windows_and_control_modes_match_the_extension(setup):
    from sdonnx.samplers import build_sigmas, resolve

    torch_pipe, controlnet, pipe, *_ = setup
    latents, hints = _noise(), [_hint(1), _hint(2)]
    units = [dict(model="control_v11p_sd15_tiny", image=hints[0], weight=0.8, guidance_start=0.0, guidance_end=0.5,
                  control_mode="My prompt is more important"),
             dict(model="control_v11p_sd15_tiny [ignored]", image=hints[1], weight=1.3, guidance_start=0.3,
                  guidance_end=1.0, control_mode=2)]
    ours = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1,
                         latents=latents, controlnet=units)
    sigmas = build_sigmas(resolve("Euler", "Karras"), STEPS, pipe.model_sigmas)
    torch_units = [(controlnet, torch.from_numpy(h.transpose(2, 0, 1)[None] / np.float32(255)), u["weight"],
                    u["guidance_start"], u["guidance_end"], mode)
                   for h, u, mode in zip(hints, units, ("My prompt is more important", "ControlNet is more important"))]
    try:
        ref = _extension_reference(torch_pipe, torch_units, latents, sigmas)
    except ImportError as e:
        pytest.skip(f"k-diffusion reference unavailable: {e}")
    _compare(ours.images, ref, TIGHT, "two units (windows, soft injection, cond-only) vs the extension's hook in torch")
    assert "ControlNet 1: " in ours.infotext and "Control Mode: ControlNet is more important" in ours.infotext


# ------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("unit, message", [
    (dict(model="control_v11p_sd15_tiny"), "ControlNet unit 0: no control image"),
    (dict(model="control_v11p_sd15_tiny", image="x.png", module="depth_leres"), "unknown ControlNet module 'depth_leres'"),
    (dict(model="nothing_here", image=np.zeros((8, 8, 3), np.uint8)), "ControlNet model 'nothing_here' not found"),
    (dict(model="control_v11p_sd15_tiny", image="x.png", weight=float("nan")), "weight must be a finite number"),
    (dict(model="control_v11p_sd15_tiny", image="x.png", guidance_start=0.8, guidance_end=0.2), "guidance_start 0.8 is after"),
    (dict(model="control_v11p_sd15_tiny", image="x.png", control_mode="Loud"), "control_mode 'Loud': choose one of"),
])
def test_bad_units_are_clear_errors(setup, unit, message):
    pipe = setup[2]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pipe.generate(PROMPT, steps=2, controlnet=[unit])


def test_model_for_another_family_is_refused(setup, tiny_onnx):
    pipe = Pipeline.load(tiny_onnx("sd2"), provider="cpu", controlnet_dir=setup[3].parent)
    with pytest.raises(ControlNetError, match="is a sd1 model; .* is sd2"):
        pipe.generate(PROMPT, steps=2, controlnet=[dict(model="control_v11p_sd15_tiny", image=_hint(1))])


def test_unconverted_file_says_how_to_convert(setup, tmp_path):
    torch_pipe, controlnet, pipe, folder, files = setup
    pipe = Pipeline.load(pipe.folder, provider="cpu", controlnet_dir=files)
    with pytest.raises(ControlNetError, match="is not converted yet; run `sdonnx convert"):
        pipe.generate(PROMPT, steps=2, controlnet=[dict(model="control_v11p_sd15_tiny", image=_hint(1))])


# ------------------------------------------------------------------------------------------- SDXL, hires, lowmem

def test_sdxl_controlnet_call_matches_torch(tiny_sdxl, tmp_path):
    """An SDXL ControlNet (diffusers folder, added text_time conditions) converts, and one controlled UNet call
    (ControlNet residuals scaled by the unit's weight, added by the rewritten SDXL UNet) equals torch's."""
    from sdonnx.controlnet.apply import ControlledUNet, PassUnit
    from sdonnx.controlnet.model import ControlNetModel

    _, torch_pipe, model = tiny_sdxl("base")
    controlnet = tiny_controlnet.make(torch_pipe.unet, seed=5)
    convert(tiny_controlnet.save(controlnet, tmp_path / "sdxl-cn", "folder"), tmp_path / "ControlNet" / "xl")
    manifest = load_controlnet_manifest(tmp_path / "ControlNet" / "xl")
    assert (manifest.family, manifest.residuals) == ("sdxl", 7)
    pipe = Pipeline.load(model, provider="cpu", controlnet_dir=tmp_path / "ControlNet")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 700.0])
    context = torch.randn(2, 77, controlnet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 96, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    hint = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, hint.expand(2, -1, -1, -1), added_cond_kwargs=added, return_dict=False)
        expected = torch_pipe.unet(x, t, context, added_cond_kwargs=added, return_dict=False,
                                   down_block_additional_residuals=[d * 0.7 for d in down],
                                   mid_block_additional_residual=mid * 0.7)[0]
    net = ControlNetModel(tmp_path / "ControlNet" / "xl", pipe.plan)
    unet = ControlledUNet(pipe._component("unet", residuals=True), [PassUnit(net, hint.numpy(), 0.7, 0, 1, False,
                                                                             False, False)],
                          StepClock(1), manifest.residuals, 4)
    out = unet(x.numpy(), t.numpy(), context.numpy(), **{k: v.numpy() for k, v in added.items()})
    assert np.abs(out - expected.numpy()).max() < 1e-4 * max(1.0, float(expected.abs().max()))


def _previews(pipe, **settings):
    seen = []
    pipe.generate(PROMPT, NEGATIVE, steps=3, cfg_scale=CFG, sampler="Euler", seed=1, hires=True, hires_scale=1.5,
                  hires_steps=2, preview=lambda x0: seen.append(x0.copy()), **settings)
    return seen


def test_hr_option_keeps_a_unit_to_one_pass(setup):
    """hires fix: "Low res only" controls the first pass only, "High res only" the second only (previews: each
    step's x0 estimate; 3 first-pass steps, then 2 hires steps)."""
    pipe = setup[2]
    unit = dict(model="control_v11p_sd15_tiny", image=_hint(1))
    plain = _previews(pipe)
    both = _previews(pipe, controlnet=[unit])
    low = _previews(pipe, controlnet=[{**unit, "hr_option": "Low res only"}])
    high = _previews(pipe, controlnet=[{**unit, "hr_option": "High res only"}])
    same = lambda a, b: all(np.array_equal(p, q) for p, q in zip(a, b))  # noqa: E731
    assert same(low[:3], both[:3]) and not same(low[:3], plain[:3])
    assert same(high[:3], plain[:3]) and not same(high[3:], plain[3:])
    assert not same(low[3:], both[3:])


def test_lowmem_frees_the_controlnet_with_the_unet(setup):
    pipe = Pipeline.load(setup[2].folder, provider="cpu", controlnet_dir=setup[3].parent, lowmem=True)
    pipe.generate(PROMPT, steps=2, controlnet=[dict(model="control_v11p_sd15_tiny", image=_hint(1))])
    assert pipe._controlnets and all(net._session is None for net in pipe._controlnets.values())
    assert not any(key[0] == "unet" for key in pipe._components)


def test_inpaint_only_keeps_the_unmasked_area(setup):
    """inpaint_only (the extension's): x0 outside the mask is the control image's latent at every call, and the
    finished image outside the grown, softened mask is the control image itself."""
    pipe = setup[2]
    image = _hint(4)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = pipe.generate(PROMPT, NEGATIVE, steps=3, cfg_scale=CFG, sampler="Euler", seed=1, controlnet=[dict(
        model="control_v11p_sd15_tiny", image=image, mask=mask, module="inpaint_only")]).images[0]
    out = np.asarray(out, np.int16)
    far = np.ones((64, 64), bool)
    far[4:60, 4:60] = False  # beyond the mask grown by the restore's sigma (7) and its blur
    assert np.abs(out[far] - image[far]).max() <= 1
    assert np.abs(out[20:44, 20:44] - image[20:44, 20:44]).mean() > 10, "the masked area was not repainted"


def test_sd15_block_layout_takes_13_residuals(tmp_path):
    """SD 1.5's UNet layout (4 levels, 2 layers each; small channels): the rewrite finds the 12 skips and the middle
    block, and adds a ControlNet's residuals where diffusers does. (SDXL's layout, 3 levels of 2, gave its 10 the
    same way when this was written; the tiny SDXL above checks the added conditions.)"""
    import onnx
    import onnxruntime as ort

    from converters.components import UNET, ComponentSpec, UNetExport
    from converters.export import export_component
    from sdonnx.controlnet.residuals import add_residual_inputs, residual_count

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), layers_per_block=2, sample_size=8,
                                          cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16).eval()
    controlnet = tiny_controlnet.make(unet, seed=2)
    g = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(2, 4, 17, 19, generator=g), torch.tensor([500.0, 30.0]), torch.randn(2, 77, 64, generator=g)
    path = export_component(ComponentSpec("unet", UNetExport(unet), UNET, (x, t, c), [], "model.", "unet"), tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    assert residual_count(model.graph) == 13
    with torch.no_grad():
        down, mid = controlnet(x, t, c, torch.rand(2, 3, 136, 152, generator=g), return_dict=False)
        expected = unet(x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    session = ort.InferenceSession(add_residual_inputs(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy(), "mid_block_res": mid.numpy(),
             **{f"down_block_res_{i}": d.numpy() for i, d in enumerate(down)}}
    out = session.run(None, feeds)[0]
    assert np.abs(out - expected.numpy()).max() < 1e-4 * max(1.0, float(expected.abs().max()))


def test_fp16_derived_unet_takes_residuals(setup, tmp_path):
    """A model with a derived fp16 UNet (`--dtype fp16`: float32 inputs, float16 inside) runs ControlNet on that
    graph, the residuals cast to float16, not on the fp32 base graph. Tolerance 1e-2 of the output's scale:
    float16's 11-bit mantissa over the tiny UNet's depth."""
    import json
    import shutil

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from converters.export import save_with_external_data

    base_pipe = setup[2]
    folder = tmp_path / "model"
    shutil.copytree(base_pipe.folder, folder)
    fp16 = convert_float_to_float16(onnx.load(str(folder / "unet" / "model.onnx")), keep_io_types=True,
                                    disable_shape_infer=True)
    (folder / "unet" / "optimized").mkdir()
    save_with_external_data(fp16, folder / "unet" / "optimized" / "model.onnx")
    manifest = json.loads((folder / "sdonnx.json").read_text())
    manifest["components"]["unet"].update(optimized_path="unet/optimized/model.onnx", optimized={"dtype": "fp16"})
    (folder / "sdonnx.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(folder, provider="cpu")
    derived, base = pipe._component("unet", residuals=True), base_pipe._component("unet", residuals=True)
    assert "Cast" in {n.op_type for n in onnx.load_from_string(derived.session._source).graph.node
                      if n.name.startswith("sdonnx_controlnet/")}
    g = np.random.default_rng(3)
    x, t, c = g.standard_normal((2, 4, 8, 8), np.float32), np.array([500.0, 20.0], np.float32), \
        g.standard_normal((2, 77, 64), np.float32)
    shapes = [(32, 8, 8), (32, 8, 8), (32, 4, 4), (32, 4, 4), (32, 2, 2), (64, 2, 2), (64, 2, 2)]
    names = [f"down_block_res_{i}" for i in range(6)] + ["mid_block_res"]
    residuals = {n: g.standard_normal((2, *s), np.float32) for n, s in zip(names, shapes)}
    expected = base(x, t, c, residuals=residuals)
    assert np.abs(derived(x, t, c, residuals=residuals) - expected).max() < 1e-2 * max(1.0, np.abs(expected).max())


def test_img2img_unit_takes_the_init_image_and_tiles(setup):
    """img2img: a unit without an image uses the init image (the same image as naming it); with seamless tiling the
    rewritten UNet is wrapped too and the unit still steers it."""
    from PIL import Image

    pipe = setup[2]
    init = Image.fromarray(_hint(6))
    common = dict(init_image=init, strength=0.7, steps=4, sampler="Euler", seed=2, tiling="xy")
    implicit = pipe.generate(PROMPT, controlnet=[dict(model="control_v11p_sd15_tiny")], **common).images[0]
    explicit = pipe.generate(PROMPT, controlnet=[dict(model="control_v11p_sd15_tiny", image=init)], **common).images[0]
    plain = pipe.generate(PROMPT, **common).images[0]
    assert np.array_equal(np.asarray(implicit), np.asarray(explicit))
    assert np.abs(np.asarray(implicit, np.int16) - np.asarray(plain, np.int16)).mean() > 1


def test_info_shows_a_controlnet(setup):
    from click.testing import CliRunner

    from sdonnx.cli import main

    result = CliRunner().invoke(main, ["info", str(setup[3])])
    assert result.exit_code == 0, result.output
    assert "ControlNet:      control_v11p_sd15_tiny [" in result.output and "residuals:       7 (6 skip" in result.output


def test_a1111_api_runs_a_unit(setup, tmp_path):
    """POST /sdapi/v1/txt2img with alwayson_scripts.controlnet: the unit's base64 image waits encoded, is decoded
    when the job runs, and gives the image the Python door gives; a model made for nothing served is a 422."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import base64
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from sdonnx.server import create_app

    torch_pipe, controlnet, pipe, folder, _ = setup
    buf = io.BytesIO()
    Image.fromarray(_hint(1)).save(buf, format="PNG")
    unit = {"input_image": base64.b64encode(buf.getvalue()).decode(), "model": "control_v11p_sd15_tiny",
            "weight": 0.9, "guidance_end": 0.7}
    app = create_app(pipe.folder, provider="cpu", controlnet_dirs=[folder.parent])
    with TestClient(app) as client:
        body = {"prompt": PROMPT, "steps": 3, "seed": 4, "sampler_name": "Euler", "width": 64, "height": 64,
                "alwayson_scripts": {"controlnet": {"args": [unit]}}}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        image, detected = (Image.open(io.BytesIO(base64.b64decode(b))) for b in r.json()["images"])
        served = np.asarray(image)
        assert np.array_equal(np.asarray(detected), _hint(1))  # the extension appends each unit's detected map
        quiet = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"control_net_no_detectmap": True}})
        assert len(quiet.json()["images"]) == 1
        assert 'ControlNet 0: "Module: none, Model: control_v11p_sd15_tiny [' in json.loads(r.json()["info"])["infotexts"][0]
        bad = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
            {**unit, "model": "control_v11f1p_sd15_depth"}]}}})
        assert bad.status_code == 422 and "control_v11f1p_sd15_depth" in bad.text
    direct = pipe.generate(PROMPT, steps=3, seed=4, sampler="Euler", scheduler="Automatic", cfg_scale=7.0,
                           controlnet=[dict(model="control_v11p_sd15_tiny", image=_hint(1), weight=0.9,
                                            guidance_end=0.7)]).images[0]
    assert np.array_equal(served, np.asarray(direct))
