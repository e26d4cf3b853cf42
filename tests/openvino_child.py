"""Run inside the OpenVINO environment (onnxruntime-openvino, no torch) by tests/test_openvino.py.

Reads a JSON list of cases on stdin ({"model", "lora_dir", "runs": [{"label", "kwargs"}]}); generates each
run with the CPU provider and with the OpenVINO provider on the CPU device, in this one environment (the
same onnxruntime build), and prints one JSON line: per run the largest and mean pixel difference, where
each component ran, the infotexts' equality, a digest of the OpenVINO images, the number of compiled models
in OpenVINO's cache after the run, plus the graph nodes that fell back from OpenVINO to the CPU
provider (from onnxruntime's profile of the first run)."""
import hashlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from sdonnx import Pipeline
from sdonnx.runtime import session as session_mod


def _images(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


def _profiled(folder):
    """session_options with onnxruntime's profiler on (it records the provider of every node run)."""
    plain = session_mod.session_options
    sessions = itertools.count()

    def options(plan):
        made = plain(plan)
        made.enable_profiling = True
        # one prefix per session: onnxruntime names the file by the second, and two sessions created in the
        # same second wrote into one file (JSONDecodeError: Extra data)
        made.profile_file_prefix = str(Path(folder) / f"profile-{next(sessions)}")
        return made

    return options


def _fallen_back(pipe):
    """{component: sorted op names run by a provider other than OpenVINO} from each session's profile."""
    found = {}
    for (name, *_), component in pipe._components.items():
        profile = component.session._session.end_profiling()
        events = json.loads(Path(profile).read_text())
        ops = {e["args"]["op_name"] for e in events
               if e.get("cat") == "Node" and e.get("args", {}).get("provider") not in (None, "OpenVINOExecutionProvider")}
        found[name] = sorted(ops)
    return found


def run_case(case, folder):
    pipes = {provider: Pipeline.load(case["model"], provider=provider, lora_dir=case.get("lora_dir"), lowmem=False,
                                     device="CPU" if provider == "openvino" else None)
             for provider in ("cpu", "openvino")}
    out, cache = {}, os.environ.get("SDONNX_OPENVINO_CACHE")
    for i, run in enumerate(case["runs"]):
        results = {provider: pipe.generate(**run["kwargs"]) for provider, pipe in pipes.items()}
        cpu, ov = _images(results["cpu"]), _images(results["openvino"])
        diff = np.abs(cpu - ov)
        out[run["label"]] = {"max": int(diff.max()), "mean": float(diff.mean()), "shape": list(ov.shape),
                             "providers": results["openvino"].providers, "devices": results["openvino"].devices,
                             "cpu_providers": results["cpu"].providers,
                             "same_infotext": results["cpu"].infotexts == results["openvino"].infotexts,
                             "digest": hashlib.sha256(ov.tobytes()).hexdigest(),
                             "cache_count": len(os.listdir(cache)) if cache else 0}
        if i == 0:
            out[run["label"]]["fell_back"] = _fallen_back(pipes["openvino"])
    return out


def main():
    cases = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as folder:
        session_mod.session_options = _profiled(folder)
        report = {case["name"]: run_case(case, folder) for case in cases}
    cache = os.environ.get("SDONNX_OPENVINO_CACHE")
    report["cache_files"] = sorted(os.listdir(cache)) if cache else []
    print(json.dumps(report))


if __name__ == "__main__":
    main()
