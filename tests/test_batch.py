"""Jobs run here (sdonnx/jobs.py), A1111's prompts-file format and `sdonnx batch` (Ray: tests/test_batch_ray.py)."""
import shutil
import struct
import sys
import zlib

import pytest
from click.testing import CliRunner
from PIL import Image

from sdonnx import GenerationRequest
from sdonnx.cli import main
from sdonnx.infotext import parse_infotext
from sdonnx.jobs import Job, line_requests, parse_prompts_file, run_jobs
from sdonnx.manifest import load_manifest
from sdonnx.pipeline import Pipeline


def job(model, name, prompt, seed=1, **settings):
    request = GenerationRequest.from_kwargs(**{"prompt": prompt, "seed": seed, "steps": 2, "width": 64, "height": 64,
                                               **settings})
    return Job(request, model, name)


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return tiny_onnx("sd1")


@pytest.fixture(scope="module")
def load():
    """A loader that keeps each model's pipeline for the module: its sessions are made once for all tests."""
    pipes = {}

    def cached(model):
        if model not in pipes:
            pipes[model] = Pipeline.load(model, provider="cpu")
        return pipes[model]
    return cached


# ------------------------------------------------------------------------------------ prompts files


@pytest.mark.parametrize("text, expected", [
    ("a cat\n\n  a dog  \n", [(1, {"prompt": "a cat"}), (3, {"prompt": "a dog"})]),
    # A1111: the words after --prompt up to the next --option are the prompt, joined by spaces
    ('--prompt a red cat --steps 30 --seed 5', [(1, {"prompt": "a red cat", "steps": 30, "seed": 5})]),
    ('--prompt "a (cat:1.2), sitting" --negative_prompt \'blurry, lowres\' --cfg_scale 6.5',
     [(1, {"prompt": "a (cat:1.2), sitting", "negative_prompt": "blurry, lowres", "cfg_scale": 6.5})]),
    ('--prompt x --width 512 --height 768 --batch_size 2 --n_iter 3',
     [(1, {"prompt": "x", "width": 512, "height": 768, "batch_size": 2, "batch_count": 3})]),
    ('--prompt x --subseed 7 --subseed_strength 0.25 --seed_resize_from_w 64 --seed_resize_from_h 32',
     [(1, {"prompt": "x", "subseed": 7, "subseed_strength": 0.25, "seed_resize_from_w": 64,
           "seed_resize_from_h": 32})]),
    ('--prompt x --sampler_name "DPM++ 2M Karras" --tiling true',
     [(1, {"prompt": "x", "sampler": "DPM++ 2M Karras", "tiling": "xy"})]),
    ('--prompt x --tiling False --restore_faces false --do_not_save_grid true --sampler_index 3',
     [(1, {"prompt": "x", "tiling": None, "restore_faces": None})]),  # keys A1111 takes that change nothing
    ('--prompt x --restore_faces true', [(1, {"prompt": "x", "restore_faces": "CodeFormer"})]),  # A1111's default model
    ('--prompt x --prompt_for_display shown --outpath_grids g --do_not_save_samples false',
     [(1, {"prompt": "x"})]),
    ('--prompt x --sd_model other', [(1, {"prompt": "x", "model": "other"})]),
    ("a cat -- with a dash", [(1, {"prompt": "a cat -- with a dash"})]),
])
def test_prompts_file_lines(text, expected):
    lines = parse_prompts_file(text)
    assert [(line.number, dict(line.settings)) for line in lines] == expected


@pytest.mark.parametrize("text, message", [
    ("a cat\n--prompt x --stpes 30", "line 2: unknown option --stpes; valid: --sd_model, --outpath_samples"),
    ("--prompt x --steps thirty", "line 1: --steps 'thirty': give a whole number"),
    ("--prompt x --cfg_scale high", "line 1: --cfg_scale 'high': give a number"),
    ("--prompt x --steps 2.5", "line 1: --steps '2.5': give a whole number"),
    ("--prompt x --tiling yes", "line 1: --tiling 'yes': give true or false"),
    ("--prompt x --steps", "line 1: --steps has no value"),
    ("--prompt x --seed --steps 3", "line 1: --seed has no value"),
    ('--prompt "a cat', "line 1: No closing quotation"),
    ("--prompt x stray --seed 1 words", "line 1: 'words' must start with --"),
    ("--prompt x --sampler_name Eulerish", "unknown sampler 'Eulerish'; valid choices: DPM++ 2M"),
    ("--prompt x --styles mine", "line 1: --styles: styles are not read"),
    ("--prompt x --outpath_samples /tmp/x", "line 1: --outpath_samples: every image goes to"),
    ("--prompt x --do_not_save_samples true", "line 1: --do_not_save_samples"),
    ("a cat --steps 30", "line 1: --steps after prompt text"),
])
def test_bad_lines_are_refused_naming_the_line(text, message):
    with pytest.raises(ValueError) as e:
        parse_prompts_file(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def _lines(base, text, **options):
    return [(r.prompt.prompt, r.prompt.negative_prompt, r.seeds.seed, r.sampling.steps, model)
            for r, model in line_requests(parse_prompts_file(text), base, **options)]


def test_lines_over_the_base_request_as_a1111_runs_them():
    base = GenerationRequest.from_kwargs(prompt="masterpiece", negative_prompt="blurry", seed=10, steps=5,
                                         batch_size=2, batch_count=3)
    text = 'a cat\n--prompt "a dog" --negative_prompt lowres --seed 3\n--steps 9 --sd_model other\n'
    assert _lines(base, text) == [("a cat masterpiece", "blurry", 10, 5, None),
                                  ("a dog masterpiece", "lowres blurry", 3, 5, None),
                                  ("masterpiece", "blurry", 10, 9, "other")]
    # "end"; "Iterate seed every line": + the base's batch_size x batch_count per line, a line's own seed kept
    assert _lines(base, text, position="end", iterate_seed=True) == [
        ("masterpiece a cat", "blurry", 10, 5, None), ("masterpiece a dog", "blurry lowres", 3, 5, None),
        ("masterpiece", "blurry", 22, 9, "other")]
    random_base = base.replace(seed=-1, prompt="")
    assert [seed for _, _, seed, _, _ in _lines(random_base, "a\nb\n")] == [-1, -1]  # a new seed per line
    same = [seed for _, _, seed, _, _ in _lines(random_base, "a\nb\n", same_seed=True)]
    iterated = [seed for _, _, seed, _, _ in _lines(random_base, "a\nb\n", iterate_seed=True)]
    assert same[0] == same[1] != -1 and iterated[1] == iterated[0] + 6 and iterated[0] != -1
    with pytest.raises(ValueError, match="prompt position 'middle': choose start or end"):
        line_requests([], base, position="middle")


# ------------------------------------------------------------------------------------------ running


def _counting(loads, load):
    def counted(model):
        loads.append(model)
        return load(model)
    return counted


def test_a_worker_whose_load_failed_loads_again():
    """A model that failed to load leaves the worker empty, not holding the previous model's name without
    its pipeline."""
    from types import SimpleNamespace

    from sdonnx.jobs import Worker

    loads = []

    def load(model):
        loads.append(model)
        if model == "broken":
            raise ValueError("broken model")
        return SimpleNamespace(generate=lambda request: SimpleNamespace(images=[model], infotexts=[""]))

    worker, settings = Worker(load), GenerationRequest().to_kwargs()
    assert worker.run("a", settings)[0] == ["a"]
    with pytest.raises(ValueError, match="broken model"):
        worker.run("broken", settings)
    assert worker.run("a", settings)[0] == ["a"] and loads == ["a", "broken", "a"]


def test_jobs_run_grouped_by_model_and_resume(model, load, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model, other)  # the same weights under another folder: a second model to load
    jobs = [job(model, "a", "a red circle"), job(other, "b", "a blue square", seed=2),
            job(model, "c", "a green dot", seed=3, batch_size=2), job(other, "d", "a cat", seed=4)]
    loads, written = [], []
    out = tmp_path / "out"
    results = run_jobs(jobs, out, load=_counting(loads, load), on_image=lambda j, p: written.append(p.name))
    # one load per model (sessions kept), the jobs of a model together, results in job order
    assert loads == [str(model), str(other)]
    assert written == ["a.png", "c-0.png", "c-1.png", "b.png", "d.png"]
    assert [r.job.name for r in results] == ["a", "b", "c", "d"] and not any(r.skipped for r in results)
    info = parse_infotext(Image.open(out / "c-1.png").info["parameters"])
    assert (info["Prompt"], info["Seed"], info["Size"], info["Steps"]) == ("a green dot", "4", "64x64", "2")
    assert info["Model"] == load_manifest(model).name
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # resume: a truncated file and a file of other settings are made again, nothing else
    (out / "d.png").write_bytes((out / "d.png").read_bytes()[:-30])
    jobs[0] = job(model, "a", "a red circle, changed")
    loads.clear(), written.clear()
    results = run_jobs(jobs, out, load=_counting(loads, load), on_image=lambda j, p: written.append(p.name))
    assert written == ["a.png", "d.png"] and loads == [str(model), str(other)]
    assert [r.skipped for r in results] == [False, True, True, False]
    assert all(stamps[n] == (out / n).stat().st_mtime_ns for n in ("b.png", "c-0.png", "c-1.png"))
    assert parse_infotext(Image.open(out / "a.png").info["parameters"])["Prompt"] == "a red circle, changed"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


def test_an_interrupted_run_resumes_without_redoing_finished_images(model, load, tmp_path):
    jobs = [job(model, f"{n}", f"prompt {n}", seed=n) for n in range(4)]
    out, written = tmp_path / "out", []

    def stop_after_two(j, path):
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, out, load=load, on_image=stop_after_two)
    done = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(done) == ["0.png", "1.png"]
    written.clear()
    results = run_jobs(jobs, out, load=load, on_image=lambda j, p: written.append(p.name))
    assert written == ["2.png", "3.png"] and [r.skipped for r in results] == [True, True, False, False]
    assert all((out / n).read_bytes() == data for n, data in done.items())
    # a file whose header claims a giant image (a decompression bomb) is no finished image either
    (out / "3.png").write_bytes(giant_png_header())
    written.clear()
    assert [r.skipped for r in run_jobs(jobs, out, load=load, on_image=lambda j, p: written.append(p.name))] == \
        [True, True, True, False]
    assert written == ["3.png"] and Image.open(out / "3.png").size == (64, 64)
    # a random seed (-1) is finished by an image of any seed; --no-resume makes everything again
    random_job = [job(model, "r", "prompt r", seed=-1)]
    first = run_jobs(random_job, out, load=load)[0]
    assert not first.skipped and run_jobs(random_job, out, load=load)[0].skipped
    assert not run_jobs(random_job, out, load=load, resume=False)[0].skipped


def giant_png_header():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_a_bad_job_is_refused_before_anything_runs(model, tmp_path):
    jobs = [job(model, "ok", "fine"), job(model, "bad", "x", width=65)]
    with pytest.raises(ValueError, match="job bad: width 65 is not a positive multiple of 8"):
        run_jobs(jobs, tmp_path / "out", load=lambda m: pytest.fail("nothing may load"))
    with pytest.raises(ValueError, match="jobs 'a' and 'a' would both write a.png"):
        run_jobs([job(model, "a", "x"), job(model, "a", "y")], tmp_path / "out")
    with pytest.raises(ValueError, match="plain file name stem"):
        run_jobs([job(model, "../a", "x")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the CLI


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_batch_command_writes_each_line_and_resumes(model, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle\n\n--prompt "a blue square" --steps 3 --seed 9 --n_iter 2\n')
    out = tmp_path / "out"
    # without Ray installed, --ray runs the jobs here and says how to install it
    monkeypatch.setitem(sys.modules, "ray", None)
    code, stdout, stderr = run("batch", prompts, "-m", model, "-o", out, "--steps", 2, "--seed", 5, "-W", 64,
                               "-H", 64, "--cfg-scale", 4, "--ray")
    assert code == 0, stderr
    assert "pip install 'sdonnx[ray]'" in stderr
    assert [p.rsplit("/", 1)[-1] for p in stdout.split()] == ["00000.png", "00001-0.png", "00001-1.png"]
    first, second = (parse_infotext(Image.open(out / n).info["parameters"]) for n in ("00000.png", "00001-1.png"))
    assert (first["Prompt"], first["Steps"], first["Seed"], first["CFG scale"]) == ("a red circle", "2", "5", "4")
    assert (second["Prompt"], second["Steps"], second["Seed"]) == ("a blue square", "3", "10")
    code, stdout, stderr = run("batch", prompts, "-m", model, "-o", out, "--steps", 2, "--seed", 5, "-W", 64,
                               "-H", 64, "--cfg-scale", 4)
    assert code == 0 and stdout == "" and "0 run, 2 already done" in stderr
    # A1111's prompt box, prompt position and "Iterate seed every line" from the command line
    code, stdout, stderr = run("batch", prompts, "-m", model, "-o", tmp_path / "more", "--steps", 1, "-W", 64,
                               "-H", 64, "-p", "masterpiece", "--prompt-position", "end", "--iterate-seed",
                               "--seed", 20)
    assert code == 0, stderr
    first, second = (parse_infotext(Image.open(tmp_path / "more" / n).info["parameters"])
                     for n in ("00000.png", "00001-0.png"))
    assert (first["Prompt"], first["Seed"]) == ("masterpiece a red circle", "20")
    assert (second["Prompt"], second["Seed"]) == ("masterpiece a blue square", "9")  # its own seed
    # a cluster address without Ray is an error, not a quiet local run
    code, _, stderr = run("batch", prompts, "-m", model, "-o", out, "--ray", "ray://head:10001")
    assert code == 2 and "pip install 'sdonnx[ray]'" in stderr


@pytest.mark.parametrize("text, message", [
    ("a cat\n--prompt x --bogus 1", "error: line 2: unknown option --bogus"),
    ("--prompt x --sd_model nothere", "error: line 1: --sd_model 'nothere' is no model folder"),
    ("--prompt x --width 65", "error: job 00000: width 65 is not a positive multiple of 8"),
    ("\n\n", "error: the prompts file holds no prompt"),
])
def test_batch_command_refuses_bad_files_in_one_line(model, tmp_path, text, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    code, stdout, stderr = run("batch", prompts, "-m", model, "-o", tmp_path / "out")
    assert code == 2 and stderr.startswith(message) and stderr.count("\n") == 1 and stdout == ""
    assert not (tmp_path / "out").exists()


def test_batch_on_ray_refuses_a_device_id(model, tmp_path):
    pytest.importorskip("ray")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code, _, stderr = run("batch", prompts, "-m", model, "-o", tmp_path / "out", "--ray", "--device-id", 1)
    assert code == 2 and stderr.startswith("error: --device-id 1 with --ray: Ray gives each worker its own GPU")
