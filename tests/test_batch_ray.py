"""Jobs on a local Ray instance (two CPU workers): the same files as a local run, byte for byte; an interrupted
run resumes without redoing finished images; a killed worker's jobs run elsewhere."""
import os
import signal

import pytest
from click.testing import CliRunner

from sdonnx import GenerationRequest
from sdonnx.cli import main
from sdonnx.jobs import Job, run_jobs
from sdonnx.pipeline import Pipeline

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (starting Ray takes seconds): 2 CPU slots for 2 workers."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return tiny_onnx("sd1")


def jobs_of(model, count=5):
    return [Job(GenerationRequest.from_kwargs(prompt=f"prompt {n}", seed=n, steps=2, width=64, height=64,
                                              sampler="DPM++ 2M SDE" if n % 2 else "Euler a",
                                              batch_size=2 if n == 1 else 1), model, f"{n:02}")
            for n in range(count)]


def files(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


@pytest.fixture(scope="module")
def local_files(model, tmp_path_factory):
    """The reference: the jobs run here."""
    out = tmp_path_factory.mktemp("local")
    run_jobs(jobs_of(model), out)
    return files(out)


def test_batch_on_ray_writes_the_same_files_as_a_local_run(cluster, model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f'--prompt "prompt {n}" --seed {n}\n' for n in range(3)) + "prompt 3\n")
    args = ["batch", str(prompts), "-m", str(model), "--steps", "2", "-W", "64", "-H", "64", "--seed", "7"]
    for where, extra in (("here", []), ("ray", ["--ray", "--workers", "2"])):
        result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / where), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
    here, there = files(tmp_path / "here"), files(tmp_path / "ray")
    assert sorted(here) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert here == there


def test_api_on_ray_uses_both_workers_and_matches_local(cluster, model, local_files, tmp_path):
    results = run_jobs(jobs_of(model), tmp_path, ray="", workers=2)
    assert files(tmp_path) == local_files
    assert [r.job.name for r in results] == ["00", "01", "02", "03", "04"]
    assert len({r.worker for r in results}) == 2  # each worker is handed two jobs at the start


def test_an_interrupted_ray_run_resumes_without_redoing_finished_images(cluster, model, local_files, tmp_path):
    written = []

    def stop_after_two(job, path):
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt

    jobs = jobs_of(model)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, tmp_path, ray="", workers=2, on_image=stop_after_two)
    assert len(list(tmp_path.glob("*.png"))) == 2 and not list(tmp_path.glob(".*"))  # whole files only
    # the jobs all of whose images were written (job 01 makes two: it may have been cut between them)
    finished = [j for j in jobs if all((tmp_path / n).exists() for n in j.file_names())]
    done = {n: (tmp_path / n).stat().st_mtime_ns for j in finished for n in j.file_names()}
    assert finished
    written.clear()
    results = run_jobs(jobs, tmp_path, ray="", workers=2, on_image=lambda j, p: written.append(p.name))
    assert sorted(written) == sorted(set(local_files) - set(done))  # the rest made, the finished jobs not
    assert [r.skipped for r in results] == [j in finished for j in jobs]
    assert all((tmp_path / n).stat().st_mtime_ns == stamp for n, stamp in done.items())
    assert files(tmp_path) == local_files


def dying_loader(marker, victim):
    """A loader whose pipelines kill their own worker process (SIGKILL, as the OOM killer or a lost node
    would) the first time any of them starts job `victim`; the marker file holds the dead process's id."""

    def load(model):
        pipe = Pipeline.load(model, provider="cpu")
        generate = pipe.generate

        def generate_or_die(request, **kwargs):
            if request.prompt.prompt == victim:
                try:
                    with open(marker, "x") as f:
                        f.write(str(os.getpid()))
                except FileExistsError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            return generate(request, **kwargs)

        pipe.generate = generate_or_die
        return pipe

    return load


def test_a_killed_worker_has_its_jobs_run_elsewhere(cluster, model, local_files, tmp_path):
    marker = tmp_path / "killed"
    out = tmp_path / "out"
    results = run_jobs(jobs_of(model), out, ray="", workers=2, load=dying_loader(marker, "prompt 2"))
    dead = marker.read_text()
    assert dead.isdigit()  # a worker was killed in the middle of job 02
    assert not results[2].worker.startswith(dead + "@")  # ...and the job ran in another process
    assert files(out) == local_files


def test_more_workers_than_the_cluster_holds_is_refused(cluster, model, tmp_path):
    # an actor Ray cannot place would hold its jobs forever
    with pytest.raises(ValueError, match="--workers 3: the Ray cluster has 2 CPU"):
        run_jobs(jobs_of(model, 1), tmp_path, ray="", workers=3)
