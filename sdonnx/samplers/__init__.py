"""A1111's samplers as pure numpy functions over k-diffusion's model call, behind A1111's names.

Contract of every `SAMPLERS[name]`:

    fn(denoise, x, sigmas, *, noise_sampler=None, callback=None, **options) -> x

- `denoise(x, sigma) -> denoised`: x [B, C, H, W] float32 in k-diffusion scaling (latent noised to
  `sigma`, not divided by sqrt(1 + sigma^2)), sigma a python float; returns the x0 estimate.
- `sigmas`: descending noise levels ending in 0 (see `build_sigmas`); len(sigmas) - 1 steps.
- `noise_sampler(sigma, sigma_next) -> array like x`: supplies every random draw, in k-diffusion's
  order. Samplers that need noise with the options given (ancestral/SDE with eta > 0, s_churn > 0,
  Restart's restarts, LCM) raise ValueError when it is None; no sampler draws random numbers itself.
- `callback(info)`: called once per step (per accepted/rejected try for "DPM adaptive") with the dict
  k-diffusion passes: {'i', 'x', 'sigma', 'sigma_hat', 'denoised'}.
- Options default to A1111's values (`resolve(...).options`); inputs are never mutated.
"""

from sdonnx.samplers.brownian import BrownianTreeNoiseSampler
from sdonnx.samplers.registry import (
    SAMPLER_INFO, SAMPLER_NAMES, SAMPLERS, Resolved, build_sigmas, resolve,
)
from sdonnx.schedules import SCHEDULER_NAMES, SCHEDULES

__all__ = [
    "SAMPLERS", "SAMPLER_INFO", "SAMPLER_NAMES", "SCHEDULES", "SCHEDULER_NAMES", "BrownianTreeNoiseSampler",
    "Resolved", "build_sigmas", "resolve",
]
