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
from .adapters.hypernetwork import hypernet_requests
from .adapters.lora import Loras, lora_requests
from .adapters.textual_inversion import EmbeddingDatabase, embedding_parts
from .diffusion.denoiser import cfg_denoiser
from .diffusion.rng import ImageRNG
from .diffusion.sigmas import betas_from_config, model_sigmas
from .image import latents_to_images
from .img2img import IMAGE_UPSCALERS, InitPlan, hires_plan as _hires_plan, img2img_sigmas as _img2img_sigmas, to_array, upscale_latents
from .infotext import format_infotext
from .manifest import load_manifest
from .prompt import extract_networks
from .prompt.conditioning import JointPromptEncoder, PromptEncoder, check_emphasis, encode_prompt
from .runtime import providers as providers_mod
from .runtime.components import TextEncoder, UNet, VaeDecoder, VaeEncoder
from .runtime.session import return_freed_memory
from .samplers import SAMPLER_INFO, SAMPLERS, BrownianTreeNoiseSampler, build_sigmas, resolve
from .text.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
DEFAULT_LORA_DIR = Path("models") / "Lora"
DEFAULT_EMBEDDINGS_DIR = Path("models") / "embeddings"
DEFAULT_HYPERNETWORK_DIR = Path("models") / "hypernetworks"
# k-diffusion draws these samplers' noise from a Brownian tree (A1111 too)
BROWNIAN_SAMPLERS = frozenset({"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"})
# A1111 runs these on DDPM timesteps: the initial latent is the unit-variance noise itself, which in
# k-diffusion scaling is noise * sqrt(1 + sigma^2), not noise * sigma (diffusers' DDIM agrees)
TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})
TILEABLE = frozenset({"unet", "vae_decoder", "vae_encoder"})  # the graphs with spatial convolutions


class Interrupted(Exception):
    """Raised from a generate callback to stop sampling (the server's interrupt)."""


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list
    infotexts: list  # one A1111 "parameters" text per image
    parameters: dict = field(default_factory=dict)
    interrupted: bool = False  # a callback raised Interrupted: the images so far, the last one unfinished
    providers: dict = field(default_factory=dict)  # component -> ONNX Runtime provider that ran it
    devices: dict = field(default_factory=dict)  # component -> its device ("CPU", "GPU.1", CUDA/DirectML id)

    @property
    def infotext(self):
        return self.infotexts[0] if self.infotexts else ""


def _ran_on(ran):
    """{component: Session or (provider, device)} -> {component: (provider, device)} of those that ran."""
    pairs = {name: getattr(item, "ran_on", item) for name, item in ran.items()}
    return {name: pair for name, pair in pairs.items() if pair is not None}


def _existing(folder):
    return folder if folder is not None and folder.is_dir() else None


class Pipeline:
    """A converted model folder, ready to generate. Sessions are created on first use and cached."""

    def __init__(self, folder, manifest, plan, lora_dir=None, embeddings_dir=None, lowmem=False, hypernetwork_dir=None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.plan = plan
        self.lowmem = lowmem
        self._components = {}  # (name, LoRA key, tiling, hypernetwork key: each None when off) -> component facade
        self.lora_dir = Path(lora_dir or DEFAULT_LORA_DIR)
        self._loras = None  # adapters.lora.Loras, made on the first LoRA tag
        self._lora_keys = {}  # component -> cache key of the active LoRA set
        self._lora_replacements = {}  # component -> {initializer: merged array} of the active set
        self.hypernetwork_dir = Path(hypernetwork_dir or DEFAULT_HYPERNETWORK_DIR)
        self._hypernetworks = None  # adapters.hypernetwork_graph.UnetHypernetworks, made on the first tag
        self._hypernet_chain, self._hypernet_multipliers = (), None  # the active set (in the UNet only)
        self._tiling = None
        self._refiners = {}  # model folder -> Pipeline, for generate(refiner=folder)
        self._vae_overflowed = False  # the fp16 VAE decoder gave NaN/Inf once: use the fp32 one from then on
        self._ran = {}  # this generate call: component -> its Session, or (provider, device) once released
        self.tokenizers = {t.component: ClipTokenizer.from_model(self.folder, t) for t in manifest.text_encoders}
        self.tokenizer = self.tokenizers[manifest.text_encoders[0].component]
        # textual inversion: a folder the user names must exist; the default one may be absent. The encoders
        # share CLIP's BPE vocabulary, so the first tokenizer finds the names for all of them
        parts = embedding_parts(t.component for t in manifest.text_encoders)
        self.embeddings = EmbeddingDatabase(embeddings_dir or DEFAULT_EMBEDDINGS_DIR, self.tokenizer,
                                            required=embeddings_dir is not None,
                                            widths={p: t.hidden_size for p, t in zip(parts, manifest.text_encoders)})
        ns = manifest.noise_schedule
        self.model_sigmas = model_sigmas(betas_from_config(ns.beta_start, ns.beta_end, ns.beta_schedule,
                                                           ns.num_train_timesteps))

    @classmethod
    def load(cls, path, provider="auto", device_id=0, lora_dir=None, embeddings_dir=None, lowmem=False, device=None,
             hypernetwork_dir=None):
        """Read the model folder's manifest and choose execution providers (no session is created yet).

        lora_dir: where `<lora:name:...>` tags find their files (default models/Lora); embeddings_dir:
        textual inversion files, used by file name in prompts (default models/embeddings); hypernetwork_dir:
        where `<hypernet:name:multiplier>` tags find their .pt files (default models/hypernetworks). lowmem: create
        each stage's session when it starts and release it when it ends (A1111's --medvram idea): peak
        memory follows the largest component instead of their sum, at the cost of session creation time.
        device: the OpenVINO device (CPU, GPU, GPU.1, NPU, AUTO; default a GPU when present, else the CPU).
        A provider named here that does not start on a one-node graph is a ProviderError."""
        manifest = load_manifest(path)
        return cls(path, manifest, providers_mod.plan(provider, device_id, device), lora_dir=lora_dir,
                   embeddings_dir=embeddings_dir, lowmem=lowmem, hypernetwork_dir=hypernetwork_dir)

    @property
    def providers(self):
        return list(self.plan.names)

    def _component(self, name, base=False):
        """The session facade for `name` with the active LoRA set, hypernetworks and tiling, created on first
        use. base: the fp32 base graph even where the model has a derived (optimized, fp16, int8) one."""
        tiling = self._tiling if name in TILEABLE else None
        chain = self._hypernet_chain if name == "unet" else ()
        key = (name, self._lora_keys.get(name), tiling, tuple(h.stamp for h in chain) or None) + (("base",) if base else ())
        if key not in self._components:
            kind = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoder, "unet": UNet, "vae_decoder": VaeDecoder,
                    "vae_encoder": VaeEncoder}
            options = {"replacements": self._lora_replacements[name]} if key[1] is not None else {}
            if tiling:
                options["tiling"] = tiling
            if base:
                options["base"] = True
            if chain:
                options["graph"] = self._hypernetworks.graph(chain, tiling)
            # one LoRA / hypernetwork variant per component is kept beside the base: drop the others
            for old in [k for k in self._components if k[0] == name and (k[1] is not None or k[3] is not None) and k != key]:
                del self._components[old]
            self._components[key] = kind[name](self.folder, self.manifest, name, self.plan, **options)
        self._ran[name] = self._components[key].session
        if chain:
            from .adapters.hypernetwork_graph import WithMultipliers

            return WithMultipliers(self._components[key], self._hypernet_multipliers)
        return self._components[key]

    def _set_tiling(self, tiling):
        """tiling: None/False, True or "xy", "x", "y" (seamless in those directions)."""
        from .runtime.tiling import tiling_axes

        self._tiling = tiling_axes(tiling)

    def set_loras(self, requests):
        """Give the text encoder and UNet these LoRAs ([LoraRequest]; [] restores the base sessions exactly).

        Merged sessions are cached per LoRA set, one per component besides the base. Returns the
        `Lora hashes` infotext value ({name: short hash}), or None without LoRAs."""
        if not requests:
            self._lora_keys, self._lora_replacements = {}, {}
            return None
        if self._loras is None:
            self._loras = Loras(self.folder, self.manifest, self.lora_dir)
        applied = self._loras.apply(requests)
        self._lora_keys = dict(applied.keys)
        self._lora_replacements = {name: applied.replacements[name] for name in applied.keys}
        return applied.hashes

    def set_hypernetworks(self, requests):
        """Give the UNet these hypernetworks ([HypernetRequest], chained in order; [] for none). Unknown names
        and files for another model are left out with a warning, as in A1111. The rewritten UNet is cached
        per set of files (one beside the base); multipliers are a graph input, so strengths change for free."""
        if requests and self._hypernetworks is None:
            from .adapters.hypernetwork_graph import UnetHypernetworks

            self._hypernetworks = UnetHypernetworks(self.folder, self.manifest, self.hypernetwork_dir)
        active = self._hypernetworks.select(requests) if requests else []
        self._hypernet_chain = tuple(h for h, _ in active)
        self._hypernet_multipliers = np.array([m for _, m in active], np.float32)

    # ------------------------------------------------------------------ stages

    def encode_prompts(self, prompt, negative_prompt="", steps=1, clip_skip=1, emphasis="Original", guidance=True,
                       first_pass_steps=None):
        """Prompt and negative prompt (A1111 prompt language, extra-network tags already taken out) ->
        (Conditioning with at(step) for the denoiser, infotext params: TI hashes, Emphasis).

        steps: the model calls to schedule over (`SamplerInfo.total_steps`); first_pass_steps: for the hires
        pass, the first pass's, which its prompt-editing timeline continues (A1111 >= 1.6)."""
        self.embeddings.refresh()
        m = self.manifest
        parts = embedding_parts(t.component for t in m.text_encoders)  # SDXL: each encoder its part of a file
        encoders = [PromptEncoder(self.tokenizers[t.component], self._component(t.component), self.embeddings,
                                  clip_skip=clip_skip, emphasis=check_emphasis(emphasis), pooled=t.pooled is not None,
                                  embedding_part=part)
                    for t, part in zip(m.text_encoders, parts)]
        # a UNet with added conditions takes entries that carry the pooled output (and later the time ids)
        encoder = JointPromptEncoder(encoders, m.force_zeros_for_empty_prompt) if m.has_added_conditions else encoders[0]
        conditioning = encode_prompt(encoder, prompt, negative_prompt, steps, guidance, first_pass_steps)
        hashes = {name.replace(":", "").replace(",", ""): e.shorthash for name, e in encoder.used.items()}
        emphasized = emphasis != "Original" and any(c in prompt + negative_prompt for c in "([")
        return conditioning, {"TI hashes": hashes or None, "Emphasis": emphasis if emphasized else None}

    def with_time_ids(self, conditioning, width, height, crop=(0, 0), aesthetic_score=6.0,
                      negative_aesthetic_score=2.5):
        """Conditioning plus the UNet's time ids, as A1111 sends them: original size = target size = the
        image size (h, w), crop (top, left); the refiner's aesthetic score instead of the target size (the
        negative prompt gets the low one). Unchanged for models without added conditions."""
        m = self.manifest
        if not m.has_added_conditions:
            return conditioning
        size = [float(height), float(width)]
        ids = lambda last: {"time_ids": np.array(size + list(map(float, crop)) + last, np.float32)}  # noqa: E731
        if m.requires_aesthetics_score:
            return conditioning.with_added(ids([float(aesthetic_score)]), ids([float(negative_aesthetic_score)]))
        return conditioning.with_added(ids(size))

    def decode(self, latents, tiled=None):
        """latents: [B, C, h, w] in the sampler's scale -> PIL images (in tiles when tiled, or when None
        and the image is large)."""
        latents = latents / self.manifest.vae_scaling_factor
        f = self.manifest.vae_scale_factor
        tiles = _use_tiles(tiled, (latents.shape[2] * f, latents.shape[3] * f))
        decoder = self._component("vae_decoder", base=self._vae_overflowed)
        images = _vae_decode(decoder, latents, tiles)
        if not np.isfinite(images).all() and not decoder.is_base:
            # fp16 activations past 65504 turn into Inf, then NaN after a norm: A1111's --no-half-vae, by itself
            log.warning("the %s VAE decoder overflowed (NaN/Inf in the image); decoding with the fp32 one from now on",
                        self.manifest.components["vae_decoder"].optimized.get("dtype", "optimized"))
            self._vae_overflowed = True
            images = _vae_decode(self._component("vae_decoder", base=True), latents, tiles)
        return latents_to_images(images)

    def encode_images(self, images):
        """images: [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f] in the sampler's scale.

        The posterior mean, not a random sample as A1111 draws (its spread is ~1e-3 of the latent):
        the same image always gives the same latents."""
        mean, _ = self._component("vae_encoder")(np.asarray(images, np.float32))
        return mean * self.manifest.vae_scaling_factor

    def _release(self, *names):
        """lowmem: drop the sessions of a finished stage so peak memory follows the largest component."""
        if self.lowmem:
            dropped = [k for k in self._components if k[0] in names]
            self._ran = _ran_on(self._ran)  # keep what ran, not the sessions being freed
            for key in dropped:
                del self._components[key]
            if dropped:
                return_freed_memory()

    # ------------------------------------------------------------------ generate

    def generate(self, prompt, negative_prompt="", steps=20, cfg_scale=7.0, sampler="Euler a",
                 scheduler="Automatic", seed=-1, width=None, height=None, batch_size=1, batch_count=1,
                 latents=None, callback=None, rng="nv", noise_sampler=None, clip_skip=1, preview=None,
                 subseed=-1, subseed_strength=0.0, seed_resize_from_w=0, seed_resize_from_h=0, ensd=0,
                 sigma_min=None, sigma_max=None, rho=None, emphasis="Original",
                 init_image=None, strength=0.75, resize_mode=0, mask=None, mask_blur=4, inpainting_fill=1,
                 inpaint_full_res=False, inpaint_full_res_padding=32, inpainting_mask_invert=False,
                 hires=False, hires_scale=2.0, hires_width=0, hires_height=0, hires_upscaler="Latent",
                 hires_steps=0, hires_denoising=0.7, hires_sampler=None, hires_scheduler=None,
                 hires_prompt=None, hires_negative_prompt=None, tiling=None, tiled_vae=None,
                 crop_top_left=(0, 0), aesthetic_score=6.0, negative_aesthetic_score=2.5, refiner=None,
                 refiner_switch_at=0.8, **sampler_options):
        """txt2img, img2img and inpainting (with init_image / mask), with optional hires fix.

        Returns GenerationResult(images, seeds, infotexts, ...); its providers / devices say which ONNX
        Runtime provider and device ran each component of this call.

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

        img2img (A1111's semantics): init_image (PIL image or path) is resized to width x height by
        resize_mode (0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale), encoded, and
        noised to the schedule's step int(min(strength, 0.999) * steps); the last t_enc + 1 steps of a
        `steps`-step schedule run. Width/height default to the init image's size rounded to 8.
        Inpainting: mask (white = repaint, same size as init_image), mask_blur, inpainting_fill (0 fill,
        1 original, 2 latent noise, 3 latent nothing), inpaint_full_res (only the masked area, grown by
        inpaint_full_res_padding, is processed at width x height), inpainting_mask_invert. 9-channel
        inpainting models get the mask and masked image as extra UNet input; every model's result keeps
        the original outside the mask.
        Hires fix: hires=True runs a second img2img pass at hires_scale (or hires_width x hires_height)
        after upscaling with hires_upscaler ("Latent", "Latent (bicubic)", "Latent (nearest)",
        "Latent (nearest-exact)", "Lanczos", "Nearest", "None"), with hires_steps (0 = steps), hires_denoising, and optional
        hires_sampler / hires_scheduler / hires_prompt / hires_negative_prompt.
        tiling: True/"xy", "x" or "y" makes the image tile seamlessly (circular padding); tiled_vae: True
        decodes/encodes in tiles (None: automatically for large images).
        SDXL (models whose UNet takes time ids): crop_top_left (top, left) goes into the time ids beside the
        image size; the refiner's aesthetic_score / negative_aesthetic_score (A1111's 6.0 / 2.5).
        Refiner (A1111's switch): refiner (a Pipeline or a model folder) takes over the first pass's denoiser
        calls from the fraction refiner_switch_at of the sampled steps on, with its own conditioning, and
        decodes the result (the hires pass, if any, runs on this model).
        """
        m = self.manifest
        self._ran = {}
        init = self._init_plan(init_image, mask, width, height, resize_mode, mask_blur, inpainting_mask_invert,
                               inpaint_full_res, inpaint_full_res_padding, inpainting_fill, strength)
        width, height = _check_size(init.width if init else (width or m.native_size),
                                    init.height if init else (height or m.native_size), m.vae_scale_factor)
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
        hr = _hires_plan(width, height, hires_scale, hires_width, hires_height, hires_upscaler,
                         hires_steps or steps, hires_denoising, m.vae_scale_factor, bool(hires_steps)) if hires else None
        self._set_tiling(tiling)
        sigma_overrides = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        sigmas = _img2img_sigmas(build_sigmas(resolved, steps, self.model_sigmas, sdxl=m.is_sdxl, **sigma_overrides),
                                 init.strength if init else None)
        variation = subseed_strength > 0
        subseed = (random.randint(0, MAX_SEED) if subseed is None or int(subseed) == -1 else int(subseed)) if variation else None
        # --- conditioning start (prompt language: issue 4)
        prompt_text, networks = extract_networks(prompt)  # A1111 takes tags from the positive prompt only
        lora_hashes = self.set_loras(lora_requests(networks))  # LoRA hook: before the text encoder runs
        self.set_hypernetworks(hypernet_requests(networks))  # the tags stay in the infotext's prompt, as A1111
        calls = SAMPLER_INFO[resolved.sampler].total_steps(steps)  # A1111 schedules prompts over model calls
        conditioning, prompt_params = self.encode_prompts(prompt_text, negative_prompt, calls, clip_skip, emphasis,
                                                          guidance=cfg_scale != 1.0)
        hr_conditioning = self._hires_conditioning(hr, resolve(hires_sampler or resolved.sampler,
                                                               hires_scheduler or resolved.schedule),
                                                   hires_prompt, hires_negative_prompt, prompt, negative_prompt,
                                                   calls, clip_skip, emphasis, cfg_scale)
        added = dict(crop=crop_top_left, aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
        conditioning = self.with_time_ids(conditioning, width, height, **added)
        if hr is not None:  # A1111 conditions the second pass on the hires size
            hr_conditioning = self.with_time_ids(hr_conditioning, hr.width, hr.height, **added)
        refine = self._refiner_plan(refiner, refiner_switch_at, prompt_text, negative_prompt, calls, clip_skip,
                                    emphasis, cfg_scale, (width, height), added,
                                    SAMPLER_INFO[resolved.sampler].total_steps(len(sigmas) - 1))
        # --- conditioning end
        self._release("text_encoder")
        init_latent, image_cond = self._init_latents(init, shape, tiled_vae)
        self._release("vae_encoder")
        params = {"Steps": steps, "Sampler": resolved.sampler, "Schedule type": resolved.schedule,
                  "CFG scale": cfg_scale, "Size": (width, height), "Model hash": m.model_hash, "Model": m.name,
                  "Denoising strength": init.strength if init else (hr.denoising if hr else None),
                  "Clip skip": clip_skip, "RNG": {"nv": "NV", "cpu": "CPU"}.get(rng, rng), "Lora hashes": lora_hashes,
                  **prompt_params,
                  "Variation seed strength": subseed_strength if variation else None,
                  "Seed resize from": (seed_resize_from_w, seed_resize_from_h) if seed_resize_from_w > 0 and seed_resize_from_h > 0 else None,
                  "ENSD": ensd or None, "Tiling": bool(tiling), "Schedule max sigma": sigma_max,
                  "Schedule min sigma": sigma_min, "Schedule rho": rho, **(init.params() if init else {}),
                  **(hr.params(hires_sampler, hires_scheduler, hires_prompt, hires_negative_prompt) if hr else {}),
                  **_refiner_params(refine, refiner_switch_at),
                  **_option_params(resolved, sampler_options), "Version": f"sdonnx {__version__}"}
        images, seeds, infotexts, interrupted = [], [], [], False
        total = (len(sigmas) - 1 + (hr.steps_run if hr else 0)) * batch_count
        for n in range(batch_count):
            batch_seeds = [seed + n * batch_size + j for j in range(batch_size)]
            batch_subseeds = [subseed + n * batch_size + j for j in range(batch_size)] if variation else None
            rng_args = dict(source=rng, subseeds=batch_subseeds, subseed_strength=subseed_strength,
                            seed_resize_from_h=seed_resize_from_h, seed_resize_from_w=seed_resize_from_w,
                            eta_noise_seed_delta=ensd)
            image_rng = ImageRNG(shape, batch_seeds, **rng_args)
            noise = latents if latents is not None else image_rng.first()
            on_step = _step_reporter(callback, n * total // batch_count, total, preview)
            try:
                x = self._denoise_pass(resolved, sigmas, noise, init_latent, image_cond, init, conditioning,
                                       cfg_scale, noise_sampler, image_rng, batch_seeds, on_step, sampler_options,
                                       refine)
                if hr is not None:
                    x = self._hires_pass(hr, x, resolved, hires_sampler, hires_scheduler, sigma_overrides,
                                         hr_conditioning, cfg_scale, batch_seeds, rng_args, on_step,
                                         sampler_options, tiled_vae)
            except Interrupted:
                interrupted, x = True, on_step.last_denoised
            if x is not None:
                self._release("unet")
                batch_images = (refine[0] if refine and hr is None else self).decode(x, tiled=tiled_vae)
                images += [init.finish(im) for im in batch_images] if init else batch_images
                seeds += batch_seeds
                infotexts += [format_infotext(prompt, negative_prompt, {**params, **_seed_params(s, j, batch_subseeds)})
                              for j, s in enumerate(batch_seeds)]
            if interrupted:
                break
        self._release("vae_decoder", "vae_encoder")
        self._ran = ran = _ran_on(self._ran)
        return GenerationResult(images=images, seeds=seeds, infotexts=infotexts, parameters=params,
                                interrupted=interrupted, providers={k: v[0] for k, v in ran.items()},
                                devices={k: v[1] for k, v in ran.items()})

    # ------------------------------------------------------------------ generate's stages

    def _init_plan(self, init_image, mask, width, height, resize_mode, mask_blur, invert, only_masked, padding,
                   fill, strength):
        if init_image is None:
            if mask is not None:
                raise ValueError("a mask needs an init_image to inpaint")
            return None
        return InitPlan.make(init_image, mask, width, height, resize_mode=resize_mode, mask_blur=mask_blur,
                             invert=invert, only_masked=only_masked, padding=padding, fill=fill,
                             strength=strength, factor=self.manifest.vae_scale_factor)

    def _init_latents(self, init, shape, tiled_vae):
        """(init latent [1, C, h, w] or None, inpainting-model image conditioning [1, C+1, h, w] or None)."""
        m = self.manifest
        image_cond = None
        if init is None:
            if m.is_inpaint:  # txt2img on an inpainting model: everything is to be painted
                blank = np.zeros((1, 3, shape[1] * m.vae_scale_factor, shape[2] * m.vae_scale_factor), np.float32)
                image_cond = np.concatenate([np.ones((1, 1, *shape[1:]), np.float32), self._encode(blank, tiled_vae)], 1)
            return None, image_cond
        latent = self._encode(init.array, tiled_vae)
        if init.resize_mode == 3:  # A1111: the image encoded at its own size, the latents resized (bilinear)
            latent = upscale_latents(latent, shape[1:], "Latent")
        if m.is_inpaint:
            repaint = init.latent_mask(shape[1:]) if init.mask is not None else np.ones((1, 1, *shape[1:]), np.float32)
            masked = self._encode(init.array * (1.0 - init.pixel_mask()), tiled_vae) if init.mask is not None else latent
            image_cond = np.concatenate([repaint, masked], 1)
        return latent, image_cond

    def _encode(self, images, tiled):
        if _use_tiles(tiled, images.shape[2:]):
            from .tiled_vae import encode_tiled

            # tiles take whole latents: the rows/columns past the last multiple of the VAE factor (only a
            # latent-upscale init image has them) are left out, where a whole-image pass floors them
            f = self.manifest.vae_scale_factor
            images = images[..., :images.shape[2] // f * f, :images.shape[3] // f * f]
            mean, _ = encode_tiled(self._component("vae_encoder"), images)
            return mean * self.manifest.vae_scaling_factor
        return self.encode_images(images)

    def _denoise_pass(self, resolved, sigmas, noise, init_latent, image_cond, init, conditioning, cfg_scale,
                      noise_sampler, image_rng, seeds, on_step, sampler_options, refine=None):
        """One sampling run: initial latent, denoiser with its inpainting hooks and refiner switch, sampler."""
        m = self.manifest
        keep = None
        if init_latent is None:
            x = noise * np.float32(_initial_scale(resolved.sampler, sigmas[0]))
        else:
            start = init_latent
            if init.mask is not None:
                keep = 1.0 - init.latent_mask(noise.shape[2:])
                start = init.masked_content(init_latent, keep, noise)
            x = start + noise * np.float32(sigmas[0])
        unet = _with_image_cond(self._component("unet"), image_cond)
        cfg_scale = cfg_scale * SAMPLER_INFO[resolved.sampler].cfg_multiplier
        denoise = cfg_denoiser(unet, self.model_sigmas, m.prediction_type, cfg_scale=cfg_scale,
                               cond_at=conditioning.at)
        if refine is not None:
            refiner, refiner_conditioning, at = refine
            # the refiner's prompt schedule goes on counting calls where the base model's stopped
            second = cfg_denoiser(refiner._component("unet"), refiner.model_sigmas, refiner.manifest.prediction_type,
                                  cfg_scale=cfg_scale, cond_at=lambda i: refiner_conditioning.at(i + at))
            denoise = _switching(denoise, second, at)
        if keep is not None:
            denoise = _blend_known(denoise, init_latent, keep)
        step_noise = noise_sampler or _noise_sampler(resolved, x, sigmas, seeds, image_rng)
        x = SAMPLERS[resolved.sampler](denoise, x, sigmas, noise_sampler=step_noise, callback=on_step,
                                       **{**resolved.options, **sampler_options})
        return x if keep is None else init_latent * keep + x * (1.0 - keep)

    def _refiner_plan(self, refiner, switch_at, prompt, negative, steps, clip_skip, emphasis, cfg_scale, size,
                      added, sampled_steps):
        """A1111's refiner switch: (refiner Pipeline, its conditioning, the denoiser call it takes over at),
        or None without a refiner. A1111 switches at the first call i with i / steps >= switch_at; steps and
        sampled_steps count model calls (`SamplerInfo.total_steps`)."""
        if refiner is None:
            return None
        if not 0 < switch_at < 1:
            raise ValueError(f"refiner_switch_at {switch_at!r}: choose a fraction between 0 and 1")
        if not isinstance(refiner, Pipeline):
            key = str(Path(refiner).resolve())
            if key not in self._refiners:
                # the refiner reads the same LoRA and embedding folders as the base model
                self._refiners[key] = Pipeline(refiner, load_manifest(refiner), self.plan, lowmem=self.lowmem,
                                               lora_dir=self.lora_dir, embeddings_dir=_existing(self.embeddings.folder))
            refiner = self._refiners[key]
        r, m = refiner.manifest, self.manifest
        if (r.latent_channels, r.vae_scale_factor) != (m.latent_channels, m.vae_scale_factor):
            raise ValueError(f"refiner {r.name} ({r.family}) has another latent space than {m.name} ({m.family}): "
                             f"{r.latent_channels} channels / factor {r.vae_scale_factor} vs "
                             f"{m.latent_channels} / {m.vae_scale_factor}")
        conditioning, _ = refiner.encode_prompts(prompt, negative, steps, clip_skip, emphasis, guidance=cfg_scale != 1.0)
        conditioning = refiner.with_time_ids(conditioning, *size, **added)
        refiner._release(*(t.component for t in r.text_encoders))
        at = next(i for i in range(sampled_steps + 1) if i / sampled_steps >= switch_at)
        return refiner, conditioning, at

    def _hires_conditioning(self, hr, hr_resolved, hires_prompt, hires_negative, prompt, negative, first_calls,
                            clip_skip, emphasis, cfg_scale):
        """The hires pass's own conditioning, as A1111 makes it even without a hires prompt: its prompt
        editing goes on from where the first pass's `first_calls` model calls ended."""
        if hr is None:
            return None
        text, _ = extract_networks(hires_prompt or prompt)
        return self.encode_prompts(text, hires_negative or negative, SAMPLER_INFO[hr_resolved.sampler].total_steps(hr.steps),
                                   clip_skip, emphasis, guidance=cfg_scale != 1.0, first_pass_steps=first_calls)[0]

    def _hires_pass(self, hr, x, resolved, hires_sampler, hires_scheduler, sigma_overrides, conditioning,
                    cfg_scale, seeds, rng_args, on_step, sampler_options, tiled_vae):
        """A1111's hires fix second pass: upscale the first pass, then img2img at the target size."""
        m = self.manifest
        shape = (m.latent_channels, hr.height // m.vae_scale_factor, hr.width // m.vae_scale_factor)
        if hr.upscaler.startswith("Latent"):
            start = upscale_latents(x, shape[1:], hr.upscaler)
        else:
            images = [im.resize((hr.width, hr.height), IMAGE_UPSCALERS[hr.upscaler]) for im in self.decode(x, tiled=tiled_vae)]
            start = self._encode(np.concatenate([to_array(im) for im in images]), tiled_vae)
        hr_resolved = resolve(hires_sampler or resolved.sampler, hires_scheduler or resolved.schedule)
        options = sampler_options if hr_resolved.sampler == resolved.sampler else {}
        sigmas = _img2img_sigmas(build_sigmas(hr_resolved, hr.steps, self.model_sigmas, sdxl=m.is_sdxl,
                                              **sigma_overrides), hr.denoising)
        noise = ImageRNG(shape, seeds, **rng_args).first()
        unet = self._component("unet")
        denoise = cfg_denoiser(unet, self.model_sigmas, m.prediction_type,
                               cfg_scale=cfg_scale * SAMPLER_INFO[hr_resolved.sampler].cfg_multiplier,
                               cond_at=conditioning.at)
        x = start + noise * np.float32(sigmas[0])
        step_noise = _noise_sampler(hr_resolved, x, sigmas, seeds, ImageRNG(shape, seeds, **rng_args))
        return SAMPLERS[hr_resolved.sampler](denoise, x, sigmas, noise_sampler=step_noise, callback=on_step,
                                             **{**hr_resolved.options, **options})


def _vae_decode(decoder, latents, tiles):
    """latents: [B, C, h, w] (unscaled) -> images [B, 3, H, W] in [-1, 1], in tiles or whole."""
    if tiles:
        from .tiled_vae import decode_tiled

        return decode_tiled(decoder, latents)
    return decoder(latents)


def _with_image_cond(unet, image_cond):
    """An inpainting model's UNet takes [x, mask, masked image latents]; the batch is blocks of B
    (uncond, conds...), so the conditioning is tiled to match."""
    if image_cond is None:
        return unet

    def call(sample, timestep, context, **added):
        reps = sample.shape[0] // image_cond.shape[0]
        return unet(np.concatenate([sample, np.tile(image_cond, (reps, 1, 1, 1))], 1), timestep, context, **added)

    return call


def _switching(first, second, at):
    """Denoiser calls 0 .. at-1 go to `first`, the rest to `second` (the refiner switch)."""
    calls = {"n": 0}

    def call(x, sigma):
        calls["n"] += 1
        active = first if calls["n"] <= at else second
        denoised = active(x, sigma)
        call.last_uncond = active.last_uncond  # what CFG++ samplers read
        return denoised

    call.last_uncond = None
    return call


def _refiner_params(refine, switch_at):
    if refine is None:
        return {}
    r = refine[0].manifest
    return {"Refiner": f"{r.name} [{r.model_hash}]" if r.model_hash else r.name, "Refiner switch at": switch_at}


def _blend_known(denoise, init_latent, keep):
    """Inpainting with any model: the known region's x0 is the init latent at every step (A1111)."""
    def call(x, sigma):
        denoised = denoise(x, sigma)
        uncond = getattr(denoise, "last_uncond", None)
        call.last_uncond = None if uncond is None else init_latent * keep + uncond * (1.0 - keep)
        return init_latent * keep + denoised * (1.0 - keep)

    call.last_uncond = None
    return call


def _use_tiles(tiled, size_hw):
    """The VAE runs in tiles when asked, or (tiled=None) when the image is large."""
    from .tiled_vae import needs_tiling

    return tiled if tiled is not None else needs_tiling(*size_hw)


def _seed_params(seed, index, subseeds):
    """A1111 writes each image's own seed, and its variation seed when one is in use."""
    params = {"Seed": seed}
    if subseeds:
        params["Variation seed"] = subseeds[index]
    return params


def _check_sampler_options(sampler, options):
    import inspect

    params = inspect.signature(SAMPLERS[sampler]).parameters.values()
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
