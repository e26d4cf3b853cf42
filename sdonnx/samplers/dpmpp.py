"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in k-diffusion's sigma form.

Time variable t = -log(sigma); h = t_next - t is the step in log-SNR/2. Every sampler:
`fn(denoise, x, sigmas, *, noise_sampler=None, callback=None, **options) -> x`.
"""

import math

from sdonnx.samplers._common import as_sigmas, get_ancestral_step, report, require_noise, to_d


def _exp_step(x, sigma, sigma_next, denoised):
    """First-order DPM-Solver++ step (= DDIM) from sigma to sigma_next towards denoised."""
    if sigma_next == 0:
        return denoised
    return (sigma_next / sigma) * x - math.expm1(math.log(sigma_next) - math.log(sigma)) * denoised


def sample_dpmpp_2s_ancestral(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) second-order single-step updates."""
    sigmas = as_sigmas(sigmas)
    if eta:
        require_noise(noise_sampler, "DPM++ 2S a")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_2 = _exp_step(x, sigma, sigma_mid, denoised)
            x = _exp_step(x, sigma, sigma_down, denoise(x_2, sigma_mid))
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def _sde_substep(x, sigma, sigma_to, denoised, eta, s_noise, noise_sampler):
    """Ancestral DPM-Solver++ first-order move from sigma to sigma_to with the given denoised estimate."""
    sigma_down, sigma_up = get_ancestral_step(sigma, sigma_to, eta)
    x = _exp_step(x, sigma, sigma_down, denoised)
    if eta:
        x = x + noise_sampler(sigma, sigma_to) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ stochastic (SDE-DPM-Solver++ with an intermediate point at fraction r of the step)."""
    sigmas = as_sigmas(sigmas)
    if eta:
        require_noise(noise_sampler, "DPM++ SDE")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        sigma_s = math.exp(-(t + r * (t_next - t)))
        x_2 = _sde_substep(x, sigma, sigma_s, denoised, eta, s_noise, noise_sampler)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoise(x_2, sigma_s)
        x = _sde_substep(x, sigma, sigma_next, denoised_d, eta, s_noise, noise_sampler)
    return x


def sample_dpmpp_2m(denoise, x, sigmas, *, noise_sampler=None, callback=None):
    """DPM-Solver++(2M): second-order multistep, reusing the previous denoised estimate."""
    sigmas = as_sigmas(sigmas)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        report(callback, i, x, sigma, denoised)
        if old_denoised is None or sigma_next == 0:
            x = _exp_step(x, sigma, sigma_next, denoised)
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_last = math.log(float(sigmas[i - 1])) - math.log(sigma)
            half_inv_r = h / (2 * h_last)
            x = _exp_step(x, sigma, sigma_next, (1 + half_inv_r) * denoised - half_inv_r * old_denoised)
        old_denoised = denoised
    return x


def _sde_noise(x, noise_sampler, sigma, sigma_next, h, eta, s_noise):
    """Noise of the exact SDE solution over a log-sigma step h (eta scales the SDE's noise)."""
    if not eta:
        return x
    return x + noise_sampler(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)


def sample_dpmpp_2m_sde(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint"):
    """DPM-Solver++(2M) SDE, with a midpoint or Heun second-order correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas = as_sigmas(sigmas)
    if eta:
        require_noise(noise_sampler, "DPM++ 2M SDE")
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            old_denoised = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        eta_h = eta * h
        phi_1 = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma * math.exp(-eta_h)) * x + phi_1 * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (phi_1 / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * phi_1 * (1 / r) * (denoised - old_denoised)
        x = _sde_noise(x, noise_sampler, sigma, sigma_next, h, eta, s_noise)
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2m_sde_heun(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the Heun correction (A1111 "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(denoise, x, sigmas, noise_sampler=noise_sampler, callback=callback, eta=eta,
                               s_noise=s_noise, solver_type="heun")


def sample_dpmpp_3m_sde(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep over the last three denoised estimates."""
    sigmas = as_sigmas(sigmas)
    if eta:
        require_noise(noise_sampler, "DPM++ 3M SDE")
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            h = h_1
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            x = _sde_noise(x, noise_sampler, sigma, sigma_next, h, eta, s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
