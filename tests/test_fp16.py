"""convert --dtype fp16: fp32 at the API's edges, and a VAE decode that never turns black (fp32 fallback)."""
import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.transformers.float16")

DECODER_WEIGHT = "model.decoder.conv_in.weight"


@pytest.fixture(scope="module")
def fp16_model(tiny_diffusers, tmp_path_factory):
    from converters.convert import convert

    folder, _ = tiny_diffusers("sd1")
    out = tmp_path_factory.mktemp("sd1-fp16") / "model"
    convert(folder, out, dtype="fp16")
    return out


def _pipe(folder):
    from sdonnx.pipeline import Pipeline

    return Pipeline.load(folder, provider="cpu")


def test_fp16_graphs_keep_fp32_inputs_and_outputs(fp16_model):
    import onnxruntime as ort

    manifest = json.loads((fp16_model / "sdonnx.json").read_text())
    assert manifest["converter"]["dtype"] == "fp16"
    for name in ("text_encoder", "unet", "vae_decoder"):
        component = manifest["components"][name]
        assert component["optimized"]["dtype"] == "fp16" and component["dtype"] == "fp32"
        session = ort.InferenceSession(str(fp16_model / component["optimized_path"]), providers=["CPUExecutionProvider"])
        assert {i.type for i in session.get_inputs() if i.name != "input_ids"} == {"tensor(float)"}
        assert {o.type for o in session.get_outputs()} == {"tensor(float)"}
    assert manifest["components"]["vae_encoder"]["optimized_path"] is None  # img2img's encoder stays fp32


def test_fp16_image_is_close_to_fp32(fp16_model, tiny_onnx):
    args = {"steps": 3, "sampler": "Euler", "seed": 3, "width": 64, "height": 64}
    half = np.asarray(_pipe(fp16_model).generate("a blue sphere", **args).images[0], np.float32)
    full = np.asarray(_pipe(tiny_onnx("sd1")).generate("a blue sphere", **args).images[0], np.float32)
    assert np.abs(half - full).mean() < 2.0


def _scale_initializer(path, name, factor):
    """Multiply one initializer of an ONNX graph (external data kept in place) by `factor`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    init = next(i for i in model.graph.initializer if i.name == name)
    array = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((array.astype(np.float32) * factor).astype(array.dtype), name))
    data = path.with_name(path.name + ".data")
    data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0)


@pytest.fixture
def overflowing_model(fp16_model, tmp_path):
    """The fp16 model with the decoder's first conv scaled by 1e5 in both VAE graphs: its activations pass
    fp16's 65504 (Inf, then NaN after the GroupNorm), while in fp32 the GroupNorm divides the scale away."""
    folder = tmp_path / "model"
    shutil.copytree(fp16_model, folder)
    manifest = json.loads((folder / "sdonnx.json").read_text())
    decoder = manifest["components"]["vae_decoder"]
    for path in (decoder["path"], decoder["optimized_path"]):
        _scale_initializer(folder / path, DECODER_WEIGHT, 1e5)
    return folder


def test_overflowing_fp16_vae_falls_back_to_fp32(overflowing_model, caplog):
    pipe = _pipe(overflowing_model)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    scaled = latents / pipe.manifest.vae_scaling_factor
    half = pipe._component("vae_decoder")
    assert not half.is_base and not np.isfinite(half(scaled)).all()  # the overflow is real
    full = pipe._component("vae_decoder", base=True)(scaled)
    assert np.isfinite(full).all()
    with caplog.at_level(logging.WARNING, logger="sdonnx.pipeline"):
        image = pipe.decode(latents)[0]
    assert "overflowed" in caplog.text
    from sdonnx.image import latents_to_images

    assert np.array_equal(np.asarray(image), np.asarray(latents_to_images(full)[0]))
    assert pipe.decode(latents)[0] is not None and pipe._vae_overflowed  # and stays on the fp32 VAE


def test_fp16_generate_with_overflow_gives_the_fp32_image(overflowing_model):
    pipe = _pipe(overflowing_model)
    result = pipe.generate("a cat", steps=2, sampler="Euler", seed=5, width=64, height=64)
    image = np.asarray(result.images[0])
    assert image.std() > 0  # not a black (NaN -> 0) image
