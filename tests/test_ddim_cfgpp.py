"""DDIM CFG++: the sigma-space sampler against A1111's DDPM-space update, written out here.

A1111 (sd_samplers_timesteps_impl.ddim_cfgpp, eta 0): pred_x0 from the guided noise, then
x_prev = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev) * eps_uncond, with the CFG scale divided by 12.5.
The last step lands on a_prev = 1 here (sigma 0), as every sdonnx sampler does.
"""
import numpy as np

from sdonnx.diffusion.sigmas import betas_from_config, model_sigmas, sigma_to_t
from sdonnx.samplers import SAMPLER_INFO, SAMPLERS, build_sigmas, resolve

TABLE = model_sigmas(betas_from_config())


def _eps(x, t, which):
    """Toy noise predictions, different for cond and uncond, depending on x and t."""
    phase = 0.3 if which == "cond" else -0.2
    return np.tanh(x * (0.5 + t / 2000) + phase).astype(np.float64)


def test_ddim_cfgpp_equals_a1111_update():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 4, 5, 6))
    cfg = 7.0 * SAMPLER_INFO["DDIM CFG++"].cfg_multiplier
    sigmas = build_sigmas(resolve("DDIM CFG++"), 6, TABLE)

    def denoise(x, sigma):
        t = sigma_to_t(sigma, TABLE)
        x_in = x / (1 + sigma**2) ** 0.5
        e_u, e_c = _eps(x_in, t, "uncond"), _eps(x_in, t, "cond")
        denoise.last_uncond = x - sigma * e_u
        return x - sigma * (e_u + cfg * (e_c - e_u))

    denoise.last_uncond = None
    ours = SAMPLERS["DDIM CFG++"](denoise, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas)

    alphas = 1 / (1 + sigmas**2)  # alphas_cumprod at each sigma; the final sigma 0 is alpha 1
    x = noise.copy()
    for k in range(len(sigmas) - 1):
        a_t, a_prev = alphas[k], alphas[k + 1]
        t = sigma_to_t(sigmas[k], TABLE)
        e_u, e_c = _eps(x, t, "uncond"), _eps(x, t, "cond")
        e_t = e_u + cfg * (e_c - e_u)
        pred_x0 = (x - np.sqrt(1 - a_t) * e_t) / np.sqrt(a_t)
        x = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * e_u
    np.testing.assert_allclose(ours, x, rtol=1e-9, atol=1e-9)


def test_without_guidance_it_is_ddim():
    noise = np.random.default_rng(1).standard_normal((1, 4, 3, 3))
    sigmas = build_sigmas(resolve("DDIM"), 5, TABLE)

    def denoise(x, sigma):
        return np.tanh(x) * 0.5

    denoise.last_uncond = None
    np.testing.assert_allclose(SAMPLERS["DDIM CFG++"](denoise, noise, sigmas), SAMPLERS["DDIM"](denoise, noise, sigmas))


def test_through_the_pipeline(tiny_onnx):
    from sdonnx import Pipeline

    pipe = Pipeline.load(tiny_onnx("sd1"), provider="cpu")
    cfgpp = pipe.generate("a cat", "dog", steps=4, sampler="DDIM CFG++", seed=3)
    ddim = pipe.generate("a cat", "dog", steps=4, sampler="DDIM", seed=3)
    assert "Sampler: DDIM CFG++" in cfgpp.infotext
    assert not np.array_equal(np.asarray(cfgpp.images[0]), np.asarray(ddim.images[0]))
