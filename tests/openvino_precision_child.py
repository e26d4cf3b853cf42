"""Run inside the OpenVINO environment by tests/test_precision.py: generate with OpenVINO on the CPU device in
fp32 and in bf16 (the inference precision hint), and print one JSON line: the PSNR and largest difference of
the bf16 image against the fp32 one, where the UNet ran, both infotexts, and the OpenVINO options the
sessions were made with."""
import json
import sys

import numpy as np

from sdonnx import Pipeline


def main():
    case = json.load(sys.stdin)
    out, images = {}, {}
    for precision in ("fp32", "bf16"):
        pipe = Pipeline.load(case["model"], provider="openvino", device="CPU", precision=precision, lowmem=False)
        result = pipe.generate(**case["kwargs"])
        images[precision] = np.asarray(result.images[0], np.float64)
        # the options sessions are created with (this onnxruntime build reports none back from a session)
        out[precision] = {"infotext": result.infotext, "unet": result.providers["unet"],
                          "options": dict(pipe.plan.providers)["OpenVINOExecutionProvider"]}
    mse = np.mean((images["bf16"] - images["fp32"]) ** 2)
    out["psnr"] = float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))
    out["max"] = float(np.abs(images["bf16"] - images["fp32"]).max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
