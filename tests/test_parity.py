"""sdonnx against torch on the same tiny weights and the same initial noise.

References: the diffusers pipeline with its equivalent scheduler where one matches k-diffusion's
definition exactly (Euler + Karras with linspace spacing; DDIM with set_alpha_to_one), and
k-diffusion's own samplers over the same diffusers modules (what A1111 runs) for every sampler.

Tolerance, in 8-bit pixel units: the ONNX graphs agree with torch to ~1e-6 per call (the convert's
parity check), which sampling and the VAE amplify to a few 1e-5 in [-1, 1]; one unit of rounding
either way is allowed (max <= 2, mean <= 0.05). DPM++ 2M against diffusers is looser because diffusers
rounds DPM-Solver timesteps to integers and k-diffusion does not (REFERENCE.md).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from kdiffusion_ref import load as load_kdiffusion  # noqa: E402
from torch_reference import diffusers_images, kdiffusion_images  # noqa: E402

from sdonnx import Pipeline  # noqa: E402
from sdonnx.samplers import build_sigmas, resolve  # noqa: E402

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
STEPS, CFG = 8, 7.0
TIGHT = dict(max=2, mean=0.05)


def _noise(pipe, batch, size, seed=0):
    shape = (batch, pipe.manifest.latent_channels, size // 8, size // 8)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _compare(ours, reference, limits, label):
    ours = np.stack([np.asarray(im) for im in ours]).astype(np.int16)
    diff = np.abs(ours - reference.astype(np.int16))
    print(f"{label}: max {diff.max()} mean {diff.mean():.4f} (pixel units; image std {reference.std():.1f})")
    assert reference.std() > 5, "reference image is flat: the test would not see differences"
    assert diff.max() <= limits["max"] and diff.mean() <= limits["mean"], f"{label}: max {diff.max()} mean {diff.mean():.4f}"


def _scheduler(pipe, cls, **kwargs):
    return getattr(diffusers, cls).from_config(pipe.scheduler.config, **kwargs)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(request, tiny_diffusers, tiny_onnx):
    family = request.param
    _, torch_pipe = tiny_diffusers(family)
    return family, torch_pipe, Pipeline.load(tiny_onnx(family), provider="cpu")


@pytest.mark.parametrize("sampler, scheduler_cls, kwargs", [
    ("Euler", "EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="linspace")),
    ("DDIM", "DDIMScheduler", dict(set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1, clip_sample=False)),
])
def test_matches_diffusers_pipeline(setup, sampler, scheduler_cls, kwargs):
    family, torch_pipe, pipe = setup
    size = pipe.manifest.native_size
    latents = _noise(pipe, 2, size)
    scheduler = "Karras" if sampler == "Euler" else "Automatic"
    ours = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler=sampler, scheduler=scheduler,
                         seed=1, batch_size=2, latents=latents).images
    ref = diffusers_images(torch_pipe, _scheduler(torch_pipe, scheduler_cls, **kwargs), PROMPT, NEGATIVE,
                           latents, STEPS, CFG)
    _compare(ours, ref, TIGHT, f"{family} {sampler} vs diffusers {scheduler_cls}")


def test_dpmpp_2m_karras_close_to_diffusers(setup):
    family, torch_pipe, pipe = setup
    latents = _noise(pipe, 1, pipe.manifest.native_size)
    ours = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="DPM++ 2M Karras", seed=1,
                         latents=latents).images
    sched = _scheduler(torch_pipe, "DPMSolverMultistepScheduler", use_karras_sigmas=True,
                       timestep_spacing="linspace", algorithm_type="dpmsolver++", solver_order=2,
                       final_sigmas_type="zero", lower_order_final=True, euler_at_final=False)
    ref = diffusers_images(torch_pipe, sched, PROMPT, NEGATIVE, latents, STEPS, CFG)
    _compare(ours, ref, dict(max=12, mean=1.5), f"{family} DPM++ 2M Karras vs diffusers DPMSolverMultistep")


@pytest.mark.parametrize("sampler, scheduler, kdiff_name, stochastic", [
    ("Euler", "Automatic", "sample_euler", False),
    ("Euler a", "Automatic", "sample_euler_ancestral", True),
    ("Euler a", "Karras", "sample_euler_ancestral", True),
    ("DPM++ 2M", "Automatic", "sample_dpmpp_2m", False),
    ("DDIM", "Automatic", "sample_euler", False),  # eta 0 DDIM is the Euler step on the DDIM schedule
    ("Heun", "Karras", "sample_heun", False),
    ("LMS", "Automatic", "sample_lms", False),
    ("DPM2", "Automatic", "sample_dpm_2", False),
    ("DPM2 a", "Automatic", "sample_dpm_2_ancestral", True),
    ("DPM++ 2S a", "Automatic", "sample_dpmpp_2s_ancestral", True),
    ("DPM++ SDE", "Automatic", "sample_dpmpp_sde", True),
    ("DPM++ 2M SDE", "Automatic", "sample_dpmpp_2m_sde", True),
    ("DPM++ 3M SDE", "Automatic", "sample_dpmpp_3m_sde", True),
])
def test_matches_kdiffusion(setup, sampler, scheduler, kdiff_name, stochastic):
    family, torch_pipe, pipe = setup
    try:
        kdiff = load_kdiffusion()
    except ImportError as e:
        pytest.skip(f"k-diffusion reference unavailable: {e}")
    latents = _noise(pipe, 2, pipe.manifest.native_size)
    resolved = resolve(sampler, scheduler)
    sigmas = build_sigmas(resolved, STEPS, pipe.model_sigmas)
    rng = np.random.default_rng(7)
    # enough draws for samplers that take two per step; both sides consume them in k-diffusion's order
    draws = [rng.standard_normal(latents.shape).astype(np.float32) for _ in range(2 * STEPS)] if stochastic else None
    it = iter(draws or [])
    ours = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler=sampler, scheduler=scheduler,
                         seed=1, batch_size=2, latents=latents,
                         noise_sampler=(lambda s, sn: next(it)) if stochastic else None).images
    # A1111's DDIM starts from unit-variance DDPM noise: sqrt(1 + sigma^2) in k-diffusion scaling
    init_scale = (1 + sigmas[0] ** 2) ** 0.5 if sampler == "DDIM" else None
    ref = kdiffusion_images(torch_pipe, kdiff, getattr(kdiff[0], kdiff_name), sigmas, PROMPT, NEGATIVE, latents,
                            CFG, pipe.manifest.prediction_type, noise=draws, init_scale=init_scale)
    _compare(ours, ref, TIGHT, f"{family} {sampler} {scheduler} vs k-diffusion {kdiff_name}")
