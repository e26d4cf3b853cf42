"""ControlNet as sd-webui-controlnet defines it: preprocessors (`preprocess`), control-image preparation
(`preprocess.prepare_control_image`) and the runtime that feeds control residuals to the UNet.

The preprocessors are image operations in numpy; OpenCV (the `sdonnx[opencv]` extra) is used when installed, because
the extension computes them with OpenCV and its results are then bit-identical. Importing this package stays cheap.
"""
