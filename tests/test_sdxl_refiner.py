"""SDXL refiner: converted from a tiny diffusers folder (bigG encoder only, aesthetic-score time ids),
and A1111's refiner switch in one generate call, against a torch Euler loop over the same diffusers
modules: the base UNet for the first calls, the refiner's (with its own conditioning and time ids
h, w, 0, 0, 6.0 / 2.5 for the negative prompt) from refiner_switch_at on, decoded by the refiner's VAE.
Tolerance as test_parity.py (max 2, mean 0.05 in 8-bit pixel units)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_parity import NEGATIVE, PROMPT, TIGHT, _compare  # noqa: E402
from test_sdxl import CFG  # noqa: E402

from sdonnx import Pipeline  # noqa: E402
from sdonnx.diffusion.sigmas import sigma_to_t  # noqa: E402
from sdonnx.samplers import build_sigmas, resolve  # noqa: E402

STEPS, SWITCH_AT = 10, 0.8


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    _, base_torch, base_dir = tiny_sdxl("base")
    _, refiner_torch, refiner_dir = tiny_sdxl("refiner")
    return base_torch, base_dir, refiner_torch, refiner_dir


def test_refiner_manifest(models):
    *_, refiner_dir = models
    m = Pipeline.load(refiner_dir, provider="cpu").manifest
    assert m.family == "sdxl_refiner" and m.requires_aesthetics_score
    assert [(t.component, t.hidden_layer, t.pooled) for t in m.text_encoders] == [("text_encoder_2", -2, "text_embeds")]
    assert "text_encoder" not in m.components


def _denoiser(pipe, time_ids, negative_time_ids, model_sigmas):
    with torch.no_grad():
        c, u, pc, pu = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True,
                                          negative_prompt=NEGATIVE)
    context, pooled = torch.cat([u, c]), torch.cat([pu, pc])
    ids = torch.tensor([negative_time_ids, time_ids], dtype=torch.float32)

    def denoise(x, sigma):
        t = torch.full((2,), float(sigma_to_t(float(sigma), model_sigmas)))
        with torch.no_grad():
            eps = pipe.unet(torch.cat([x, x]) / (sigma**2 + 1) ** 0.5, t, encoder_hidden_states=context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        uncond, cond = (torch.cat([x, x]) - sigma * eps).chunk(2)
        return uncond + CFG * (cond - uncond)

    return denoise


def test_refiner_switch_matches_torch(models):
    base_torch, base_dir, refiner_torch, refiner_dir = models
    pipe = Pipeline.load(base_dir, provider="cpu")
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    result = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1,
                           latents=latents, refiner=refiner_dir, refiner_switch_at=SWITCH_AT)
    assert "Refiner switch at: 0.8" in result.infotext
    sigmas = build_sigmas(resolve("Euler", "Karras"), STEPS, pipe.model_sigmas)
    base = _denoiser(base_torch, [64, 64, 0, 0, 64, 64], [64, 64, 0, 0, 64, 64], pipe.model_sigmas)
    refine = _denoiser(refiner_torch, [64, 64, 0, 0, 6.0], [64, 64, 0, 0, 2.5], pipe.model_sigmas)
    x = torch.from_numpy(latents) * float(sigmas[0])
    for i in range(STEPS):  # A1111 switches at the first step i with i / steps >= switch_at: 8 of 10 here
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = (base if i / STEPS < SWITCH_AT else refine)(x, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    with torch.no_grad():
        image = refiner_torch.vae.decode(x / refiner_torch.vae.config.scaling_factor).sample
    ref = ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    _compare(result.images, ref, TIGHT, "sdxl base + refiner switch 0.8 Euler Karras vs torch")
    alone = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1,
                          latents=latents).images
    assert np.abs(np.asarray(alone[0], np.int16) - np.asarray(result.images[0], np.int16)).max() > 5


def test_refiner_reads_the_base_models_lora_and_embedding_folders(models, tmp_path):
    """The refiner pass must understand the same <lora:...> tags and embedding names as the base pass."""
    _, base_dir, _, refiner_dir = models
    (tmp_path / "emb").mkdir()
    pipe = Pipeline.load(base_dir, provider="cpu", lora_dir=tmp_path / "lora", embeddings_dir=tmp_path / "emb")
    pipe.generate(PROMPT, steps=2, sampler="Euler", seed=1, refiner=refiner_dir, refiner_switch_at=0.5)
    (refiner,) = pipe._refiners.values()
    assert refiner.lora_dir == tmp_path / "lora" and refiner.embeddings.folder == tmp_path / "emb"


def _alive_during_unet_calls(monkeypatch):
    """Per UNet call, the (family, component) of every session facade still alive (weak references after
    a garbage collection: freed means no reference left anywhere, not only gone from a cache)."""
    import gc
    import weakref

    from sdonnx.runtime import components

    made, seen = [], []
    init, run = components._Component.__init__, components.UNet.__call__

    def spy_init(self, folder, manifest, name, *args, **kwargs):
        init(self, folder, manifest, name, *args, **kwargs)
        made.append((manifest.family, name, weakref.ref(self)))

    def spy_call(self, *args, **kwargs):
        gc.collect()
        seen.append(sorted((family, name) for family, name, ref in made if ref() is not None))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(components._Component, "__init__", spy_init)
    monkeypatch.setattr(components.UNet, "__call__", spy_call)
    return made, seen


def test_lowmem_keeps_one_model_at_a_time_with_sdxl_and_its_refiner(models, monkeypatch):
    """lowmem: while a UNet runs, no text encoder (SDXL's text_encoder_2 included) and no other UNet is
    alive; the refiner's UNet loads at the switch after the base UNet is let go; the refiner's UNet and
    VAE are let go when the job ends."""
    import gc

    _, base_dir, _, refiner_dir = models
    made, seen = _alive_during_unet_calls(monkeypatch)
    pipe = Pipeline.load(base_dir, provider="cpu", lowmem=True)
    pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", seed=1, refiner=refiner_dir,
                  refiner_switch_at=SWITCH_AT)
    assert seen == [[("sdxl", "unet")]] * 8 + [[("sdxl_refiner", "unet")]] * 2, seen
    gc.collect()
    assert [(family, name) for family, name, ref in made if ref() is not None] == []
    assert {(family, name) for family, name, _ in made} >= {("sdxl", "text_encoder_2"), ("sdxl_refiner", "vae_decoder")}
