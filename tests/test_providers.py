"""Execution-provider choice: names, auto order, per-EP options, flavour conflicts (no GPU needed)."""
import pytest

from sdonnx.runtime import providers as p


@pytest.fixture
def offered(monkeypatch):
    def set_offered(*names):
        import onnxruntime

        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [p.PROVIDERS[n] for n in names])

    return set_offered


def test_auto_picks_the_best_available(offered):
    offered("cpu", "dml", "cuda")
    assert p.plan("auto").names == ["cuda", "cpu"]
    offered("cpu", "openvino")
    assert p.plan("auto").names == ["openvino", "cpu"]
    offered("cpu")
    assert p.plan("auto").names == ["cpu"]


def test_directml_gets_its_session_options(offered):
    offered("cpu", "dml")
    plan = p.plan("directml", device_id=1)
    assert plan.disable_mem_pattern and plan.sequential
    assert plan.providers[0] == ("DmlExecutionProvider", {"device_id": 1})
    assert plan.providers[-1][0] == "CPUExecutionProvider"


def test_unavailable_and_unknown(offered):
    offered("cpu")
    with pytest.raises(p.ProviderError, match="provider cuda is not available here; available: cpu"):
        p.plan("cuda")
    with pytest.raises(p.ProviderError, match="unknown provider 'tpu'; choose auto or one of cpu, cuda, dml"):
        p.plan(["tpu"])


def test_list_of_providers(offered):
    offered("cpu", "cuda", "migraphx")
    assert p.plan(["migraphx", "cuda"]).names == ["migraphx", "cuda", "cpu"]


def test_flavour_conflict_is_explained(monkeypatch):
    from importlib import metadata

    installed = {"onnxruntime", "onnxruntime-directml"}

    def version(name):
        if name in installed:
            return "1.0"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert p.installed_flavours() == ["onnxruntime", "onnxruntime-directml"]
    message = p.flavour_conflict()
    assert "onnxruntime, onnxruntime-directml" in message and "Keep exactly one" in message
    installed.discard("onnxruntime-directml")
    assert p.flavour_conflict() is None
