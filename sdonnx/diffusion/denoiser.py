"""The k-diffusion model call `denoise(x, sigma) -> denoised` over an eps or v UNet, with CFG."""
from typing import NamedTuple

import numpy as np

from .sigmas import sigma_to_t


class Cond(NamedTuple):
    """A conditioning entry that carries the UNet's added inputs beside its context (SDXL)."""

    context: np.ndarray  # [T, D] (or [B, T, D])
    added: dict  # UNet input name -> [P] per image (or [B, P]): text_embeds, time_ids


def context_of(entry):
    """The context [T, D] of a conditioning entry: a Cond's, or the entry itself (an array)."""
    return entry.context if isinstance(entry, Cond) else entry


def scalings(sigma, prediction_type):
    """(c_skip, c_out, c_in) of the discrete eps / v parameterizations (k-diffusion CompVis(V)Denoiser)."""
    c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1.0), -sigma * c_in, c_in
    return 1.0, -sigma, c_in


def cfg_denoiser(unet, model_sigmas, prediction_type, cond=None, uncond=None, cfg_scale=1.0, cond_at=None,
                 row_roles=False):
    """Build denoise(x, sigma) for x: [B, C, h, w]; cond/uncond: [B, T, D] (or [T, D], shared by the batch).

    With guidance, one UNet call takes the batch [uncond, cond_1, ..., cond_k] and the result is
    uncond + sum_i w_i * cfg_scale * (cond_i - uncond) on the denoised latents (A1111's composable
    diffusion; the same as on the noise prediction, both being linear in it). cond_at(step) ->
    (uncond or None, [(cond_i, w_i)]), if given, supplies per-step conditioning (prompt editing) and
    overrides cond/uncond; `step` counts model calls from 0, as A1111's CFG denoiser does, so a Heun
    step counts twice. row_roles: also tell the unet how many leading rows of its batch are the negative
    prompt's (`uncond_rows=`; ControlNet's cond-only control needs it).
    """
    step = {"i": 0}

    def denoise(x, sigma):
        u, conds = cond_at(step["i"]) if cond_at else (uncond, [(cond, 1.0)])
        step["i"] += 1
        guided = u is not None and (cfg_scale != 1.0 or len(conds) > 1 or conds[0][1] != 1.0)
        c_skip, c_out, c_in = scalings(float(sigma), prediction_type)
        batch = len(x)
        entries = [u, *[c for c, _ in conds]] if guided else [conds[0][0]]
        contexts = [_per_image(context_of(e), batch) for e in entries]
        _same_length(contexts)
        n = len(contexts)
        t = np.full(batch * n, sigma_to_t(float(sigma), model_sigmas), np.float32)
        roles = {"uncond_rows": batch if guided else 0} if row_roles else {}
        out = unet(np.concatenate([x] * n) * c_in, t, np.concatenate(contexts), **_added(entries, batch), **roles)
        denoised = x[None] * c_skip + out.reshape(n, *x.shape) * c_out
        if not guided:
            denoise.last_uncond = None
            return denoised[0].astype(np.float32)
        denoise.last_uncond = denoised[0].astype(np.float32)  # CFG++ samplers re-noise along it
        result = denoised[0]
        for k, (_, weight) in enumerate(conds, start=1):
            result = result + (weight * cfg_scale) * (denoised[k] - denoised[0])
        return result.astype(np.float32)

    denoise.last_uncond = None
    return denoise


def _added(entries, batch):
    """The entries' added UNet inputs batched in the same [uncond, cond_1, ...] order as the contexts."""
    if not isinstance(entries[0], Cond):
        return {}
    return {name: np.concatenate([_per_image(e.added[name], batch, ndim=1) for e in entries])
            for name in entries[0].added}


def _per_image(context, batch, ndim=2):
    context = np.asarray(context, np.float32)
    return np.broadcast_to(context, (batch, *context.shape)) if context.ndim == ndim else context


def _same_length(contexts):
    """The prompt stage pads positive and negative to the same number of chunks; check it held."""
    lengths = {c.shape[1] for c in contexts}
    if len(lengths) > 1:
        raise ValueError(f"conditionings have {sorted(lengths)} tokens: pad to equal chunks first")
