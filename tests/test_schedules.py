"""Sigma schedules against their references.

- Karras / Exponential / Polyexponential / Uniform (get_sigmas) / sigma<->t: k-diffusion 0.1.1.post1
  (`sampling.get_sigmas_*`, `external.DiscreteSchedule`), loaded by tests/kdiffusion_ref.py.
- SGM Uniform, Normal, Simple, DDIM, KL Optimal, Align Your Steps, Beta: A1111
  `modules/sd_schedulers.py` (v1.10), transcribed below in torch/numpy on k-diffusion's
  DiscreteSchedule exactly as A1111 calls them.
- betas / model sigmas / DDIM timesteps: diffusers' schedulers.
Tolerance: k-diffusion and A1111 compute in float32; ours in float64 -> rtol 1e-5.
"""

import math

import numpy as np
import pytest

from sdonnx.diffusion.sigmas import (
    betas_from_config, discrete_sigmas, model_sigmas, sigma_to_t, t_to_sigma,
)
from sdonnx.schedules import AYS_SIGMAS_SD1, AYS_SIGMAS_SDXL, SCHEDULER_NAMES, SCHEDULES, beta_ppf

torch = pytest.importorskip("torch", reason="torch runs the reference implementations")

RTOL = 1e-5
BETAS = betas_from_config()
MODEL_SIGMAS = model_sigmas(BETAS)
SIGMA_MIN, SIGMA_MAX = float(MODEL_SIGMAS[0]), float(MODEL_SIGMAS[-1])


@pytest.fixture(scope="module")
def kd():
    import kdiffusion_ref

    try:
        return kdiffusion_ref.load()
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"k-diffusion reference not loadable: {exc}")


@pytest.fixture(scope="module")
def discrete(kd):
    """k-diffusion's DiscreteSchedule over SD's float32 alphas_cumprod, as A1111's CompVisDenoiser holds it."""
    alphas_cumprod = torch.tensor(np.cumprod(1 - BETAS), dtype=torch.float32)
    return kd[1].DiscreteSchedule(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize=False)


def check_schedule(ours, ref, n):
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == (n + 1,) and ours[-1] == 0 and np.all(np.diff(ours) < 0)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=0)


def test_betas_and_sigmas_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for beta_schedule in ("scaled_linear", "linear"):
        config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
        ref = diffusers.DDPMScheduler(**config)
        np.testing.assert_allclose(betas_from_config(**config), ref.betas.numpy(), rtol=1e-6)
    euler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref_sigmas = (((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5).numpy()
    # diffusers takes the cumprod in float32; CompVis/A1111 (and we) in float64, rounded to float32 after.
    np.testing.assert_allclose(MODEL_SIGMAS, ref_sigmas, rtol=2e-5)
    np.testing.assert_allclose(MODEL_SIGMAS[[0, -1]], [0.0291675, 14.6146], rtol=1e-5)  # A1111's sigma range
    assert MODEL_SIGMAS.shape == (1000,) and np.all(np.diff(MODEL_SIGMAS) > 0)
    with pytest.raises(ValueError, match="scaled_linear"):
        betas_from_config(beta_schedule="cosine")


def test_sigma_t_round_trip_matches_kdiffusion(discrete):
    sigmas = np.array([0.01, SIGMA_MIN, 0.05, 0.5, 1.0, 3.3, 14.0, SIGMA_MAX, 20.0])
    ref = discrete.sigma_to_t(torch.tensor(sigmas, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(sigma_to_t(sigmas, MODEL_SIGMAS), ref, rtol=1e-4, atol=1e-3)
    t = np.array([0.0, 0.25, 1.5, 499.9, 998.5, 999.0])
    ref = discrete.t_to_sigma(torch.tensor(t, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(t_to_sigma(t, MODEL_SIGMAS), ref, rtol=RTOL)
    inner = np.array([0.1, 1.0, 10.0])
    np.testing.assert_allclose(t_to_sigma(sigma_to_t(inner, MODEL_SIGMAS), MODEL_SIGMAS), inner, rtol=1e-12)
    assert isinstance(sigma_to_t(1.0, MODEL_SIGMAS), float) and isinstance(t_to_sigma(3.5, MODEL_SIGMAS), float)


@pytest.mark.parametrize("n", [1, 2, 10, 25])
def test_kdiffusion_schedules(kd, n):
    sampling = kd[0]
    check_schedule(SCHEDULES["Karras"](n, SIGMA_MIN, SIGMA_MAX),
                   sampling.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX), n)
    check_schedule(SCHEDULES["Karras"](n, 0.1, 10.0, rho=3.0), sampling.get_sigmas_karras(n, 0.1, 10.0, rho=3.0), n)
    check_schedule(SCHEDULES["Exponential"](n, SIGMA_MIN, SIGMA_MAX),
                   sampling.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX), n)
    for rho in (1.0, 2.5):
        check_schedule(SCHEDULES["Polyexponential"](n, SIGMA_MIN, SIGMA_MAX, rho=rho),
                       sampling.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=rho), n)


@pytest.mark.parametrize("n", [2, 10, 30])
def test_uniform_is_kdiffusion_get_sigmas(discrete, n):
    check_schedule(SCHEDULES["Uniform"](n, SIGMA_MIN, SIGMA_MAX, model_sigmas=MODEL_SIGMAS),
                   discrete.get_sigmas(n), n)
    np.testing.assert_array_equal(discrete_sigmas(n, MODEL_SIGMAS),
                                  SCHEDULES["Uniform"](n, None, None, model_sigmas=MODEL_SIGMAS))


# A1111 modules/sd_schedulers.py, transcribed (inner_model = k-diffusion DiscreteSchedule).

def a1111_normal(n, sigma_min, sigma_max, inner_model, sgm=False):
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    timesteps = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return [float(inner_model.t_to_sigma(ts)) for ts in timesteps] + [0.0]


def a1111_simple(n, inner_model):
    ss = len(inner_model.sigmas) / n
    return [float(inner_model.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0]


def a1111_ddim(n, inner_model):
    sigs, ss, x = [], max(len(inner_model.sigmas) // n, 1), 1
    while x < len(inner_model.sigmas):
        sigs.append(float(inner_model.sigmas[x]))
        x += ss
    return sigs[::-1] + [0.0]


def a1111_kl_optimal(n, sigma_min, sigma_max):
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    step_indices = torch.arange(n + 1)
    return torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)


def a1111_ays(n, table):
    table = list(table)
    if n == len(table):
        return table + [0.0]
    xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
    return list(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]) + [0.0]


@pytest.mark.parametrize("n", [3, 10, 30])
def test_a1111_model_schedules(discrete, n):
    table = {"model_sigmas": MODEL_SIGMAS}
    check_schedule(SCHEDULES["Normal"](n, SIGMA_MIN, SIGMA_MAX, **table),
                   a1111_normal(n, SIGMA_MIN, SIGMA_MAX, discrete), n)
    check_schedule(SCHEDULES["SGM Uniform"](n, SIGMA_MIN, SIGMA_MAX, **table),
                   a1111_normal(n, SIGMA_MIN, SIGMA_MAX, discrete, sgm=True), n)
    check_schedule(SCHEDULES["Normal"](n, 0.1, 10.0, **table), a1111_normal(n, 0.1, 10.0, discrete), n)
    check_schedule(SCHEDULES["Simple"](n, SIGMA_MIN, SIGMA_MAX, **table), a1111_simple(n, discrete), n)


@pytest.mark.parametrize("n", [1, 10, 20, 50])
def test_ddim_schedule_matches_a1111_and_diffusers(discrete, n):
    diffusers = pytest.importorskip("diffusers")
    ours = SCHEDULES["DDIM"](n, SIGMA_MIN, SIGMA_MAX, model_sigmas=MODEL_SIGMAS)
    check_schedule(ours, a1111_ddim(n, discrete), n)  # n divides 1000: A1111 makes exactly n steps
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(n)
    np.testing.assert_allclose(ours[:-1], MODEL_SIGMAS[scheduler.timesteps.numpy()], rtol=0)


def test_ddim_schedule_keeps_n_steps_when_a1111_would_not(discrete):
    """A1111's loop yields 31 sigmas for 30 steps (stride 33); we keep its first 30 (= diffusers)."""
    ours = SCHEDULES["DDIM"](30, SIGMA_MIN, SIGMA_MAX, model_sigmas=MODEL_SIGMAS)
    a1111 = a1111_ddim(30, discrete)
    assert len(a1111) == 32 and len(ours) == 31
    np.testing.assert_allclose(ours[:-1], a1111[1:-1], rtol=RTOL)
    with pytest.raises(ValueError, match="DDIM"):
        SCHEDULES["DDIM"](1000, SIGMA_MIN, SIGMA_MAX, model_sigmas=MODEL_SIGMAS)


@pytest.mark.parametrize("n", [1, 5, 20])
def test_kl_optimal_is_a1111_with_final_zero(n):
    ours = SCHEDULES["KL Optimal"](n, SIGMA_MIN, SIGMA_MAX)
    ref = a1111_kl_optimal(n, SIGMA_MIN, SIGMA_MAX).numpy()
    assert ours.shape == (n + 1,) and ours[-1] == 0
    np.testing.assert_allclose(ours[:-1], ref[:-1], rtol=RTOL)


@pytest.mark.parametrize("n", [4, 10, 11, 25])
def test_align_your_steps(n):
    check_schedule(SCHEDULES["Align Your Steps"](n, SIGMA_MIN, SIGMA_MAX), a1111_ays(n, AYS_SIGMAS_SD1), n)
    check_schedule(SCHEDULES["Align Your Steps"](n, SIGMA_MIN, SIGMA_MAX, sdxl=True),
                   a1111_ays(n, AYS_SIGMAS_SDXL), n)


@pytest.mark.parametrize("n", [2, 10, 30])
def test_beta_schedule_matches_scipy(n):
    stats = pytest.importorskip("scipy.stats")
    for alpha, beta in ((0.6, 0.6), (0.5, 0.7), (2.0, 3.0)):
        ref = [SIGMA_MIN + stats.beta.ppf(q, alpha, beta) * (SIGMA_MAX - SIGMA_MIN) for q in 1 - np.linspace(0, 1, n)]
        check_schedule(SCHEDULES["Beta"](n, SIGMA_MIN, SIGMA_MAX, alpha=alpha, beta=beta), ref + [0.0], n)


def test_beta_ppf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in ((0.6, 0.6), (0.3, 2.0), (5.0, 1.5)):
        for q in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999999):
            assert beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_is_descending_and_ends_in_zero(name):
    for n in (2, 7, 40):
        sigmas = SCHEDULES[name](n, SIGMA_MIN, SIGMA_MAX, model_sigmas=MODEL_SIGMAS)
        assert sigmas.shape == (n + 1,) and sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0), name
        assert sigmas[0] <= SIGMA_MAX * (1 + 1e-4) and sigmas[0] > 1  # AYS starts at 14.615


@pytest.mark.parametrize("name", ["Uniform", "SGM Uniform", "Simple", "Normal", "DDIM"])
def test_table_schedules_need_the_table(name):
    with pytest.raises(ValueError, match="model_sigmas"):
        SCHEDULES[name](10, SIGMA_MIN, SIGMA_MAX)


def test_scheduler_names_in_a1111_order():
    assert SCHEDULER_NAMES == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                               "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
    assert not math.isnan(SCHEDULES["Karras"](3, 0.1, 10)[0])
