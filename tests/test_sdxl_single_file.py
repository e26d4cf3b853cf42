"""SDXL single-file checkpoints in the original (sgm / A1111) layout: written from the tiny diffusers
pipelines by converters/original_layout.py, detected from the weights, converted offline, and giving
the same images as diffusers (Euler + Karras, tolerance as test_parity.py)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_parity import NEGATIVE, PROMPT, STEPS, TIGHT, _compare, _scheduler  # noqa: E402
from test_sdxl import CFG, EULER  # noqa: E402
from torch_reference import diffusers_images  # noqa: E402

from converters.checkpoint import load_state_dict  # noqa: E402
from converters.original_layout import save_checkpoint  # noqa: E402
from converters.single_file import detect  # noqa: E402
from sdonnx import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tiny_sdxl, tmp_path_factory):
    _, torch_pipe, _ = tiny_sdxl("base")
    return torch_pipe, save_checkpoint(torch_pipe, tmp_path_factory.mktemp("sdxl-file") / "tiny_sdxl.safetensors")


def test_detects_sdxl_layout(checkpoint):
    _, path = checkpoint
    state = load_state_dict(path)
    assert any(k.startswith("conditioner.embedders.1.model.text_projection") for k in state)
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in state)
    guess = detect(state)
    assert (guess.family, guess.prediction, guess.inpaint) == ("sdxl", "epsilon", False)


def test_single_file_converts_offline_and_matches_diffusers(checkpoint, tmp_path, monkeypatch):
    from converters.convert import convert

    torch_pipe, path = checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = convert(path, tmp_path / "model")
    assert manifest.family == "sdxl" and manifest.native_size == 1024  # the family's size, not the tiny one's
    assert manifest.addition_time_embed_dim == 8 and manifest.vae_scaling_factor == pytest.approx(0.13025)
    pipe = Pipeline.load(tmp_path / "model", provider="cpu")
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1,
                         width=64, height=64, latents=latents).images
    ref = diffusers_images(torch_pipe, _scheduler(torch_pipe, "EulerDiscreteScheduler", **EULER), PROMPT, NEGATIVE,
                           latents, STEPS, CFG)
    _compare(ours, ref, TIGHT, "sdxl single file Euler Karras vs diffusers")
