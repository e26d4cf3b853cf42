"""RetinaFace detection around the ONNX graph, as facexlib's `detect_faces` and A1111 call it: the image
resized to a short side of 640 (OpenCV's Lanczos), BGR minus the channel means, prior boxes per pyramid
level, boxes and landmarks decoded with the variances, a confidence threshold of 0.97, NMS at IoU 0.4,
then faces whose eyes are closer than 5 px dropped. numpy only.
"""
import math

import numpy as np

from .face_ops import resize_lanczos4

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)
THRESHOLD, NMS_IOU, EYE_DISTANCE, SHORT_SIDE = 0.97, 0.4, 5.0, 640


def prior_boxes(height, width, min_sizes=MIN_SIZES, steps=STEPS):
    """[N, 4] anchors (cx, cy, w, h) relative to the image, in the order of the heads' outputs: level,
    row, column, anchor size."""
    levels = []
    for sizes, step in zip(min_sizes, steps):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width,
                             indexing="ij")
        per_size = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], -1) for s in sizes]
        levels.append(np.stack(per_size, axis=2).reshape(-1, 4))
    return np.concatenate(levels).astype(np.float32)


def decode_boxes(loc, priors, variance=VARIANCE):
    """[N, 4] (x1, y1, x2, y2) relative boxes from the regression output."""
    centre = priors[:, :2] + loc[:, :2] * variance[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * variance[1])
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1)


def decode_landmarks(pre, priors, variance=VARIANCE):
    """[N, 10] relative (x, y) of the five landmarks: eyes, nose, mouth corners."""
    points = priors[:, None, :2] + pre.reshape(-1, 5, 2) * variance[0] * priors[:, None, 2:]
    return points.reshape(-1, 10)


def nms(boxes, scores, iou):
    """Indices kept by greedy non-maximum suppression, best score first (torchvision's nms: areas
    without +1, a box suppressed when its IoU with a kept one is above `iou`)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        order = rest[inter / (area[i] + area[rest] - inter) <= iou]
    return np.array(keep, dtype=np.int64)


def detect(image, run, threshold=THRESHOLD, nms_iou=NMS_IOU, short_side=SHORT_SIDE, eye_distance=EYE_DISTANCE):
    """Faces in an RGB uint8 image [H, W, 3] -> (boxes [F, 5] x1, y1, x2, y2, score; landmarks [F, 5, 2]),
    in the image's pixels, best first. run(bgr_minus_mean [1, 3, h, w]) -> (loc, conf, landmarks)."""
    h, w = image.shape[:2]
    scale = min(h, w) / short_side
    resized = resize_lanczos4(image, (int(w / scale), int(h / scale)))
    bgr = resized[..., ::-1].astype(np.float32) - np.array(MEAN_BGR, np.float32)
    loc, conf, landmarks = run(bgr.transpose(2, 0, 1)[None])
    rh, rw = resized.shape[:2]
    priors = prior_boxes(rh, rw)
    boxes = decode_boxes(loc[0], priors) * np.array([rw, rh] * 2, np.float32)
    points = decode_landmarks(landmarks[0], priors) * np.array([rw, rh] * 5, np.float32)
    scores = conf[0][:, 1]
    chosen = np.nonzero(scores > threshold)[0]
    chosen = chosen[np.argsort(-scores[chosen], kind="stable")]
    keep = chosen[nms(boxes[chosen], scores[chosen], nms_iou)]
    boxes = np.concatenate([boxes[keep] * scale, scores[keep, None]], axis=1)
    points = points[keep].reshape(-1, 5, 2) * scale
    eyes = np.linalg.norm(points[:, 0] - points[:, 1], axis=1)
    wide = eyes >= eye_distance  # side faces and tiny faces are left alone (facexlib's eye_dist_threshold)
    return boxes[wide], points[wide]
