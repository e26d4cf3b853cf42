"""The model's discrete noise levels: betas -> sigmas, and sigma <-> fractional timestep.

Follows k-diffusion's `DiscreteSchedule` (the table A1111 wraps every SD 1.x/2.x/XL UNet in):
sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t), ascending in t, and conversions that
interpolate linearly in log-sigma between neighbouring table entries.
"""

import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")


def betas_from_config(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000):
    """Training betas as diffusers/CompVis build them (float64): [num_train_timesteps]."""
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def model_sigmas(betas):
    """Ascending noise levels of the discrete model (Ho et al. 2020 in Karras et al. 2022 form).

    alphas_cumprod is rounded to float32 as CompVis/A1111 and diffusers store it; at t=0 that moves
    sigma by ~1e-5 relative (1 - alphas_cumprod cancels), and every sigma_min users know carries it.
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)).astype(np.float32).astype(np.float64)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigma_to_t(sigma, model_sigmas):
    """Fractional timestep of sigma, interpolating in log-sigma (k-diffusion DiscreteSchedule)."""
    log_sigmas = np.log(np.asarray(model_sigmas, dtype=np.float64))
    log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
    low_idx = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0.0, 1.0)
    t = (1.0 - w) * low_idx + w * (low_idx + 1)
    return float(t) if np.ndim(t) == 0 else t


def t_to_sigma(t, model_sigmas):
    """Sigma at fractional timestep t, interpolating in log-sigma (k-diffusion DiscreteSchedule)."""
    log_sigmas = np.log(np.asarray(model_sigmas, dtype=np.float64))
    t = np.asarray(t, dtype=np.float64)
    low_idx = np.floor(t).astype(np.int64)
    high_idx = np.ceil(t).astype(np.int64)
    w = t - low_idx
    sigma = np.exp((1.0 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx])
    return float(sigma) if np.ndim(sigma) == 0 else sigma


def discrete_sigmas(n, model_sigmas):
    """The model's own n sigmas plus 0, evenly spaced in t (k-diffusion `get_sigmas`): [n + 1]."""
    t = np.linspace(len(model_sigmas) - 1, 0, n)
    return np.append(t_to_sigma(t, model_sigmas), 0.0)
