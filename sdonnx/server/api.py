"""A1111's /sdapi/v1 routes: request -> validated generation plan -> worker job -> A1111 response."""
import asyncio
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Request

from .. import __version__, limits
from ..image import read_infotext, save_png
from ..img2img import LATENT_UPSCALERS
from ..infotext import parse_infotext
from ..pipeline import Interrupted
from ..request import GenerationRequest
from ..samplers import SAMPLER_INFO
from ..schedules import DEFAULT_RHO, SCHEDULER_NAMES
from .a1111 import (NO_REFINER, OPTIONS, SAMPLER_NEUTRAL, TranslationError, check_option, drop_missing_loras,
                    translate)
from .codec import EncodedImage, decode_bytes, decode_image, encode_png, latent_preview
from . import scripts
from .extras import (ExtrasBatchImagesRequest, ExtrasSingleImageRequest, decode_images, html_info, ignored,
                     plan_images, realesrgan_list, run_images, upscaler_list)
from .models import UnknownModel
from .schemas import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from .worker import QueueFull

log = logging.getLogger(__name__)



class ApiError(Exception):
    """An A1111-style error answer: status code and detail."""

    def __init__(self, status, detail, headers=None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status, detail, headers


@dataclass
class Plan:
    """A validated generation: what to run on which model, and what to report."""

    mode: str
    entry: object
    kwargs: dict
    seed: int
    batch_size: int
    n_iter: int
    ignored: list
    save: bool
    comments: list = field(default_factory=list)  # warnings for the response's info
    styles: list = field(default_factory=list)
    prompts: dict = field(default_factory=dict)  # prompt as sent -> prompt generated from (missing LoRAs)
    batch_pixels: int = 0  # pixels of its largest batch (first pass or hires target)
    detected_maps: bool = False  # append the ControlNet units' detected maps to the images (the extension's)


@dataclass
class ServerState:
    store: object
    worker: object
    outdir: Path | None = None
    upscalers: object = None  # postprocess.upscale.Upscalers: the Extras routes' and /upscalers' models
    face_restorers: object = None  # postprocess.faces.FaceRestorers: /face-restorers, the Extras face steps
    options: dict = field(default_factory=lambda: {**{name: default for name, (_, default) in OPTIONS.items()},
                                                   "samples_format": "png", "live_previews_enable": True,
                                                   "control_net_no_detectmap": False})


def build_router(state):
    router = APIRouter(prefix="/sdapi/v1")

    @router.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        await _convert_first(state, req, request)
        plan = plan_generation(state, req, "txt2img")
        if req.script_name:
            return await _run_script(state, plan, req, request)
        return await _generate(state, plan, req, request)

    @router.post("/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        await _convert_first(state, req, request)
        plan = plan_generation(state, req, "img2img")
        run = _run_script if req.script_name else _generate
        response = await run(state, plan, req, request)
        if not req.include_init_images:
            response["parameters"].update(init_images=None, mask=None)
        return response

    @router.post("/png-info")
    async def png_info(req: PngInfoRequest):
        raw = decode_bytes(req.image)
        image = decode_image(req.image)
        text = read_infotext(io.BytesIO(raw)) or ""
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @router.get("/progress")
    async def progress(skip_current_image: bool = False):
        return progress_report(state.worker, skip_current_image)

    @router.post("/interrupt")
    async def interrupt():
        state.worker.interrupt()
        return {}

    @router.post("/skip")
    async def skip():
        state.worker.skip()
        return {}

    @router.get("/samplers")
    async def samplers():
        return [{"name": name, "aliases": list(info.aliases), "options": _sampler_options(info)}
                for name, info in SAMPLER_INFO.items()]

    @router.get("/schedulers")
    async def schedulers():
        return [{"name": _schedule_id(label), "label": label, "aliases": None,
                 "default_rho": DEFAULT_RHO.get(label, -1), "need_inner_model": False} for label in SCHEDULER_NAMES]

    @router.get("/sd-models")
    async def sd_models():
        return [m.as_a1111() for m in state.store.models]

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints():
        state.store.refresh()
        return {}

    @router.get("/loras")
    async def loras():
        return state.store.loras()

    @router.post("/refresh-loras")
    async def refresh_loras():
        return {}  # listed from disk on every request

    @router.get("/embeddings")
    async def embeddings():
        return state.store.embeddings()

    @router.get("/options")
    async def get_options():
        return current_options(state)

    @router.post("/options")
    async def set_options(options: dict):
        apply_options(state, options)  # A1111 answers null

    @router.get("/upscalers")
    async def upscalers():  # A1111's built-in ones and the upscaler models in the upscaler folders
        return upscaler_list(state.upscalers)

    @router.get("/realesrgan-models")
    async def realesrgan_models():
        return realesrgan_list(state.upscalers)

    @router.post("/extra-single-image")
    async def extra_single_image(req: ExtrasSingleImageRequest, request: Request):
        images, text = await _extras(state, req, request)
        return {"html_info": html_info(text), "image": images[0]}

    @router.post("/extra-batch-images")
    async def extra_batch_images(req: ExtrasBatchImagesRequest, request: Request):
        images, text = await _extras(state, req, request)
        return {"html_info": html_info(text), "images": images}

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/prompt-styles")
    async def prompt_styles():
        return [{"name": name, "prompt": prompt, "negative_prompt": negative}
                for name, (prompt, negative) in state.store.styles().items()]

    @router.get("/memory")
    async def memory():
        return {"ram": ram_figures(), "cuda": {"error": "unavailable"}}  # A1111's answer without torch.cuda

    # A1111 lists clients ask for at start-up; this server has none of these
    @router.get("/hypernetworks")
    async def hypernetworks():
        return state.store.hypernetworks()

    @router.get("/face-restorers")
    async def face_restorers():
        faces = state.face_restorers
        return [{"name": name, "cmd_dir": str(faces.folders[name])} for name in faces.installed()] if faces else []

    @router.get("/sd-vae")
    async def sd_vae():
        return [{"model_name": name, "filename": str(path)} for name, path in state.store.vaes().items()]

    for name in ("sd-modules",):
        router.add_api_route(f"/{name}", _empty_list, methods=["GET"])
    router.add_api_route("/scripts", _scripts, methods=["GET"])
    router.add_api_route("/script-info", _script_info, methods=["GET"])
    router.add_api_route("/cmd-flags", _no_flags, methods=["GET"])
    return router


def _installed_restorers(state):
    return state.face_restorers.installed() if state.face_restorers else []


def ram_figures():
    """A1111's /memory RAM entry in bytes: this process's resident memory against the machine's total."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError) as e:  # no sysconf or /proc (Windows, macOS)
        return {"error": f"unavailable ({e})"}
    return {"free": total - used, "used": used, "total": total}


async def _empty_list():
    return []


async def _scripts():
    return scripts.script_lists()


async def _script_info():
    from ..plots.axes import axis_types

    return scripts.script_info(lambda mode: [t.label for t in axis_types(mode) if not t.unsupported])


async def _no_flags():
    return {}


# ---------------------------------------------------------------------------- planning


def plan_generation(state, req, mode):
    """Validate a request against the model and samplers before it queues; raises ApiError."""
    overrides = dict(req.override_settings or {})
    entry = _model_for(state, overrides.pop("sd_model_checkpoint", None))
    manifest = entry.manifest
    _check_counts(req)
    try:
        t = translate(req, mode, {**state.options, **overrides}, state.store.styles(), state.store.find,
                      restorers=_installed_restorers(state))
    except TranslationError as e:
        raise ApiError(e.status, str(e)) from None
    t.ignored += [f"override_settings.{k}" for k in overrides if k not in state.options and k not in OPTIONS]
    kwargs, f = t.kwargs, manifest.vae_scale_factor
    init = kwargs.get("init_image")  # img2img's size defaults to the init image's, floored to the latent grid
    width, height = (init.width // f * f, init.height // f * f) if init is not None else (manifest.native_size,) * 2
    kwargs["width"], kwargs["height"] = _check_size(kwargs.get("width") or width, kwargs.get("height") or height, f)
    batch_pixels = _check_limits(kwargs, manifest)
    _check_hires_upscaler(state, kwargs)
    prompts = _without_missing_loras(kwargs, state.store.lora_names(), t.comments)
    try:  # every user error before the job queues; the decoded images are dropped again until it runs
        GenerationRequest.from_kwargs(**_decoded(kwargs)).validate(manifest)
        _check_controlnets(state, kwargs.get("controlnet", ()), manifest)
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    return Plan(mode, entry, kwargs, kwargs.pop("seed"), kwargs.pop("batch_size"), kwargs.pop("batch_count"),
                t.ignored, req.save_images, comments=t.comments, styles=t.styles, prompts=prompts,
                batch_pixels=batch_pixels, detected_maps=bool(kwargs.get("controlnet")) and not {
                    **state.options, **overrides}.get("control_net_no_detectmap", False))


def _check_hires_upscaler(state, kwargs):
    """A hires upscaler model must be installed and converted (422 naming the choices or the convert command)."""
    name = kwargs.get("hires_upscaler")  # absent (e.g. an infotext without the key): the request's Latent
    if kwargs.get("hires") and name is not None and name not in LATENT_UPSCALERS and state.upscalers is not None:
        try:
            state.upscalers.get(name)
        except ValueError as e:
            raise ApiError(422, f"hr_upscaler: {e}") from None


def _check_controlnets(state, units, manifest):
    """Each ControlNet unit names a converted ControlNet made for this model (ControlNetError, a ValueError)."""
    from ..controlnet.model import check_fits, load_controlnet_manifest

    library = state.store.controlnets()
    for unit in units:
        check_fits(load_controlnet_manifest(library.find(unit.model)), manifest)


def _check_limits(kwargs, manifest):
    """The Pipeline's limits, checked before the job queues (each batch is checked again when it runs).
    Returns the pixels of the job's largest batch."""
    args = {k: v for k, v in kwargs.items() if k not in ("init_image", "mask")}  # the size is set: no image needed
    try:
        limits.check_generation(args, manifest.native_size)
        width, height = limits.final_size(args, manifest.native_size)
    except limits.LimitError as e:
        raise ApiError(422, str(e)) from None
    return width * height * kwargs["batch_size"]


def _decoded(kwargs):
    """The keywords with the request's images decoded (they wait in the queue compressed, as EncodedImage)."""
    return {k: v.decode() if isinstance(v, EncodedImage) else v for k, v in kwargs.items()}


def _without_missing_loras(kwargs, available, comments):
    """A1111 generates without a LoRA it cannot find and says so: the tags go from the prompts generate sees.
    Returns {prompt as sent: prompt generated from} for putting the tags back into the infotexts."""
    missing, restore = [], {}
    for key in ("prompt", "hires_prompt"):
        if kwargs.get(key):
            kept, gone = drop_missing_loras(kwargs[key], available)
            if gone:
                restore[kwargs[key]] = kept
                kwargs[key] = kept
                missing += [name for name in gone if name not in missing]
    if missing:
        comments.append(f"Lora not found: {', '.join(missing)}")
        log.warning("Lora not found: %s", ", ".join(missing))
    return restore


async def _convert_first(state, req, request):
    """A data folder's checkpoint (the model, or the refiner) that has no converted copy yet is converted by the
    worker before the request is planned: one job, shown in /progress with its stages, behind the jobs already
    queued (the conversion's memory and cores are the device's too). Other routes keep answering meanwhile:
    the conversion runs in a child process and the worker's thread only relays its progress."""
    names = [(req.override_settings or {}).get("sd_model_checkpoint")]
    if getattr(req, "refiner_checkpoint", None) not in NO_REFINER:
        names.append(req.refiner_checkpoint)
    for i, name in enumerate(names):
        entry = _model_for(state, name) if i == 0 else _find(state, name)
        if entry is None or entry.manifest is not None:
            continue
        try:
            job = state.worker.submit(lambda job, _, entry=entry: _convert_job(job, state.store, entry), "convert",
                                      task_id=req.force_task_id if i == 0 else None)
        except QueueFull as e:
            raise ApiError(503, str(e), {"Retry-After": "10"}) from None
        await _wait(job, request)
    await _convert_vae_first(state, req, request, _model_for(state, names[0]))


async def _convert_vae_first(state, req, request, entry):
    """The VAE the request selects (sd_vae) when it has no converted copy yet: refused (422) when it cannot decode
    the model's latents, else converted as a job /progress shows, before the generation queues."""
    from ..cache import entry_source
    from ..datadir import model_cache
    from ..vae import check_space, find_vae_file, load_external_vae, vae_family

    value = (req.override_settings or {}).get("sd_vae", state.options.get("sd_vae"))
    try:
        found = find_vae_file(value, entry_source(entry.path), state.store.data)
        if found is None:
            return
        path, beside = found
        family = vae_family(path, entry.manifest.family if beside else None)
        check_space(family, path.name, entry.manifest)
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    cache = model_cache(state.store.data)
    if cache.find("vae", path, {"family": family}) is not None:
        return

    def convert(job, _):
        def progress(p):
            job.message = p.message
            job.callback(p.done, p.total) if p.total else job.callback(job.step, job.steps)
        try:
            load_external_vae(path, entry.manifest, state.store.data, beside, progress)
        except Interrupted:
            raise ApiError(409, f"converting {path.name} was interrupted") from None

    try:
        job = state.worker.submit(convert, "convert")
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": "10"}) from None
    await _wait(job, request)


def _find(state, name):
    try:
        return state.store.find(name)
    except UnknownModel:
        return None  # the translation names it


def _convert_job(job, store, entry):
    """Worker side of a conversion: its stages become the job's steps; /interrupt stops it (no entry is left)."""
    def progress(p):
        job.message = p.message
        job.callback(p.done, p.total) if p.total else job.callback(job.step, job.steps)

    try:
        return store.convert(entry, progress)
    except Interrupted:
        raise ApiError(409, f"converting {entry.checkpoint.name} was interrupted") from None


def _model_for(state, name):
    try:
        entry = state.store.find(name) if name else state.store.current
    except UnknownModel as e:
        raise ApiError(404, str(e)) from None
    if entry is None:
        raise ApiError(404, "no model to generate with: the models folder holds no converted model "
                            "(convert one with `sdonnx convert`, then POST /sdapi/v1/refresh-checkpoints)")
    return entry


def _check_counts(req):
    for name, value, top in (("steps", req.steps, limits.MAX_STEPS), ("batch_size", req.batch_size,
                              limits.MAX_BATCH_SIZE), ("n_iter", req.n_iter, limits.MAX_BATCH_COUNT)):
        if not 1 <= value <= top:
            raise ApiError(422, f"{name} must be between 1 and {top}, got {value}")


def _check_size(width, height, factor):
    for name, value in (("width", width), ("height", height)):
        if value < factor or value > limits.MAX_SIDE or value % factor:
            raise ApiError(422, f"{name} {value} must be a multiple of {factor} between {factor} and "
                                f"{limits.MAX_SIDE}")
    return width, height


# ---------------------------------------------------------------------------- running


def run_plan(job, pipeline_for, plan, outdir):
    """Worker side: generate plan.n_iter batches (so /skip can drop one), encode them, save if asked."""
    pipe = pipeline_for(plan.entry)
    kwargs = _decoded(plan.kwargs)
    job.job_count = plan.n_iter
    images, seeds, infotexts, parameters, detected = [], [], [], {}, []
    for n in range(plan.n_iter):
        if job.stop:
            break
        job.next_iteration(n)
        # seeds run on across iterations as in one A1111 call; with a variation strength the variation
        # seeds do and the seed stays
        offset = n * plan.batch_size
        if "subseed" in kwargs:
            kwargs["subseed"] = plan.kwargs["subseed"] + offset
        seed = plan.seed if "subseed" in kwargs else plan.seed + offset
        result = pipe.generate(**kwargs, seed=seed, batch_size=plan.batch_size,
                               batch_count=1, callback=job.callback, preview=job.preview)
        images += result.images
        seeds += result.seeds
        infotexts += [_with_sent_prompt(text, plan.prompts) for text in result.infotexts]
        parameters, detected = result.parameters, result.detected_maps
    save_error = _save(plan, outdir, images, seeds, infotexts)
    encoded = [encode_png(image, text) for image, text in zip(images, infotexts)]
    if plan.detected_maps and not job.stop:  # sd-webui-controlnet appends them after the images, unsaved
        encoded += [encode_png(image) for image in detected]
    return {"images": encoded, "seeds": seeds, "infotexts": infotexts, "parameters": parameters,
            "interrupted": job.stop, "save_error": save_error}


def _save(plan, outdir, images, seeds, infotexts):
    """Save the images when asked; a failure (disk full, folder gone) is returned, not raised: the client
    still gets its images, and the error in `info`."""
    if not plan.save or outdir is None:
        return None
    try:
        for image, seed, text in zip(images, seeds, infotexts):
            save_png(image, Path(outdir) / f"{plan.mode}-images", text, seed=seed)
    except OSError as e:
        log.warning("saving %s images to %s failed: %s", plan.mode, outdir, e)
        return f"images not saved to {outdir}: {e.strerror or e}"
    return None


def _with_sent_prompt(text, prompts):
    """The infotext with the prompt as the client sent it (the tags of LoRAs not found included, as A1111)."""
    for sent, generated in prompts.items():
        if text.startswith(generated):
            return sent + text[len(generated):]
    return text


async def _generate(state, plan, req, request):
    # past four native-size images per batch, ONNX Runtime's arena would keep the job's peak: hand it back
    large = plan.batch_pixels > 4 * plan.entry.manifest.native_size ** 2
    try:
        job = state.worker.submit(lambda job, pipeline_for: run_plan(job, pipeline_for, plan, state.outdir),
                                  plan.mode, task_id=req.force_task_id, release=large)
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": "10"}) from None
    outcome = await _wait(job, request)
    return {"images": outcome["images"] if req.send_images else [], "parameters": req.model_dump(),
            "info": json.dumps(_info(plan, req, outcome, job), ensure_ascii=False)}


async def _run_script(state, plan, req, request):
    """A1111's script_name/script_args: the script's cells checked before the job queues, run as one job."""
    try:
        name = scripts.find_script(req.script_name)
        base = scripts.base_request(_decoded(plan.kwargs), plan.seed, plan.batch_size, plan.n_iter)
        script = scripts.plan_script(name, req.script_args, base, req.seed in (-1, None),
                                     scripts.context_for(state.store, plan.mode, state.upscalers),
                                     lambda model: (model or plan.entry).manifest, state.store.find)
    except ValueError as e:  # the script's arguments, a cell's value, a model name or a limit
        raise ApiError(422, str(e)) from None
    try:
        job = state.worker.submit(lambda job, pipeline_for: scripts.run_script_job(
            job, pipeline_for, script, lambda model: model or plan.entry), plan.mode, task_id=req.force_task_id)
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": "10"}) from None
    result = await _wait(job, request)
    images, texts = (result.images, result.infotexts) if result else ([], [])
    save_error = scripts.save_script_images(result, state.outdir, plan.mode, name) \
        if result and plan.save and state.outdir else None
    outcome = {"parameters": {}, "seeds": [], "infotexts": texts, "interrupted": job.stop, "save_error": save_error}
    info = {**_info(plan, req, outcome, job), **(scripts.info_fields(result) if result else {})}
    encoded = [encode_png(image, text) for image, text in zip(images, texts)] if req.send_images else []
    return {"images": encoded, "parameters": req.model_dump(), "info": json.dumps(info, ensure_ascii=False)}


async def _extras(state, req, request):
    """An Extras request checked (names, values, sizes) before it queues, then run on the worker ->
    (base64 PNGs, A1111's postprocessing text)."""
    try:
        images = decode_images(req)
        extras = plan_images(req, images, state.upscalers, state.face_restorers)
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    if ignored(req):
        log.warning("extras: ignoring %s (not available here)", ", ".join(ignored(req)))
    try:
        job = state.worker.submit(lambda job, pipeline_for: run_images(images, extras, state.upscalers,
                                                                              state.face_restorers), "extras")
    except QueueFull as e:
        raise ApiError(503, str(e), {"Retry-After": "10"}) from None
    return await _wait(job, request)


async def _wait(job, request):
    """The job's result; a client that disconnects while waiting cancels its job (freeing the device)."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                job.cancel()
                raise ApiError(499, "client closed the request")
    except asyncio.CancelledError:
        job.cancel()
        raise
    except ValueError as e:  # the pipeline's own checks name the bad value
        raise ApiError(422, str(e)) from None


def _info(plan, req, outcome, job):
    """A1111's `info` JSON, plus what this server ignored and whether the run was interrupted."""
    kw, m = plan.kwargs, plan.entry
    params = outcome["parameters"]
    seeds = outcome["seeds"]
    prompt = next((sent for sent, used in plan.prompts.items() if used == kw["prompt"]), kw["prompt"])
    return {
        "prompt": prompt, "all_prompts": [prompt] * len(seeds),
        "negative_prompt": kw["negative_prompt"], "all_negative_prompts": [kw["negative_prompt"]] * len(seeds),
        "seed": seeds[0] if seeds else plan.seed, "all_seeds": seeds,
        "subseed": kw.get("subseed", -1), "subseed_strength": kw.get("subseed_strength", 0),
        "all_subseeds": [kw["subseed"] + i for i in range(len(seeds))] if "subseed" in kw else [-1] * len(seeds),
        "width": kw["width"], "height": kw["height"], "sampler_name": kw["sampler"],
        "scheduler": kw["scheduler"], "cfg_scale": kw["cfg_scale"], "steps": kw["steps"],
        "batch_size": plan.batch_size, "restore_faces": bool(kw.get("restore_faces")),
        "face_restoration_model": kw.get("restore_faces"),
        "sd_model_name": m.name, "sd_model_hash": m.model_hash, "sd_vae_name": params.get("VAE"),
        "sd_vae_hash": params.get("VAE hash"),
        "seed_resize_from_w": kw.get("seed_resize_from_w", -1), "seed_resize_from_h": kw.get("seed_resize_from_h", -1),
        "denoising_strength": kw.get("strength", kw.get("hires_denoising")),
        "extra_generation_params": _extra_params(params), "index_of_first_image": 0, "infotexts": outcome["infotexts"],
        "styles": plan.styles, "comments": "".join(f"{c}\n" for c in plan.comments),
        "job_timestamp": job.timestamp, "clip_skip": kw["clip_skip"],
        "is_using_inpainting_conditioning": plan.entry.manifest.is_inpaint, "version": f"sdonnx {__version__}",
        "ignored_fields": sorted(set(plan.ignored)), "interrupted": outcome["interrupted"],
        **({"save_error": outcome["save_error"]} if outcome.get("save_error") else {}),
    }


def _extra_params(params):
    known = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "Version",
             "Clip skip", "VAE", "VAE hash"}
    return {k: v for k, v in params.items() if k not in known and isinstance(v, (str, int, float, bool))}


# ---------------------------------------------------------------------------- progress, options


def progress_report(worker, skip_current_image=False):
    """A1111's /progress answer for the running job (zeros when idle)."""
    job = worker.current
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None, "queue_pending": worker.pending}
    steps = max(job.steps, 1)
    done = (job.job_no + min(job.step, steps) / steps) / max(job.job_count, 1)
    elapsed = time.monotonic() - job.started if job.started else 0.0
    state.update(skipped=job.skip, interrupted=job.stop, job=job.label, job_count=job.job_count,
                 job_timestamp=job.timestamp, job_no=job.job_no, sampling_step=job.step, sampling_steps=job.steps)
    image = None
    if not skip_current_image and job.latents is not None:
        preview = latent_preview(job.latents)
        image = encode_png(preview) if preview is not None else None
    return {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0, "state": state,
            "current_image": image,
            "textinfo": job.message or (f"Step {job.step}/{job.steps}" if job.steps else "Starting"),
            "current_task": job.id, "queue_pending": worker.pending}


def current_options(state):
    current = state.store.current
    return {**state.options, "sd_model_checkpoint": current.title if current else None,
            "sd_checkpoint_hash": current.model_hash if current else None,
            "outdir_samples": str(state.outdir) if state.outdir else ""}


def apply_options(state, options):
    """POST /options: only the options GET /options lists, each checked before any is stored (a bad value
    kept would break every later request, for every client); the model switch last, once all are valid."""
    if len(json.dumps(options)) > limits.MAX_OPTIONS_BYTES:
        raise ApiError(413, f"options body is over {limits.MAX_OPTIONS_BYTES} bytes")
    current = current_options(state)
    unknown = sorted(set(options) - set(current))
    if unknown:
        raise ApiError(422, f"unknown option {', '.join(map(repr, unknown))}; this server has: "
                            f"{', '.join(sorted(current))}")
    checked = {}
    try:
        for key, value in options.items():
            if key in OPTIONS:
                checked[key] = check_option(key, value)
            elif key in SERVER_OPTIONS:
                checked[key] = SERVER_OPTIONS[key](value)
            elif key != "sd_model_checkpoint" and value != current[key]:
                raise ApiError(422, f"option {key} is read-only here (it is {current[key]!r})")
    except TranslationError as e:
        raise ApiError(e.status, str(e)) from None
    name = options.get("sd_model_checkpoint")
    if name:
        try:
            state.store.select(name)
        except UnknownModel as e:
            raise ApiError(404, str(e)) from None
    state.options.update(checked)


def _samples_format(value):
    if value != "png":
        raise ApiError(422, f"samples_format {value!r}: this server saves png only")
    return value


def _live_previews(value):
    if not isinstance(value, bool):
        raise ApiError(422, f"live_previews_enable must be true or false, got {value!r}")
    return value


# settings of the server itself that POST /options may change, each with its check
def _no_detectmap(value):
    if not isinstance(value, bool):
        raise ApiError(422, f"control_net_no_detectmap must be true or false, got {value!r}")
    return value


SERVER_OPTIONS = {"samples_format": _samples_format, "live_previews_enable": _live_previews,
                  "control_net_no_detectmap": _no_detectmap}


def _sampler_options(info):
    options = {}
    if info.schedule != "Uniform":
        options["scheduler"] = _schedule_id(info.schedule)
    if info.discard_penultimate_sigma:
        options["discard_next_to_last_sigma"] = True
    return options


def _schedule_id(label):
    return label.lower().replace(" ", "_")
