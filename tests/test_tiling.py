"""Seamless tiling: the rewritten ONNX graphs against torch modules whose Conv2d pad circularly (A1111's
tiling), and decoded images whose opposite edges continue each other."""
import copy
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from sdonnx.runtime import tiling
from sdonnx.runtime.providers import plan
from sdonnx.runtime.session import Session

AXES = ["xy", "x", "y"]


class _WrapConv2d(torch.nn.Conv2d):
    """Conv2d padding circularly on `wrap_axes` only and with zeros on the other axis (torch's own
    padding_mode="circular" wraps both)."""

    wrap_axes = "xy"

    def _conv_forward(self, x, weight, bias):
        ph, pw = self.padding
        wx, wy = "x" in self.wrap_axes, "y" in self.wrap_axes
        x = torch.nn.functional.pad(x, (pw * wx, pw * wx, ph * wy, ph * wy), mode="circular")
        return torch.nn.functional.conv2d(x, weight, bias, self.stride, (0 if wy else ph, 0 if wx else pw),
                                          self.dilation, self.groups)


def circular(module, axes):
    """A copy of `module` whose every Conv2d pads by wrapping on `axes` (A1111: padding_mode="circular")."""
    module = copy.deepcopy(module)
    for conv in module.modules():
        if isinstance(conv, torch.nn.Conv2d):
            if axes == "xy":
                conv.padding_mode = "circular"
            else:
                conv.__class__ = _WrapConv2d
                conv.wrap_axes = axes
    return module


@pytest.fixture(scope="module")
def sd1(tiny_onnx, tiny_diffusers, tmp_path_factory):
    """(folder with copies of the sd1 unet and vae graphs, torch pipeline)."""
    folder = tmp_path_factory.mktemp("tiling")
    for name in ("unet", "vae_decoder", "vae_encoder"):
        shutil.copytree(tiny_onnx("sd1") / name, folder / name)
    return folder, tiny_diffusers("sd1")[1]


def session(folder, name, axes):
    return Session(folder / name / "model.onnx", plan("cpu"), tiling=axes)


def assert_close(got, want, tol=2e-5):
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err < tol, f"relative error {err:.2e}"


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("axes", AXES)
def test_unet_equals_torch_circular_conv(sd1, axes):
    folder, pipe = sd1
    sample, context, t = rand(2, 4, 16, 24), rand(2, 10, 64, seed=1), np.array([10.0, 700.0], np.float32)
    got = session(folder, "unet", axes).run({"sample": sample, "timestep": t, "encoder_hidden_states": context})
    with torch.no_grad():
        want = circular(pipe.unet, axes)(torch.from_numpy(sample), torch.from_numpy(t),
                                         encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
        plain = pipe.unet(torch.from_numpy(sample), torch.from_numpy(t),
                          encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    assert_close(got["out_sample"], want)
    assert np.abs(got["out_sample"] - plain).max() > 1e-2  # the rewrite did change the result


@pytest.mark.parametrize("axes", AXES)
def test_vae_equals_torch_circular_conv(sd1, axes):
    folder, pipe = sd1
    latents, images = rand(1, 4, 8, 12), np.tanh(rand(1, 3, 64, 96, seed=1))
    decoded = session(folder, "vae_decoder", axes).run({"latent_sample": latents})["sample"]
    encoded = session(folder, "vae_encoder", axes).run({"sample": images})
    vae = circular(pipe.vae, axes)
    with torch.no_grad():
        assert_close(decoded, vae.decode(torch.from_numpy(latents)).sample.numpy())
        dist = vae.encode(torch.from_numpy(images)).latent_dist
    assert_close(encoded["latent_mean"], dist.mean.numpy())
    assert_close(encoded["latent_logvar"], dist.logvar.numpy())


def wrapped_seam(image, axis, k=8):
    """The k rows/columns either side of the wrap-around seam: last k of `image`, then its first k."""
    n = image.shape[axis]
    return np.concatenate([np.take(image, range(n - k, n), axis), np.take(image, range(k), axis)], axis)


def seam_truth(decode, latents, axes, axis, k=8):
    """The k rows/columns either side of a join between copies of `latents`, as the untiled decoder paints
    it in the middle of a canvas holding 3 copies along every axis in `axes`."""
    reps = [1, 1, 3 if "y" in axes else 1, 3 if "x" in axes else 1]
    canvas = decode(None, np.tile(latents, reps))
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    rows = slice(h, 2 * h) if "y" in axes else slice(0, h)
    cols = slice(w, 2 * w) if "x" in axes else slice(0, w)
    if axis == -1:
        return canvas[..., rows, w - k:w + k]
    return canvas[..., h - k:h + k, cols]


@pytest.fixture(scope="module")
def decoders(sd1):
    folder, _ = sd1
    sessions = {axes: session(folder, "vae_decoder", axes) for axes in (None, *AXES)}
    return lambda axes, z: sessions[axes].run({"latent_sample": z})["sample"]


@pytest.mark.parametrize("axes", AXES)
def test_tiled_decode_edges_continue_each_other(decoders, axes):
    """A tiled image's opposite edges join as the decoder paints the same latents inside a larger canvas
    of copies; an untiled image's do not (zero padding paints a border)."""
    latents = rand(2, 4, 12, 16, seed=3)
    tiled, untiled = decoders(axes, latents), decoders(None, latents)
    for axis, name in ((-1, "x"), (-2, "y")):
        if name not in axes:
            continue
        truth = seam_truth(decoders, latents, axes, axis)
        errors = [np.abs(wrapped_seam(image, axis) - truth).mean() / truth.std() for image in (tiled, untiled)]
        print(f"tiling {axes}, {name} seam: error vs continuation tiled {errors[0]:.3f}, untiled {errors[1]:.3f}")
        assert errors[0] < 0.2 and errors[1] > 0.5


def test_rewrite_keeps_opset_and_weights_file(sd1):
    folder, _ = sd1
    source = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    for axes in AXES:
        tiled = tiling.wrap_padding(source, axes)
        assert [(o.domain, o.version) for o in tiled.opset_import] == [(o.domain, o.version) for o in source.opset_import]
        convs = [n for n in tiled.graph.node if n.op_type == "Conv"]
        pads = [list(onnx.helper.get_attribute_value(a)) for n in convs for a in n.attribute if a.name == "pads"]
        # [top, left, bottom, right]: zero on the wrapped axes, the other axis untouched
        assert all(p[1] == p[3] == 0 for p in pads) == ("x" in axes)
        assert all(p[0] == p[2] == 0 for p in pads) == ("y" in axes)
        assert any(any(p) for p in pads) == (axes != "xy")
    # the source proto is left as it was
    assert any(onnx.helper.get_attribute_value(a) == [1, 1, 1, 1] for n in source.graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "pads")
    Session(folder / "unet" / "model.onnx", plan("cpu"), tiling="xy")
    onnx.checker.check_model(str(folder / "unet" / "model.tiled-xy.onnx"))
    assert sorted(p.name for p in (folder / "unet").iterdir() if p.name.endswith(".data")) == ["model.onnx.data"]


def test_asymmetric_pads_wrap():
    """A Conv with pads [top 2, left 0, bottom 1, right 3] against the same wrap done in numpy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = rand(2, 3, 3, 3, seed=5)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 0, 1, 3])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rand(1, 3, 7, 9, seed=6)
    for axes in AXES:
        tiled = tiling.wrap_padding(model, axes)
        got = ort.InferenceSession(tiled.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        padded = np.pad(x, [(0, 0), (0, 0), (2, 1), (0, 0)], mode="wrap" if "y" in axes else "constant")
        padded = np.pad(padded, [(0, 0), (0, 0), (0, 0), (0, 3)], mode="wrap" if "x" in axes else "constant")
        want = torch.nn.functional.conv2d(torch.from_numpy(padded), torch.from_numpy(weight)).numpy()
        assert got.shape == want.shape
        assert_close(got, want)


def copy_graph(source, target):
    """model.onnx and its weights only (no cached tiled graphs)."""
    target.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(source / name, target / name)


def test_cached_graph_written_once_and_refreshed(sd1, tmp_path):
    folder, _ = sd1
    copy_graph(folder / "vae_decoder", tmp_path / "vae_decoder")
    source = tmp_path / "vae_decoder" / "model.onnx"
    cached = tmp_path / "vae_decoder" / "model.tiled-x.onnx"
    session(tmp_path, "vae_decoder", "x")
    first = cached.stat().st_mtime_ns
    session(tmp_path, "vae_decoder", "x")
    assert cached.stat().st_mtime_ns == first  # reused
    later = first + 10**9
    import os

    os.utime(source, ns=(later, later))  # a reconverted model.onnx is newer than the cache
    session(tmp_path, "vae_decoder", "x")
    assert cached.stat().st_mtime_ns > first
    assert not [p for p in cached.parent.iterdir() if p.suffix == ".tmp"]


def test_unwritable_folder_loads_from_memory(sd1, tmp_path, monkeypatch):
    folder, _ = sd1
    copy_graph(folder / "vae_decoder", tmp_path / "vae_decoder")
    latents = rand(1, 4, 6, 5, seed=7)
    want = session(folder, "vae_decoder", "y").run({"latent_sample": latents})["sample"]

    def refuse(model, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(tiling, "_write_atomic", refuse)
    got = session(tmp_path, "vae_decoder", "y").run({"latent_sample": latents})["sample"]
    np.testing.assert_array_equal(got, want)
    assert not (tmp_path / "vae_decoder" / "model.tiled-y.onnx").exists()


@pytest.mark.parametrize("value, axes", [(True, "xy"), ("XY", "xy"), ("yx", "xy"), ("x", "x"), ("y", "y"),
                                         (None, None), (False, None)])
def test_tiling_axes(value, axes):
    assert tiling.tiling_axes(value) == axes


def test_tiling_axes_bad_value():
    with pytest.raises(ValueError, match="tiling 'z': choose one of x, y, xy"):
        tiling.tiling_axes("z")
