"""A1111's "Restore faces" on ONNX Runtime: detect, align, restore (GFPGAN or CodeFormer), parse, blend back.

The stages follow facexlib's FaceRestoreHelper as A1111 (>= 1.8) drives it for both restorers:
1. detect (retinaface.py): five landmarks per face; callers with their own detector pass `landmarks`;
2. align: the similarity transform taking the landmarks to the FFHQ five-point template of a 512 px
   face, the face warped out bilinearly with a grey border;
3. restore: RGB in [-1, 1] -> the network -> clamped to [-1, 1] -> uint8 by truncation, as A1111;
   CodeFormer takes its fidelity weight (A1111's `code_former_weight`, default 0.5);
4. mask: the parser's classes (background, neck, cloth, hair, hat out), Gaussian-blurred twice
   (101 px, sigma 11), 10 px border zeroed;
5. paste: the face and its mask warped back with the inverse transform and blended over the image,
   face after face; the result truncated to uint8.
torch-free: numpy and ONNX Runtime.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..manifest import MANIFEST_NAME
from . import retinaface
from .models import NotConverted, scan
from .face_ops import footprint, gaussian_blur, invert_affine, similarity_transform, warp_affine

log = logging.getLogger(__name__)

# five landmarks (left eye, right eye, nose, left and right mouth corner) of an aligned 512 px FFHQ face
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])
BORDER_RGB = (132, 133, 135)  # facexlib's grey around a face near the image edge (BGR 135, 133, 132)
# ParseNet classes kept out of the blend mask: background, neck, cloth, hair, hat
OUTSIDE_FACE = (0, 14, 16, 17, 18)
MASK_BLUR, MASK_SIGMA, MASK_BORDER = 101, 11, 10
RESTORERS = ("GFPGAN", "CodeFormer")  # A1111's face_restoration_model choices
DEFAULT_CODEFORMER_WEIGHT = 0.5


@dataclass(frozen=True)
class AlignedFace:
    """One face cut out of an image: the crop [S, S, 3] uint8 RGB and the 2x3 matrix image -> crop."""

    crop: np.ndarray
    matrix: np.ndarray


def template(size):
    return FFHQ_TEMPLATE * (size / 512.0)


def align(image, landmarks, size=512):
    """AlignedFace of the face whose five landmarks [5, 2] (image pixels) are given."""
    matrix = similarity_transform(np.asarray(landmarks, np.float64).reshape(5, 2), template(size))
    return AlignedFace(warp_affine(image, matrix, (size, size), BORDER_RGB), matrix)


def to_net(crop):
    """uint8 RGB [S, S, 3] -> float32 [1, 3, S, S] in [-1, 1] (facexlib's /255 then normalize 0.5, 0.5)."""
    x = crop.astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)[None]


def from_net(output):
    """float [1, 3, S, S] in [-1, 1] -> uint8 RGB [S, S, 3], clamped then truncated as A1111 does."""
    x = (np.clip(output[0].astype(np.float32), -1.0, 1.0) + np.float32(1.0)) / np.float32(2.0)
    return (x.transpose(1, 2, 0) * np.float32(255.0)).astype(np.uint8)


def face_mask(parsing):
    """Soft blend mask [S, S] float64 in [0, 1] from the parser's logits [1, classes, S, S]."""
    classes = np.argmax(parsing[0], axis=0)
    mask = np.where(np.isin(classes, OUTSIDE_FACE), 0.0, 255.0)
    mask = gaussian_blur(gaussian_blur(mask, MASK_BLUR, MASK_SIGMA), MASK_BLUR, MASK_SIGMA)
    b = MASK_BORDER
    mask[:b, :], mask[-b:, :], mask[:, :b], mask[:, -b:] = 0, 0, 0, 0
    return mask / 255.0


def paste(canvas, face, matrix, mask, origin=(0, 0)):
    """Blend a restored face [S, S, 3] uint8 into `canvas` (float64 [h, w, 3]: the image's pixels from
    origin (x, y) on) through the inverse of `matrix`, weighted by `mask` [S, S] warped the same way; in place."""
    ox, oy = origin
    h, w = canvas.shape[:2]
    inverse = invert_affine(matrix)
    # only where the face can land: elsewhere the warped face and mask are 0 and the canvas stays as it is
    x0, y0, x1, y1 = footprint(inverse, face.shape[0], (ox + w, oy + h))
    window = (max(x0, ox), max(y0, oy), x1, y1)
    x0, y0 = window[:2]
    if x1 <= x0 or y1 <= y0:
        return canvas
    back = warp_affine(face, inverse, None, window=window).astype(np.float64)
    soft = warp_affine(mask, inverse, None, window=window)[..., None]
    region = canvas[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    region[...] = soft * back + (1 - soft) * region
    return canvas


def restore_faces(image, restore, parse, faces, size=512):
    """Restore every face of an RGB uint8 image [H, W, 3] -> a new image.

    faces: [F, 5, 2] landmarks (image pixels); restore(net_input) -> net_output and parse(net_input) ->
    logits run the networks on [1, 3, size, size] inputs in [-1, 1]. As facexlib, the faces are blended
    one after the other in floating point and the result truncated once; the floating-point canvas covers
    only the faces' footprints (an 8k image holds no 8k float copy)."""
    h, w = image.shape[:2]
    aligned = [align(image, landmarks, size) for landmarks in faces]
    windows = [footprint(invert_affine(a.matrix), size, (w, h)) for a in aligned]
    windows = [win for win in windows if win[2] > win[0] and win[3] > win[1]]
    if not windows:
        return image.copy()
    x0, y0 = min(win[0] for win in windows), min(win[1] for win in windows)
    x1, y1 = max(win[2] for win in windows), max(win[3] for win in windows)
    canvas = image[y0:y1, x0:x1].astype(np.float64)
    for face in aligned:
        restored = from_net(restore(to_net(face.crop)))
        paste(canvas, restored, face.matrix, face_mask(parse(to_net(restored))), (x0, y0))
    out = image.copy()
    out[y0:y1, x0:x1] = canvas.astype(np.uint8)
    return out


class FaceRestorer:
    """One restorer model (GFPGAN or CodeFormer) with the detector and parser, as ONNX sessions."""

    def __init__(self, restorer, detector, parser, plan=None):
        """restorer, detector, parser: Found models (sdonnx.postprocess.models) of kinds face_restorer,
        face_detector and face_parser; plan: a ProviderPlan (default: the CPU)."""
        from ..runtime.providers import plan as provider_plan
        from ..runtime.session import Session

        plan = plan or provider_plan("cpu")
        self.name = restorer.manifest.architecture
        self.size = restorer.manifest.input_size[0]
        self._restorer = Session(restorer.folder / restorer.manifest.graph, plan, name=restorer.name)
        self._detector = Session(detector.folder / detector.manifest.graph, plan, name=detector.name)
        self._parser = Session(parser.folder / parser.manifest.graph, plan, name=parser.name)
        self._weight_input = restorer.manifest.facts.get("weight_input")

    def detect(self, image):
        """(boxes [F, 5], landmarks [F, 5, 2]) of the faces in an RGB uint8 image."""
        return retinaface.detect(image, lambda x: _outputs(self._detector, {"image": x}))

    def restore(self, image, landmarks=None, codeformer_weight=DEFAULT_CODEFORMER_WEIGHT):
        """Restore the faces of `image` (RGB uint8 [H, W, 3]); landmarks [F, 5, 2] skips detection."""
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        faces = self.detect(image)[1] if landmarks is None else np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
        log.info("%s: restoring %d face(s)", self.name, len(faces))
        weight = np.array([codeformer_weight], np.float32)

        def restore(x):
            feeds = {"image": x, self._weight_input: weight} if self._weight_input else {"image": x}
            return _outputs(self._restorer, feeds)[0]

        return restore_faces(image, restore, lambda x: _outputs(self._parser, {"image": x})[0], faces, self.size)


def _outputs(session, feeds):
    result = session.run(feeds)
    return [result[name] for name in session.output_names]


DEFAULT_FOLDERS = {"GFPGAN": Path("models") / "GFPGAN", "CodeFormer": Path("models") / "Codeformer"}


def face_folders(gfpgan_dir=None, codeformer_dir=None):
    """{restorer name: folder}: A1111's models/GFPGAN and models/Codeformer unless given. The detector and
    parser are looked up in both (A1111 has facexlib download them into the GFPGAN folder)."""
    return {"GFPGAN": Path(gfpgan_dir or DEFAULT_FOLDERS["GFPGAN"]),
            "CodeFormer": Path(codeformer_dir or DEFAULT_FOLDERS["CodeFormer"])}


def installed(folders):
    """[(restorer name, folder)] of the restorers with a converted model in their folder."""
    return [(name, folder) for name, folder in folders.items() if _restorer_models(name, folder)]


def _restorer_models(name, folder):
    return [m for m in scan([folder], "face_restorer") if m.converted and m.manifest.architecture == name]


def find_models(name, folders):
    """(restorer, detector, parser) Found models for restorer `name` (GFPGAN or CodeFormer); a ValueError
    says what is missing and how to convert it. Several converted restorers of one kind: the newest, as
    A1111 takes the newest GFPGAN file."""
    if name not in RESTORERS:
        raise ValueError(f"face restoration model {name!r}: choose one of {', '.join(RESTORERS)}")
    folder = folders[name]
    restorers = _restorer_models(name, folder)
    if not restorers:
        helpers = {Path(FILES[k]).stem for k in ("face_detector", "face_parser")}
        waiting = [m.source for m in scan([folder], "face_restorer") if not m.converted and m.source.stem not in helpers]
        hint = (f"; convert it first: sdonnx convert \"{waiting[0]}\" -o \"{waiting[0].with_suffix('')}\""
                if waiting else f" (A1111's file is {FILES[name]})")
        raise NotConverted(f"no converted {name} model in {folder}{hint}")
    restorer = max(restorers, key=lambda m: (m.folder / MANIFEST_NAME).stat().st_mtime)
    return (restorer, _helper("face_detector", folders), _helper("face_parser", folders))


FILES = {"GFPGAN": "GFPGANv1.4.pth", "CodeFormer": "codeformer-v0.1.0.pth", "face_detector": "detection_Resnet50_Final.pth",
         "face_parser": "parsing_parsenet.pth"}


def _helper(kind, folders):
    search = list(dict.fromkeys(folders.values()))
    found = scan(search, kind)
    converted = [m for m in found if m.converted]
    if converted:
        return converted[0]
    where = " or ".join(str(f) for f in search)
    waiting = [m.source for m in found if not m.converted and m.source.stem == Path(FILES[kind]).stem]
    if waiting:
        return_hint = f"convert it first: sdonnx convert \"{waiting[0]}\" -o \"{waiting[0].with_suffix('')}\""
    else:
        return_hint = f"put facexlib's {FILES[kind]} there and convert it with sdonnx convert"
    raise NotConverted(f"restoring faces needs the {kind.replace('face_', 'face ')} in {where}: {return_hint}")


class FaceRestorers:
    """The restorers of a pair of folders by A1111's names, their sessions made on first use (a cache)."""

    def __init__(self, folders, plan=None):
        self.folders, self.plan, self._loaded = dict(folders), plan, {}

    def installed(self):
        return [name for name, _ in installed(self.folders)]

    def check(self, name):
        """Raise the ValueError that get(name) would, without creating sessions."""
        find_models(name, self.folders)

    def get(self, name):
        if name not in self._loaded:
            self._loaded[name] = FaceRestorer(*find_models(name, self.folders), plan=self.plan)
        return self._loaded[name]
