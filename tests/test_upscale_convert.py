"""Converting upscaler files: each architecture and key layout, built here with random weights, converted
and compared with an independent torch reference; bad files refused with a clear message."""
import pickle

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from converters.postprocess import convert_postprocess, looks_like_postprocess
from converters.postprocess.base import NotRecognised, PostprocessConvertError
from sdonnx.postprocess import load_postprocess_manifest
from upscaler_reference import BasicsrRRDBNet, SRVGGNetCompact, bsrgan_layout, old_layout, randomize

# fp32 graphs of the same convolutions: differences are summation-order rounding, ~1e-6 on outputs of
# order 1; 1e-4 leaves room for the deeper references without hiding a wrong layer (those differ by >0.1)
TOLERANCE = 1e-4


def _run(folder, image):
    manifest = load_postprocess_manifest(folder, "upscaler")
    session = ort.InferenceSession(str(folder / manifest.graph), providers=["CPUExecutionProvider"])
    return manifest, session.run(None, {manifest.image_input: image.numpy()})[0]


def _compare(reference, folder, shape=(1, 3, 13, 10)):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    manifest, got = _run(folder, image)
    with torch.no_grad():
        expected = reference(image).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE * max(1.0, np.abs(expected).max())
    assert np.abs(expected).max() > 0.1  # the weights make a visible output: the comparison means something
    return manifest


CASES = {  # name -> (reference module, state dict as saved, expected scale, layout)
    "4x-old": lambda: _case(BasicsrRRDBNet(4), lambda s: old_layout(s, 1), 4),
    "4x-basicsr": lambda: _case(BasicsrRRDBNet(4), lambda s: {"params_ema": s}, 4),
    "4x-bsrgan": lambda: _case(BasicsrRRDBNet(4), bsrgan_layout, 4),
    "x2plus": lambda: _case(BasicsrRRDBNet(2), lambda s: {"params_ema": s}, 2),
    "x1": lambda: _case(BasicsrRRDBNet(1), lambda s: s, 1),
    "compact": lambda: _case(SRVGGNetCompact(8, 2, 4), lambda s: {"params": s}, 4),
    "compact-2x": lambda: _case(SRVGGNetCompact(8, 1, 2), lambda s: s, 2),
}


def _case(module, saved, scale):
    module = randomize(module)
    return module, saved(module.state_dict()), scale


@pytest.mark.parametrize("case", list(CASES))
def test_architectures_convert_and_match_torch(case, tmp_path):
    reference, saved, scale = CASES[case]()
    source = tmp_path / f"{case}.pth"
    torch.save(saved, source)
    assert looks_like_postprocess(source)
    convert_postprocess(source, tmp_path / case)
    manifest = _compare(reference, tmp_path / case)
    assert (manifest.kind, manifest.scale, manifest.channel_order, manifest.value_range) == \
        ("upscaler", scale, "BGR", [0.0, 1.0])
    assert manifest.name == case and manifest.source["file"] == source.name
    assert manifest.parity_max_abs_err <= manifest.parity_tolerance


def test_safetensors_and_cli(tmp_path):
    from safetensors.torch import save_file

    from converters.cli import convert

    reference = randomize(SRVGGNetCompact(8, 1, 4))
    source = tmp_path / "realesr-animevideov3.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(source))
    result = CliRunner().invoke(convert, [str(source), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "upscaler" in result.output
    _compare(reference, tmp_path / "out")
    again = CliRunner().invoke(convert, [str(source), "-o", str(tmp_path / "out")])
    assert again.exit_code != 0 and "--force" in again.output
    assert CliRunner().invoke(convert, [str(source), "-o", str(tmp_path / "out"), "--force"]).exit_code == 0


def test_a_diffusion_checkpoint_is_not_claimed(tmp_path):
    source = tmp_path / "sd.pth"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, source)
    assert not looks_like_postprocess(source)


# ------------------------------------------------------------------ bad files

def test_wrong_architecture_is_named(tmp_path):
    source = tmp_path / "other.pth"
    torch.save({"encoder.layer.weight": torch.zeros(4, 4)}, source)
    assert not looks_like_postprocess(source)
    with pytest.raises(NotRecognised, match=r"other: not a post-processing model this converter knows \(ESRGAN"):
        convert_postprocess(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_esrgan_keys_with_wrong_shapes_are_refused(tmp_path):
    state = old_layout(BasicsrRRDBNet(4).state_dict(), 1)
    state["model.1.sub.0.RDB2.conv3.0.weight"] = torch.zeros(4, 3, 3, 3)
    source = tmp_path / "broken.pth"
    torch.save(state, source)
    assert looks_like_postprocess(source)  # claimed, so the convert says what is wrong
    with pytest.raises(PostprocessConvertError, match="looks like ESRGAN but its weights do not fit"):
        convert_postprocess(source, tmp_path / "out")


def test_truncated_file_is_refused(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(old_layout(BasicsrRRDBNet(4).state_dict(), 1), good)
    source = tmp_path / "truncated.pth"
    source.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(PostprocessConvertError, match="not a readable torch checkpoint"):
        convert_postprocess(source, tmp_path / "out")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    from converters.cli import convert

    marker = tmp_path / "ran"
    source = tmp_path / "evil.pth"
    with open(source, "wb") as f:
        pickle.dump({"model.0.weight": _Payload(marker)}, f)
    with pytest.raises(PostprocessConvertError, match="refused to load.*Nothing from it was run"):
        convert_postprocess(source, tmp_path / "out")
    result = CliRunner().invoke(convert, [str(source), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "refused to load" in result.output and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_output_folder_with_other_files_is_never_replaced(tmp_path):
    source = tmp_path / "m.pth"
    torch.save(randomize(SRVGGNetCompact(8, 1, 4)).state_dict(), source)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "me.jpg").write_bytes(b"x")
    with pytest.raises(PostprocessConvertError, match="not a converted model"):
        convert_postprocess(source, out, force=True)
    assert (out / "me.jpg").exists()


# ------------------------------------------------------------------ SwinIR

def _swinir(upsampler, scale, resi="1conv"):
    from converters.postprocess.swinir import SwinIR

    torch.manual_seed(0)
    return SwinIR(embed_dim=12, depths=[2], heads=[2], ws=4, hidden=24, upsampler=upsampler, scale=scale,
                  resi=resi, patch_norm=True, img_range=1.0, feat=8).eval()


@pytest.mark.parametrize("upsampler, scale, resi", [("nearest+conv", 4, "3conv"), ("pixelshuffle", 2, "1conv"),
                                                    ("pixelshuffledirect", 2, "1conv")])
def test_swinir_converts_with_any_size(upsampler, scale, resi, tmp_path):
    """One graph for every size: the shifted-window masks are computed in the graph from the input's size
    (the conversion itself checks two sizes); here a third, wider one."""
    module = _swinir(upsampler, scale, resi)
    state = dict(module.state_dict())
    state["layers.0.residual_group.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)  # saved by SwinIR, made per size here
    torch.save({"params_ema": state}, tmp_path / "SwinIR_4x.pth")
    convert_postprocess(tmp_path / "SwinIR_4x.pth", tmp_path / "out")
    manifest = _compare(module, tmp_path / "out", (1, 3, 12, 28))
    assert (manifest.architecture, manifest.scale, manifest.tiling.mode, manifest.tiling.multiple) == \
        ("SwinIR", scale, "average", 4)
    assert manifest.facts["upsampler"] == upsampler


def test_swinir_masks_match_the_slicing_definition():
    from converters.postprocess.swinir import _shift_mask
    from upscaler_reference import swinir_mask

    for h, w, ws in ((16, 24, 8), (8, 8, 4), (12, 20, 4)):
        assert torch.equal(_shift_mask(h, w, ws, ws // 2), swinir_mask(h, w, ws, ws // 2))
