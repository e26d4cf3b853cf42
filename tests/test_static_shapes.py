"""Static-shape sessions (DirectML): free dimensions fixed per call shape, a small LRU cache of sessions.

DirectML is not on the test machine; the same session options work on the CPU provider, so the static path
runs here with the CPU provider and a plan that asks for static shapes, against the dynamic session."""
import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")

from sdonnx.manifest import load_manifest
from sdonnx.runtime import providers
from sdonnx.runtime.components import UNet


def _feeds(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 4, size, size), np.float32), np.full(batch, 500, np.float32),
            rng.standard_normal((batch, 77, 64), np.float32))


def test_static_sessions_match_dynamic_and_are_evicted(tiny_onnx):
    folder = tiny_onnx("sd1")
    manifest = load_manifest(folder)
    dynamic_plan = providers.plan("cpu")
    static_plan = dataclasses.replace(dynamic_plan, static_shapes=True, static_cache=2)
    dynamic, static = UNet(folder, manifest, "unet", dynamic_plan), UNet(folder, manifest, "unet", static_plan)
    assert static.session.shapes_cached == []  # created by the first run, for its shape
    for batch, size in ((2, 8), (2, 16), (2, 8), (1, 12)):
        feeds = _feeds(batch, size)
        np.testing.assert_allclose(static(*feeds), dynamic(*feeds), rtol=1e-5, atol=1e-5)
    # (2, 8) was used again after (2, 16), so (2, 16) was the least recently used when (1, 12) came
    assert static.session.shapes_cached == [
        {"batch": 2, "height": 8, "sequence": 77, "width": 8}, {"batch": 1, "height": 12, "sequence": 77, "width": 12}]
    # the session really has fixed dimensions: a call of another shape would need another session
    fixed = static.session._session.get_inputs()[0].shape
    assert fixed == [1, 4, 12, 12]


def test_gpu_plans_ask_for_static_shapes_and_binding(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(providers, "probe", lambda name, options=None: None)  # no GPU here: pretend it starts

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["DmlExecutionProvider", "CPUExecutionProvider"])
    assert providers.plan("dml").static_shapes and providers.plan("dml", device_id=1).bind_device == ("dml", 1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not providers.plan("cuda").static_shapes and providers.plan("cuda").bind_device == ("cuda", 0)
    assert providers.plan("cpu").bind_device is None


def test_pipeline_with_static_shapes_makes_the_same_images(tiny_onnx, monkeypatch):
    from sdonnx.pipeline import Pipeline

    folder = tiny_onnx("sd1")
    images = {}
    for static in (False, True):
        real_plan = providers.plan
        monkeypatch.setattr(providers, "plan", lambda *a, _plan=real_plan, _static=static, **k:
                            dataclasses.replace(_plan(*a, **k), static_shapes=_static))
        pipe = Pipeline.load(folder, provider="cpu")
        images[static] = [np.asarray(pipe.generate("a red cube", steps=3, sampler="Euler", seed=3, width=w, height=w,
                                                   batch_size=b).images[0], np.float32)
                          for w, b in ((64, 1), (96, 2))]
        monkeypatch.setattr(providers, "plan", real_plan)
    for a, b in zip(images[False], images[True]):
        assert np.abs(a - b).max() <= 1


def test_io_binding_keeps_the_steady_conditioning_resident(tiny_onnx):
    """GPU plans bind the text conditioning once and rebind it while it does not change; the same code runs
    here with OrtValues on the CPU device."""
    folder = tiny_onnx("sd1")
    manifest = load_manifest(folder)
    plain = UNet(folder, manifest, "unet", providers.plan("cpu"))
    bound = UNet(folder, manifest, "unet", dataclasses.replace(providers.plan("cpu"), bind_device=("cpu", 0)))
    sample, t, context = _feeds(2, 8)
    for step in range(3):
        x = sample * (step + 1)
        np.testing.assert_array_equal(bound(x, t, context), plain(x, t, context))
    assert bound.session.resident_reused == 2  # copied in at the first step, reused at the next two
    other = context + 1  # a prompt-editing step changes the conditioning: copied again, still right
    np.testing.assert_array_equal(bound(sample, t, other), plain(sample, t, other))
    assert bound.session.resident_reused == 2 and not bound.session._binding_failed


def test_io_binding_falls_back_where_the_device_is_missing(tiny_onnx, caplog):
    folder = tiny_onnx("sd1")
    manifest = load_manifest(folder)
    plan = dataclasses.replace(providers.plan("cpu"), bind_device=("no-such-device", 0))
    unet, plain = UNet(folder, manifest, "unet", plan), UNet(folder, manifest, "unet", providers.plan("cpu"))
    feeds = _feeds(2, 8)
    np.testing.assert_array_equal(unet(*feeds), plain(*feeds))
    assert unet.session._binding_failed and "IO binding on no-such-device unavailable" in caplog.text
