"""Euler, Heun, DPM2 (+ ancestral variants), LMS and DDIM in Karras et al. (2022) sigma space.

Every sampler: `fn(denoise, x, sigmas, *, noise_sampler=None, callback=None, **options) -> x`,
x: [B, C, H, W] latent scaled by sigma (k-diffusion convention), sigmas descending and ending in 0.
"""

import math

import numpy as np

from sdonnx.samplers._common import (
    as_sigmas, churn_gamma, get_ancestral_step, report, require_noise, to_d,
)


def _churn(x, sigma, gamma, s_noise, noise_sampler, sigma_next):
    """Raise the noise level of x from sigma to sigma * (1 + gamma) (Karras et al. 2022, Alg. 2 l.5-6)."""
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigma_next) * s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)
    return x, sigma_hat


def _churned_steps(name, denoise, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise,
                   second_step):
    """Shared loop of Euler/Heun/DPM2: churn, model call, then `second_step` finishes the step."""
    sigmas = as_sigmas(sigmas)
    steps = len(sigmas) - 1
    if s_churn > 0:
        require_noise(noise_sampler, name, "s_churn > 0 adds noise")
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = churn_gamma(s_churn, steps, sigma, s_tmin, s_tmax)
        x, sigma_hat = _churn(x, sigma, gamma, s_noise, noise_sampler, sigma_next)
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        report(callback, i, x, sigma, denoised, sigma_hat)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            x = second_step(denoise, x, d, sigma_hat, sigma_next)
    return x


def _heun_step(denoise, x, d, sigma, sigma_next):
    dt = sigma_next - sigma
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
    return x + (d + d_2) / 2 * dt


def _dpm2_step(denoise, x, d, sigma, sigma_next):
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
    return x + d_2 * (sigma_next - sigma)


def sample_euler(denoise, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps, Algorithm 2 of Karras et al. (2022)."""
    return _churned_steps("Euler", denoise, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise,
                          lambda denoise, x, d, sigma, sigma_next: x + d * (sigma_next - sigma))


def sample_heun(denoise, x, sigmas, *, noise_sampler=None, callback=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun steps, Algorithm 2 of Karras et al. (2022)."""
    return _churned_steps("Heun", denoise, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise,
                          _heun_step)


def sample_dpm_2(denoise, x, sigmas, *, noise_sampler=None, callback=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 midpoint steps (Lu et al. 2022) inside Algorithm 2 of Karras et al. (2022)."""
    return _churned_steps("DPM2", denoise, x, sigmas, noise_sampler, callback, s_churn, s_tmin, s_tmax, s_noise,
                          _dpm2_step)


def sample_euler_ancestral(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps (one noise draw per step, after the model call)."""
    sigmas = as_sigmas(sigmas)
    if eta:
        require_noise(noise_sampler, "Euler a")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, denoised)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_dpm_2_ancestral(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 midpoint steps (Lu et al. 2022)."""
    sigmas = as_sigmas(sigmas)
    if eta:
        require_noise(noise_sampler, "DPM2 a")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
            continue
        x = _dpm2_step(denoise, x, d, sigma, sigma_down)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_ddim(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=0.0, s_noise=1.0):
    """DDIM (Song et al. 2021) written in sigma space.

    With x = latent / sqrt(alphas_cumprod) and sigma^2 = (1 - alphas_cumprod) / alphas_cumprod, DDIM's
    update is an Euler step to sigma_down plus sigma_up fresh noise, where DDIM's sigma_eta works out
    to exactly k-diffusion's ancestral split with the same eta: eta=0 is the plain Euler step, eta>0
    one noise draw per step. On the "DDIM" schedule (`sdonnx.schedules.get_sigmas_ddim`) the result
    equals diffusers' DDIMScheduler(set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1):
    the last step lands on sigma = 0 (alphas_cumprod = 1), unlike CompVis/A1111 DDIM, which stops at
    alphas_cumprod[0].
    """
    if eta:
        require_noise(noise_sampler, "DDIM", "eta > 0")
    return sample_euler_ancestral(denoise, x, sigmas, noise_sampler=noise_sampler, callback=callback, eta=eta,
                                  s_noise=s_noise)


def _lagrange_integral(ts, j, t_from, t_to, nodes, weights):
    """Integral over [t_from, t_to] of the Lagrange basis polynomial j on the points ts."""
    tau = (t_to - t_from) / 2 * nodes + (t_from + t_to) / 2
    basis = np.ones_like(tau)
    for k, t_k in enumerate(ts):
        if k != j:
            basis *= (tau - t_k) / (ts[j] - t_k)
    return float((t_to - t_from) / 2 * np.dot(weights, basis))


def linear_multistep_coeffs(sigmas, i, order):
    """Adams-Bashforth weights in sigma for the last `order` derivatives (exact Gauss-Legendre)."""
    ts = [float(sigmas[i - k]) for k in range(order)]
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))
    return [_lagrange_integral(ts, j, float(sigmas[i]), float(sigmas[i + 1]), nodes, weights)
            for j in range(order)]


def sample_lms(denoise, x, sigmas, *, noise_sampler=None, callback=None, order=4):
    """Linear multistep (Adams-Bashforth) over the Karras ODE, as k-diffusion's LMS."""
    sigmas = as_sigmas(sigmas)
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        denoised = denoise(x, sigma)
        ds = [*ds[-(order - 1):], to_d(x, sigma, denoised)] if order > 1 else [to_d(x, sigma, denoised)]
        report(callback, i, x, sigma, denoised)
        coeffs = linear_multistep_coeffs(sigmas, i, min(i + 1, order))
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def sample_ddim_cfgpp(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=0.0, s_noise=1.0):
    """DDIM with CFG++ (Chung et al. 2024): the step keeps the guided x0 estimate but re-noises along the
    *unconditional* noise prediction.

    `denoise` reports the unconditional estimate of its last call as `denoise.last_uncond` (the CFG
    denoiser does; None without guidance, which makes this plain DDIM). A1111 pairs it with a CFG scale
    divided by 12.5 (SAMPLER_INFO's cfg_multiplier), mapping the usual 0..12.5 to CFG++'s 0..1.
    """
    sigmas = as_sigmas(sigmas)
    if eta:
        require_noise(noise_sampler, "DDIM CFG++", "eta > 0")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        uncond = getattr(denoise, "last_uncond", None)
        uncond = denoised if uncond is None else uncond
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, denoised)
        x = denoised + to_d(x, sigma, uncond) * sigma_down
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x
