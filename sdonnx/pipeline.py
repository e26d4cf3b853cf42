"""Orchestration: a generate call as a short list of named stages.

request -> prompt conditioning -> sigmas -> initial noise (seeded) -> denoise loop (sampler) ->
VAE decode -> images + infotext.
"""
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapters.hypernetwork import hypernet_requests
from .adapters.lora import Loras, lora_requests
from .adapters.textual_inversion import EmbeddingDatabase, embedding_parts
from .cache import entry_source
from .controlnet.model import Library
from .controlnet.residuals import unet_graph
from .diffusion.denoiser import cfg_denoiser
from .diffusion.rng import ImageRNG
from .diffusion.sigmas import betas_from_config, model_sigmas
from .image import latents_to_images
from .img2img import LATENT_UPSCALERS, to_array, upscale_latents
from .manifest import load_manifest
from .prompt import extract_networks
from .prompt.conditioning import JointPromptEncoder, PromptEncoder, check_emphasis, encode_prompt
from .postprocess.upscale import Upscalers, resize_with, upscaler_folders
from .request import MAX_SEED, GenerationRequest  # noqa: F401  (MAX_SEED: re-exported, doors use it)
from .runtime import precision as precision_mod
from .runtime import providers as providers_mod
from .runtime.precision import Precision
from .runtime.components import TextEncoder, UNet, VaeDecoder, VaeEncoder
from .runtime.session import return_freed_memory
from .samplers import SAMPLER_INFO, SAMPLERS, BrownianTreeNoiseSampler
from .text.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

DEFAULT_LORA_DIR = Path("models") / "Lora"
DEFAULT_EMBEDDINGS_DIR = Path("models") / "embeddings"
DEFAULT_HYPERNETWORK_DIR = Path("models") / "hypernetworks"
DEFAULT_MODELS_ROOT = Path("models")  # A1111's: the upscaler folders ESRGAN, RealESRGAN, SwinIR are under it
DEFAULT_CONTROLNET_DIR = Path("models") / "ControlNet"  # sd-webui-controlnet's folder name
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
    detected_maps: list = field(default_factory=list)  # each ControlNet unit's preprocessed image (PIL), in order
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

    def __init__(self, folder, manifest, plan, lora_dir=None, embeddings_dir=None, lowmem=False, hypernetwork_dir=None,
                 upscaler_dirs=None, controlnet_dir=None, precision=None, face_dirs=None, data=None,
                 convert_progress=None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.plan = plan
        self.precision = precision or Precision()  # runtime.precision.Precision: which graphs, which hint
        self.lowmem = lowmem
        # external VAEs: the data folder's (datadir.DataDir or None), and the checkpoint this model was converted
        # from on first use (its MODEL.vae.* is the "Automatic" VAE); None for a folder converted by hand
        self.data = data
        self.checkpoint = entry_source(self.folder)
        self.convert_progress = convert_progress
        self._vaes = {}  # (VAE file, size, mtime) -> vae.ExternalVae, converted and checked once
        # caches only: nothing a generate call asks for is kept for the next one
        self._components = {}  # (name, LoRA key, tiling, hypernetwork key: each None when off) -> component facade
        self.lora_dir = Path(lora_dir or DEFAULT_LORA_DIR)
        self._loras = None  # adapters.lora.Loras, made on the first LoRA tag
        self.hypernetwork_dir = Path(hypernetwork_dir or DEFAULT_HYPERNETWORK_DIR)
        self._hypernetworks = None  # adapters.hypernetwork_graph.UnetHypernetworks, made on the first tag
        self._refiners = {}  # model folder -> Pipeline, for generate(refiner=folder)
        # the hires fix's upscaler models, by A1111's names; their sessions are made on first use
        self.upscalers = Upscalers(upscaler_dirs or upscaler_folders(DEFAULT_MODELS_ROOT), plan,
                                   cache=_model_cache(data))
        folders = controlnet_dir if isinstance(controlnet_dir, (list, tuple)) else (controlnet_dir,)
        self.controlnet_library = Library(tuple(Path(f) for f in folders if f) or (DEFAULT_CONTROLNET_DIR,),
                                          cache=_model_cache(data))
        self._controlnets = {}  # resolved ControlNet folder -> ControlNetModel (its session made on first use)
        # restore faces: {"GFPGAN": folder, "CodeFormer": folder} (A1111's models/GFPGAN, models/Codeformer)
        from .postprocess.faces import face_folders

        self.face_dirs = face_folders(**(face_dirs or {}))
        self._face_restorers = {}  # restorer name -> postprocess.faces.FaceRestorer
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
             hypernetwork_dir=None, upscaler_dirs=None, controlnet_dir=None, precision=None, face_dirs=None,
             data_dir=None, convert_progress=None):
        """Read the model folder's manifest and choose execution providers (no session is created yet).

        path: a converted model folder; or a checkpoint file, or (with data_dir) a checkpoint of an A1111 install
        by any name A1111 lists it under (`v1-5-pruned-emaonly`, `v1-5-pruned-emaonly.safetensors [6ce0161689]`,
        `6ce0161689`), converted on first use into the conversion cache (convert_progress(cache.Progress)
        hears how it goes). data_dir: an A1111 data folder (default: the SDONNX_DATA_DIR environment variable);
        the LoRA, embeddings and hypernetwork folders default to its own.

        lora_dir: where `<lora:name:...>` tags find their files (default models/Lora); embeddings_dir:
        textual inversion files, used by file name in prompts (default models/embeddings); hypernetwork_dir:
        where `<hypernet:name:multiplier>` tags find their .pt files (default models/hypernetworks); controlnet_dir:
        the folder (or list of folders) of converted ControlNets units name (default models/ControlNet). lowmem: create
        each stage's session when it starts and release it when it ends (A1111's --medvram idea): peak
        memory follows the largest component instead of their sum, at the cost of session creation time.
        upscaler_dirs: where the hires fix finds upscaler models by name (default A1111's models/ESRGAN,
        models/RealESRGAN and models/SwinIR; see postprocess.upscale.upscaler_folders).
        device: the OpenVINO device (CPU, GPU, GPU.1, NPU, AUTO; default a GPU when present, else the CPU).
        A provider named here that does not start on a one-node graph is a ProviderError.
        face_dirs: {"gfpgan_dir": ..., "codeformer_dir": ...}, where restore_faces finds its converted models
        (default models/GFPGAN and models/Codeformer, the detector and parser in either).
        precision: fp32, bf16, fp16, int8 or auto (runtime/precision.py: what each provider can do); None runs
        each graph as converted. One this provider, CPU or model cannot run is a PrecisionError naming the
        valid ones; `auto` logs what it picked."""
        from .datadir import DataDir, resolve_model

        data = DataDir.from_option(data_dir)
        path = resolve_model(path, data, convert_progress)
        if data is not None:
            lora_dir = lora_dir or data.existing("lora")
            embeddings_dir = embeddings_dir or data.existing("embeddings")
            hypernetwork_dir = hypernetwork_dir or data.existing("hypernetworks")
            controlnet_dir = controlnet_dir or data.existing("controlnet")
            face_dirs = face_dirs or {"gfpgan_dir": data.folder("gfpgan"), "codeformer_dir": data.folder("codeformer")}
            if upscaler_dirs is None:
                from .postprocess.upscale import upscaler_folders

                upscaler_dirs = upscaler_folders(data.root / "models")
        manifest = load_manifest(path)
        plan = providers_mod.plan(provider, device_id, device)
        chosen = precision_mod.resolve(precision, plan.names[0], plan.device(plan.providers[0][0]), manifest)
        if chosen.openvino:
            plan = providers_mod.with_openvino_options(plan, chosen.openvino)
        if chosen.name is not None:
            log.info("precision %s (UNet: %s)", chosen.name, chosen.label(manifest))
        return cls(path, manifest, plan, lora_dir=lora_dir, embeddings_dir=embeddings_dir, lowmem=lowmem,
                   hypernetwork_dir=hypernetwork_dir, upscaler_dirs=upscaler_dirs,
                   controlnet_dir=controlnet_dir, precision=chosen, face_dirs=face_dirs, data=data,
                   convert_progress=convert_progress)

    @property
    def providers(self):
        return list(self.plan.names)

    def _component(self, name, base=False, networks=None, tiling=None, residuals=False, vae=None):
        """The session facade for `name` with these extra networks (a Networks, or None) and tiling ("xy", "x",
        "y" or None), created on first use. base: the fp32 base graph even where the model has a derived
        (optimized, fp16, int8) one. residuals: the UNet taking ControlNet residuals (controlnet.residuals).
        vae: an external VAE (vae.ExternalVae) whose graphs replace the model's VAE decoder and encoder."""
        tiling = tiling if name in TILEABLE else None
        lora_key = networks.lora_key(name) if networks is not None else None
        chain = networks.hypernets if networks is not None and name == "unet" else ()
        external = vae if name in ("vae_decoder", "vae_encoder") else None
        key = (name, lora_key, tiling, tuple(h.stamp for h in chain) or None) + (("base",) if base else ()) + \
            (("residuals",) if residuals else ())
        if external is not None:
            key += (("vae", str(external.folder)),)
            for old in [k for k in self._components if k[0] == name and _external_key(k) and k != key]:
                del self._components[old]  # one external VAE kept beside the model's own
        if key not in self._components:
            kind = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoder, "unet": UNet, "vae_decoder": VaeDecoder,
                    "vae_encoder": VaeEncoder}
            options = {"replacements": networks.loras.replacements[name]} if lora_key is not None else {}
            options["precision"] = self.precision
            if tiling:
                options["tiling"] = tiling
            if base:
                options["base"] = True
            if chain:
                options["graph"] = self._hypernetworks.graph(chain, tiling, residuals=residuals)
            elif residuals:  # without LoRAs the model's derived (optimized, fp16) graph, where it has one
                options["graph"] = unet_graph(self.folder, self.manifest, tiling,
                                              None if base or lora_key is not None else self.plan, self.precision)
            # one LoRA / hypernetwork / ControlNet variant per component is kept beside the base: drop the others
            for old in [k for k in self._components if k[0] == name and k != key
                        and (k[1] is not None or k[3] is not None or "residuals" in k)]:
                del self._components[old]
            folder, manifest = (external.folder, external.manifest) if external else (self.folder, self.manifest)
            self._components[key] = kind[name](folder, manifest, name, self.plan, **options)
        self._ran[name] = self._components[key].session
        if chain:
            from .adapters.hypernetwork_graph import WithMultipliers

            return WithMultipliers(self._components[key], networks.multipliers)
        return self._components[key]

    def load_networks(self, loras=(), hypernets=()):
        """These LoRAs ([LoraRequest]) and hypernetworks ([HypernetRequest], chained in order) ready to pass as
        `networks=`: a Networks, or None when there are none.

        LoRA merges are cached per set; the hypernetwork UNet per set of files (multipliers are a graph
        input, so strengths change for free). Unknown hypernetworks and files for another model are left out
        with a warning, as in A1111. Nothing about the set is kept for later calls."""
        applied = None
        if loras:
            if self._loras is None:
                self._loras = Loras(self.folder, self.manifest, self.lora_dir)
            applied = self._loras.apply(loras)
        active = []
        if hypernets:
            if self._hypernetworks is None:
                from .adapters.hypernetwork_graph import UnetHypernetworks

                self._hypernetworks = UnetHypernetworks(self.folder, self.manifest, self.hypernetwork_dir)
            active = self._hypernetworks.select(hypernets)
        if applied is None and not active:
            return None
        return Networks(applied, tuple(h for h, _ in active), np.array([m for _, m in active], np.float32))

    # ------------------------------------------------------------------ stages

    def encode_prompts(self, prompt, negative_prompt="", steps=1, clip_skip=1, emphasis="Original", guidance=True,
                       first_pass_steps=None, networks=None):
        """Prompt and negative prompt (A1111 prompt language, extra-network tags already taken out) ->
        (Conditioning with at(step) for the denoiser, infotext params: TI hashes, Emphasis).

        steps: the model calls to schedule over (`SamplerInfo.total_steps`); first_pass_steps: for the hires
        pass, the first pass's, which its prompt-editing timeline continues (A1111 >= 1.6). networks: the
        LoRAs the text encoders run with (from load_networks)."""
        self.embeddings.refresh()
        m = self.manifest
        parts = embedding_parts(t.component for t in m.text_encoders)  # SDXL: each encoder its part of a file
        encoders = [PromptEncoder(self.tokenizers[t.component], self._component(t.component, networks=networks),
                                  self.embeddings, clip_skip=clip_skip, emphasis=check_emphasis(emphasis),
                                  pooled=t.pooled is not None, embedding_part=part)
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

    def decode(self, latents, tiled=None, tiling=None, vae=None):
        """latents: [B, C, h, w] in the sampler's scale -> PIL images (VAE in tiles when tiled, or when None
        and the image is large; tiling: the seamless-tiling axes the image was made with; vae: an external
        VAE, vae.ExternalVae, instead of the model's own; the model's scaling factor applies either way)."""
        latents = latents / self.manifest.vae_scaling_factor
        f = self.manifest.vae_scale_factor
        tiles = _use_tiles(tiled, (latents.shape[2] * f, latents.shape[3] * f))
        decoder = self._component("vae_decoder", base=self._vae_overflowed, tiling=tiling, vae=vae)
        images = _vae_decode(decoder, latents, tiles)
        if not np.isfinite(images).all() and not decoder.is_base:
            # fp16 activations past 65504 turn into Inf, then NaN after a norm: A1111's --no-half-vae, by itself
            log.warning("the %s VAE decoder overflowed (NaN/Inf in the image); decoding with the fp32 one from now on",
                        self.manifest.components["vae_decoder"].optimized.get("dtype", "optimized"))
            self._vae_overflowed = True
            images = _vae_decode(self._component("vae_decoder", base=True, tiling=tiling), latents, tiles)
        return latents_to_images(images)

    def encode_images(self, images, tiled=False, tiling=None, vae=None):
        """images: [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f] in the sampler's scale.

        The posterior mean, not a random sample as A1111 draws (its spread is ~1e-3 of the latent):
        the same image always gives the same latents. tiled: the VAE in tiles (None: for large images)."""
        encoder = self._component("vae_encoder", tiling=tiling, vae=vae)
        images = np.asarray(images, np.float32)
        if _use_tiles(tiled, images.shape[2:]):
            from .tiled_vae import encode_tiled

            # tiles take whole latents: the rows/columns past the last multiple of the VAE factor (only a
            # latent-upscale init image has them) are left out, where a whole-image pass floors them
            f = self.manifest.vae_scale_factor
            mean, _ = encode_tiled(encoder, images[..., :images.shape[2] // f * f, :images.shape[3] // f * f])
        else:
            mean, _ = encoder(images)
        return mean * self.manifest.vae_scaling_factor

    def _release(self, *names):
        """lowmem: drop the sessions of a finished stage so peak memory follows the largest component."""
        if self.lowmem:
            if "unet" in names:  # the ControlNets run with the UNet: freed with it (the extension's low_vram)
                for net in self._controlnets.values():
                    net.release()
            dropped = [k for k in self._components if k[0] in names]
            self._ran = _ran_on(self._ran)  # keep what ran, not the sessions being freed
            for key in dropped:
                del self._components[key]
            if dropped:
                return_freed_memory()

    # ------------------------------------------------------------------ generate

    def generate(self, prompt="", negative_prompt=None, *, latents=None, callback=None, noise_sampler=None,
                 preview=None, on_batch=None, **settings):
        """txt2img, img2img and inpainting, with optional hires fix and refiner -> GenerationResult.

        Takes a `sdonnx.GenerationRequest` (`pipe.generate(request)`), or its keywords
        (`pipe.generate("a cat", steps=20, hires=True)`; `GenerationRequest.keywords()` lists them with
        their defaults, and each part's fields document them). With a request, keywords given beside it
        replace its values. Every setting is checked before a session runs.

        Hooks that are not part of the request: latents, the initial noise as diffusers takes it,
        [batch_size, C, H/f, W/f] before scaling by the first sigma (the seed still gives the per-step noise,
        as diffusers' generator does; batch_count must be 1, since every batch would repeat that noise);
        callback(step, total) after every sampler step (raise Interrupted to stop: the result then holds the
        finished batches plus the current one decoded from its last x0 estimate, result.interrupted True);
        noise_sampler(sigma, sigma_next) overrides the first pass's per-step noise; preview(denoised) gets
        each step's x0 estimate [batch_size, C, H/f, W/f]; on_batch(images, seeds, infotexts) gets each batch
        as soon as it is decoded (the CLI saves it then, so an interrupt keeps the finished batches).
        """
        self._ran = {}
        request = _request(prompt, negative_prompt, settings)
        plan = request.validate(self.manifest, self.model_sigmas)
        if plan.hires is not None and plan.hires.upscaler not in LATENT_UPSCALERS:
            self.upscalers.get(plan.hires.upscaler)  # an unknown or unconverted model fails before any pass
        hooks = _Hooks(_check_latents(latents, plan, request.prompt), callback, noise_sampler, preview, on_batch)
        if request.faces.restore_faces:  # its models found and loaded before any sampling
            self.face_restorer(request.faces.restore_faces)
        refiner = self._refiner(request.refiner.refiner)
        job = self._prepare(request, plan, refiner)
        return self._run(request, plan, job, hooks)

    # ------------------------------------------------------------------ generate's stages

    def _prepare(self, request, plan, refiner):
        """Everything the batches share: LoRAs, conditionings, the init latent and image conditioning."""
        p, s, h = request.prompt, request.sampling, request.hires
        text, tags = extract_networks(p.prompt)  # A1111 takes tags from the positive prompt only
        # before the text encoder runs; hypernetwork tags stay in the infotext's prompt, as A1111
        networks = self.load_networks(lora_requests(tags), hypernet_requests(tags))
        guidance = s.cfg_scale != 1.0
        calls = SAMPLER_INFO[plan.sampler.sampler].total_steps(s.steps)  # A1111 schedules prompts over model calls
        conditioning, prompt_params = self.encode_prompts(text, p.negative_prompt, calls, p.clip_skip, p.emphasis,
                                                          guidance, networks=networks)
        hr_conditioning = None
        if plan.hires is not None:  # its own, as A1111's: prompt editing goes on from the first pass's calls
            hr_text, _ = extract_networks(h.hires_prompt or p.prompt)
            hr_conditioning, _ = self.encode_prompts(
                hr_text, h.hires_negative_prompt or p.negative_prompt,
                SAMPLER_INFO[plan.hires_sampler.sampler].total_steps(plan.hires.steps), p.clip_skip, p.emphasis,
                guidance, first_pass_steps=calls, networks=networks)
        added = _added(request.sdxl)
        conditioning = self.with_time_ids(conditioning, plan.width, plan.height, **added)
        if plan.hires is not None:  # A1111 conditions the second pass on the hires size
            hr_conditioning = self.with_time_ids(hr_conditioning, plan.hires.width, plan.hires.height, **added)
        self._release(*(t.component for t in self.manifest.text_encoders))  # SDXL: text_encoder_2 too
        refine = self._refine(refiner, request, plan, text, calls)
        vae = self.external_vae(request.vae.vae)
        init_latent, image_cond = self._init_latents(plan, request.tiling.tiled_vae, vae)
        self._release("vae_encoder")
        controls = self._controls(request, plan)
        facts = {"Model hash": self.manifest.model_hash, "Model": self.manifest.name,
                 "VAE hash": vae.sha256[:10] if vae else None, "VAE": vae.name if vae else None,
                 "Lora hashes": networks.hashes if networks else None, "TI hashes": prompt_params["TI hashes"],
                 "Refiner": _refiner_name(refiner), "ControlNet": {i: c.net.manifest.title for i, c in enumerate(controls)},
                 "VAE hash": vae.sha256[:10] if vae else None, "VAE": vae.name if vae else None,
                 "Precision": self._precision_label(networks, plan)}
        return _Job(conditioning, hr_conditioning, networks, refine, init_latent, image_cond, facts, controls,
                    vae)

    def _controls(self, request, plan):
        """The request's ControlNet units with their models (checked against this model) and detected maps."""
        from .controlnet.apply import Control, detect
        from .controlnet.model import ControlNetModel, check_fits
        from .controlnet.preprocess import numpy_seed

        controls = []
        init = request.init
        for i, unit in enumerate(request.controlnet.units):
            folder = self.controlnet_library.find(unit.model).resolve()
            if folder not in self._controlnets:
                self._controlnets[folder] = ControlNetModel(folder, self.plan)
            net = self._controlnets[folder]
            check_fits(net.manifest, self.manifest)
            image, mask = _unit_source(unit, init, i)
            detected = detect(unit, image, mask, plan.width, plan.height, numpy_seed(plan.seed, plan.subseed or 0))
            controls.append(Control(unit, net, detected))
        return tuple(controls)

    def _precision_label(self, networks, plan):
        """The UNet's precision for the infotext: None for fp32. LoRA, hypernetworks and tiling run the fp32
        base graph (they rewrite its weights and convolutions); a provider's precision hint still applies."""
        base = bool(networks) or bool(plan.tiling)
        label = self.precision.label(self.manifest, base=base)
        return None if label == "fp32" else label

    def _run(self, request, plan, job, hooks):
        """The batches, one after the other: sample, decode, infotext."""
        size, count = request.prompt.batch_size, request.prompt.batch_count
        params = request.infotext_params(plan, job.facts)
        result = GenerationResult(images=[], seeds=[], infotexts=[], parameters=params)
        total = (len(plan.sigmas) - 1 + (plan.hires.steps_run if plan.hires else 0)) * count
        for n in range(count):
            seeds, subseeds = plan.batch_seeds(n, size)
            on_step = _StepReporter(hooks.callback, n * total // count, total, hooks.preview)
            try:
                x = self._sample_batch(request, plan, job, hooks, seeds, subseeds, on_step)
            except Interrupted:
                result.interrupted, x = True, on_step.last_denoised
            if x is not None:
                self._release("unet")
                if job.refine:
                    job.refine[0]._release("unet")
                result.images += self._images(x, request, plan, job)
                result.seeds += seeds
                result.infotexts += [request.infotext(plan, n * size + j, params=params) for j in range(size)]
                if hooks.on_batch is not None:
                    hooks.on_batch(result.images[-size:], seeds, result.infotexts[-size:])
            if result.interrupted:
                break
        self._release("vae_decoder", "vae_encoder")
        if job.refine:
            job.refine[0]._release("vae_decoder")
        if job.controls:
            from .controlnet.apply import detected_images

            result.detected_maps = detected_images(job.controls)
        self._ran = ran = _ran_on(self._ran)
        result.providers, result.devices = {k: v[0] for k, v in ran.items()}, {k: v[1] for k, v in ran.items()}
        return result

    def _sample_batch(self, request, plan, job, hooks, seeds, subseeds, on_step):
        """One batch's first pass, then its hires pass -> latents [B, C, h, w]."""
        rng_args = _rng_args(request.seeds, subseeds)
        rng = ImageRNG(plan.shape, seeds, **rng_args)
        noise = hooks.latents if hooks.latents is not None else rng.first()
        first = _Pass(plan.sampler, plan.sigmas, job.conditioning, request.sampling.options(), job.init_latent,
                      job.image_cond, plan.init, job.refine, self._pass_controls(job, plan.width, plan.height, plan),
                      request.sampling.steps if plan.init is None else len(plan.sigmas) - 1)
        x = self._sample(first, noise, rng, seeds, request, on_step, hooks.noise_sampler, job.networks, plan.tiling)
        if plan.hires is None:
            return x
        return self._hires_pass(x, request, plan, job, seeds, rng_args, on_step)

    def _hires_pass(self, x, request, plan, job, seeds, rng_args, on_step):
        """A1111's hires fix second pass: upscale the first pass, then img2img at the target size. Its noise
        comes from one new ImageRNG at the target size: the initial draw, then the per-step draws (A1111)."""
        m, hr, tiled = self.manifest, plan.hires, request.tiling.tiled_vae
        shape = (m.latent_channels, hr.height // m.vae_scale_factor, hr.width // m.vae_scale_factor)
        if hr.upscaler.startswith("Latent"):
            start = upscale_latents(x, shape[1:], hr.upscaler)
        else:
            upscaler = self.upscalers.get(hr.upscaler)  # A1111's resize_image with the hires upscaler
            images = [resize_with(im, hr.width, hr.height, upscaler)
                      for im in self.decode(x, tiled=tiled, tiling=plan.tiling, vae=job.vae)]
            start = self.encode_images(np.concatenate([to_array(im) for im in images]), tiled, plan.tiling, job.vae)
        # an inpainting model repaints everything in the second pass, as in txt2img (A1111)
        image_cond = self._blank_image_cond(shape, tiled, plan.tiling, job.vae) if m.is_inpaint else None
        same = plan.hires_sampler.sampler == plan.sampler.sampler
        second = _Pass(plan.hires_sampler, plan.hires_sigmas, job.hr_conditioning,
                       request.sampling.options() if same else {}, start, image_cond,
                       controls=self._pass_controls(job, hr.width, hr.height, plan, hires_pass=True),
                       control_steps=len(plan.hires_sigmas) - 1)
        rng = ImageRNG(shape, seeds, **rng_args)
        return self._sample(second, rng.first(), rng, seeds, request, on_step, None, job.networks, plan.tiling)

    def _pass_controls(self, job, width, height, plan, hires_pass=False):
        from .controlnet.apply import pass_units

        return pass_units(job.controls, width, height, hires_pass, plan.hires is not None) if job.controls else ()

    def _sample(self, p, noise, rng, seeds, request, on_step, noise_sampler, networks, tiling):
        """The one sampling routine of every pass: initial latent, denoiser (with the inpainting hooks and
        the refiner switch), per-step noise, sampler -> latents [B, C, h, w]."""
        keep = None
        if p.start is not None and p.init is not None and p.init.mask is not None:
            keep = 1.0 - p.init.latent_mask(noise.shape[2:])
        x = _initial_latent(p, noise, keep)
        clock = None
        if p.controls:  # the guidance windows follow the sampler's steps, as A1111's state.sampling_step
            from .controlnet.apply import StepClock

            clock = StepClock(p.control_steps)
            on_step = _chained(clock, on_step)
        denoise = self._denoiser(p, request.sampling.cfg_scale, networks, tiling, clock)
        for unit in p.controls:
            if unit.prepared is not None:  # ControlNet inpaint_only: the unmasked area's x0 is the control image's
                from .controlnet.apply import inpaint_only_blend

                pixels, blend = inpaint_only_blend(unit)
                denoise = _BlendKnown(denoise, self.encode_images(pixels, request.tiling.tiled_vae, tiling), blend)
                self._release("vae_encoder")
        if keep is not None:
            denoise = _BlendKnown(denoise, p.start, keep)
        step_noise = noise_sampler or _noise_sampler(p.sampler, x, p.sigmas, seeds, rng)
        x = SAMPLERS[p.sampler.sampler](denoise, x, p.sigmas, noise_sampler=step_noise, callback=on_step,
                                        **{**p.sampler.options, **p.options})
        return x if keep is None else p.start * keep + x * (1.0 - keep)

    def _denoiser(self, p, cfg_scale, networks, tiling, clock=None):
        """CFG denoiser of a pass; with a refiner, the refiner's takes over at its switch call. With ControlNet
        units (p.controls, clock) the UNet takes their residuals."""
        cfg_scale = cfg_scale * SAMPLER_INFO[p.sampler.sampler].cfg_multiplier
        # no local name keeps the UNet: after a refiner switch nothing holds it, and lowmem frees it
        unet = self._component("unet", networks=networks, tiling=tiling, residuals=bool(p.controls))
        if p.controls:
            from .controlnet.apply import ControlledUNet

            unet = ControlledUNet(unet, p.controls, clock, p.controls[0].net.manifest.residuals,
                                  self.manifest.latent_channels)
        denoise = cfg_denoiser(_with_image_cond(unet, p.image_cond), self.model_sigmas, self.manifest.prediction_type,
                               cfg_scale=cfg_scale, cond_at=p.conditioning.at, row_roles=bool(p.controls))
        if p.refine is None:
            return denoise
        refiner, conditioning, at = p.refine

        def second():  # at the switch, after the base UNet is let go (lowmem: one UNet at a time)
            self._release("unet")
            # the refiner's prompt schedule goes on counting calls where the base model's stopped
            return cfg_denoiser(refiner._component("unet", tiling=tiling), refiner.model_sigmas,
                                refiner.manifest.prediction_type, cfg_scale=cfg_scale,
                                cond_at=lambda i: conditioning.at(i + at))
        return _Switching(denoise, second, at)

    def _images(self, x, request, plan, job):
        """Decode a batch (with the refiner's VAE when it finished the job) and paste inpainting results."""
        decoder = job.refine[0] if job.refine and plan.hires is None else self
        images = decoder.decode(x, tiled=request.tiling.tiled_vae, tiling=plan.tiling, vae=job.vae)
        if job.controls:  # ControlNet inpaint_only puts the unmasked area back, as the extension
            from .controlnet.apply import restore_images

            images = restore_images(images, job.controls, images[0].width, images[0].height)
        # A1111: scripts' batch postprocessing, then restore faces per image, then the inpainting paste
        images = self._restore_faces(images, request.faces)
        return [plan.init.finish(im) for im in images] if plan.init else images

    def face_restorer(self, name):
        """The FaceRestorer of `name` (GFPGAN or CodeFormer) from self.face_dirs, loaded on first use."""
        if name not in self._face_restorers:
            from .postprocess.faces import FaceRestorer, find_models

            self._face_restorers[name] = FaceRestorer(*find_models(name, self.face_dirs), plan=self.plan)
        return self._face_restorers[name]

    def _restore_faces(self, images, faces):
        if not faces.restore_faces:
            return images
        from PIL import Image

        restorer = self.face_restorer(faces.restore_faces)
        return [Image.fromarray(restorer.restore(np.asarray(im.convert("RGB")), codeformer_weight=faces.codeformer_weight))
                for im in images]

    def _init_latents(self, plan, tiled, vae=None):
        """(init latent [1, C, h, w] or None, inpainting-model image conditioning [1, C+1, h, w] or None)."""
        m, init, shape = self.manifest, plan.init, plan.shape
        if init is None:  # txt2img on an inpainting model: everything is to be painted
            return None, self._blank_image_cond(shape, tiled, plan.tiling, vae) if m.is_inpaint else None
        latent = self.encode_images(init.array, tiled, plan.tiling, vae)
        if init.resize_mode == 3:  # A1111: the image encoded at its own size, the latents resized (bilinear)
            latent = upscale_latents(latent, shape[1:], "Latent")
        if not m.is_inpaint:
            return latent, None
        if init.mask is None:
            return latent, np.concatenate([np.ones((1, 1, *shape[1:]), np.float32), latent], 1)
        masked = self.encode_images(init.array * (1.0 - init.pixel_mask()), tiled, plan.tiling, vae)
        return latent, np.concatenate([init.conditioning_mask(shape[1:]), masked], 1)

    def _blank_image_cond(self, shape, tiled, tiling, vae=None):
        """An inpainting model's conditioning when all is to be painted: mask of ones, the latents of a grey
        image (A1111's txt2img_image_conditioning): [1, C+1, h, w]."""
        f = self.manifest.vae_scale_factor
        blank = np.zeros((1, 3, shape[1] * f, shape[2] * f), np.float32)
        return np.concatenate([np.ones((1, 1, *shape[1:]), np.float32),
                               self.encode_images(blank, tiled, tiling, vae)], 1)

    def external_vae(self, value):
        """The external VAE a request's `vae` selects (vae.ExternalVae, converted on first use and checked
        against this model's latent space), or None for the model's own (A1111's sd_vae semantics)."""
        from .vae import find_vae_file, load_external_vae

        found = find_vae_file(value, self.checkpoint, self.data)
        if found is None:
            return None
        path, beside = found
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime)
        if key not in self._vaes:
            self._vaes[key] = load_external_vae(path, self.manifest, self.data, beside, self.convert_progress)
        return self._vaes[key]

    def _refiner(self, refiner):
        """The refiner Pipeline (loaded once per folder; no session yet), or None; checked before any pass."""
        if refiner is None or isinstance(refiner, Pipeline):
            found = refiner
        else:
            key = str(Path(refiner).resolve())
            if key not in self._refiners:
                # the refiner reads the same LoRA and embedding folders as the base model
                self._refiners[key] = Pipeline(refiner, load_manifest(refiner), self.plan, lowmem=self.lowmem,
                                               lora_dir=self.lora_dir, embeddings_dir=_existing(self.embeddings.folder))
            found = self._refiners[key]
        if found is not None:
            r, m = found.manifest, self.manifest
            if (r.latent_channels, r.vae_scale_factor) != (m.latent_channels, m.vae_scale_factor):
                raise ValueError(f"refiner {r.name} ({r.family}) has another latent space than {m.name} ({m.family}): "
                                 f"{r.latent_channels} channels / factor {r.vae_scale_factor} vs "
                                 f"{m.latent_channels} / {m.vae_scale_factor}")
        return found

    def _refine(self, refiner, request, plan, text, calls):
        """A1111's refiner switch: (refiner Pipeline, its conditioning, the denoiser call it takes over at),
        or None without a refiner. A1111 switches at the first call i with i / steps >= switch_at, counting
        model calls (`SamplerInfo.total_steps`)."""
        if refiner is None:
            return None
        p, s = request.prompt, request.sampling
        conditioning, _ = refiner.encode_prompts(text, p.negative_prompt, calls, p.clip_skip, p.emphasis,
                                                 guidance=s.cfg_scale != 1.0)
        conditioning = refiner.with_time_ids(conditioning, plan.width, plan.height, **_added(request.sdxl))
        refiner._release(*(t.component for t in refiner.manifest.text_encoders))
        sampled = SAMPLER_INFO[plan.sampler.sampler].total_steps(len(plan.sigmas) - 1)
        at = next(i for i in range(sampled + 1) if i / sampled >= request.refiner.refiner_switch_at)
        return refiner, conditioning, at


# Pipeline.generate's keywords, for help() and for callers that inspect them (the HTTP door)
Pipeline.generate.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     # prompt: the text, or a whole GenerationRequest
     *[inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
       for name, default in (("prompt", ""), ("negative_prompt", None))],
     *[inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
       for name, default in GenerationRequest.keywords().items() if name not in ("prompt", "negative_prompt")],
     *[inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
       for name in ("latents", "callback", "noise_sampler", "preview")]])


@dataclass(frozen=True)
class Networks:
    """The extra networks of one generate call, passed to the stages as an argument."""

    loras: object = None  # adapters.lora.Applied or None
    hypernets: tuple = ()  # hypernetwork files chained in the UNet, in tag order
    multipliers: object = None  # float32 [len(hypernets)]

    @property
    def hashes(self):
        """The `Lora hashes` infotext value, or None."""
        return self.loras.hashes if self.loras is not None else None

    def lora_key(self, component):
        return self.loras.keys.get(component) if self.loras is not None else None


@dataclass(frozen=True)
class _Hooks:
    """What a generate call passes besides its request."""

    latents: object
    callback: object
    noise_sampler: object
    preview: object
    on_batch: object = None


@dataclass(frozen=True)
class _Job:
    """What every batch of a generate call shares."""

    conditioning: object
    hr_conditioning: object
    networks: object  # adapters.lora.Applied or None
    refine: object  # (refiner Pipeline, conditioning, switch call) or None
    init_latent: object  # [1, C, h, w] or None
    image_cond: object  # inpainting models: [1, C+1, h, w] or None
    facts: dict  # infotext values the model side knows
    controls: tuple = ()  # controlnet.apply.Control of each enabled unit
    vae: object = None  # vae.ExternalVae decoding and encoding instead of the model's VAE, or None


@dataclass(frozen=True)
class _Pass:
    """One sampling run: the first pass, the hires pass (the refiner rides on the first)."""

    sampler: object  # samplers.Resolved
    sigmas: object
    conditioning: object
    options: dict  # sampler options given by the user
    start: object = None  # img2img: the latent noised to sigmas[0]; None: txt2img from pure noise
    image_cond: object = None
    init: object = None  # img2img.InitPlan: masks and masked content
    refine: object = None
    controls: tuple = ()  # controlnet.apply.PassUnit of the units active in this pass
    control_steps: int = 0  # the steps the extension divides by for the guidance windows


def _model_cache(data):
    """The conversion cache of a data folder (its upscaler files convert on first use), None without one."""
    if data is None:
        return None
    from .datadir import model_cache

    return model_cache(data)


def _external_key(key):
    return isinstance(key[-1], tuple) and key[-1][:1] == ("vae",)


def _request(prompt, negative_prompt, settings):
    """generate's arguments -> GenerationRequest: a request (keywords beside it replace its values), or the
    keywords themselves."""
    if isinstance(prompt, GenerationRequest):
        if negative_prompt is not None:
            settings = {"negative_prompt": negative_prompt, **settings}
        return prompt.replace(**settings) if settings else prompt
    return GenerationRequest.from_kwargs(prompt=prompt, negative_prompt=negative_prompt or "", **settings)


def _check_latents(latents, plan, prompt_part):
    if latents is None:
        return None
    latents = np.asarray(latents, np.float32)
    if prompt_part.batch_count > 1:
        raise ValueError(f"latents give the noise of one batch; with batch_count {prompt_part.batch_count} every "
                         f"batch would repeat it while the infotext reports other seeds: use batch_count=1")
    expected = (prompt_part.batch_size, *plan.shape)
    if latents.shape != expected:
        raise ValueError(f"latents have shape {latents.shape}; expected {expected} "
                         f"for batch size {prompt_part.batch_size} at {plan.width}x{plan.height}")
    return latents


def _initial_latent(p, noise, keep):
    """txt2img: noise at the first sigma; img2img: the start latent (masked content applied) plus noise."""
    if p.start is None:
        return noise * np.float32(_initial_scale(p.sampler.sampler, p.sigmas[0]))
    start = p.init.masked_content(p.start, keep, noise) if keep is not None else p.start
    return start + noise * np.float32(p.sigmas[0])


def _rng_args(seeds_part, subseeds):
    return dict(source=seeds_part.rng, subseeds=subseeds, subseed_strength=seeds_part.subseed_strength,
                seed_resize_from_h=seeds_part.seed_resize_from_h, seed_resize_from_w=seeds_part.seed_resize_from_w,
                eta_noise_seed_delta=seeds_part.ensd)


def _added(sdxl):
    return dict(crop=sdxl.crop_top_left, aesthetic_score=sdxl.aesthetic_score,
                negative_aesthetic_score=sdxl.negative_aesthetic_score)


def _refiner_name(refiner):
    if refiner is None:
        return None
    r = refiner.manifest
    return f"{r.name} [{r.model_hash}]" if r.model_hash else r.name


def _vae_decode(decoder, latents, tiles):
    """latents: [B, C, h, w] (unscaled) -> images [B, 3, H, W] in [-1, 1], in tiles or whole."""
    if tiles:
        from .tiled_vae import decode_tiled

        return decode_tiled(decoder, latents)
    return decoder(latents)


def _unit_source(unit, init, index):
    """(image, mask or None) uint8 arrays a unit preprocesses: its own, or in img2img without one the init image
    (and, for inpaint modules, the inpainting mask: white = repaint), as the extension."""
    from .controlnet.apply import image_array
    from .controlnet.preprocess import find_module

    what = f"ControlNet unit {index}"
    if unit.image is not None:
        mask = None if unit.mask is None else image_array(unit.mask, f"{what} mask")
        return image_array(unit.image, f"{what} image"), mask
    mask = None
    if init.mask is not None and find_module(unit.module).mask_in_alpha:
        mask = image_array(init.mask, "inpainting mask")
        mask = 255 - mask if init.inpainting_mask_invert else mask
    return image_array(init.init_image, "init image"), mask


def _chained(first, second):
    """A sampler callback that calls both."""
    def callback(*args, **kwargs):
        first(*args, **kwargs)
        return second(*args, **kwargs)

    return callback


def _with_image_cond(unet, image_cond):
    """An inpainting model's UNet takes [x, mask, masked image latents]; the batch is blocks of B
    (uncond, conds...), so the conditioning is tiled to match."""
    if image_cond is None:
        return unet

    def call(sample, timestep, context, **added):
        reps = sample.shape[0] // image_cond.shape[0]
        return unet(np.concatenate([sample, np.tile(image_cond, (reps, 1, 1, 1))], 1), timestep, context, **added)

    return call


class _Switching:
    """Denoiser calls 0 .. at-1 go to `first`, the rest to the denoiser make_second() returns (the refiner
    switch). `first` is dropped before make_second runs, so its UNet can be freed before the next loads.
    last_uncond is what CFG++ samplers read, from the denoiser that made the last call."""

    def __init__(self, first, make_second, at):
        self.active, self.make_second, self.at, self.calls, self.last_uncond = first, make_second, at, 0, None

    def __call__(self, x, sigma):
        self.calls += 1
        if self.calls == self.at + 1:
            self.active = None
            self.active = self.make_second()
        denoised = self.active(x, sigma)
        self.last_uncond = self.active.last_uncond
        return denoised


class _BlendKnown:
    """Inpainting with any model: the known region's x0 is the init latent at every step (A1111)."""

    def __init__(self, denoise, init_latent, keep):
        self.denoise, self.init_latent, self.keep, self.last_uncond = denoise, init_latent, keep, None

    def __call__(self, x, sigma):
        denoised = self.denoise(x, sigma)
        uncond = getattr(self.denoise, "last_uncond", None)
        self.last_uncond = None if uncond is None else self._blend(uncond)
        return self._blend(denoised)

    def _blend(self, x0):
        return self.init_latent * self.keep + x0 * (1.0 - self.keep)


def _use_tiles(tiled, size_hw):
    """The VAE runs in tiles when asked, or (tiled=None) when the image is large."""
    from .tiled_vae import needs_tiling

    return tiled if tiled is not None else needs_tiling(*size_hw)


def _initial_scale(sampler, sigma_max):
    return (1.0 + sigma_max**2) ** 0.5 if sampler in TIMESTEP_SAMPLERS else sigma_max


def _noise_sampler(resolved, x, sigmas, seeds, image_rng):
    if resolved.sampler in BROWNIAN_SAMPLERS:
        positive = sigmas[sigmas > 0]
        return BrownianTreeNoiseSampler(x.shape, float(positive.min()), float(positive.max()), seed=list(seeds),
                                        dtype=x.dtype)
    return lambda sigma, sigma_next: image_rng.next()


class _StepReporter:
    """The sampler callback: counts steps over the whole job for callback(done, total), hands each step's
    x0 estimate to preview, and keeps the last one (an interrupted batch is decoded from it)."""

    def __init__(self, callback, offset, total, preview=None):
        self.callback, self.done, self.total, self.preview = callback, offset, total, preview
        self.last_denoised = None

    def __call__(self, info=None, *args, **kwargs):
        self.done += 1
        if isinstance(info, dict) and info.get("denoised") is not None:
            self.last_denoised = info["denoised"]
            if self.preview is not None:
                self.preview(self.last_denoised)
        if self.callback is not None:
            self.callback(self.done, self.total)
