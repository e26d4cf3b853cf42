"""Face restoration (issue 19): GFPGAN, CodeFormer, RetinaFace and ParseNet converted from tiny random-weight
modules and compared with torch; every face stage compared with OpenCV, which facexlib (A1111's helper) uses,
given the same landmarks and the same restored face; the chain end to end through the CLI and the API.

Reference values: OpenCV's estimateAffinePartial2D (LMEDS), warpAffine, GaussianBlur and resize (Lanczos4)
are what facexlib calls; the detector's decode and NMS are restated below in torch from facexlib's formulas.
"""
import base64
import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from converters.postprocess import convert_postprocess  # noqa: E402
from converters.postprocess.base import PostprocessConvertError  # noqa: E402
from converters.postprocess.codeformer_arch import CodeFormer, encoder_blocks, generator_blocks  # noqa: E402
from converters.postprocess.gfpgan_arch import GFPGAN  # noqa: E402
from converters.postprocess.parsenet_arch import ParseNet  # noqa: E402
from converters.postprocess.retinaface_arch import RetinaFace  # noqa: E402
from sdonnx.postprocess import faces, face_ops, retinaface  # noqa: E402

TEMPLATE = faces.FFHQ_TEMPLATE


def _randomize(module, seed):
    """Random weights with BatchNorm statistics that are not the identity, and live noise strengths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.dtype.is_floating_point:
                continue
            if "running_var" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("modulated_conv.weight") or name.startswith("stylegan_decoder"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "noise" in name else 0.3))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return module.eval()


def _detector():
    """A tiny RetinaFace that sees one big face per 512-px anchor: the heads' weights are zero, the biases
    score the 512 anchor as a face and put the five landmarks around the anchor's centre."""
    model = _randomize(RetinaFace(8, (1, 1, 1, 1), 32), 3)
    points = torch.tensor([-1.0, -0.6, 1.0, -0.6, 0.0, 0.0, -0.8, 0.8, 0.8, 0.8])
    with torch.no_grad():
        for level in range(3):
            for head in (model.ClassHead[level], model.LandmarkHead[level], model.BboxHead[level]):
                head.conv1x1.weight.zero_()
            face = level == 2
            model.ClassHead[level].conv1x1.bias.copy_(torch.tensor([10.0, 0, 0, 10.0] if face else [10.0, 0, 10, 0]))
            model.LandmarkHead[level].conv1x1.bias.copy_(torch.cat([points, points]))
            model.BboxHead[level].conv1x1.bias.zero_()
    return model


@pytest.fixture(scope="module")
def face_models(tmp_path_factory):
    """models/GFPGAN (GFPGAN, detector, parser) and models/Codeformer, converted from tiny torch modules."""
    root = tmp_path_factory.mktemp("faces")
    gfpgan_dir, codeformer_dir = root / "GFPGAN", root / "Codeformer"
    gfpgan_dir.mkdir()
    codeformer_dir.mkdir()
    torch.manual_seed(0)
    modules = {
        "GFPGANv1.4": (gfpgan_dir, _randomize(GFPGAN(32, 32, 2, 1 / 16, 2), 1), "params_ema"),
        "codeformer-v0.1.0": (codeformer_dir, _randomize(CodeFormer(32, 32, (1, 2), 16, 16, 32, 2, 1, (32,)), 2),
                              "params_ema"),
        "detection_Resnet50_Final": (gfpgan_dir, _detector(), "module."),
        "parsing_parsenet": (gfpgan_dir, _randomize(ParseNet(8, 1, 1, 1, 16, 19), 4), None),
    }
    manifests = {}
    for name, (folder, module, wrap) in modules.items():
        state = module.state_dict()
        state = {"params_ema": state} if wrap == "params_ema" else (
            {"module." + k: v for k, v in state.items()} if wrap == "module." else state)
        torch.save(state, folder / f"{name}.pth")
        manifests[name] = convert_postprocess(folder / f"{name}.pth", folder / name)
    return {"root": root, "gfpgan_dir": gfpgan_dir, "codeformer_dir": codeformer_dir,
            "modules": {k: v[1] for k, v in modules.items()}, "manifests": manifests}


def _session(folder):
    import onnxruntime as ort

    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------ converter


def test_each_kind_is_recognised_and_its_graph_matches_torch(face_models):
    expected = {"GFPGANv1.4": ("face_restorer", "GFPGAN"), "codeformer-v0.1.0": ("face_restorer", "CodeFormer"),
                "detection_Resnet50_Final": ("face_detector", "RetinaFace"), "parsing_parsenet": ("face_parser", "ParseNet")}
    for name, manifest in face_models["manifests"].items():
        assert (manifest.kind, manifest.architecture) == expected[name]
        # convert_postprocess refused the graph past tolerance * max(1, |torch output|) on random input
        assert manifest.parity_max_abs_err is not None and manifest.parity_tolerance == 1e-3
    assert face_models["manifests"]["GFPGANv1.4"].facts["noise"] == "stored"


def test_codeformer_weight_is_a_graph_input(face_models):
    module = face_models["modules"]["codeformer-v0.1.0"]
    session = _session(face_models["codeformer_dir"] / "codeformer-v0.1.0")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    outputs = []
    for w in (0.2, 0.9):
        got = session.run(None, {"image": image.numpy(), "weight": np.array([w], np.float32)})[0]
        with torch.no_grad():
            want = module(image, torch.tensor([w])).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1, np.abs(want).max()))
        outputs.append(got)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # the weight changes the result in the graph


def test_full_size_layouts_match_the_released_files():
    """The released configurations, built without memory (meta tensors): CodeFormer's fusion points are the
    released model's (encoder blocks 2, 5, ..., 18; generator blocks 6, 9, ..., 21) and the names and counts
    of a few tensors of each file."""
    assert encoder_blocks(64, (1, 2, 2, 4, 4, 8), 512, 256)[1] == {512: 2, 256: 5, 128: 8, 64: 11, 32: 14, 16: 18}
    assert generator_blocks(64, (1, 2, 2, 4, 4, 8), 512, 256)[1] == {16: 6, 32: 9, 64: 12, 128: 15, 256: 18, 512: 21}
    with torch.device("meta"):
        gfpgan, codeformer, detector, parser = GFPGAN(), CodeFormer(), RetinaFace(), ParseNet()
    g = gfpgan.state_dict()
    assert g["stylegan_decoder.noises.noise14"].shape == (1, 1, 512, 512)
    assert g["final_linear.weight"].shape == (16 * 512, 256 * 16)
    assert g["condition_scale.6.2.weight"].shape == (32, 32, 3, 3)  # SFT on half of the 64 decoder channels
    assert codeformer.state_dict()["position_emb"].shape == (256, 512)
    assert codeformer.state_dict()["fuse_convs_dict.256.encode_enc.conv1.weight"].shape == (128, 256, 3, 3)
    assert detector.state_dict()["body.layer4.2.bn3.running_var"].shape == (2048,)
    assert detector.state_dict()["LandmarkHead.2.conv1x1.weight"].shape == (20, 256, 1, 1)
    assert parser.state_dict()["out_mask_conv.conv2d.weight"].shape == (19, 64, 3, 3)
    assert len([k for k in parser.state_dict() if k.startswith("body.")]) == 10 * 12


def test_bad_files_are_refused(tmp_path):
    broken = GFPGAN(32, 32, 2, 1 / 16, 2).state_dict()
    del broken["final_conv.weight"]
    torch.save({"params_ema": broken}, tmp_path / "GFPGANv1.4.pth")
    with pytest.raises(PostprocessConvertError, match="looks like GFPGAN but its weights do not fit"):
        convert_postprocess(tmp_path / "GFPGANv1.4.pth", tmp_path / "out")

    class Payload:
        def __reduce__(self):
            return (Path("never-written").write_text, ("ran",))

    (tmp_path / "evil.pth").write_bytes(b"")
    torch.save({"params_ema": {"toRGB.0.weight": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(PostprocessConvertError, match="refused"):
        convert_postprocess(tmp_path / "evil.pth", tmp_path / "out2")
    assert not Path("never-written").exists()
    data = (tmp_path / "GFPGANv1.4.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(PostprocessConvertError, match="cut.pth"):
        convert_postprocess(tmp_path / "cut.pth", tmp_path / "out3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out3").exists()


# ------------------------------------------------------------------------------------------ face stages


def _photo(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 2)


LANDMARKS = np.array([[50.0, 40], [78, 41], [64, 55], [52, 70], [77, 69]])


def test_alignment_matches_opencv():
    """facexlib: estimateAffinePartial2D(LMEDS) to the template, warpAffine with a grey border (BGR)."""
    image = _photo()
    for size in (512, 32):
        target = TEMPLATE * size / 512
        ours = faces.align(image, LANDMARKS, size)
        matrix = cv2.estimateAffinePartial2D(LANDMARKS, target, method=cv2.LMEDS)[0]
        # five consistent points: LMEDS keeps them all and refines to the least-squares similarity
        np.testing.assert_allclose(ours.matrix, matrix, rtol=1e-4, atol=1e-3 * size / 512)
        bgr = cv2.warpAffine(image[..., ::-1], matrix, (size, size), borderMode=cv2.BORDER_CONSTANT,
                             borderValue=(135, 133, 132))
        # identical with OpenCV 4.10 (bench/face_ops_opencv.py); OpenCV 5 interpolates 8-bit images in float32:
        # one level apart on a few per cent of the pixels of a smooth image
        assert np.abs(ours.crop.astype(int) - bgr[..., ::-1]).max() <= 1


def test_blur_warp_and_lanczos_match_opencv():
    rng = np.random.default_rng(1)
    mask = rng.random((64, 64))
    np.testing.assert_allclose(face_ops.gaussian_blur(mask, 101, 11), cv2.GaussianBlur(mask, (101, 101), 11), atol=1e-12)
    matrix = cv2.invertAffineTransform(cv2.estimateAffinePartial2D(LANDMARKS, TEMPLATE / 8, method=cv2.LMEDS)[0])
    np.testing.assert_allclose(face_ops.warp_affine(mask, matrix, (128, 96)),
                               cv2.warpAffine(mask, matrix, (128, 96), flags=3), atol=1e-12)
    image = _photo()
    for size in ((896, 672), (60, 45)):
        assert np.array_equal(face_ops.resize_lanczos4(image, size), cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4))


def _reference_mask(parsing):
    """facexlib's paste_faces_to_input_image mask, with OpenCV."""
    out = parsing[0].argmax(0)
    mask = np.zeros(out.shape)
    colormap = [0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0]
    for idx, color in enumerate(colormap):
        mask[out == idx] = color
    mask = cv2.GaussianBlur(cv2.GaussianBlur(mask, (101, 101), 11), (101, 101), 11)
    mask[:10, :], mask[-10:, :], mask[:, :10], mask[:, -10:] = 0, 0, 0, 0
    return mask / 255.0


def test_mask_and_paste_match_facexlib_given_the_same_face():
    rng = np.random.default_rng(2)
    image = _photo()
    parsing = rng.standard_normal((1, 19, 32, 32)).astype(np.float32)
    parsing[0, 1, 8:24, 8:24] += 6  # a face in the middle: skin
    mask = faces.face_mask(parsing)
    np.testing.assert_allclose(mask, _reference_mask(parsing), atol=1e-12)
    restored = _photo(32, 32, seed=5)
    matrix = faces.align(image, LANDMARKS, 32).matrix
    ours = faces.paste(image.astype(np.float64), restored, matrix, mask).astype(np.uint8)
    inverse = cv2.invertAffineTransform(matrix)
    back = cv2.warpAffine(restored, inverse, (128, 96))
    soft = cv2.warpAffine(mask, inverse, (128, 96), flags=3)[:, :, None]
    want = (soft * back + (1 - soft) * image).astype(np.uint8)
    assert np.abs(ours.astype(int) - want).max() <= 1  # the 8-bit warp's rounding (see above)
    assert (ours != image).any()


def test_net_io_as_a1111():
    crop = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    x = faces.to_net(crop)
    np.testing.assert_allclose(x[0, 0], (crop[..., 0] / 255.0 - 0.5) / 0.5, atol=1e-6)
    out = np.array([[[[-2.0, -1.0, 0.0, 0.999, 1.5]]]], np.float32).repeat(3, 1)
    # clamp to [-1, 1], to [0, 1], times 255, truncated (A1111's astype('uint8'))
    assert faces.from_net(out)[0, :, 0].tolist() == [0, 0, 127, 254, 255]


def _reference_detect(image, module, threshold):
    """facexlib's get_face_landmarks_5(resize=640) + detect_faces, restated in torch and OpenCV."""
    h, w = image.shape[:2]
    scale = min(h, w) / 640
    bgr = cv2.resize(image[..., ::-1], (int(w / scale), int(h / scale)), interpolation=cv2.INTER_LANCZOS4)
    x = torch.from_numpy(bgr.astype(np.float32).transpose(2, 0, 1))[None] - torch.tensor([104.0, 117, 123]).view(1, 3, 1, 1)
    with torch.no_grad():
        loc, conf, landm = module(x)
    rh, rw = bgr.shape[:2]
    anchors = []
    for sizes, step in zip(((16, 32), (64, 128), (256, 512)), (8, 16, 32)):
        for i in range(-(-rh // step)):
            for j in range(-(-rw // step)):
                for s in sizes:
                    anchors.append([(j + 0.5) * step / rw, (i + 0.5) * step / rh, s / rw, s / rh])
    priors = torch.tensor(anchors)
    boxes = torch.cat((priors[:, :2] + loc[0, :, :2] * 0.1 * priors[:, 2:], priors[:, 2:] * torch.exp(loc[0, :, 2:] * 0.2)), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    boxes = boxes * torch.tensor([rw, rh, rw, rh])
    points = torch.cat([priors[:, :2] + landm[0, :, 2 * k:2 * k + 2] * 0.1 * priors[:, 2:] for k in range(5)], 1)
    points = points * torch.tensor([rw, rh] * 5)
    scores = conf[0, :, 1]
    # equal scores (this crafted detector has many) in prior order: facexlib's order among ties is its sort's
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = [i for i in order.tolist() if scores[i] > threshold]
    chosen = []
    for i in keep:  # greedy NMS, IoU > 0.4 suppressed
        b = boxes[i]
        if all(_iou(b, boxes[j]) <= 0.4 for j in chosen):
            chosen.append(i)
    points = points[chosen].numpy().reshape(-1, 5, 2) * scale
    wide = np.linalg.norm(points[:, 0] - points[:, 1], axis=1) >= 5
    return boxes[chosen].numpy()[wide] * scale, points[wide]


def _iou(a, b):
    inter = (torch.minimum(a[2:], b[2:]) - torch.maximum(a[:2], b[:2])).clamp(min=0).prod()
    return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)


def test_detection_matches_facexlib_reference(face_models):
    module = face_models["modules"]["detection_Resnet50_Final"]
    session = _session(face_models["gfpgan_dir"] / "detection_Resnet50_Final")
    image = _photo(72, 100, seed=3)
    boxes, points = retinaface.detect(image, lambda x: session.run(None, {"image": x}))
    want_boxes, want_points = _reference_detect(image, module, 0.97)
    assert len(boxes) == len(want_boxes) > 0
    np.testing.assert_allclose(boxes[:, :4], want_boxes, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(points, want_points, rtol=1e-4, atol=1e-3)


def test_restore_with_given_landmarks_runs_each_stage(face_models):
    """The entry point with landmarks: the restored face is the torch module's on the same crop."""
    restorer = faces.FaceRestorer(*faces.find_models("GFPGAN", faces.face_folders(face_models["gfpgan_dir"],
                                                                                   face_models["codeformer_dir"])))
    image = _photo()
    result = restorer.restore(image, landmarks=[LANDMARKS / 1.0])
    aligned = faces.align(image, LANDMARKS, 32)
    with torch.no_grad():
        torch_face = faces.from_net(face_models["modules"]["GFPGANv1.4"](torch.from_numpy(faces.to_net(aligned.crop))).numpy())
    parsing = face_models["modules"]["parsing_parsenet"](torch.from_numpy(faces.to_net(torch_face)))[0].detach().numpy()
    want = faces.paste(image.astype(np.float64), torch_face, aligned.matrix, faces.face_mask(parsing)).astype(np.uint8)
    assert np.abs(result.astype(int) - want).max() <= 1  # the truncation to uint8 after float differences
    assert (result != image).any()
    assert np.array_equal(restorer.restore(image, landmarks=np.zeros((0, 5, 2))), image)


# ------------------------------------------------------------------------------------------ doors


def test_cli_generate_restores_faces(face_models, tiny_onnx, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sdonnx.cli import main

    model = tiny_onnx("sd1")
    args = ["generate", "-m", str(model), "a face", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5",
            "--gfpgan-models-path", str(face_models["gfpgan_dir"]),
            "--codeformer-models-path", str(face_models["codeformer_dir"])]
    plain = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    restored = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "cf"), "--restore-faces", "CodeFormer",
                                         "--codeformer-weight", "0.8"])
    assert restored.exit_code == 0, restored.output
    before = Image.open(next((tmp_path / "plain").glob("*.png")))
    after = Image.open(next((tmp_path / "cf").glob("*.png")))
    assert "Face restoration: CodeFormer" in after.info["parameters"]
    assert "CodeFormer weight: 0.8" in after.info["parameters"]
    assert np.asarray(before).shape == np.asarray(after).shape and (np.asarray(before) != np.asarray(after)).any()
    missing = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "x"), "--restore-faces", "GFPGAN",
                                        "--gfpgan-models-path", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "no converted GFPGAN model" in missing.output
    assert "Traceback" not in missing.output


def test_api_lists_restorers_and_restores(face_models, tiny_onnx, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdonnx.server import create_app

    (tmp_path / "tiny").symlink_to(tiny_onnx("sd1"), target_is_directory=True)
    app = create_app(tmp_path, provider="cpu", face_dirs={"gfpgan_dir": face_models["gfpgan_dir"],
                                                          "codeformer_dir": face_models["codeformer_dir"]})
    with TestClient(app) as client:
        listed = client.get("/sdapi/v1/face-restorers").json()
        assert [r["name"] for r in listed] == ["GFPGAN", "CodeFormer"]
        body = {"prompt": "a face", "steps": 2, "width": 64, "height": 64, "seed": 5, "restore_faces": True,
                "override_settings": {"face_restoration_model": "GFPGAN"}}
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        assert "Face restoration: GFPGAN" in answer.json()["info"]
        bad = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"face_restoration_model": "Nope"}})
        assert bad.status_code == 422 and "GFPGAN" in bad.text
        buffer = io.BytesIO()
        from PIL import Image

        Image.fromarray(_photo()).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        extras = client.post("/sdapi/v1/extra-single-image", json={"image": image, "codeformer_visibility": 0.5,
                                                                     "codeformer_weight": 0.3})
        assert extras.status_code == 200, extras.text
        assert "CodeFormer visibility: 0.5, CodeFormer weight: 0.3" in extras.json()["html_info"]
        restored = np.asarray(Image.open(io.BytesIO(base64.b64decode(extras.json()["image"]))))
        full = faces.FaceRestorer(*faces.find_models("CodeFormer", faces.face_folders(
            face_models["gfpgan_dir"], face_models["codeformer_dir"]))).restore(_photo(), codeformer_weight=0.3)
        # A1111's Image.blend(input, restored, visibility)
        want = np.asarray(Image.blend(Image.fromarray(_photo()), Image.fromarray(full), 0.5))
        assert np.array_equal(restored, want)
        wrong = client.post("/sdapi/v1/extra-single-image", json={"image": image, "gfpgan_visibility": 1.5})
        assert wrong.status_code in (400, 422) and "gfpgan_visibility" in wrong.text


def test_cli_upscale_restores_faces(face_models, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sdonnx.cli import main

    Image.fromarray(_photo()).save(tmp_path / "in.png")
    result = CliRunner().invoke(main, ["upscale", str(tmp_path / "in.png"), "--restore-faces", "GFPGAN",
                                       "--gfpgan-models-path", str(face_models["gfpgan_dir"]),
                                       "--codeformer-models-path", str(face_models["codeformer_dir"]),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = Image.open(next((tmp_path / "out").glob("*.png")))
    assert "GFPGAN visibility: 1" in out.info["postprocessing"]
    restorer = faces.FaceRestorer(*faces.find_models("GFPGAN", faces.face_folders(face_models["gfpgan_dir"],
                                                                                   face_models["codeformer_dir"])))
    assert np.array_equal(np.asarray(out), restorer.restore(_photo()))
    missing = CliRunner().invoke(main, ["upscale", str(tmp_path / "in.png"), "--restore-faces", "CodeFormer",
                                        "--codeformer-models-path", str(tmp_path / "none"), "-o", str(tmp_path / "o2")])
    assert missing.exit_code != 0 and "no converted CodeFormer model" in missing.output


def test_page_offers_face_restoration():
    """The web page's generate form and Extras tab send the A1111 fields and settings the API reads."""
    static = Path(faces.__file__).parent.parent / "server" / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    for id_ in ("restore_faces", "code_former_weight", "extras_gfpgan_visibility", "extras_codeformer_visibility",
                "extras_codeformer_weight"):
        assert f'id="{id_}"' in page, id_
    app = (static / "app.js").read_text(encoding="utf-8")
    assert "body.restore_faces = true" in app and "face_restoration_model" in app and '"Face restoration"' in app
    extras = (static / "extras.js").read_text(encoding="utf-8")
    assert all(f"{key}: Number(" in extras for key in ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight"))
