"""The optimized-graph cache of the CPU provider (runtime/graph_cache.py) on the tiny SD 1.x UNet: written
once, loaded by the next session (seen by the entry's file times and the log, never by timing), outputs
equal to a plain session's, damaged entries made again, a lost race leaves the winner's entry."""
import logging

import numpy as np
import pytest

from sdonnx.runtime import graph_cache
from sdonnx.runtime.providers import plan
from sdonnx.runtime.session import Session


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "graphs"
    monkeypatch.setenv("SDONNX_GRAPH_CACHE", str(folder))
    return folder


def feeds(seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 64), dtype=np.float32)}


def unet(model):
    return Session(model / "unet" / "model.onnx", plan("cpu"), name="unet")


def entries(folder):
    return sorted(p for p in folder.iterdir()) if folder.exists() else []


def run(session):
    return session.run(feeds())["out_sample"]


def test_written_once_then_loaded(tiny_onnx, cache, monkeypatch, caplog):
    model = tiny_onnx("sd1")
    monkeypatch.setenv("SDONNX_GRAPH_CACHE", "")
    plain = run(unet(model))
    monkeypatch.setenv("SDONNX_GRAPH_CACHE", str(cache))
    with caplog.at_level(logging.INFO, logger="sdonnx.runtime.session"):
        first = run(unet(model))
    [entry] = entries(cache)
    assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "model.onnx", "model.onnx.data"]
    assert "optimized graph saved to" in caplog.text
    written = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdonnx.runtime.session"):
        second = run(unet(model))
    assert f"unet: optimized graph loaded from {entry}" in caplog.text and "saved" not in caplog.text
    assert entries(cache) == [entry] and {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == written
    # the same kernels run: the same numbers
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_entries_are_made_again(tiny_onnx, cache, caplog, damage):
    model = tiny_onnx("sd1")
    want = run(unet(model))
    [entry] = entries(cache)
    if damage == "truncated":  # sizes no longer as recorded
        data = entry / "model.onnx.data"
        data.write_bytes(data.read_bytes()[:1000])
    else:  # same size, not a graph: onnxruntime refuses it
        graph = entry / "model.onnx"
        graph.write_bytes(b"\xff" * graph.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="sdonnx"):
        got = run(unet(model))
    assert "is made again" in caplog.text
    np.testing.assert_array_equal(got, want)
    [again] = entries(cache)
    assert graph_cache.lookup(cache, again.name) == again / "model.onnx"


def test_a_lost_race_keeps_the_first_entry(tmp_path):
    """Two processes making the same entry: the second rename fails, its copy is dropped, the first stays."""
    folder = tmp_path / "graphs"
    for content in (b"first", b"second"):
        temporary = graph_cache.staging(folder, "k")
        (temporary / "model.onnx").write_bytes(content)
        published = graph_cache.publish(temporary, folder, "k")
        assert published == (content == b"first") and not temporary.exists()
    assert (folder / "k" / "model.onnx").read_bytes() == b"first"
    assert graph_cache.lookup(folder, "k") == folder / "k" / "model.onnx"
    assert [p.name for p in folder.iterdir()] == ["k"]


def test_key_follows_the_graph_and_its_data(tiny_onnx, tmp_path):
    import shutil

    copy = tmp_path / "unet"
    shutil.copytree(tiny_onnx("sd1") / "unet", copy)
    key = graph_cache.entry_key(copy / "model.onnx")
    assert graph_cache.entry_key(copy / "model.onnx") == key
    assert graph_cache.entry_key(copy / "model.onnx", [("a", "1")]) != key
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes())  # rewritten weights: a new modification time
    import os

    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert graph_cache.entry_key(copy / "model.onnx") != key


def test_not_used_for_lora_replacements_or_when_off(tiny_onnx, cache, monkeypatch):
    import onnx
    from onnx import numpy_helper

    model = tiny_onnx("sd1")
    graph = onnx.load(str(model / "unet" / "model.onnx")).graph  # weights loaded: one becomes a "LoRA" value
    weight = next(i for i in graph.initializer if len(i.dims) == 2)
    Session(model / "unet" / "model.onnx", plan("cpu"), name="unet",
            replacements={weight.name: numpy_helper.to_array(weight)})
    assert entries(cache) == []
    monkeypatch.setenv("SDONNX_GRAPH_CACHE", "")
    unet(model)
    assert entries(cache) == []
