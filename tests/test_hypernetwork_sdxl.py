"""Hypernetworks on SDXL's UNet (tiny model: self-attention widths 64 and 128, a 192-wide text context), against
the torch reference of test_hypernetwork.py (A1111's module rules as a diffusers attention processor).

A1111 picks a module by the context's width alone, so a file's modules apply wherever the width matches
and the others do nothing; a file with no matching width is left out with a warning. Tolerance as in
test_hypernetwork.py and test_sdxl.py (max 2, mean 0.05 pixel levels).
"""
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from test_hypernetwork import compare, generate, images, make_layers, noise, reference, save_a1111

from sdonnx import Pipeline


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, tmp_path_factory):
    _, torch_pipe, folder = tiny_sdxl("base")
    hypernets = tmp_path_factory.mktemp("sdxl-hypernetworks")
    layers = make_layers((64, 128, 192), seed=11, activation="tanh", layer_norm=True)
    save_a1111(hypernets / "xl.pt", {**layers, **make_layers((32,), seed=12, activation="tanh", layer_norm=True)},
               activation_func="tanh", is_layer_norm=True)
    save_a1111(hypernets / "sd1only.pt", make_layers((32, 768), seed=13, structure=(1, 0.1, 1)),
               layer_structure=[1, 0.1, 1])
    return torch_pipe, Pipeline.load(folder, provider="cpu", hypernetwork_dir=hypernets), layers


def test_sdxl_self_and_cross_attention_match_the_reference(sdxl, caplog):
    torch_pipe, pipe, layers = sdxl
    latents = noise(6)
    base = images(generate(pipe, "a red circle on a blue background", latents))
    with caplog.at_level(logging.WARNING):
        ours = generate(pipe, "a red circle on a blue background <hypernet:xl:0.9>", latents)
    assert "its 32 module(s) match no attention context" in caplog.text and "text context 192" in caplog.text
    assert np.abs(images(ours) - base).mean() > 2
    compare(ours, reference(torch_pipe, [(layers, 0.9)], latents), "sdxl hypernetwork vs torch")


def test_sdxl_leaves_out_a_file_without_matching_widths(sdxl, caplog):
    _, pipe, _ = sdxl
    latents = noise(7)
    base = images(generate(pipe, "a red circle on a blue background", latents))
    with caplog.at_level(logging.WARNING):
        ours = images(generate(pipe, "a red circle on a blue background <hypernet:sd1only:1>", latents))
    assert "none of its modules (32, 768)" in caplog.text
    assert np.array_equal(ours, base)
