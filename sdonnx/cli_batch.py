"""`sdonnx batch FILE`: A1111's "Prompts from file or textbox" from the command line, here or on a Ray cluster."""
import functools
import sys
from pathlib import Path

import click

from .cli import _fail, _given, _request_options, _user_errors


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-m", "--model", required=True, type=click.Path(), help="Converted model folder; a line's "
              "--sd_model NAME names a model folder beside it.")
@click.option("-o", "--outdir", default="outputs/batch", show_default=True, type=click.Path(file_okay=False))
@click.option("-p", "--prompt", default="", help="A1111's prompt box: joined with each line's prompt (and -n with "
              "each line's negative prompt), by a space.")
@click.option("--prompt-position", type=click.Choice(["start", "end"]), default="start", show_default=True,
              help="Where a line's prompt goes: before or after --prompt.")
@click.option("--iterate-seed", is_flag=True, help="A1111's \"Iterate seed every line\": the seed counts up by "
              "batch size x batch count per line (give --seed for a resumable run).")
@click.option("--same-seed", is_flag=True, help="A1111's \"Use same random seed for all lines\" (give --seed "
              "for a resumable run).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip the jobs whose images are already in OUTDIR with the same settings.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on a Ray cluster: ADDRESS (auto, ray://head:10001, host:6379) or, alone, a local Ray "
                   "instance (needs pip install 'sdonnx[ray]').")
@click.option("--workers", type=click.IntRange(min=1), help="Ray workers [default: one per GPU, else 1].")
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, dml, migraphx, rocm or openvino.")
@click.option("--device-id", default=0, show_default=True, type=int, help="CUDA/DirectML/ROCm device (adapter) index.")
@click.option("--device", default=None, help="OpenVINO device: CPU, GPU, GPU.1, NPU or AUTO.")
@click.option("--lora-dir", type=click.Path(file_okay=False), help="Folder of <lora:name:w> files [default: models/Lora].")
@click.option("--embeddings-dir", type=click.Path(file_okay=False),
              help="Folder of textual inversion embeddings [default: models/embeddings].")
@click.option("--hypernetwork-dir", type=click.Path(file_okay=False),
              help="Folder of <hypernet:name:w> .pt files [default: models/hypernetworks].")
@_request_options
def batch(file, model, prompt, prompt_position, iterate_seed, same_seed, outdir, resume, ray_address, workers, provider,
          device_id, device, lora_dir, embeddings_dir, hypernetwork_dir, **fields):
    """One image job per line of FILE ("-": standard input), A1111's "Prompts from file or textbox": a
    prompt per line, or options per line (--prompt "a cat" --negative_prompt "..." --steps 30 --seed 5
    --sampler_name "DPM++ 2M" --cfg_scale 7 --width 512 --height 768 --n_iter 2 --sd_model NAME ...).

    The flags below are the defaults every line starts from. Images are written as OUTDIR/NNNNN.png (the
    job's number; NNNNN-K.png when a line makes several) with A1111 infotext; a second run skips what is
    done, so an interrupted batch resumes where it stopped."""
    from .jobs import run_jobs
    from .request import GenerationRequest

    try:
        ray_address = _ray_or_here(ray_address)
        if ray_address is not None and device_id:
            raise ValueError(f"--device-id {device_id} with --ray: Ray gives each worker its own GPU as device 0")
        base = GenerationRequest.from_kwargs(**{**_given(fields), "prompt": prompt})
        jobs = _jobs(_read(file), model, base, position=prompt_position, iterate_seed=iterate_seed,
                     same_seed=same_seed)
        load = functools.partial(_load, provider=provider, device_id=device_id, device=device,
                                 **_absolute(lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                                             hypernetwork_dir=hypernetwork_dir))
        results = run_jobs(jobs, outdir, load=load, ray=ray_address, workers=workers, resume=resume,
                           on_image=lambda job, path: click.echo(str(path)))
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: run the same command again to resume ({outdir})", err=True)
        sys.exit(130)
    except _batch_errors() as e:
        _fail(e)
    skipped = sum(r.skipped for r in results)
    click.echo(f"{len(results)} job(s): {len(results) - skipped} run, {skipped} already done, in {outdir}", err=True)


def _ray_or_here(address):
    """The Ray address, or None to run here when Ray is not installed and no cluster was named."""
    from .jobs_ray import ray_available

    if address is None or ray_available():
        return address
    if address != "local":
        raise ValueError(f"--ray {address}: Ray is not installed here; pip install 'sdonnx[ray]'")
    click.echo("note: Ray is not installed (pip install 'sdonnx[ray]'); running the jobs here", err=True)
    return None


def _batch_errors():
    from .jobs_ray import WorkersLost

    return (*_user_errors(), WorkersLost)


def _read(file):
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jobs(text, model, base, **options):
    """The jobs of a prompts file: each line's settings over the command line's (jobs.line_requests)."""
    from .jobs import Job, line_requests, parse_prompts_file

    lines = parse_prompts_file(text)
    if not lines:
        raise ValueError("the prompts file holds no prompt")
    return [Job(request, _model_folder(name, model, line.number), f"{n:05}", {"line": line.number})
            for n, (line, (request, name)) in enumerate(zip(lines, line_requests(lines, base, **options)))]


def _model_folder(name, model, number):
    """-m's folder, or the model folder NAME beside it (A1111's checkpoint name); absolute, as Ray workers
    may run in another folder."""
    if name is None:
        return Path(model).resolve()
    root = Path(model).resolve().parent
    folder = root / name
    if not (folder / "sdonnx.json").is_file():
        known = sorted(p.parent.name for p in root.glob("*/sdonnx.json"))
        raise ValueError(f"line {number}: --sd_model {name!r} is no model folder in {root}; "
                         f"found: {', '.join(known) or 'none'}")
    return folder


def _absolute(**folders):
    """The folders given, absolute; the defaults (models/...) made absolute here, for the same reason."""
    from .pipeline import DEFAULT_EMBEDDINGS_DIR, DEFAULT_HYPERNETWORK_DIR, DEFAULT_LORA_DIR

    defaults = {"lora_dir": DEFAULT_LORA_DIR, "embeddings_dir": DEFAULT_EMBEDDINGS_DIR,
                "hypernetwork_dir": DEFAULT_HYPERNETWORK_DIR}
    out = {name: str(Path(value).resolve()) if value else None for name, value in folders.items()}
    # a default folder stays optional (None) unless it exists here, so a missing one is no error
    for name, value in out.items():
        if value is None and defaults[name].is_dir():
            out[name] = str(defaults[name].resolve())
    return out


def _load(model, **options):
    from .pipeline import Pipeline

    return Pipeline.load(model, **options)
