"""The face-restoration image operations (sdonnx/postprocess/face_ops.py) against the OpenCV installed here:
max differences of the similarity estimate, 8-bit and float warps, the mask blur and the Lanczos resize.

Runs without torch and without the rest of sdonnx (face_ops.py is loaded by path), so it can be run with
any OpenCV in a throwaway environment:
    python -m venv /tmp/cv4 && /tmp/cv4/bin/pip install numpy "opencv-python-headless==4.10.0.84"
    /tmp/cv4/bin/python bench/face_ops_opencv.py
Measured (2026-11-30): OpenCV 4.10: every 8-bit warp and resize identical, blur within 1e-15, the matrix
within 1.4e-5 of estimateAffinePartial2D(LMEDS); OpenCV 5.0 interpolates 8-bit warps in float32 at exact
positions: 1 level apart on smooth images, a few levels on sharp edges.
"""
import importlib.util
from pathlib import Path

import cv2
import numpy as np

spec = importlib.util.spec_from_file_location(
    "face_ops", Path(__file__).resolve().parent.parent / "sdonnx" / "postprocess" / "face_ops.py")
fo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fo)
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]])


def main():
    rng = np.random.default_rng(2)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (1024, 1200, 3), dtype=np.uint8), (7, 7), 2)
    sharp = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    landmarks = np.array([[500.0, 400], [620, 410], [560, 470], [510, 540], [610, 535]])
    matrix = cv2.estimateAffinePartial2D(landmarks, TEMPLATE, method=cv2.LMEDS)[0]
    print(f"OpenCV {cv2.__version__}")
    print(f"similarity vs estimateAffinePartial2D: {np.abs(fo.similarity_transform(landmarks, TEMPLATE) - matrix).max():.2g}")
    for name, src in (("smooth", smooth), ("sharp", sharp)):
        ours = fo.warp_affine(src, matrix, (512, 512), (135, 133, 132))
        cv = cv2.warpAffine(src, matrix, (512, 512), borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))
        diff = np.abs(ours.astype(int) - cv)
        print(f"8-bit warp, {name} image: max {diff.max()} levels, {100 * (diff > 0).mean():.2f}% of pixels differ")
    inverse = cv2.invertAffineTransform(matrix)
    mask = rng.random((512, 512))
    print(f"float warp: {np.abs(fo.warp_affine(mask, inverse, (1200, 1024)) - cv2.warpAffine(mask, inverse, (1200, 1024), flags=3)).max():.2g}")
    print(f"Gaussian blur 101/11: {np.abs(fo.gaussian_blur(mask, 101, 11) - cv2.GaussianBlur(mask, (101, 101), 11)).max():.2g}")
    for size in ((896, 747), (200, 143)):
        diff = np.abs(fo.resize_lanczos4(smooth[:300, :360], size).astype(int)
                      - cv2.resize(smooth[:300, :360], size, interpolation=cv2.INTER_LANCZOS4))
        print(f"Lanczos4 to {size}: max {diff.max()} levels")


if __name__ == "__main__":
    main()
