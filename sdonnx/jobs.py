"""Many images: jobs (a request, a model, an output name) run one after the other on this machine, or spread
over a Ray cluster (sdonnx/jobs_ray.py), and written as PNGs with A1111 infotext.

- Sessions are created once per model, not per image: a runner keeps the pipeline of the model it ran last
  and takes the jobs grouped by model (in their first-seen order), so a file of many prompts over a few
  checkpoints loads each checkpoint once per worker.
- Resumable: a job whose final files are all there, are valid PNGs and carry the infotext the job asks for is
  not run again. Files are written under a temporary name and renamed, so a final name never holds half an
  image, whatever interrupts the run.
- Results come back in job order, whichever order (or worker) ran them.

A1111's "Prompts from file or textbox" file format is read by `parse_prompts_file`; `sdonnx batch`
(sdonnx/cli_batch.py) is its command-line door.
"""
from __future__ import annotations

import logging
import os
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One generate call: its request, the model folder that runs it, the stem of its output file names
    (`stem.png`, or `stem-0.png`, `stem-1.png`, ... when it makes several images) and free metadata for the
    caller (a line number, grid coordinates)."""

    request: GenerationRequest
    model: str
    name: str
    metadata: MappingProxyType = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def count(self):
        return self.request.prompt.batch_size * self.request.prompt.batch_count

    def file_names(self):
        if self.count == 1:
            return [f"{self.name}.png"]
        return [f"{self.name}-{k}.png" for k in range(self.count)]


@dataclass(frozen=True)
class JobResult:
    """What became of a job: its image files, whether they were already there (resume), where it ran."""

    job: Job
    paths: list
    skipped: bool = False
    worker: str = ""  # "pid@host" of the process that generated it; "" when skipped


def run_jobs(jobs, outdir, *, load=None, ray=None, workers=None, resume=True, on_image=None):
    """Run `jobs`, write their images into `outdir`, return a JobResult per job, in job order.

    load(model) -> Pipeline: how a runner loads a model (default `Pipeline.load(model)`); with Ray it is
    pickled to the workers. ray: None runs here; "" (or "local") a local Ray instance; any other text is a
    cluster address ("auto", "ray://head:10001"); a running `ray.init()` is used as it is. workers: Ray
    workers to start (default one per GPU of the cluster, else 1). resume: skip jobs whose files are
    finished. on_image(job, path) after each image is written.

    Every job is checked against its model before anything runs (a ValueError names the job)."""
    from .image import check_writable

    jobs = list(jobs)
    outdir = check_writable(outdir)
    _check_names(jobs)
    expected = _expected_infotexts(jobs)
    results = [None] * len(jobs)
    pending = []
    for i, job in enumerate(jobs):
        if resume and all(_finished(outdir / n, t, job) for n, t in zip(job.file_names(), expected[i])):
            results[i] = JobResult(job, [outdir / n for n in job.file_names()], skipped=True)
        else:
            pending.append(i)
    log.info("%d job(s): %d finished already, %d to run", len(jobs), len(jobs) - len(pending), len(pending))
    # nothing left: no Ray to start, no actor to wait for
    runs = _runner(ray if pending else None)(jobs, _by_model(jobs, pending), load or _default_load, ray, workers)
    try:
        for i, images, infotexts, worker in runs:
            paths = _write(jobs[i], outdir, images, infotexts, expected[i], on_image)
            results[i] = JobResult(jobs[i], paths, worker=worker)
    finally:
        runs.close()  # stops the Ray workers when a callback or an interrupt ends the loop early
    return results


def _runner(ray):
    if ray is None:
        return run_local
    from .jobs_ray import ray_available, run_on_ray

    if ray_available():
        return run_on_ray
    if ray not in ("", "local", True):
        raise ValueError(f"--ray {ray}: Ray is not installed here; pip install 'sdonnx[ray]'")
    log.warning("Ray is not installed (pip install 'sdonnx[ray]'): running the jobs here")
    return run_local


def _default_load(model):
    from .pipeline import Pipeline

    return Pipeline.load(model)


# ------------------------------------------------------------------------------------------- running


class Worker:
    """What runs jobs, in this process or as a Ray actor: it keeps the pipeline of the model it ran last, so
    the sessions of a model are created once, then reused by every job of that model."""

    def __init__(self, load):
        self.load, self.model, self.pipe = load, None, None

    def where(self):
        return f"{os.getpid()}@{socket.gethostname()}"

    def run(self, model, settings):
        """settings: the request's keywords (`GenerationRequest.to_kwargs()`, which pickles where a request
        does not) -> (images, infotexts, where)."""
        if model != self.model:
            # the previous model's sessions go before the next model's load (and a failed load leaves none)
            self.pipe = self.model = None
            self.pipe = self.load(model)
            self.model = model
        result = self.pipe.generate(GenerationRequest.from_kwargs(**settings))
        return result.images, result.infotexts, self.where()


def run_local(jobs, order, load, ray=None, workers=None):
    """Yield (job index, images, infotexts, where) for the jobs at `order`, one after the other, here."""
    worker = Worker(load)
    for i in order:
        yield (i, *worker.run(jobs[i].model, wire_settings(jobs[i].request)))


def wire_settings(request):
    """The request as keywords that pickle and mean the same in another process or on another machine: an
    init image, mask or ControlNet unit image given as a path is read here, since the worker may not see the file."""
    import dataclasses

    from .img2img import load_image

    settings = request.to_kwargs()
    for name in ("init_image", "mask"):
        if isinstance(settings[name], (str, os.PathLike)):
            settings[name] = load_image(settings[name])
    read = lambda value, what: load_image(value, what) if isinstance(value, (str, os.PathLike)) else value  # noqa: E731
    settings["controlnet"] = tuple(dataclasses.replace(u, image=read(u.image, "ControlNet image"),
                                                       mask=read(u.mask, "ControlNet mask"))
                                   for u in settings["controlnet"])
    return settings


def _by_model(jobs, indices):
    """The indices grouped by model, models in the order they first appear, jobs in order within a model."""
    first = {}
    for i in indices:
        first.setdefault(jobs[i].model, len(first))
    return sorted(indices, key=lambda i: (first[jobs[i].model], i))


# ------------------------------------------------------------------------------------------ writing


def _write(job, outdir, images, infotexts, expected, on_image):
    from .image import write_png

    if len(images) != len(expected):
        raise RuntimeError(f"job {job.name}: {len(images)} images came back, {len(expected)} expected")
    paths = []
    for name, image, text, want in zip(job.file_names(), images, infotexts, expected):
        if not _same_infotext(text, want, job):
            log.warning("job %s: the infotext written differs from the one expected; a resume will redo it",
                        job.name)
        paths.append(write_png(image, outdir / name, text))
        if on_image is not None:
            on_image(job, paths[-1])
    return paths


def _check_names(jobs):
    seen = {}
    for job in jobs:
        if not job.name or job.name in (".", "..") or any(c in job.name for c in "/\\\0"):
            raise ValueError(f"job name {job.name!r}: give a plain file name stem (no folders)")
        for name in job.file_names():
            if name in seen:
                raise ValueError(f"jobs {seen[name]!r} and {job.name!r} would both write {name}")
            seen[name] = job.name


# ------------------------------------------------------------------------------------------- resume


def _expected_infotexts(jobs):
    """Each job's infotexts as its run will write them, from the request and the model's manifest alone (no
    session). Validates every job first: a bad one is a ValueError naming it, before anything runs."""
    from .manifest import load_manifest

    manifests = {}
    out = []
    for job in jobs:
        try:
            if job.model not in manifests:
                manifests[job.model] = load_manifest(job.model)
            m = manifests[job.model]
            plan = job.request.validate(m)
        except ValueError as e:
            raise ValueError(f"job {job.name}: {e}") from None
        params = job.request.infotext_params(plan, {"Model hash": m.model_hash, "Model": m.name})
        out.append([job.request.infotext(plan, k, params=params) for k in range(job.count)])
    return out


# keys the manifest and request alone cannot give (file hashes found while running, the refiner's title)
# or that do not change the image (the sdonnx version that wrote it)
_NOT_COMPARED = frozenset({"Lora hashes", "TI hashes", "Refiner", "Version"})


def _same_infotext(text, expected, job):
    """Whether an infotext read from a file is the one the job writes. A job with a random seed (-1) takes
    any seed: the image made with whichever seed was drawn finishes it."""
    from .infotext import parse_infotext

    seeds = job.request.seeds
    ignore = set(_NOT_COMPARED)
    if seeds.seed == -1:
        ignore |= {"Seed"}
    if seeds.subseed == -1:
        ignore |= {"Variation seed"}
    got, want = parse_infotext(text), parse_infotext(expected)
    return ({k: v for k, v in got.items() if k not in ignore} ==
            {k: v for k, v in want.items() if k not in ignore})


def _finished(path, expected, job):
    """A final file that is a whole PNG (every chunk's CRC checked) holding the infotext the job writes."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as img:
            text = img.info.get("parameters") if img.format == "PNG" else None
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        log.info("%s is not a whole PNG of a sane size (%s): made again", path, e)
        return False
    if text is None or not _same_infotext(text, expected, job):
        log.info("%s holds other settings than job %s: made again", path, job.name)
        return False
    return True


# ----------------------------------------------------------------------------- prompts from a file


def _text(value):
    return value


def _boolean(value):
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"{value!r} is not true or false")
    return lowered == "true"


# A1111's "Prompts from file or textbox" keys: (request keyword or None, conversion). None: A1111 takes the
# key but it changes nothing sdonnx writes (display text, grids, the deprecated sampler index), so it is
# read and left out; REFUSED ones would change the output in a way sdonnx cannot.
PROMPT_KEYS = {
    "sd_model": ("model", _text),
    "outpath_samples": (None, _text),
    "outpath_grids": (None, _text),
    "prompt_for_display": (None, _text),
    "prompt": ("prompt", _text),
    "negative_prompt": ("negative_prompt", _text),
    "styles": (None, _text),
    "seed": ("seed", int),
    "subseed_strength": ("subseed_strength", float),
    "subseed": ("subseed", int),
    "seed_resize_from_h": ("seed_resize_from_h", int),
    "seed_resize_from_w": ("seed_resize_from_w", int),
    "sampler_index": (None, int),
    "sampler_name": ("sampler", _text),
    "batch_size": ("batch_size", int),
    "n_iter": ("batch_count", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "restore_faces": ("restore_faces", _boolean),
    "tiling": ("tiling", _boolean),
    "do_not_save_samples": (None, _boolean),
    "do_not_save_grid": (None, _boolean),
}
REFUSED = {
    "outpath_samples": "every image goes to the batch's output folder (-o)",
    "styles": "styles are not read by sdonnx batch; write the style's text into the prompt",
    "do_not_save_samples": "a batch exists to save its images",
}
_REFUSED_UNLESS = {"do_not_save_samples": False}  # the values that change nothing


@dataclass(frozen=True)
class PromptLine:
    """One job of a prompts file: its line number (from 1) and the request keywords it sets (plus "model"
    for an sd_model key: a checkpoint name)."""

    number: int
    settings: MappingProxyType

    def __post_init__(self):
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))


def parse_prompts_file(text):
    """A1111's "Prompts from file or textbox": one job per non-empty line; a line that starts with `--` holds
    options (`--prompt "a cat" --negative_prompt "..." --steps 30 --seed 5`, shell quoting; the words after
    --prompt/--negative_prompt up to the next --option join with spaces, as A1111), any other line is a prompt.
    Unlike A1111, which takes a line it cannot read as a prompt, a bad line is a ValueError naming the line
    and the valid keys. -> [PromptLine]"""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        try:
            settings = _line_options(line) if line.startswith("--") else _plain_prompt(line)
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
        lines.append(PromptLine(number, settings))
    return lines


def line_requests(lines, base, *, position="start", iterate_seed=False, same_seed=False):
    """A1111's run of a prompts file over the request of its page: [(request, model name or None)] per line.

    A line's prompt and negative prompt go before (position "start") or after ("end") the base request's,
    joined by a space; its other keys replace the base's. Seeds: a line without --seed takes the base seed, so
    -1 draws a new random seed per line; iterate_seed ("Iterate seed every line") counts the base seed up by
    the base's batch_size x batch_count per line, same_seed ("Use same random seed for all lines") keeps one;
    with either, a base seed of -1 is drawn once first."""
    from .request import random_seed

    if position not in ("start", "end"):
        raise ValueError(f"prompt position {position!r}: choose start or end")
    seed = base.seeds.seed
    if (iterate_seed or same_seed) and seed == -1:
        seed = random_seed()
    out = []
    for line in lines:
        settings = dict(line.settings)
        model = settings.pop("model", None)
        for key in ("prompt", "negative_prompt"):
            own = getattr(base.prompt, key)
            if settings.get(key) and own:
                settings[key] = f"{settings[key]} {own}" if position == "start" else f"{own} {settings[key]}"
        settings.setdefault("seed", seed)
        out.append((base.replace(**settings), model))
        if iterate_seed:
            seed += base.prompt.batch_size * base.prompt.batch_count
    return out


def _plain_prompt(line):
    # A1111 reads such a line as a prompt after its option parse fails; an option in the middle is far more
    # likely a misplaced option than prompt text, so say so rather than paint it
    words = line.split()
    misplaced = [w for w in words[1:] if w.startswith("--") and w[2:] in PROMPT_KEYS]
    if misplaced:
        raise ValueError(f"{misplaced[0]} after prompt text: a line of options starts with --prompt or another "
                         f"--option")
    return {"prompt": line}


def _line_options(line):
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"{e} (quote with \"...\" or '...')") from None
    settings, pos = {}, 0
    while pos < len(words):
        key, pos = _key(words[pos]), pos + 1
        if pos >= len(words) or (key not in ("prompt", "negative_prompt") and words[pos].startswith("--")):
            raise ValueError(f"--{key} has no value")
        if key in ("prompt", "negative_prompt"):
            end = next((j for j in range(pos + 1, len(words)) if words[j].startswith("--")), len(words))
            settings[key], pos = " ".join(words[pos:end]), end
            continue
        settings.update(_option(key, words[pos]))
        pos += 1
    return settings


def _key(word):
    if not word.startswith("--"):
        raise ValueError(f"{word!r} must start with -- (an option), or quote it into the --prompt")
    key = word[2:]
    if key not in PROMPT_KEYS:
        raise ValueError(f"unknown option --{key}; valid: {', '.join('--' + k for k in PROMPT_KEYS)}")
    return key


def _option(key, value):
    """{request keyword: value} of one `--key value` pair ({} for a key that changes nothing here)."""
    name, convert = PROMPT_KEYS[key]
    try:
        converted = convert(value)
    except ValueError:
        kind = {int: "a whole number", float: "a number"}.get(convert, "true or false")
        raise ValueError(f"--{key} {value!r}: give {kind}") from None
    if key in REFUSED and _REFUSED_UNLESS.get(key, object()) != converted:
        raise ValueError(f"--{key}: {REFUSED[key]}")
    if name == "sampler":
        from .samplers import resolve

        resolve(converted)  # an unknown name is refused on its line; A1111 falls back to its default sampler
    if name == "tiling":
        converted = "xy" if converted else None
    if name == "restore_faces":  # A1111: the face_restoration_model setting, CodeFormer by default
        converted = "CodeFormer" if converted else None
    if name is None:
        log.info("--%s is read and changes nothing sdonnx writes", key)
        return {}
    return {name: converted}
