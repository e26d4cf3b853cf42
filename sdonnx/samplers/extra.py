"""A1111's samplers outside k-diffusion 0.1: Restart, LCM, PLMS and UniPC, written in sigma space."""

import math

import numpy as np

from sdonnx.samplers._common import as_sigmas, report, require_noise, to_d
from sdonnx.schedules import get_sigmas_karras


def _nearest(sigmas, value):
    return int(np.argmin(np.abs(sigmas - value)))


def restart_plan(sigmas, restart_list=None):
    """(steps, noise) of Restart sampling: the (sigma, sigma_next) pairs to integrate, A1111's defaults.

    restart_list: {min_sigma: [restart_steps, restart_times, max_sigma]}. When None, A1111's rule:
    under 20 steps no restarts; else the main Karras schedule is shortened and one (2 for >= 36 steps)
    restart segment jumps from sigma ~0.1 back up to ~2 and re-integrates it.
    """
    sigmas = as_sigmas(sigmas)
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = get_sigmas_karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]))
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restarts = {_nearest(sigmas, key): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 not in restarts:
            continue
        restart_steps, restart_times, restart_max = restarts[i + 1]
        min_idx, max_idx = i + 1, _nearest(sigmas, restart_max)
        if max_idx < min_idx:
            sigma_restart = get_sigmas_karras(restart_steps, float(sigmas[min_idx]), float(sigmas[max_idx]))[:-1]
            pairs.extend(list(zip(sigma_restart[:-1].tolist(), sigma_restart[1:].tolist())) * restart_times)
    return pairs


def sample_restart(denoise, x, sigmas, *, noise_sampler=None, callback=None, s_noise=1.0, restart_list=None):
    """Restart sampling (Xu et al. 2023): Heun steps with jumps back up in noise, as A1111 does it.

    Ignores the interior of `sigmas` when it has >= 20 steps (A1111 rebuilds a Karras schedule
    between sigmas[0] and sigmas[-2]); callback's sigma is the step's target sigma, as in A1111.
    """
    pairs = restart_plan(sigmas, restart_list)
    if any(b[0] > a[1] for a, b in zip(pairs, pairs[1:])):
        require_noise(noise_sampler, "Restart", "its restart segments add noise")
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(pairs):
        if last_sigma is not None and last_sigma < sigma:
            x = x + noise_sampler(last_sigma, sigma) * s_noise * (sigma ** 2 - last_sigma ** 2) ** 0.5
        denoised = denoise(x, sigma)
        d = to_d(x, sigma, denoised)
        report(callback, i, x, sigma_next, denoised, sigma)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        last_sigma = sigma_next
    return x


def sample_lcm(denoise, x, sigmas, *, noise_sampler=None, callback=None):
    """Latent Consistency Model sampling (Luo et al. 2023): jump to denoised, re-noise to sigma_next.

    The LCM boundary-condition scalings belong to the denoiser (the model call), not to this loop.
    """
    sigmas = as_sigmas(sigmas)
    if len(sigmas) > 2 and sigmas[1] > 0:
        require_noise(noise_sampler, "LCM")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        report(callback, i, x, sigma, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * noise_sampler(sigma, sigma_next)
    return x


# Adams-Bashforth weights on eps for 2, 3 and 4 points (Liu et al. 2022, PNDM eq. 12).
PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(denoise, x, sigmas, *, noise_sampler=None, callback=None):
    """PLMS / PNDM (Liu et al. 2022) as CompVis and A1111 run it: DDIM steps on a multistep eps.

    In sigma space the DDIM (eta=0) step with noise estimate eps is x + eps * (sigma_next - sigma).
    The first step uses a pseudo improved Euler (one extra model call at sigma_next); then the
    Adams-Bashforth weights of order 2, 3, 4 on the past noise estimates.
    """
    sigmas = as_sigmas(sigmas)
    old_eps = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        eps = to_d(x, sigma, denoised)
        report(callback, i, x, sigma, denoised)
        if not old_eps and sigma_next > 0:
            x_2 = x + eps * (sigma_next - sigma)
            eps_prime = (eps + to_d(x_2, sigma_next, denoise(x_2, sigma_next))) / 2
        else:
            history = [eps, *old_eps[::-1]][:4]
            eps_prime = sum(w * e for w, e in zip(PLMS_WEIGHTS[len(history)], history))
        x = x + eps_prime * (sigma_next - sigma)
        old_eps = [*old_eps[-2:], eps]
    return x


def _unipc_coefficients(lambdas, lambda_t, order, variant):
    """UniPC's B(h), phi_1 term, difference ratios r_k and the (R, b) system (Zhao et al. 2023, Alg. 2/3).

    lambdas: log-SNR/2 of the stored points, newest last; the newest is the step's start s0.
    """
    lambda_s0 = lambdas[-1]
    h = lambda_t - lambda_s0
    hh = -h  # data-prediction form
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(lambdas[-(k + 1)] - lambda_s0) / h for k in range(1, order)] + [1.0]
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, rks[:-1], np.array(rows), np.array(b)


def _unipc_update(x, sigma_s0, sigma_t, history, order, variant, denoised_t=None):
    """UniP predictor (denoised_t None) or UniC corrector step from history[-1] to sigma_t."""
    lambdas = [lam for lam, _ in history]
    m0 = history[-1][1]
    h_phi_1, b_h, rks, rows, b = _unipc_coefficients(lambdas, -math.log(sigma_t), order, variant)
    d1s = [(history[-(k + 2)][1] - m0) / rk for k, rk in enumerate(rks)]
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    if denoised_t is None:
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1]).tolist()
        return x_t - b_h * sum(rho * d1 for rho, d1 in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(rows, b).tolist()
    correction = sum(rho * d1 for rho, d1 in zip(rhos[:-1], d1s)) + rhos[-1] * (denoised_t - m0)
    return x_t - b_h * correction


def sample_unipc(denoise, x, sigmas, *, noise_sampler=None, callback=None, order=3, variant="bh1",
                 lower_order_final=True):
    """UniPC multistep predictor-corrector in data-prediction form (Zhao et al. 2023, arXiv:2302.04867).

    Follows diffusers' UniPCMultistepScheduler (predict_x0, corrector after every step but the last)
    in sigma space; A1111's defaults: order 3, variant "bh1", lower order on the final steps. A1111 runs
    UniPC on its own continuous-time grid; here it runs on whichever schedule `sigmas` holds.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    sigmas = as_sigmas(sigmas)
    steps = len(sigmas) - 1
    history, x_last, step_order = [], None, 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        report(callback, i, x, sigma, denoised)
        if i > 0:
            x = _unipc_update(x_last, float(sigmas[i - 1]), sigma, history, step_order, variant, denoised)
        history = [*history, (-math.log(sigma), denoised)][-order:]
        step_order = min(order, steps - i, i + 1) if lower_order_final else min(order, i + 1)
        x_last = x
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_update(x, sigma, sigma_next, history, step_order, variant)
    return x
