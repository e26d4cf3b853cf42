"""Execution-provider choice: names, auto order, per-EP options, flavour conflicts, and the check that a
session really runs on the provider asked for (no GPU needed: onnxruntime's own fallback is provoked with
providers this build lacks)."""
import dataclasses
import logging
import os
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from sdonnx.runtime import providers as p
from sdonnx.runtime import session as s


@pytest.fixture
def offered(monkeypatch):
    """Pretend this build offers `names`; `fails` maps a name to the reason its probe gives."""
    def set_offered(*names, fails=None):
        import onnxruntime

        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [p.PROVIDERS[n] for n in names])
        monkeypatch.setattr(p, "probe", lambda name, options=None: (fails or {}).get(name))

    return set_offered


def test_auto_picks_the_best_available(offered):
    offered("cpu", "dml", "cuda")
    assert p.plan("auto").names == ["cuda", "cpu"]
    offered("cpu", "openvino")
    assert p.plan("auto").names == ["openvino", "cpu"]
    offered("cpu")
    assert p.plan("auto").names == ["cpu"]
    assert p.plan("auto").auto and not p.plan("cpu").auto


def test_auto_skips_a_provider_that_does_not_start(offered, caplog):
    offered("cpu", "dml", "cuda", fails={"cuda": "libcudnn.so.9: cannot open shared object file"})
    with caplog.at_level(logging.WARNING):
        assert p.plan("auto").names == ["dml", "cpu"]
    assert "cuda did not start (libcudnn.so.9: cannot open shared object file)" in caplog.text


def test_a_named_provider_that_does_not_start_is_an_error(offered):
    offered("cpu", "cuda", fails={"cuda": "libcudnn.so.9: cannot open shared object file"})
    with pytest.raises(p.ProviderStartError, match="provider cuda did not start: libcudnn.so.9: cannot open shared "
                                                   "object file; install the CUDA and cuDNN versions"):
        p.plan("cuda")


def test_directml_gets_its_session_options(offered):
    offered("cpu", "dml")
    plan = p.plan("directml", device_id=1)
    assert plan.disable_mem_pattern and plan.sequential and plan.one_run_at_a_time and plan.static_shapes
    assert plan.providers[0] == ("DmlExecutionProvider", {"device_id": 1})
    assert plan.providers[-1][0] == "CPUExecutionProvider"
    assert plan.device("DmlExecutionProvider") == "1" and plan.device("CPUExecutionProvider") == "CPU"


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


# ------------------------------------------------------------------ the session really runs there


def _missing_provider():
    """A provider this onnxruntime build lacks: onnxruntime warns and runs the session on the CPU."""
    import onnxruntime

    return next(p.PROVIDERS[n] for n in ("cuda", "dml", "migraphx", "openvino")
                if p.PROVIDERS[n] not in onnxruntime.get_available_providers())


def test_a_session_that_fell_back_is_an_error_or_with_auto_a_warning(caplog):
    missing = _missing_provider()
    providers = [(missing, {}), ("CPUExecutionProvider", {})]
    with pytest.raises(p.ProviderStartError, match=f"provider {p.user_name(missing)} did not start: .*{missing}"):
        s.start_session(p.tiny_model(), None, providers, name="unet")
    with caplog.at_level(logging.WARNING):
        session = s.start_session(p.tiny_model(), None, providers, name="unet", auto=True)
    assert session.get_providers()[0] == "CPUExecutionProvider"
    assert f"unet: {p.user_name(missing)} did not start" in caplog.text and "running on cpu" in caplog.text
    assert p.probe(p.user_name(missing))  # the probe says why, too
    assert p.probe("cpu") is None


def test_onnxruntimes_reason_is_read_from_its_log():
    # two lines as onnxruntime-openvino 1.24.1 wrote them to stderr for device_type GPU on a machine without one
    logged = ("\x1b[1;31m2026-11-30 11:38:33.055431889 [E:onnxruntime:Default, provider_bridge_ort.cc:2310 Create] "
              "/onnxruntime/onnxruntime/core/providers/openvino/openvino_provider_factory.cc:141 std::string "
              "onnxruntime::openvino_ep::ParseDeviceType(std::shared_ptr<OVCore>, const onnxruntime::ProviderOptions&) "
              "[ERROR] [OpenVINO] Device GPU is not available\n\x1b[m\n"
              "\x1b[0;93m2026-11-30 11:38:33.055476557 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1066 "
              "CreateExecutionProviderFactoryInstance] Failed to create OpenVINOExecutionProvider. Please refer "
              "https://onnxruntime.ai/docs/execution-providers/OpenVINO-ExecutionProvider.html\x1b[m\n")
    assert p.native_reason(logged) == "[OpenVINO] Device GPU is not available"
    assert p.native_reason(logged.split("\n\x1b[m\n")[1]).startswith("Failed to create OpenVINOExecutionProvider")
    assert p.clean_reason("/onnxruntime/x/onnxruntime_pybind_state.cc:1053 std::shared_ptr<F> f(const S&, "
                          "const M&) Invalid OpenVINO EP option: bogus") == "Invalid OpenVINO EP option: bogus"


def test_native_log_collects_file_descriptor_2():
    with s.native_log() as logged:
        os.write(2, b"[E:onnxruntime:Default, x.cc:1 f] [ERROR] the reason\n")
    assert p.native_reason("".join(logged)) == "the reason"


def test_a_session_that_starts_passes_onnxruntimes_output_on(capfd):
    # the CPU provider starts; what native code wrote meanwhile still reaches stderr
    session = s.start_session(p.tiny_model(), None, [("CPUExecutionProvider", {})])
    assert session.run(None, {"x": np.array([2.0], np.float32)})[0].tolist() == [4.0]


# ------------------------------------------------------------------ OpenVINO options


def test_openvino_device_defaults_to_a_gpu_when_found(monkeypatch):
    monkeypatch.setattr(p, "openvino_devices", lambda: ["CPU"])
    assert p.openvino_device() == "CPU"
    monkeypatch.setattr(p, "openvino_devices", lambda: ["CPU", "GPU.0", "GPU.1", "NPU"])
    assert p.openvino_device() == "GPU"
    assert p.openvino_device("gpu.1") == "GPU.1" and p.openvino_device("AUTO:GPU,CPU") == "AUTO:GPU,CPU"
    with pytest.raises(p.ProviderError, match=r"unknown OpenVINO device 'tpu'; choose CPU, GPU, GPU.0, GPU.1, NPU "
                                              r"or AUTO \(found here: CPU, GPU.0, GPU.1, NPU\)"):
        p.openvino_device("tpu")


def test_openvino_options_are_deliberate(monkeypatch, tmp_path):
    monkeypatch.setenv("SDONNX_OPENVINO_CACHE", str(tmp_path / "ov"))
    monkeypatch.setenv("SDONNX_THREADS", "3")
    options = p.openvino_options("CPU")
    assert options == {"device_type": "CPU", "precision": "ACCURACY", "num_streams": "1", "num_of_threads": "3",
                       "cache_dir": str(tmp_path / "ov")}
    assert (tmp_path / "ov").is_dir()
    assert "num_of_threads" not in p.openvino_options("GPU")
    monkeypatch.setenv("SDONNX_OPENVINO_CACHE", "")
    assert "cache_dir" not in p.openvino_options("CPU")
    # issue 21's bf16: load_config replaces the precision hint; None removes a default
    monkeypatch.setattr(p, "openvino_devices", lambda: ["CPU"])
    bf16 = p.provider_options("openvino", openvino={"precision": None,
                                                    "load_config": {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}})
    assert "precision" not in bf16 and bf16["load_config"] == '{"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}'


def test_lora_sessions_do_not_fill_the_compiled_model_cache():
    providers = [("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "/c"}), ("CPUExecutionProvider", {})]
    assert p.without_compiled_cache(providers) == [("OpenVINOExecutionProvider", {"device_type": "CPU"}),
                                                   ("CPUExecutionProvider", {})]


def test_device_is_for_openvino_only(offered):
    offered("cpu", "cuda")
    with pytest.raises(p.ProviderError, match="--device 'GPU' chooses an OpenVINO device, but the provider is cuda"):
        p.plan("cuda", device="GPU")


def test_user_cache_dir_per_platform(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert p.user_cache_dir("win32") == tmp_path / "local"
    assert p.user_cache_dir("linux") == tmp_path / "xdg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert p.user_cache_dir("darwin").name == ".cache"


# ------------------------------------------------------------------ the CLI and the result say where it ran


def test_providers_command_starts_each_provider(monkeypatch):
    from sdonnx.cli import main

    result = CliRunner().invoke(main, ["providers"])
    assert result.exit_code == 0, result.output
    assert "CPUExecutionProvider       starts" in result.output and "devices: CPU" in result.output
    assert "auto picks: " in result.output
    # a provider this build offers but that does not start is shown with onnxruntime's reason
    import onnxruntime

    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [*real, "CUDAExecutionProvider"])
    result = CliRunner().invoke(main, ["providers"])
    assert "cuda      CUDAExecutionProvider      does not start: " in result.output, result.output
    assert "auto picks: cpu" in result.output or "auto picks: openvino" in result.output


def test_generation_result_says_where_each_component_ran(tiny_onnx, caplog):
    pytest.importorskip("torch")
    from sdonnx.pipeline import Pipeline

    folder = tiny_onnx("sd1")
    for lowmem in (False, True):  # lowmem frees each stage's sessions before the result is made
        pipe = Pipeline.load(folder, provider="cpu", lowmem=lowmem)
        with caplog.at_level(logging.INFO, logger="sdonnx.runtime.session"):
            result = pipe.generate("a red cube", steps=2, seed=1, width=64, height=64)
        assert result.providers == {"text_encoder": "CPUExecutionProvider", "unet": "CPUExecutionProvider",
                                    "vae_decoder": "CPUExecutionProvider"}
        assert result.devices == dict.fromkeys(result.providers, "CPU")
        assert "unet: runs on CPUExecutionProvider (device CPU)" in caplog.text
        assert "CPUExecutionProvider" not in result.infotext


# ------------------------------------------------------------------ DirectML's session settings


def test_directml_sessions_are_made_with_its_settings(tiny_onnx, offered):
    """The DirectML plan's options, read back from a session made with them (on the CPU provider here)."""
    pytest.importorskip("torch")
    import onnxruntime

    from sdonnx.manifest import load_manifest
    from sdonnx.runtime.components import UNet

    offered("cpu", "dml")
    plan = dataclasses.replace(p.plan("dml"), providers=[("CPUExecutionProvider", {})], bind_device=None)
    folder = tiny_onnx("sd1")
    unet = UNet(folder, load_manifest(folder), "unet", plan)
    sample = np.zeros((2, 4, 8, 8), np.float32)
    unet(sample, np.full(2, 500, np.float32), np.zeros((2, 77, 64), np.float32))
    made = unet.session._session
    options = made.get_session_options()
    assert options.enable_mem_pattern is False
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert made.get_inputs()[0].shape == [2, 4, 8, 8]  # free dimensions fixed for this call's shape


def test_one_run_at_a_time_per_session_where_the_plan_says_so(tiny_onnx, offered):
    pytest.importorskip("torch")
    from sdonnx.manifest import load_manifest
    from sdonnx.runtime.components import UNet

    offered("cpu", "dml")
    dml = dataclasses.replace(p.plan("dml"), providers=[("CPUExecutionProvider", {})], bind_device=None,
                              static_shapes=False)
    folder = tiny_onnx("sd1")
    overlaps = {}
    for name, plan in (("dml", dml), ("cpu", p.plan("cpu"))):
        unet = UNet(folder, load_manifest(folder), "unet", plan)
        running, most = [0], [0]
        real_run = unet.session._session.run

        def slow_run(*args, _real=real_run, _running=running, _most=most):
            _running[0] += 1
            _most[0] = max(_most[0], _running[0])
            time.sleep(0.05)
            try:
                return _real(*args)
            finally:
                _running[0] -= 1

        unet.session._session = unet.session._sessions[()] = _Wrapped(unet.session._session, slow_run)
        feeds = (np.zeros((1, 4, 8, 8), np.float32), np.full(1, 500, np.float32), np.zeros((1, 77, 64), np.float32))
        threads = [threading.Thread(target=unet, args=feeds) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        overlaps[name] = most[0]
    assert overlaps == {"dml": 1, "cpu": 3}  # the CPU provider runs concurrent calls; DirectML must not


class _Wrapped:
    """An InferenceSession with its run replaced (to observe concurrency)."""

    def __init__(self, session, run):
        self._session, self.run = session, run

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_serve_checks_the_provider_at_startup(tmp_path):
    pytest.importorskip("fastapi")
    from sdonnx.cli import main

    result = CliRunner().invoke(main, ["serve", "-m", str(tmp_path), "--provider", "cpu", "--device", "GPU"])
    assert result.exit_code == 2 and "error: --device 'GPU' chooses an OpenVINO device" in result.output
    result = CliRunner().invoke(main, ["serve", "-m", str(tmp_path), "--provider", "cuda"])
    assert result.exit_code == 2 and "provider cuda is not available here" in result.output
