"""DPM-Solver-1/2/3 (Lu et al. 2022, arXiv:2206.00927) with fixed ("DPM fast") or adaptive step sizes.

Works in t = -log(sigma) on eps = (x - denoised) / sigma, as k-diffusion's `DPMSolver`. The sigma
range comes from the schedule: sigma_max = sigmas[0], sigma_min = the smallest positive sigma, and
"DPM fast" takes len(sigmas) - 1 model evaluations (A1111 passes the step count as the NFE budget).
"""

import math

import numpy as np

from sdonnx.samplers._common import get_ancestral_step, report, require_noise, as_sigmas


def _sigma(t):
    return math.exp(-t)


def _log_sigma_range(sigmas):
    sigmas = as_sigmas(sigmas)
    positive = sigmas[sigmas > 0]
    if len(positive) == 0:
        raise ValueError("DPM-Solver needs at least one positive sigma")
    return -math.log(float(sigmas.max())), -math.log(float(positive.min()))


def _eps(denoise, x, t, cache, key):
    """Model noise prediction at time t, computed once per key within a step."""
    if key not in cache:
        cache[key] = (x - denoise(x, _sigma(t))) / _sigma(t)
    return cache[key]


def dpm_solver_1_step(denoise, x, t, t_next, cache):
    """First-order step (DDIM)."""
    eps = _eps(denoise, x, t, cache, "eps")
    return x - _sigma(t_next) * math.expm1(t_next - t) * eps


def dpm_solver_2_step(denoise, x, t, t_next, cache, r1=1 / 2):
    """Second-order singlestep update (Lu et al. 2022, Algorithm 4)."""
    h = t_next - t
    eps = _eps(denoise, x, t, cache, "eps")
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
    eps_r1 = _eps(denoise, u1, s1, cache, "eps_r1")
    return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps)


def dpm_solver_3_step(denoise, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
    """Third-order singlestep update (Lu et al. 2022, Algorithm 5)."""
    h = t_next - t
    eps = _eps(denoise, x, t, cache, "eps")
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
    eps_r1 = _eps(denoise, u1, s1, cache, "eps_r1")
    u2 = (x - _sigma(s2) * math.expm1(r2 * h) * eps
          - _sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = _eps(denoise, u2, s2, cache, "eps_r2")
    return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


def _ancestral_target(t, t_next, t_end, eta):
    """Time to solve the ODE to, and the noise to add afterwards, for an ancestral step."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = min(t_end, -math.log(sigma_down))
    return t_down, math.sqrt(_sigma(t_next) ** 2 - _sigma(t_down) ** 2)


def _fast_orders(nfe):
    """Orders of the steps so that their model calls add up to nfe (Lu et al. 2022, sec. 3.4)."""
    m = nfe // 3 + 1
    if nfe % 3 == 0:
        return m, [3] * (m - 2) + [2, 1]
    return m, [3] * (m - 1) + [nfe % 3]


STEPS_BY_ORDER = {1: dpm_solver_1_step, 2: dpm_solver_2_step, 3: dpm_solver_3_step}


def sample_dpm_fast(denoise, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver-Fast: fixed steps uniform in log-sigma with orders 3, ..., 3, 2, 1 (Lu et al. 2022)."""
    t_start, t_end = _log_sigma_range(sigmas)
    nfe = len(sigmas) - 1
    if eta:
        require_noise(noise_sampler, "DPM fast", "eta > 0")
    m, orders = _fast_orders(nfe)
    ts = np.linspace(t_start, t_end, m + 1)
    for i, order in enumerate(orders):
        cache = {}
        t, t_next = float(ts[i]), float(ts[i + 1])
        t_down, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps = _eps(denoise, x, t, cache, "eps")
        report(callback, i, x, _sigma(t), x - _sigma(t) * eps)
        x = STEPS_BY_ORDER[order](denoise, x, t, t_down, cache)
        if eta:
            x = x + sigma_up * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
    return x


def _pid_factor(errs, b1, b2, b3):
    """PID step-size factor from the last three inverse errors, softly limited (Soderlind 2003)."""
    factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
    return 1 + math.atan(factor - 1)


def _error(x_low, x_high, x_prev, rtol, atol):
    delta = np.maximum(atol, rtol * np.maximum(np.abs(x_low), np.abs(x_prev)))
    return float(np.linalg.norm(((x_low - x_high) / delta).ravel()) / math.sqrt(x_low.size))


def sample_dpm_adaptive(denoise, x, sigmas, *, noise_sampler=None, callback=None, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver-12/23 with PID-controlled adaptive step size (Lu et al. 2022, sec. 3.4)."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    t_start, t_end = _log_sigma_range(sigmas)
    if eta:
        require_noise(noise_sampler, "DPM adaptive", "eta > 0")
    pid_order = 1.5 if eta else order
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / pid_order, -(pcoeff + 2 * dcoeff) / pid_order, dcoeff / pid_order
    low_step, high_step = (dpm_solver_1_step, dpm_solver_2_step) if order == 2 else (
        lambda *a: dpm_solver_2_step(*a, r1=1 / 3), dpm_solver_3_step)
    s, h, x_prev, errs, steps = t_start, h_init, x, None, 0
    while s < t_end - 1e-5:
        cache = {}
        t = min(t_end, s + h)
        t_down, sigma_up = _ancestral_target(s, t, t_end, eta)
        eps = _eps(denoise, x, s, cache, "eps")
        denoised = x - _sigma(s) * eps
        x_low = low_step(denoise, x, s, t_down, cache)
        x_high = high_step(denoise, x, s, t_down, cache)
        inv_error = 1 / (_error(x_low, x_high, x_prev, rtol, atol) + 1e-8)
        errs = [inv_error] * 3 if errs is None else [inv_error, *errs[1:]]
        factor = _pid_factor(errs, b1, b2, b3)
        h *= factor
        if factor >= accept_safety:
            errs = [errs[0], errs[0], errs[1]]
            x_prev = x_low
            x = x_high
            if eta:
                x = x + sigma_up * s_noise * noise_sampler(_sigma(s), _sigma(t))
            s = t
        report(callback, steps, x, _sigma(s), denoised)
        steps += 1
    return x
