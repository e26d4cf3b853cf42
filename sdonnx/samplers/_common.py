"""Pieces every sampler shares: the Karras ODE derivative, ancestral step sizes, callbacks, noise checks."""

import math

import numpy as np


def as_sigmas(sigmas):
    """Sigmas as a float64 vector (steps use python floats from it)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a vector of at least 2 values, got shape {sigmas.shape}")
    return sigmas


def to_d(x, sigma, denoised):
    """Denoiser output -> derivative dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    sigma_down = math.sqrt(sigma_to ** 2 - sigma_up ** 2)
    return sigma_down, sigma_up


def require_noise(noise_sampler, sampler, why="it is stochastic"):
    """Raise unless a noise sampler was given; samplers never draw hidden random numbers."""
    if noise_sampler is None:
        raise ValueError(f"sampler {sampler!r} needs a noise_sampler(sigma, sigma_next) because {why}")
    return noise_sampler


def report(callback, i, x, sigma, denoised, sigma_hat=None):
    """Call callback(info) with k-diffusion's dict: i, x, sigma, sigma_hat, denoised."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


def churn_gamma(s_churn, steps, sigma, s_tmin, s_tmax):
    """Karras et al. (2022) Algorithm 2 churn: how far to raise sigma before the step."""
    return min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0

