"""Samplers against k-diffusion's torch implementation (and diffusers for DDIM/PLMS) on a toy denoiser.

Reference: k-diffusion 0.1.1.post1 `sampling.py` (loaded by tests/kdiffusion_ref.py). Both sides get
the same float32 latents, the same float32 sigmas and, for stochastic samplers, the same pre-drawn
noise arrays in the same order. Tolerance: float32 round-off accumulated over the steps; our scalar
step coefficients are float64 where k-diffusion's are float32, so results agree to ~1e-6 relative;
asserted at RTOL * max|x| with RTOL = 2e-5.
"""

import math

import numpy as np
import pytest

from sdonnx.diffusion.sigmas import betas_from_config, model_sigmas, sigma_to_t
from sdonnx.samplers import (
    SAMPLER_NAMES, SAMPLERS, SCHEDULER_NAMES, SCHEDULES, BrownianTreeNoiseSampler, build_sigmas, resolve,
)
from sdonnx.samplers.extra import restart_plan
from sdonnx.schedules import get_sigmas_ddim, get_sigmas_karras

torch = pytest.importorskip("torch", reason="torch is the reference implementation's runtime")

RTOL = 2e-5
SHAPE = (2, 4, 8, 8)
MODEL_SIGMAS = model_sigmas(betas_from_config())


@pytest.fixture(scope="module")
def kd():
    import kdiffusion_ref

    try:
        sampling, _ = kdiffusion_ref.load()
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"k-diffusion reference not loadable: {exc}")
    return sampling


def toy_denoise(x, sigma):
    """Deterministic, nonlinear in x, smooth in sigma: numpy float32 -> float32."""
    c_in = 1.0 / math.sqrt(sigma ** 2 + 1)
    return (0.6 * np.tanh(x * c_in) + 0.05 * math.cos(sigma) * x * c_in).astype(np.float32)


def toy_denoise_torch(x, sigma):
    sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float64)
    c_in = 1.0 / torch.sqrt(sigma ** 2 + 1)
    return (0.6 * torch.tanh(x * c_in) + 0.05 * torch.cos(sigma) * x * c_in).to(torch.float32)


def make_inputs(steps=12, seed=0, schedule=get_sigmas_karras):
    sigmas = schedule(steps, float(MODEL_SIGMAS[0]), float(MODEL_SIGMAS[-1])).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(SHAPE) * sigmas[0]).astype(np.float32)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(4 * steps + 8)]
    return x, sigmas, noises


class ListNoise:
    """Hands out pre-drawn arrays in order and records the (sigma, sigma_next) of each call."""

    def __init__(self, noises, as_torch=False):
        self.noises, self.as_torch, self.calls = noises, as_torch, []

    def __call__(self, sigma, sigma_next):
        noise = self.noises[len(self.calls)]
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.from_numpy(noise.copy()) if self.as_torch else noise.copy()


def run_both(kd_fn, ours_fn, x, sigmas, noises=None, kd_kwargs=None, **options):
    ours_noise = ListNoise(noises) if noises is not None else None
    ref_noise = ListNoise(noises, as_torch=True) if noises is not None else None
    steps_ours, steps_ref = [], []
    x_in = x.copy()
    ours = ours_fn(toy_denoise, x, sigmas, noise_sampler=ours_noise, callback=steps_ours.append, **options)
    np.testing.assert_array_equal(x, x_in)  # inputs not mutated
    extra = {} if ref_noise is None else {"noise_sampler": ref_noise}
    ref = kd_fn(toy_denoise_torch, torch.from_numpy(x.copy()), torch.from_numpy(sigmas.copy()),
                callback=steps_ref.append, disable=True, **extra, **(kd_kwargs or {}), **options).numpy()
    assert [s["i"] for s in steps_ours] == [s["i"] for s in steps_ref]
    if noises is not None:
        assert len(ours_noise.calls) == len(ref_noise.calls)
        np.testing.assert_allclose(ours_noise.calls, ref_noise.calls, rtol=1e-5)
    return ours, ref


def assert_close(ours, ref):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.isfinite(ours).all()
    err = np.abs(ours - ref).max()
    assert err <= RTOL * max(1.0, np.abs(ref).max()), f"max abs diff {err:.3g}"


DETERMINISTIC = [
    ("Euler", "sample_euler", {}),
    ("Heun", "sample_heun", {}),
    ("DPM2", "sample_dpm_2", {}),
    ("LMS", "sample_lms", {}),
    ("DPM++ 2M", "sample_dpmpp_2m", {}),
]

STOCHASTIC = [
    ("Euler a", "sample_euler_ancestral", {}),
    ("DPM2 a", "sample_dpm_2_ancestral", {}),
    ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", {}),
    ("DPM++ SDE", "sample_dpmpp_sde", {}),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", {}),
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", {}),
]


@pytest.mark.parametrize("name, kd_name, kd_kwargs", DETERMINISTIC, ids=[c[0] for c in DETERMINISTIC])
def test_deterministic_matches_kdiffusion(kd, name, kd_name, kd_kwargs):
    x, sigmas, _ = make_inputs()
    ours, ref = run_both(getattr(kd, kd_name), SAMPLERS[name], x, sigmas, kd_kwargs=kd_kwargs)
    assert_close(ours, ref)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("name, kd_name, kd_kwargs", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_stochastic_matches_kdiffusion(kd, name, kd_name, kd_kwargs, eta):
    x, sigmas, noises = make_inputs()
    ours, ref = run_both(getattr(kd, kd_name), SAMPLERS[name], x, sigmas, noises, kd_kwargs=kd_kwargs,
                         eta=eta, s_noise=0.9)
    assert_close(ours, ref)


@pytest.mark.parametrize("name", [n for n, _, _ in STOCHASTIC] + ["LCM"])
def test_stochastic_samplers_need_a_noise_sampler(name):
    x, sigmas, _ = make_inputs(steps=4)
    with pytest.raises(ValueError, match="noise_sampler"):
        SAMPLERS[name](toy_denoise, x, sigmas)


@pytest.mark.parametrize("name, kd_name", [("Euler", "sample_euler"), ("Heun", "sample_heun"),
                                           ("DPM2", "sample_dpm_2")])
def test_churn_matches_kdiffusion(kd, name, kd_name):
    """s_churn > 0: k-diffusion draws torch.randn_like once per step; replay that stream to ours."""
    x, sigmas, _ = make_inputs(steps=8)
    options = {"s_churn": 2.0, "s_noise": 1.003}
    torch.manual_seed(7)
    x_t = torch.from_numpy(x.copy())
    stream = [torch.randn_like(x_t).numpy() for _ in range(len(sigmas) - 1)]
    ours = SAMPLERS[name](toy_denoise, x, sigmas, noise_sampler=ListNoise(stream), **options)
    torch.manual_seed(7)
    ref = getattr(kd, kd_name)(toy_denoise_torch, x_t, torch.from_numpy(sigmas), disable=True, **options).numpy()
    assert_close(ours, ref)
    with pytest.raises(ValueError, match="noise_sampler"):
        SAMPLERS[name](toy_denoise, x, sigmas, **options)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_matches_kdiffusion(kd, eta):
    x, sigmas, noises = make_inputs(steps=10)
    ours = SAMPLERS["DPM fast"](toy_denoise, x, sigmas, noise_sampler=ListNoise(noises), eta=eta)
    ref = kd.sample_dpm_fast(toy_denoise_torch, torch.from_numpy(x), float(sigmas[-2]), float(sigmas[0]),
                             len(sigmas) - 1, disable=True, eta=eta,
                             noise_sampler=ListNoise(noises, as_torch=True)).numpy()
    assert_close(ours, ref)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_adaptive_matches_kdiffusion(kd, eta):
    x, sigmas, noises = make_inputs(steps=10)
    ours_steps = []
    ours = SAMPLERS["DPM adaptive"](toy_denoise, x, sigmas, noise_sampler=ListNoise(noises), eta=eta,
                                    callback=ours_steps.append)
    ref, info = kd.sample_dpm_adaptive(toy_denoise_torch, torch.from_numpy(x), float(sigmas[-2]),
                                       float(sigmas[0]), disable=True, eta=eta, return_info=True,
                                       noise_sampler=ListNoise(noises, as_torch=True))
    assert len(ours_steps) == info["steps"]
    assert_close(ours, ref.numpy())


def test_restart_without_restarts_is_heun(kd):
    x, sigmas, _ = make_inputs(steps=12)
    ours, ref = run_both(kd.sample_heun, SAMPLERS["Restart"], x, sigmas)
    assert_close(ours, ref)


def test_restart_plan_follows_a1111():
    """A1111 sd_samplers_extra.restart_sampler: 20 steps -> 11 Karras steps + one 9-step restart."""
    sigmas = get_sigmas_karras(20, 0.0292, 14.6146)
    pairs = restart_plan(sigmas)
    main = get_sigmas_karras(11, 0.0292, 14.6146)
    restart_at = int(np.argmin(np.abs(main - 0.1)))
    top = int(np.argmin(np.abs(main - 2)))
    restart = get_sigmas_karras(10, main[restart_at], main[top])[:-1]
    expected = list(zip(main[:restart_at], main[1:restart_at + 1]))
    expected += list(zip(restart[:-1], restart[1:])) + list(zip(main[restart_at:-1], main[restart_at + 1:]))
    np.testing.assert_allclose(pairs, expected, rtol=1e-12)
    assert len(restart_plan(get_sigmas_karras(40, 0.03, 14.6))) == 40 - 10 * 2 + 2 * 10


def test_restart_adds_noise_at_each_jump():
    x, sigmas, noises = make_inputs(steps=20)
    noise = ListNoise(noises)
    out = SAMPLERS["Restart"](toy_denoise, x, sigmas, noise_sampler=noise)
    assert np.isfinite(out).all() and len(noise.calls) == 1
    low, high = noise.calls[0]
    assert low < high


def test_lcm_is_denoise_then_renoise():
    x, sigmas, noises = make_inputs(steps=4)
    expected = x
    for i in range(4):
        expected = toy_denoise(expected, float(sigmas[i]))
        if i < 3:
            expected = expected + float(sigmas[i + 1]) * noises[i]
    out = SAMPLERS["LCM"](toy_denoise, x, sigmas, noise_sampler=ListNoise(noises))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


# --- DDIM and PLMS against diffusers (same toy model written as an eps-predictor in VP space) ---

def eps_model(x_vp, t):
    return 0.8 * np.tanh(x_vp) + 0.1 * np.sin(t / 100.0)


def ddim_denoise(x, sigma):
    t = round(sigma_to_t(sigma, MODEL_SIGMAS))
    eps = eps_model(x / math.sqrt(1 + sigma ** 2), t).astype(np.float32)
    return x - sigma * eps


def run_diffusers(scheduler, steps, x_vp, noises=None, eta=None):
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(x_vp.copy())
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.from_numpy(eps_model(sample.numpy(), int(t)).astype(np.float32))
        kwargs = {} if eta is None else {"eta": eta, "variance_noise": torch.from_numpy(noises[i])}
        sample = scheduler.step(eps, t, sample, **kwargs).prev_sample
    return sample.numpy()


def scheduler_config():
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=True,
                steps_offset=1, timestep_spacing="leading")


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers(eta, steps):
    diffusers = pytest.importorskip("diffusers")
    sigmas = get_sigmas_ddim(steps, model_sigmas=MODEL_SIGMAS)
    rng = np.random.default_rng(3)
    x_vp = rng.standard_normal(SHAPE).astype(np.float32)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps)]
    x = (x_vp * math.sqrt(1 + sigmas[0] ** 2)).astype(np.float32)
    ours = SAMPLERS["DDIM"](ddim_denoise, x, sigmas, noise_sampler=ListNoise(noises) if eta else None, eta=eta)
    ref = run_diffusers(diffusers.DDIMScheduler(**scheduler_config(), clip_sample=False), steps, x_vp, noises, eta)
    assert_close(ours, ref)


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_plms_matches_diffusers_pndm(steps):
    diffusers = pytest.importorskip("diffusers")
    sigmas = get_sigmas_ddim(steps, model_sigmas=MODEL_SIGMAS)
    x_vp = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    x = (x_vp * math.sqrt(1 + sigmas[0] ** 2)).astype(np.float32)
    ours = SAMPLERS["PLMS"](ddim_denoise, x, sigmas)
    ref = run_diffusers(diffusers.PNDMScheduler(**scheduler_config(), skip_prk_steps=True), steps, x_vp)
    assert_close(ours, ref)


# --- Brownian tree ---

def test_brownian_tree_is_additive_and_order_free():
    tree = BrownianTreeNoiseSampler((1, 3, 4, 4), 0.03, 14.6, seed=42)
    a, b, c = 9.0, 2.5, 0.3
    ac = tree(a, c) * math.sqrt(a - c)
    ab, bc = tree(a, b) * math.sqrt(a - b), tree(b, c) * math.sqrt(b - c)
    np.testing.assert_allclose(ac, ab + bc, rtol=1e-5, atol=1e-5)
    again = BrownianTreeNoiseSampler((1, 3, 4, 4), 0.03, 14.6, seed=42)
    np.testing.assert_array_equal(again(b, c), tree(b, c))  # queried in another order
    np.testing.assert_array_equal(tree(c, b), -tree(b, c))
    assert not np.array_equal(BrownianTreeNoiseSampler((1, 3, 4, 4), 0.03, 14.6, seed=43)(a, b), tree(a, b))
    assert tree(a, b).dtype == np.float32


def test_brownian_tree_statistics():
    """Interval noise is N(0, 1) per element and disjoint intervals are uncorrelated."""
    tree = BrownianTreeNoiseSampler((64, 4, 16, 16), 0.03, 14.6, seed=0)
    sigmas = get_sigmas_karras(6, 0.03, 14.6)[:-1]
    draws = [tree(s, s_next) for s, s_next in zip(sigmas[:-1], sigmas[1:])]
    for noise in draws:
        assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    corr = np.corrcoef(np.stack([d.ravel() for d in draws]))
    assert np.abs(corr - np.eye(len(draws))).max() < 0.03
    short = tree(0.05, 0.0501)  # much finer than the dyadic split at the top of the range
    assert abs(short.std() - 1) < 0.05


def test_brownian_tree_per_item_seeds():
    batch = BrownianTreeNoiseSampler((2, 4, 8, 8), 0.03, 14.6, seed=[5, 6])
    single = BrownianTreeNoiseSampler((1, 4, 8, 8), 0.03, 14.6, seed=6)
    np.testing.assert_array_equal(batch(3.0, 1.0)[1], single(3.0, 1.0)[0])
    with pytest.raises(ValueError):
        BrownianTreeNoiseSampler((2, 4, 8, 8), 0.03, 14.6, seed=[5])


def test_sde_sampler_with_brownian_noise_runs():
    x, sigmas, _ = make_inputs(steps=8)
    noise = BrownianTreeNoiseSampler(x.shape, float(sigmas[-2]), float(sigmas[0]), seed=1)
    for name in ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
        out = SAMPLERS[name](toy_denoise, x, sigmas, noise_sampler=noise)
        assert out.dtype == np.float32 and np.isfinite(out).all()
        np.testing.assert_array_equal(out, SAMPLERS[name](toy_denoise, x, sigmas, noise_sampler=noise))


# --- names ---

AUTOMATIC = {
    "DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
    "Restart": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
    "DPM++ 3M SDE": "Exponential", "DDIM": "DDIM", "PLMS": "DDIM", "Euler": "Uniform", "Euler a": "Uniform",
    "LMS": "Uniform", "Heun": "Uniform",
}


@pytest.mark.parametrize("sampler, schedule", AUTOMATIC.items())
def test_automatic_schedule_per_sampler(sampler, schedule):
    assert resolve(sampler).schedule == schedule


@pytest.mark.parametrize("name, sampler, schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("dpm++ 2m  karras", "DPM++ 2M", "Karras"),
    ("LMS Karras", "LMS", "Karras"),
    ("DPM2 a Karras", "DPM2 a", "Karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
    ("DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun", "Karras"),
    ("Euler a", "Euler a", "Uniform"),
    ("k_euler_a", "Euler a", "Uniform"), ("k_euler", "Euler", "Uniform"), ("k_lms", "LMS", "Uniform"),
    ("k_heun", "Heun", "Uniform"), ("k_dpm_2", "DPM2", "Karras"), ("k_dpm_2_a", "DPM2 a", "Karras"),
    ("k_dpmpp_2s_a", "DPM++ 2S a", "Karras"), ("k_dpmpp_2m", "DPM++ 2M", "Karras"),
    ("k_dpmpp_sde", "DPM++ SDE", "Karras"), ("k_dpmpp_2m_sde", "DPM++ 2M SDE", "Exponential"),
    ("k_dpm_fast", "DPM fast", "Uniform"), ("k_dpm_ad", "DPM adaptive", "Uniform"), ("ddim", "DDIM", "DDIM"),
    ("plms", "PLMS", "DDIM"), ("k_lcm", "LCM", "Uniform"), ("K_EULER_A", "Euler a", "Uniform"),
])
def test_resolve_names(name, sampler, schedule):
    resolved = resolve(name)
    assert (resolved.sampler, resolved.schedule) == (sampler, schedule)


def test_explicit_schedule_wins_and_defaults():
    assert resolve("Euler a", "karras").schedule == "Karras"
    assert resolve("DPM++ 2M Karras", "Exponential").schedule == "Exponential"
    assert resolve("DPM++ 2M", "sgm_uniform").schedule == "SGM Uniform"
    assert resolve("Euler a").options == {"eta": 1.0, "s_noise": 1.0}
    assert resolve("DDIM").options == {"eta": 0.0}
    assert resolve("Euler").options["s_tmax"] == float("inf")


def test_unknown_names_list_choices():
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M.*Euler a"):
        resolve("Euler b")
    with pytest.raises(ValueError, match="Karras"):
        resolve("Euler", "Karras2")
    with pytest.raises(ValueError, match="rho"):
        build_sigmas(resolve("Euler", "Exponential"), 10, MODEL_SIGMAS, rho=3)


def test_name_lists():
    assert SAMPLER_NAMES[:4] == ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun"]
    assert set(SAMPLERS) == set(SAMPLER_NAMES)
    assert SCHEDULER_NAMES[0] == "Automatic" and set(SCHEDULER_NAMES[1:]) == set(SCHEDULES)


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a", "DPM++ 3M SDE"])
def test_build_sigmas_discards_penultimate(name):
    resolved = resolve(name)
    assert resolved.discard_penultimate_sigma
    sigmas = build_sigmas(resolved, 10, MODEL_SIGMAS)
    full = SCHEDULES[resolved.schedule](11, MODEL_SIGMAS[0], MODEL_SIGMAS[-1])
    assert len(sigmas) == 11
    np.testing.assert_array_equal(sigmas, np.append(full[:-2], 0.0))


def test_build_sigmas_overrides():
    sigmas = build_sigmas(resolve("DPM++ 2M"), 10, MODEL_SIGMAS, sigma_min=0.1, sigma_max=10, rho=5)
    np.testing.assert_allclose(sigmas, get_sigmas_karras(10, 0.1, 10, rho=5))
    uniform = build_sigmas(resolve("Euler"), 10, MODEL_SIGMAS)
    assert len(uniform) == 11 and uniform[-1] == 0 and uniform[0] == pytest.approx(MODEL_SIGMAS[-1])


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_runs_on_its_automatic_schedule(name):
    resolved = resolve(name)
    sigmas = build_sigmas(resolved, 6, MODEL_SIGMAS)
    x = (np.random.default_rng(0).standard_normal(SHAPE) * sigmas[0]).astype(np.float32)
    noise = BrownianTreeNoiseSampler(x.shape, float(sigmas[-2]), float(sigmas[0]), seed=0)
    calls = []
    out = SAMPLERS[name](toy_denoise, x, sigmas, noise_sampler=noise, callback=calls.append, **resolved.options)
    assert out.dtype == np.float32 and out.shape == x.shape and np.isfinite(out).all()
    assert calls and set(calls[0]) == {"i", "x", "sigma", "sigma_hat", "denoised"}
    assert np.abs(out).max() < 2  # denoised toy outputs stay within ~0.6 + small


@pytest.mark.parametrize("order, variant", [(1, "bh2"), (2, "bh2"), (3, "bh1"), (3, "bh2")])
@pytest.mark.parametrize("steps", [3, 12])
def test_unipc_matches_diffusers(order, variant, steps):
    """diffusers' UniPC on the same sigmas (its bh1 turns the final step to sigma 0 into NaN: B(h) = -inf,
    so bh1 is compared with the run stopping at sigma_min, the one schedule not ending in 0 here)."""
    diffusers = pytest.importorskip("diffusers")
    final = "zero" if variant == "bh2" else "sigma_min"
    scheduler = diffusers.UniPCMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", solver_order=order,
        solver_type=variant, lower_order_final=True, final_sigmas_type=final, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    np.testing.assert_allclose(sigmas[:-1], MODEL_SIGMAS[scheduler.timesteps.numpy()], rtol=2e-5)
    sigmas[:-1] = MODEL_SIGMAS[scheduler.timesteps.numpy()]  # same table values as ddim_denoise's lookup
    sigmas[-1] = 0.0 if final == "zero" else MODEL_SIGMAS[0]
    x_vp = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    x = (x_vp * math.sqrt(1 + sigmas[0] ** 2)).astype(np.float32)
    ours = SAMPLERS["UniPC"](ddim_denoise, x, sigmas, order=order, variant=variant)
    ours = (ours / math.sqrt(1 + sigmas[-1] ** 2)).astype(np.float32)  # diffusers returns the VP latent
    ref = run_diffusers(scheduler, steps, x_vp)
    assert_close(ours, ref)
