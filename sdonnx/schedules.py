"""Sigma schedules by A1111 "Schedule type" name: `fn(n, sigma_min, sigma_max, **options) -> sigmas`.

Every schedule returns n + 1 descending float64 sigmas ending in 0 (n sampler steps). All accept
`model_sigmas=` (the ascending table from `sdonnx.diffusion.sigmas.model_sigmas`) so callers can pass
it uniformly; Uniform, SGM Uniform, Simple, Normal and DDIM need it, the others ignore it. Options
beyond that: rho (Karras 7, Polyexponential 1), sdxl (Align Your Steps), alpha/beta (Beta, 0.6/0.6).
Karras, Exponential and Polyexponential follow k-diffusion's `get_sigmas_*`; the rest follow A1111's
`modules/sd_schedulers.py` (differences noted per function).
"""

import math

import numpy as np

from sdonnx.diffusion.sigmas import discrete_sigmas, sigma_to_t, t_to_sigma

# Align Your Steps reference sigmas for 10 steps (NVIDIA's published table, as A1111 ships it).
AYS_SIGMAS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SIGMAS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def _append_zero(sigmas):
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def _need_table(name, model_sigmas):
    if model_sigmas is None:
        raise ValueError(f"schedule {name!r} needs the model's sigma table: pass model_sigmas=")
    return np.asarray(model_sigmas, dtype=np.float64)


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, *, model_sigmas=None):
    """Noise schedule of Karras et al. (2022), eq. 5."""
    ramp = np.linspace(0.0, 1.0, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(n, sigma_min, sigma_max, *, model_sigmas=None):
    """Sigmas evenly spaced in log-sigma."""
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, *, model_sigmas=None):
    """Sigmas spaced as a polynomial (power rho) in log-sigma."""
    ramp = np.linspace(1.0, 0.0, n) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero(np.exp(ramp * (log_max - log_min) + log_min))


def get_sigmas_uniform(n, sigma_min=None, sigma_max=None, *, model_sigmas=None):
    """The model's own discrete sigmas, evenly spaced in t (k-diffusion `get_sigmas`); ignores the range."""
    return discrete_sigmas(n, _need_table("Uniform", model_sigmas))


def _sigmas_linear_in_t(n, sigma_min, sigma_max, model_sigmas, drop_last):
    table = _need_table("SGM Uniform" if drop_last else "Normal", model_sigmas)
    start, end = sigma_to_t(sigma_max, table), sigma_to_t(sigma_min, table)
    t = np.linspace(start, end, n + 1)[:-1] if drop_last else np.linspace(start, end, n)
    return _append_zero(t_to_sigma(t, table))


def get_sigmas_normal(n, sigma_min, sigma_max, *, model_sigmas=None):
    """Sigmas at timesteps evenly spaced from t(sigma_max) to t(sigma_min) (A1111 "Normal")."""
    return _sigmas_linear_in_t(n, sigma_min, sigma_max, model_sigmas, drop_last=False)


def get_sigmas_sgm_uniform(n, sigma_min, sigma_max, *, model_sigmas=None):
    """As "Normal" but with n + 1 timesteps, the last dropped (SGM / SDXL Turbo spacing)."""
    return _sigmas_linear_in_t(n, sigma_min, sigma_max, model_sigmas, drop_last=True)


def get_sigmas_simple(n, sigma_min=None, sigma_max=None, *, model_sigmas=None):
    """Every (T/n)-th table sigma counted down from the top (A1111/ComfyUI "Simple")."""
    table = _need_table("Simple", model_sigmas)
    stride = len(table) / n
    return _append_zero([table[-(1 + int(i * stride))] for i in range(n)])


def get_sigmas_ddim(n, sigma_min=None, sigma_max=None, *, model_sigmas=None):
    """DDIM's "uniform" timesteps 1, 1+c, ..., 1+(n-1)c with c = T // n (Song et al. 2021), reversed.

    Equals diffusers' DDIMScheduler timesteps with timestep_spacing="leading", steps_offset=1.
    A1111 keeps stepping by c up to T, which gives more than n steps when n does not divide T;
    here exactly n are returned.
    """
    table = _need_table("DDIM", model_sigmas)
    if not 0 < n < len(table):
        raise ValueError(f"DDIM schedule needs 0 < steps < {len(table)}, got {n}")
    stride = len(table) // n
    return _append_zero(table[1 + stride * np.arange(n)][::-1])


def get_sigmas_kl_optimal(n, sigma_min, sigma_max, *, model_sigmas=None):
    """Sigmas linear in arctan(sigma) (Sabour et al. 2024, "Align Your Steps" appendix; A1111 "KL Optimal").

    A1111 returns tan of the n + 1 points and so stops at sigma_min; the last one is 0 here so the
    final step denoises fully (all other sigmas equal A1111's).
    """
    frac = np.arange(n + 1) / n
    sigmas = np.tan(frac * math.atan(sigma_min) + (1.0 - frac) * math.atan(sigma_max))
    sigmas[-1] = 0.0
    return sigmas


def _loglinear_interp(sigmas, n):
    xs = np.linspace(0.0, 1.0, len(sigmas))
    ys = np.log(np.asarray(sigmas, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0.0, 1.0, n), xs, ys))[::-1]


def get_sigmas_ays(n, sigma_min=None, sigma_max=None, *, sdxl=False, model_sigmas=None):
    """Align Your Steps (Sabour et al. 2024) table, log-linearly resampled to n; ignores the range."""
    table = AYS_SIGMAS_SDXL if sdxl else AYS_SIGMAS_SD1
    sigmas = np.asarray(table, dtype=np.float64) if n == len(table) else _loglinear_interp(table, n)
    return _append_zero(sigmas)


def _betacf(a, b, x, max_iter=300, eps=1e-15):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q, a, b):
    """Quantile of the Beta(a, b) distribution by bisection (scipy.stats.beta.ppf without scipy)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def get_sigmas_beta(n, sigma_min, sigma_max, alpha=0.6, beta=0.6, *, model_sigmas=None):
    """Sigmas at Beta(alpha, beta) quantiles of [sigma_min, sigma_max] (Lee et al. 2024; A1111 "Beta")."""
    quantiles = [beta_ppf(q, alpha, beta) for q in 1.0 - np.linspace(0.0, 1.0, n)]
    return _append_zero([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


SCHEDULES = {
    "Uniform": get_sigmas_uniform,
    "Karras": get_sigmas_karras,
    "Exponential": get_sigmas_exponential,
    "Polyexponential": get_sigmas_polyexponential,
    "SGM Uniform": get_sigmas_sgm_uniform,
    "KL Optimal": get_sigmas_kl_optimal,
    "Align Your Steps": get_sigmas_ays,
    "Simple": get_sigmas_simple,
    "Normal": get_sigmas_normal,
    "DDIM": get_sigmas_ddim,
    "Beta": get_sigmas_beta,
}

# A1111's "Schedule type" dropdown, in order; "Automatic" picks the sampler's default.
SCHEDULER_NAMES = ["Automatic", *SCHEDULES]

# Schedules whose rho the user may override (A1111 `default_rho`).
DEFAULT_RHO = {"Karras": 7.0, "Polyexponential": 1.0}
