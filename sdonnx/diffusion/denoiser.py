"""The k-diffusion model call `denoise(x, sigma) -> denoised` over an eps or v UNet, with CFG."""
import numpy as np

from .sigmas import sigma_to_t


def scalings(sigma, prediction_type):
    """(c_skip, c_out, c_in) of the discrete eps / v parameterizations (k-diffusion CompVis(V)Denoiser)."""
    c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1.0), -sigma * c_in, c_in
    return 1.0, -sigma, c_in


def cfg_denoiser(unet, model_sigmas, prediction_type, cond, uncond=None, cfg_scale=1.0, cond_at=None):
    """Build denoise(x, sigma) for x: [B, C, h, w]; cond/uncond: [B, T, D].

    With guidance, one UNet call takes the batch [uncond, cond] (A1111's and diffusers' order) and the
    result is uncond + cfg_scale * (cond - uncond) on the denoised latents (the same as on the noise
    prediction: both are linear in it). cond_at(step) -> (cond, uncond), if given, supplies per-step
    conditioning (prompt editing; `step` counts model calls, as A1111's CFG denoiser does) and
    overrides cond/uncond.
    """
    guided = uncond is not None and cfg_scale != 1.0
    step = {"i": 0}

    def denoise(x, sigma):
        c, u = cond_at(step["i"]) if cond_at else (cond, uncond)
        step["i"] += 1
        c_skip, c_out, c_in = scalings(float(sigma), prediction_type)
        t = np.full(x.shape[0] * (2 if guided else 1), sigma_to_t(float(sigma), model_sigmas), np.float32)
        if guided:
            batch_x = np.concatenate([x, x]) * c_in
            context = np.concatenate(_same_length(u, c))
            out = unet(batch_x, t, context)
            denoised = x[None] * c_skip + out.reshape(2, *x.shape) * c_out
            return (denoised[0] + cfg_scale * (denoised[1] - denoised[0])).astype(np.float32)
        return (x * c_skip + unet(x * c_in, t, c) * c_out).astype(np.float32)

    return denoise


def _same_length(uncond, cond):
    """The prompt stage pads positive and negative to the same number of chunks; check it held."""
    if uncond.shape[1] != cond.shape[1]:
        raise ValueError(f"cond has {cond.shape[1]} tokens and uncond {uncond.shape[1]}: pad to equal chunks first")
    return uncond, cond
