"""Seeds, variation seeds, ENSD and sampler options through the pipeline, and back from the infotext."""
import numpy as np
import pytest

from sdonnx import Pipeline
from sdonnx.infotext import generation_args
from sdonnx.samplers import SAMPLER_NAMES
from sdonnx.schedules import SCHEDULER_NAMES


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return Pipeline.load(tiny_onnx("sd1"), provider="cpu")


def _pixels(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(int)


def test_every_sampler_and_schedule_runs(pipe):
    for sampler in SAMPLER_NAMES:
        r = pipe.generate("a cat", "dog", steps=3, sampler=sampler, seed=5)
        assert np.asarray(r.images[0]).std() > 1, sampler
    for scheduler in SCHEDULER_NAMES:
        r = pipe.generate("a cat", steps=3, sampler="Euler", scheduler=scheduler, seed=5)
        assert f"Schedule type: {r.parameters['Schedule type']}" in r.infotext


def test_infotext_reproduces_the_image(pipe):
    first = pipe.generate("a cat", "dog", steps=4, sampler="DPM++ 2M SDE", seed=11, subseed=99,
                          subseed_strength=0.25, ensd=31337, eta=0.5, batch_size=2, rng="cpu")
    args = generation_args(first.infotexts[1])
    # with a variation strength A1111 keeps the seed for every image and counts the variation seed
    assert args["seed"] == 11 and args["subseed"] == 100 and args["ensd"] == 31337 and args["rng"] == "cpu"
    again = pipe.generate(**args)
    assert np.array_equal(_pixels(again)[0], _pixels(first)[1])


def test_seeds_and_variation(pipe):
    base = _pixels(pipe.generate("a cat", steps=3, sampler="Euler a", seed=7, batch_size=2))
    single = _pixels(pipe.generate("a cat", steps=3, sampler="Euler a", seed=8))
    assert np.array_equal(base[1], single[0])  # image i of a batch uses seed + i
    varied = _pixels(pipe.generate("a cat", steps=3, sampler="Euler a", seed=7, subseed=3, subseed_strength=0.5))
    assert not np.array_equal(varied[0], base[0])
    zero = _pixels(pipe.generate("a cat", steps=3, sampler="Euler a", seed=7, subseed=3, subseed_strength=0.0))
    assert np.array_equal(zero[0], base[0])
    ensd = _pixels(pipe.generate("a cat", steps=3, sampler="Euler a", seed=7, ensd=31337))
    assert not np.array_equal(ensd[0], base[0])  # ancestral noise moves with ENSD
    euler = _pixels(pipe.generate("a cat", steps=3, sampler="Euler", seed=7))
    assert np.array_equal(euler, _pixels(pipe.generate("a cat", steps=3, sampler="Euler", seed=7, ensd=31337)))


def test_bad_sampler_options(pipe):
    with pytest.raises(ValueError, match="takes no option eta"):
        pipe.generate("a", steps=2, sampler="Euler", eta=0.3)
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M"):
        pipe.generate("a", steps=2, sampler="Euler b")
