"""Orchestration: a generate call as a short list of named stages.

request -> prompt conditioning -> sigmas -> initial noise (seeded) -> denoise loop (sampler) ->
VAE decode -> images + infotext.
"""
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .adapters.lora import Loras, lora_requests
from .adapters.textual_inversion import EmbeddingDatabase
from .diffusion.denoiser import cfg_denoiser
from .diffusion.rng import ImageRNG
from .diffusion.sigmas import betas_from_config, model_sigmas
from .image import latents_to_images
from .infotext import format_infotext
from .manifest import load_manifest
from .prompt import extract_networks
from .prompt.conditioning import PromptEncoder, check_emphasis, encode_prompt
from .runtime import providers as providers_mod
from .runtime.components import TextEncoder, UNet, VaeDecoder, VaeEncoder
from .samplers import SAMPLERS, BrownianTreeNoiseSampler, build_sigmas, resolve
from .text.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
DEFAULT_LORA_DIR = Path("models") / "Lora"
DEFAULT_EMBEDDINGS_DIR = Path("models") / "embeddings"
# k-diffusion draws these samplers' noise from a Brownian tree (A1111 too)
BROWNIAN_SAMPLERS = frozenset({"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"})
# A1111 runs these on DDPM timesteps: the initial latent is the unit-variance noise itself, which in
# k-diffusion scaling is noise * sqrt(1 + sigma^2), not noise * sigma (diffusers' DDIM agrees)
TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})


class Interrupted(Exception):
    """Raised from a generate callback to stop sampling (the server's interrupt)."""


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list
    infotexts: list  # one A1111 "parameters" text per image
    parameters: dict = field(default_factory=dict)
    interrupted: bool = False  # a callback raised Interrupted: the images so far, the last one unfinished

    @property
    def infotext(self):
        return self.infotexts[0] if self.infotexts else ""


class Pipeline:
    """A converted model folder, ready to generate. Sessions are created on first use and cached."""

    def __init__(self, folder, manifest, plan, lora_dir=None, embeddings_dir=None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.plan = plan
        self._components = {}
        self.lora_dir = Path(lora_dir or DEFAULT_LORA_DIR)
        self._loras = None  # adapters.lora.Loras, made on the first LoRA tag
        self._lora_keys = {}  # component -> cache key of the active LoRA set
        self._lora_components = {}  # (component, key) -> component built with merged weights
        info = manifest.text_encoders[0]
        self.tokenizer = ClipTokenizer.from_model(self.folder, info)
        # textual inversion: a folder the user names must exist; the default one may be absent
        self.embeddings = EmbeddingDatabase(embeddings_dir or DEFAULT_EMBEDDINGS_DIR, self.tokenizer,
                                            required=embeddings_dir is not None)
        ns = manifest.noise_schedule
        self.model_sigmas = model_sigmas(betas_from_config(ns.beta_start, ns.beta_end, ns.beta_schedule,
                                                           ns.num_train_timesteps))

    @classmethod
    def load(cls, path, provider="auto", device_id=0, lora_dir=None, embeddings_dir=None):
        """Read the model folder's manifest and choose execution providers (no session is created yet).

        lora_dir: where `<lora:name:...>` tags find their files (default models/Lora); embeddings_dir:
        textual inversion files, used by file name in prompts (default models/embeddings)."""
        manifest = load_manifest(path)
        return cls(path, manifest, providers_mod.plan(provider, device_id), lora_dir=lora_dir,
                   embeddings_dir=embeddings_dir)

    @property
    def providers(self):
        return list(self.plan.names)

    def _component(self, name):
        if name in self._lora_keys:
            return self._lora_components[(name, self._lora_keys[name])]
        if name not in self._components:
            kind = {"text_encoder": TextEncoder, "unet": UNet, "vae_decoder": VaeDecoder, "vae_encoder": VaeEncoder}
            self._components[name] = kind[name](self.folder, self.manifest, name, self.plan)
        return self._components[name]

    def set_loras(self, requests):
        """Give the text encoder and UNet these LoRAs ([LoraRequest]; [] restores the base sessions exactly).

        Merged sessions are cached per LoRA set, one per component besides the base. Returns the
        `Lora hashes` infotext value ({name: short hash}), or None without LoRAs."""
        if not requests:
            self._lora_keys = {}
            return None
        if self._loras is None:
            self._loras = Loras(self.folder, self.manifest, self.lora_dir)
        applied = self._loras.apply(requests)
        kind = {"text_encoder": TextEncoder, "unet": UNet}
        for name, key in applied.keys.items():
            if (name, key) not in self._lora_components:
                for old in [k for k in self._lora_components if k[0] == name]:
                    del self._lora_components[old]
                self._lora_components[(name, key)] = kind[name](self.folder, self.manifest, name, self.plan,
                                                                replacements=applied.replacements[name])
        self._lora_keys = dict(applied.keys)
        return applied.hashes

    # ------------------------------------------------------------------ stages

    def encode_prompts(self, prompt, negative_prompt="", steps=1, clip_skip=1, emphasis="Original", guidance=True):
        """Prompt and negative prompt (A1111 prompt language, extra-network tags already taken out) ->
        (Conditioning with at(step) for the denoiser, infotext params: TI hashes, Emphasis)."""
        self.embeddings.refresh()
        encoder = PromptEncoder(self.tokenizer, self._component("text_encoder"), self.embeddings,
                                clip_skip=clip_skip, emphasis=check_emphasis(emphasis))
        conditioning = encode_prompt(encoder, prompt, negative_prompt, steps, guidance=guidance)
        hashes = {name.replace(":", "").replace(",", ""): e.shorthash for name, e in encoder.used.items()}
        emphasized = emphasis != "Original" and any(c in prompt + negative_prompt for c in "([")
        return conditioning, {"TI hashes": hashes or None, "Emphasis": emphasis if emphasized else None}

    def decode(self, latents):
        """latents: [B, C, h, w] in the sampler's scale -> PIL images."""
        decoded = self._component("vae_decoder")(latents / self.manifest.vae_scaling_factor)
        return latents_to_images(decoded)

    # ------------------------------------------------------------------ generate

    def generate(self, prompt, negative_prompt="", steps=20, cfg_scale=7.0, sampler="Euler a",
                 scheduler="Automatic", seed=-1, width=None, height=None, batch_size=1, batch_count=1,
                 latents=None, callback=None, rng="nv", noise_sampler=None, clip_skip=1, preview=None,
                 subseed=-1, subseed_strength=0.0, seed_resize_from_w=0, seed_resize_from_h=0, ensd=0,
                 sigma_min=None, sigma_max=None, rho=None, emphasis="Original", **sampler_options):
        """txt2img. Returns GenerationResult(images, seeds, infotexts).

        latents: the initial noise as diffusers takes it, [batch_size, C, H/f, W/f], before scaling by the
        first sigma. callback(step, total) is called after every sampler step of every batch; when it raises
        Interrupted, sampling stops and the result holds the finished batches plus, as A1111 shows an
        interrupted image, the current batch decoded from its last x0 estimate (result.interrupted is True).
        noise_sampler(sigma, sigma_next) overrides the per-step noise of stochastic samplers (advanced: to
        match another implementation's random stream). preview(denoised) gets each step's x0 estimate
        [batch_size, C, H/f, W/f] (live previews).

        Seeds as A1111: image i of the job uses seed + i; subseed/subseed_strength give variation seeds,
        seed_resize_from_w/h A1111's "resize seed from"; ensd is the eta noise seed delta (ancestral and
        SDE noise). sigma_min/sigma_max/rho override the schedule; sampler_options (eta, s_churn, s_tmin,
        s_tmax, s_noise, ...) go to the sampler, defaulting to A1111's values.
        """
        m = self.manifest
        width, height = _check_size(width or m.native_size, height or m.native_size, m.vae_scale_factor)
        resolved = resolve(sampler, scheduler)
        _check_sampler_options(resolved.sampler, sampler_options)
        steps = _positive_int("steps", steps)
        batch_size = _positive_int("batch_size", batch_size)
        batch_count = _positive_int("batch_count", batch_count)
        seed = random.randint(0, MAX_SEED) if seed is None or int(seed) == -1 else int(seed)
        shape = (m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (batch_size, *shape):
                raise ValueError(f"latents have shape {latents.shape}; expected {(batch_size, *shape)} "
                                 f"for batch size {batch_size} at {width}x{height}")
        sigmas = build_sigmas(resolved, steps, self.model_sigmas, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        variation = subseed_strength > 0
        subseed = (random.randint(0, MAX_SEED) if subseed is None or int(subseed) == -1 else int(subseed)) if variation else None
        # --- conditioning start (prompt language: issue 4)
        prompt_text, networks = extract_networks(prompt)  # A1111 takes tags from the positive prompt only
        lora_hashes = self.set_loras(lora_requests(networks))  # LoRA hook: before the text encoder runs
        conditioning, prompt_params = self.encode_prompts(prompt_text, negative_prompt, steps, clip_skip, emphasis,
                                                          guidance=cfg_scale != 1.0)
        # --- conditioning end
        denoise_args = (self._component("unet"), self.model_sigmas, m.prediction_type)
        params = {"Steps": steps, "Sampler": resolved.sampler, "Schedule type": resolved.schedule,
                  "CFG scale": cfg_scale, "Size": (width, height), "Model hash": m.model_hash, "Model": m.name,
                  "Clip skip": clip_skip, "RNG": {"nv": "NV", "cpu": "CPU"}.get(rng, rng), "Lora hashes": lora_hashes,
                  **prompt_params,
                  "Variation seed strength": subseed_strength if variation else None,
                  "Seed resize from": (seed_resize_from_w, seed_resize_from_h) if seed_resize_from_w > 0 and seed_resize_from_h > 0 else None,
                  "ENSD": ensd or None, "Schedule max sigma": sigma_max, "Schedule min sigma": sigma_min,
                  "Schedule rho": rho, **_option_params(resolved, sampler_options), "Version": f"sdonnx {__version__}"}
        images, seeds, infotexts, interrupted = [], [], [], False
        total = steps * batch_count
        for n in range(batch_count):
            batch_seeds = [seed + n * batch_size + j for j in range(batch_size)]
            batch_subseeds = [subseed + n * batch_size + j for j in range(batch_size)] if variation else None
            image_rng = ImageRNG(shape, batch_seeds, source=rng, subseeds=batch_subseeds,
                                 subseed_strength=subseed_strength, seed_resize_from_h=seed_resize_from_h,
                                 seed_resize_from_w=seed_resize_from_w, eta_noise_seed_delta=ensd)
            noise = latents if latents is not None else image_rng.first()
            x = noise * np.float32(_initial_scale(resolved.sampler, sigmas[0]))
            step_noise = noise_sampler or _noise_sampler(resolved, x, sigmas, batch_seeds, image_rng)
            denoise = cfg_denoiser(*denoise_args, cfg_scale=cfg_scale, cond_at=conditioning.at)
            on_step = _step_reporter(callback, n * steps, total, preview)
            try:
                x = SAMPLERS[resolved.sampler](denoise, x, sigmas, noise_sampler=step_noise, callback=on_step,
                                               **{**resolved.options, **sampler_options})
            except Interrupted:
                interrupted, x = True, on_step.last_denoised
            if x is not None:
                images += self.decode(x)
                seeds += batch_seeds
                infotexts += [format_infotext(prompt, negative_prompt, {**params, **_seed_params(s, j, batch_subseeds)})
                              for j, s in enumerate(batch_seeds)]
            if interrupted:
                break
        return GenerationResult(images=images, seeds=seeds, infotexts=infotexts, parameters=params,
                                interrupted=interrupted)


def _seed_params(seed, index, subseeds):
    """A1111 writes each image's own seed, and its variation seed when one is in use."""
    params = {"Seed": seed}
    if subseeds:
        params["Variation seed"] = subseeds[index]
    return params


def _check_sampler_options(sampler, options):
    import inspect

    params = inspect.signature(SAMPLERS[sampler]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return  # a thin wrapper passing options on; the sampler it calls checks them
    accepted = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("noise_sampler", "callback")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {sampler!r} takes no option {', '.join(unknown)}; "
                         f"its options: {', '.join(accepted) or 'none'}")


def _option_params(resolved, options):
    """Sampler options that differ from A1111's defaults, under A1111's infotext names."""
    names = {"eta": "Eta", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax",
             "s_noise": "Sigma noise"}
    defaults = resolved.options
    return {names.get(k, k.replace("_", " ").capitalize()): v for k, v in options.items()
            if defaults.get(k, object()) != v}


def _initial_scale(sampler, sigma_max):
    return (1.0 + sigma_max**2) ** 0.5 if sampler in TIMESTEP_SAMPLERS else sigma_max


def _noise_sampler(resolved, x, sigmas, seeds, image_rng):
    if resolved.sampler in BROWNIAN_SAMPLERS:
        positive = sigmas[sigmas > 0]
        return BrownianTreeNoiseSampler(x.shape, float(positive.min()), float(positive.max()), seed=list(seeds),
                                        dtype=x.dtype)
    return lambda sigma, sigma_next: image_rng.next()


def _step_reporter(callback, offset, total, preview=None):
    if callback is None and preview is None:
        return None
    state = {"done": offset}

    def report(info=None, *args, **kwargs):
        state["done"] += 1
        if isinstance(info, dict) and info.get("denoised") is not None:
            report.last_denoised = info["denoised"]
            if preview is not None:
                preview(report.last_denoised)
        if callback is not None:
            callback(state["done"], total)

    report.last_denoised = None
    return report


def _positive_int(name, value):
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def _check_size(width, height, factor):
    for name, value in (("width", width), ("height", height)):
        if int(value) != value or value < factor or value % factor:
            raise ValueError(f"{name} {value} is not a positive multiple of {factor}; "
                             f"use a size like {max(factor, int(value) // factor * factor)}")
    return int(width), int(height)
