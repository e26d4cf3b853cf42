"""Torch references for parity tests: the diffusers pipeline itself, and k-diffusion's samplers over
the same diffusers modules (what A1111 runs)."""
import numpy as np
import torch


def diffusers_images(pipe, scheduler, prompt, negative_prompt, latents, steps, cfg_scale, generator=None, **extra):
    """Run the torch pipeline with `scheduler` on the given initial noise; uint8 [B, H, W, 3]. extra: more
    arguments of the pipeline's call (a ControlNet pipeline's image and conditioning scale)."""
    pipe.scheduler = scheduler
    lat = torch.from_numpy(latents)
    h, w = lat.shape[2] * pipe.vae_scale_factor, lat.shape[3] * pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe([prompt] * lat.shape[0], negative_prompt=[negative_prompt] * lat.shape[0], latents=lat,
                   num_inference_steps=steps, guidance_scale=cfg_scale, height=h, width=w,
                   output_type="np", generator=generator, **extra).images
    return (out * 255).round().astype(np.uint8)


class _CompVisShim(torch.nn.Module):
    """What k-diffusion's CompVis wrappers expect: apply_model(x, t, cond) and alphas_cumprod."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]


def kdiffusion_images(pipe, kdiff, sampler_fn, sigmas, prompt, negative_prompt, latents, cfg_scale,
                      prediction_type, noise=None, init_scale=None):
    """k-diffusion sampler + diffusers modules; `noise` is a list of per-step noise arrays (or None)."""
    sampling, external = kdiff
    shim = _CompVisShim(pipe.unet, pipe.scheduler.alphas_cumprod.float())
    wrapper = external.CompVisVDenoiser if prediction_type == "v_prediction" else external.CompVisDenoiser
    model = wrapper(shim, quantize=False)
    b = latents.shape[0]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt([prompt] * b, "cpu", 1, True, [negative_prompt] * b)

        def denoise(x, sigma, **_):
            out = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond]))
            u, c = out.chunk(2)
            return u + cfg_scale * (c - u)

        draws = iter(noise or [])
        kwargs = {"noise_sampler": lambda s, sn: torch.from_numpy(next(draws))} if noise is not None else {}
        sig = torch.tensor(np.asarray(sigmas), dtype=torch.float32)
        scale = sig[0] if init_scale is None else init_scale
        x = sampler_fn(denoise, torch.from_numpy(latents) * scale, sig, disable=True, **kwargs)
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)
