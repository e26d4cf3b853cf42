"""ControlNet preprocessors and control-image fitting against sd-webui-controlnet's formulas.

The references below restate the extension's code with OpenCV (the library it computes with); sdonnx runs OpenCV
when installed and its numpy re-statements otherwise, so each comparison runs both ways (`backend` fixture).
Tolerances for the numpy path come from OpenCV's fixed-point arithmetic on uint8 (resize, blur, remap round their
weights to 11-15 bits): at most 1 level on at most a few percent of pixels; binary outputs (Canny, thresholds)
may then flip on the few pixels that sit on a threshold, bounded as a fraction of pixels per test.
"""

import numpy as np
import pytest

from sdonnx.controlnet import imageops, inpaint
from sdonnx.controlnet import preprocess as cn

try:
    import cv2
except ImportError:  # the runtime then computes in numpy; the comparisons with the extension need OpenCV
    cv2 = None
needs_cv2 = pytest.mark.skipif(cv2 is None, reason="OpenCV, the extension's library and the reference, is not "
                                                   "installed (pip install -e '.[opencv]')")


@pytest.fixture(params=["opencv", "numpy"])
def backend(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(imageops, "opencv", lambda: None)
    return request.param


def _photo(h, w, seed=0):
    """A smooth colour image with edges: blurred noise stretched to 0..255, a rectangle and a disc."""
    rng = np.random.default_rng(seed)
    x = imageops.gaussian_blur_np(rng.integers(0, 256, (h, w, 3)).astype(np.float32), 3)
    x = ((x - x.min()) / (x.max() - x.min()) * 255).round().astype(np.uint8)
    x[h // 4:h // 2, w // 5:w // 2] = (250, 30, 40)
    yy, xx = np.mgrid[:h, :w]
    x[(yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 <= (min(h, w) // 5) ** 2] = (20, 200, 90)
    return x


def _edges(h, w):
    """A black image with one-pixel white lines (a Canny map): a slanted line and a circle."""
    x = np.zeros((h, w), np.uint8)
    t = np.linspace(0, 1, 4 * w)
    x[np.rint(4 + t * (h // 2 - 4)).astype(int), np.rint(3 + t * (w - 8)).astype(int)] = 255
    angle = np.linspace(0, 2 * np.pi, 8 * (h + w))
    r = min(h, w) // 3
    x[np.rint(h // 2 + r * np.sin(angle)).astype(int), np.rint(w // 2 + r * np.cos(angle)).astype(int)] = 255
    return np.stack([x] * 3, axis=2)


def _segments(h, w):
    """Five flat colours (a segmentation map)."""
    x = np.zeros((h, w, 3), np.uint8)
    for i, colour in enumerate([(10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]):
        x[:, i * w // 5:] = colour
    return x


# ------------------------------------------------------------------------------------------- the extension
def _ext_high_quality_resize(x, size):
    """scripts/controlnet.py: Script.detectmap_proc.high_quality_resize, restated."""
    mask = None
    if x.shape[2] == 4:
        mask, x = x[:, :, 3], x[:, :, :3]
    if x.shape[:2] != (size[1], size[0]):
        smaller = size[0] * size[1] < x.shape[0] * x.shape[1]
        bigger = size[0] * size[1] > x.shape[0] * x.shape[1]
        colours = len(np.unique(x.reshape(-1, 3), axis=0))
        binary = colours == 2 and x.min() < 16 and x.max() > 240
        one_pixel = False
        if binary:
            k = np.ones((3, 3), np.uint8)
            xc = cv2.dilate(cv2.erode(x, k), k)
            one_pixel = np.where(xc < x)[0].shape[0] * 2 > np.where(x > 127)[0].shape[0]
        interp = (cv2.INTER_NEAREST if 2 < colours < 200 else cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)
        y = cv2.resize(x, size, interpolation=interp)
        if mask is not None:
            mask = cv2.resize(mask, size, interpolation=interp)
        if binary:
            y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if one_pixel:
                y = _ext_nake_nms(y)
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
                y = _ext_thin(y, bigger)
            else:
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = np.stack([y] * 3, axis=2)
    else:
        y = x
    if mask is not None:
        y = np.concatenate([y, ((mask > 127) * 255).astype(np.uint8)[:, :, None]], axis=2)
    return y


def _ext_nake_nms(x):
    y = np.zeros_like(x)
    for f in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
              [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]]):
        np.putmask(y, cv2.dilate(x, kernel=np.array(f, np.uint8)) == x, x)
    return y


def _ext_thin(x, prunings):
    def rot(raw):
        return [np.rot90(np.array(k, np.int32), r) for r in range(4) for k in raw]

    kernels = rot([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
    prune = rot([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])

    def once(y, ks):
        done = True
        for k in ks:
            hits = np.where(cv2.morphologyEx(y, cv2.MORPH_HITMISS, k) > 127)
            y[hits] = 0
            done = done and hits[0].shape[0] == 0
        return y, done

    y = x
    for _ in range(32):
        y, done = once(y, kernels)
        if done:
            break
    return once(y, prune)[0] if prunings else y


def _ext_detectmap(x, mode, h, w):
    """Script.detectmap_proc's geometry, restated."""
    if mode == "Just Resize":
        return _ext_high_quality_resize(x, (w, h))
    old_h, old_w = x.shape[:2]
    k0, k1 = h / old_h, w / old_w
    if mode == "Resize and Fill":
        k = min(k0, k1)
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        colour = np.median(borders, axis=0).astype(x.dtype)
        if len(colour) == 4:
            colour[3] = 255
        bg = np.tile(colour[None, None], [h, w, 1])
        y = _ext_high_quality_resize(x, (int(np.round(old_w * k)), int(np.round(old_h * k))))
        ph, pw = max(0, (h - y.shape[0]) // 2), max(0, (w - y.shape[1]) // 2)
        bg[ph:ph + y.shape[0], pw:pw + y.shape[1]] = y
        return bg
    k = max(k0, k1)
    y = _ext_high_quality_resize(x, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    ph, pw = max(0, (y.shape[0] - h) // 2), max(0, (y.shape[1] - w) // 2)
    return y[ph:ph + h, pw:pw + w]


# ------------------------------------------------------------------------------------------- fitting
@needs_cv2
@pytest.mark.parametrize("mode", cn.RESIZE_MODES)
@pytest.mark.parametrize("kind,size", [("photo", (96, 64)), ("photo", (40, 56)), ("segments", (90, 50)),
                                       ("edges", (160, 120)), ("edges", (50, 40))])
def test_prepare_matches_the_extension(backend, kind, size, mode):
    x = {"photo": _photo, "segments": _segments, "edges": _edges}[kind](60, 80)
    w, h = size
    ours, ref = cn.prepare_control_image(x, w, h, mode), _ext_detectmap(x.copy(), mode, h, w)
    assert ours.shape == ref.shape == (h, w, 3)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    if backend == "opencv":
        assert diff.max() == 0
    elif kind == "edges":  # a rounding step before Otsu may move a line pixel
        assert np.count_nonzero(diff) / diff.size < 0.01
    else:
        assert diff.max() <= 1 and np.count_nonzero(diff) / diff.size < 0.1


@needs_cv2
@pytest.mark.parametrize("mode", cn.RESIZE_MODES)
def test_prepare_keeps_the_inpaint_mask(backend, mode):
    rgba = np.concatenate([_photo(40, 60), np.zeros((40, 60, 1), np.uint8)], axis=2)
    rgba[10:20, 10:30, 3] = 255
    ours, ref = cn.prepare_control_image(rgba, 64, 80, mode), _ext_detectmap(rgba.copy(), mode, 80, 64)
    assert ours.shape == ref.shape == (80, 64, 4)
    assert set(np.unique(ours[:, :, 3])) <= {0, 255}
    diff = np.abs(ours.astype(int) - ref.astype(int))
    if backend == "opencv":
        assert diff.max() == 0
    else:  # a mask pixel resampled to 127.5 may round to either side of the extension's > 127
        assert diff[:, :, :3].max() <= 1 and np.count_nonzero(diff[:, :, 3]) / diff[:, :, 3].size < 0.01


def test_resize_mode_sizes_by_hand():
    """300x200 (WxH) into 512x512: Crop and Resize scales by 512/200 = 2.56 to 768x512 and cuts 128 columns off
    each side; Resize and Fill scales by 512/300 to 512x341 and pads 85 rows above; Just Resize stretches."""
    x = np.zeros((200, 300, 3), np.uint8)
    x[:, :150] = 200  # left half light: the crop must keep 128..384 of the scaled 768 columns
    crop = cn.prepare_control_image(x, 512, 512, "Crop and Resize")
    assert crop.shape == (512, 512, 3)
    assert (crop[:, :250] == 200).all() and (crop[:, 262:] == 0).all()  # bicubic rings near the step
    x[:, :] = 0
    x[:, 150:] = 255
    fill = cn.prepare_control_image(x, 512, 512, "Resize and Fill")
    assert fill.shape == (512, 512, 3)
    # the margin has the median border colour: half the 1000 border pixels are white, (0 + 255) / 2 truncated
    assert (fill[:85] == 127).all() and (fill[85 + 341:] == 127).all()
    assert (fill[85:85 + 341, 0] == 0).all() and (fill[85:85 + 341, -1] == 255).all()
    stretch = cn.prepare_control_image(x, 100, 50, "Just Resize")
    assert stretch.shape == (50, 100, 3)


def test_pixel_perfect_by_hand():
    x = np.zeros((200, 300, 3), np.uint8)
    assert cn.pixel_perfect_resolution(x, 512, 512, "Crop and Resize") == 512  # 512/200 * 200
    assert cn.pixel_perfect_resolution(x, 512, 512, "Just Resize") == 512
    assert cn.pixel_perfect_resolution(x, 512, 512, "Resize and Fill") == 341  # 512/300 * 200 = 341.33
    assert cn.pixel_perfect_resolution(x, 768, 512, 2) == 512  # min(512/200, 768/300) * 200


@pytest.mark.parametrize("value,mode", [("Just Resize", "Just Resize"), (0, "Just Resize"), (3, "Just Resize"),
                                        (1, "Crop and Resize"), ("Inner Fit (Scale to Fit)", "Crop and Resize"),
                                        ("Scale to Fit (Inner Fit)", "Crop and Resize"), (2, "Resize and Fill"),
                                        ("Outer Fit (Shrink to Fit)", "Resize and Fill"),
                                        ("Envelope (Outer Fit)", "Resize and Fill")])
def test_resize_mode_names(value, mode):
    assert cn.resize_mode(value) == mode


@pytest.mark.parametrize("bad", ["Stretch", 4, -1, True, None])
def test_resize_mode_rejects(bad):
    with pytest.raises(ValueError, match="Crop and Resize"):
        cn.resize_mode(bad)


def test_control_hint_marks_masked_pixels():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[:2, :, 3] = 0
    hint = cn.control_hint(rgba)
    assert hint.shape == (1, 3, 4, 4) and hint.dtype == np.float32
    assert (hint[:, :, :2] == 1).all() and (hint[:, :, 2:] == -1).all()


# ------------------------------------------------------------------------------------------- modules
def test_module_list_shape_and_order():
    names = cn.module_names()
    assert names[0] == "none" and len(set(names)) == len(names)
    labels = cn.module_names(alias_names=True)
    assert "invert (from white bg & black line)" in labels and "inpaint_global_harmonious" in labels
    detail = cn.module_detail()
    assert list(detail) == names
    for d in detail.values():
        assert set(d) == {"model_free", "sliders"}
        for s in d["sliders"]:
            assert set(s) == {"name", "value", "min", "max", "step"} and s["min"] <= s["value"] <= s["max"]
    assert detail["none"]["sliders"] == [{"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
    assert detail["invert"]["sliders"] == []


def test_unknown_module_names_the_valid_ones():
    with pytest.raises(cn.UnknownModule, match=r"'cany'.*none, .*invert"):
        cn.preprocess("cany", np.zeros((8, 8, 3), np.uint8), 512, -1, -1)


def test_labels_are_accepted_like_names():
    x = _photo(16, 16)
    assert (cn.preprocess("invert (from white bg & black line)", x, 512, -1, -1) == 255 - x).all()


def test_none_and_invert():
    x = _photo(20, 30)
    assert (cn.preprocess("none", x, 512, -1, -1) == x).all()
    grey = x[:, :, 0]
    assert (cn.preprocess("invert", grey, 64, -1, -1) == 255 - np.stack([grey] * 3, axis=2)).all()
    rgba = np.concatenate([x, np.full((20, 30, 1), 0, np.uint8)], axis=2)  # fully transparent: white
    assert (cn.preprocess("none", rgba, 512, -1, -1) == 255).all()


def test_inpaint_modules_keep_the_mask():
    rgba = np.concatenate([_photo(20, 30), np.zeros((20, 30, 1), np.uint8)], axis=2)
    rgba[5:10, 5:10, 3] = 255
    for module in ("inpaint_only", "inpaint"):
        assert (cn.preprocess(module, rgba, -1, -1, -1) == rgba).all()
        shown = cn.display_image(module, rgba)
        assert (shown[5:10, 5:10, 3] == 128).all() and (shown[0, 0, 3] == 255)
    with pytest.raises(ValueError, match="mask"):
        cn.preprocess("inpaint_only", rgba[:, :, :3], -1, -1, -1)


def test_control_input_combines_like_the_extension():
    x = _photo(10, 12)
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 2:5] = 255
    assert cn.control_input(x, mask, "inpaint_only").shape == (10, 12, 4)
    assert (cn.control_input(x, None, "inpaint_only")[:, :, 3] == 0).all()
    assert (cn.control_input(x, np.zeros_like(mask), "invert") == x).all()  # empty mask: the image
    assert (cn.control_input(x, mask, "invert")[:, :, 0] == mask).all()  # a drawing: the canvas scribble
    with pytest.raises(ValueError, match="differs"):
        cn.control_input(x, mask[:5], "inpaint_only")


def test_out_of_range_parameters_take_the_defaults():
    assert cn.resolve_params("none", -1, -1, -1)[0] == 512
    assert cn.resolve_params("none", 768, -1, -1)[0] == 768
    assert cn.resolve_params("none", 4096, -1, -1)[0] == 512


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((0, 4), np.uint8)])
def test_bad_images_are_refused(bad):
    with pytest.raises(ValueError, match="ControlNet images"):
        cn.preprocess("none", bad, 512, -1, -1)


# ------------------------------------------------------------------------------------------- preprocessors
def _ext_pad(img, res):
    """scripts/utils.py resize_image_with_pad, restated: (padded image, remove_pad)."""
    h_raw, w_raw = img.shape[:2]
    k = res / min(h_raw, w_raw)
    h, w = int(np.round(h_raw * k)), int(np.round(w_raw * k))
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(img, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    return padded, lambda x: x[:h, :w]


def _ext_canny(img, res, a, b):
    img, unpad = _ext_pad(img, res)
    return cv2.cvtColor(unpad(cv2.Canny(img, int(a), int(b))), cv2.COLOR_GRAY2RGB)


def _ext_threshold(img, res, a, b):
    img, unpad = _ext_pad(img, res)
    out = np.zeros_like(img)
    out[np.min(img, axis=2) > a] = 255
    return unpad(out)


def _ext_xdog(img, res, a, b):
    img, unpad = _ext_pad(img, res)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(img)
    out[2 * (255 - dog) > a] = 255
    return unpad(out)


def _ext_blur(img, res, a, b):
    img, unpad = _ext_pad(img, res)
    return cv2.GaussianBlur(unpad(img), (0, 0), float(a))


def _ext_tile(img, res, a, b):
    if a < 1.1:
        return img
    return cv2.resize(img, (int(img.shape[1] / a), int(img.shape[0] / a)), interpolation=cv2.INTER_AREA)


def _ext_lineart_standard(img, res, a, b):
    img, unpad = _ext_pad(img, res)
    x = img.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    return cv2.cvtColor(unpad(intensity.clip(0, 255).astype(np.uint8)), cv2.COLOR_GRAY2RGB)


def _ext_color(img, res, a, b):
    h, w = img.shape[:2]
    size = (res, int(round(w / h * res))) if h < w else (int(round(h / w * res)), res)
    img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    cells = cv2.resize(img, (size[1] // 64, size[0] // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def _ext_shuffle(img, res, seed):
    """The extension's shuffle with numpy's global generator seeded as the extension seeds it."""
    img, unpad = _ext_pad(img, res)
    img = unpad(img)
    h, w = img.shape[:2]
    np.random.seed(seed)

    def disk(f=256):
        noise = np.random.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
        noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
        noise -= np.min(noise)
        noise /= np.max(noise)
        return noise[:, :, None]

    flow = np.concatenate([disk() * float(w - 1), disk() * float(h - 1)], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


# (module, reference, resolution, threshold_a, threshold_b, numpy tolerance: (max level difference, fraction of
# values that may differ)). For the 0/255 maps the fraction counts differing pixels among the reference's white
# (edge) pixels: they flip where the numpy resize rounds a level the other way (measured: at most 0.14% of canny's
# edge pixels on the test images, 0 for most).
_CASES = [
    ("canny", _ext_canny, 96, 100, 200, (255, 0.01)),
    ("canny", _ext_canny, 40, 30, 60, (255, 0.01)),
    ("threshold", _ext_threshold, 72, 127, -1, (255, 0.01)),
    ("scribble_xdog", _ext_xdog, 96, 32, -1, (255, 0.01)),
    ("blur_gaussian", _ext_blur, 64, 3.0, -1, (1, 0.1)),
    ("tile_resample", _ext_tile, 512, 2.5, -1, (1, 0.1)),
    ("tile_resample", _ext_tile, 512, 1.05, -1, (0, 0)),
    ("lineart_standard", _ext_lineart_standard, 80, -1, -1, (2, 0.05)),
    ("color", _ext_color, 128, -1, -1, (2, 0.5)),  # two resizes in a row, cells of 64x64 share their error
]


@needs_cv2
@pytest.mark.parametrize("module,ref,res,a,b,tol", _CASES, ids=[f"{c[0]}-{c[2]}" for c in _CASES])
def test_module_matches_the_extension(backend, module, ref, res, a, b, tol):
    x = _photo(90, 120)
    ours, expected = cn.preprocess(module, x, res, a, b), ref(x.copy(), res, a, b)
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    diff = np.abs(ours.astype(int) - expected.astype(int))
    if backend == "opencv":
        assert diff.max() == 0
    elif tol[0] == 255:
        assert np.count_nonzero(diff) / max(1, np.count_nonzero(expected)) <= tol[1]
    else:
        assert diff.max() <= tol[0] and np.count_nonzero(diff) / diff.size <= tol[1]


def test_output_sizes_follow_the_processor_resolution():
    x = _photo(90, 120)  # short side 90 -> 96: 128x96 (the work image is padded to 128x128 and cut back)
    assert cn.preprocess("canny", x, 96, 100, 200).shape == (96, 128, 3)
    assert cn.preprocess("scribble_xdog", x, 45, 32, -1).shape == (45, 60, 3)
    assert cn.preprocess("tile_resample", x, 512, 2.0, -1).shape == (45, 60, 3)
    assert cn.preprocess("invert", x, 96, -1, -1).shape == (90, 120, 3)


@needs_cv2
def test_numpy_canny_is_opencvs():
    """The numpy Canny against cv2.Canny on the same input: tolerance 0 differing pixels (it restates OpenCV's
    integer Sobel, sector tests and tie rules exactly)."""
    for img in (_photo(120, 160, 1), _photo(64, 96, 2)[:, :, 1], _edges(50, 70)):
        for low, high in ((100, 200), (20, 40), (200, 100), (1, 255), (20.7, 40.2)):
            ours, ref = imageops.canny_np(img, low, high), cv2.Canny(img, low, high)
            assert np.count_nonzero(ours != ref) == 0 and np.count_nonzero(ref) > 0


@needs_cv2
def test_shuffle_is_the_extensions_for_the_same_seed(backend):
    x = _photo(90, 120)
    ours, ref = cn.preprocess("shuffle", x, 64, -1, -1, seed=1234), _ext_shuffle(x.copy(), 64, 1234)
    assert ours.shape == ref.shape == (64, 85, 3)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    if backend == "opencv":
        assert diff.max() == 0
    else:  # OpenCV's bilinear weights are 5-bit positions and 15-bit fixed point, numpy's exact
        assert diff.max() <= 3 and np.count_nonzero(diff > 1) / diff.size < 0.01
    assert (cn.preprocess("shuffle", x, 64, -1, -1, seed=1234) == ours).all()
    assert (cn.preprocess("shuffle", x, 64, -1, -1, seed=1235) != ours).any()
    assert cn.numpy_seed(1234, 0) == 1234 and cn.numpy_seed(2**32 - 1, 2) == 1
    assert cn.numpy_seed(-1, -1, 77) == 154 and cn.numpy_seed(5, -1, 5) == 10  # A1111's default subseed is -1


def test_numpy_canny_by_hand(monkeypatch):
    """A white square (rows and columns 8..23) on black, without OpenCV. Across each side two pixels tie for the
    largest gradient (1020); OpenCV's rule keeps the first along the gradient (m > previous, m >= next), so edges
    lie just outside the square on the left and top (column and row 7) and on its last pixels on the right and
    bottom (column and row 23)."""
    monkeypatch.setattr(imageops, "opencv", lambda: None)
    x = np.zeros((32, 32), np.uint8)
    x[8:24, 8:24] = 255
    edges = imageops.canny(x, 100, 200) > 0
    sides = slice(10, 22)
    assert edges[sides, 7].all() and edges[sides, 23].all() and edges[7, sides].all() and edges[23, sides].all()
    assert not edges[sides, 8].any() and not edges[sides, 24].any() and not edges[8, sides].any()
    assert not edges[9:23, 9:23].any() and not edges[:6].any() and not edges[:, 25:].any()
    assert not imageops.canny(x, 1021, 2000).any()  # no gradient passes the thresholds


def test_resolution_limits():
    x = np.zeros((1, 400, 3), np.uint8)  # short side 1 -> 2048 would be 2048 x 819200
    with pytest.raises(ValueError, match="pixels allowed"):
        cn.preprocess("canny", x, 2048, 100, 200)
    with pytest.raises(ValueError, match="positive"):
        cn.preprocess("canny", x, 0, 100, 200)


# ------------------------------------------------------------------------------------------- inpaint_only
def _prepared_with_mask(h=64, w=80):
    rgba = np.concatenate([_photo(h, w), np.zeros((h, w, 1), np.uint8)], axis=2)
    rgba[13:31, 22:47, 3] = 255
    rgba[50, 70, 3] = 255  # one lone pixel: the pooling and the dilation must both see it
    return rgba


def test_latent_mask_is_the_extensions_max_pool():
    torch = pytest.importorskip("torch")
    rgba = _prepared_with_mask()
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(rgba[:, :, 3].astype(np.float32) / 255)[None, None],
                                         (10, 10), stride=(8, 8), padding=1).numpy()
    ours = inpaint.latent_mask(rgba)
    assert ours.shape == ref.shape == (1, 1, 8, 10) and (ours == ref).all()


@needs_cv2
@pytest.mark.parametrize("sigma", [7, 4])
def test_restore_unmasked_is_the_extensions(backend, sigma):
    rgba = _prepared_with_mask()
    generated = np.random.default_rng(3).random((64, 80, 3), dtype=np.float32) * 1.2 - 0.1
    m = cv2.blur(cv2.dilate(rgba[:, :, 3].astype(np.float32) / 255, np.ones((sigma, sigma), np.uint8)),
                 (sigma, sigma))[:, :, None]
    ref = (m * generated.clip(0, 1) + (1 - m) * rgba[:, :, :3].astype(np.float32) / 255).clip(0, 1)
    ours = inpaint.restore_unmasked(generated, rgba, sigma)
    # float32 sums in another order (numpy's matrix form of the box blur)
    assert np.abs(ours - ref).max() < (1e-6 if backend == "opencv" else 1e-5)
    far = (slice(40, 48), slice(0, 10))  # well away from the mask: the control image itself
    assert np.allclose(ours[far], rgba[far][:, :, :3] / 255, atol=1e-6)
