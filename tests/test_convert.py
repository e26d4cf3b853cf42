"""The converter: sources, manifest, weight map, staged output folder, refusals."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from converters.convert import ConvertError, convert, load_source  # noqa: E402
from original_layout import save_checkpoint  # noqa: E402
from sdonnx import Pipeline  # noqa: E402
from sdonnx.manifest import MANIFEST_NAME, load_manifest  # noqa: E402


def test_manifest_facts(tiny_onnx):
    for family, prediction in (("sd1", "epsilon"), ("sd2", "v_prediction")):
        m = load_manifest(tiny_onnx(family))
        assert (m.family, m.prediction_type) == (family, prediction)
        assert m.vae_scale_factor == 8 and m.latent_channels == 4 and m.native_size == 64
        te = m.text_encoders[0]
        assert (te.bos_id, te.eos_id, te.pad_id) == (49406, 49407, 49407 if family == "sd1" else 0)
        for name, c in m.components.items():
            assert c.parity_max_abs_err is not None and c.parity_max_abs_err < 1e-3, name
        # run-time LoRA needs the checkpoint -> initializer map: every UNet weight is named
        unet_weights = m.components["unet"].weights
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in unet_weights
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight" in m.components["text_encoder"].weights


def test_weight_map_names_real_initializers(tiny_onnx):
    import onnx

    folder = tiny_onnx("sd1")
    m = load_manifest(folder)
    graph = onnx.load(str(folder / m.components["unet"].path), load_external_data=False).graph
    names = {i.name for i in graph.initializer}
    assert set(m.components["unet"].weights.values()) <= names
    assert len(m.components["unet"].weights) >= 0.95 * len(names)


# each family once and each file format once: the format decides only how the file is read (both readers are
# checked against the original modules for both families in test_single_file.py), the family decides the rest
@pytest.mark.parametrize("family, suffix", [("sd1", ".ckpt"), ("sd2", ".safetensors")])
def test_single_file_converts_and_matches_diffusers_folder(tiny_diffusers, tiny_onnx, tmp_path, family, suffix):
    """Original-layout file -> same images as the converted diffusers folder (same weights)."""
    _, pipe = tiny_diffusers(family)
    ckpt = tmp_path / f"tiny-{family}{suffix}"
    save_checkpoint(pipe, ckpt)
    # SD 2.x's 512-base vs 768-v is not in the shapes: the tiny v model needs the override
    prediction = "v_prediction" if family == "sd2" else None
    out = tmp_path / "model"
    m = convert(ckpt, out, prediction=prediction)
    assert m.family == family and m.model_hash and len(m.model_hash) == 10
    assert m.name == ckpt.stem
    from_file = Pipeline.load(out, provider="cpu")
    from_folder = Pipeline.load(tiny_onnx(family), provider="cpu")
    args = dict(prompt="a cat", negative_prompt="", steps=4, sampler="Euler", seed=3, width=64, height=64)
    a = np.asarray(from_file.generate(**args).images[0]).astype(int)
    b = np.asarray(from_folder.generate(**args).images[0]).astype(int)
    assert np.abs(a - b).max() <= 1


def test_refuses_non_empty_output_without_force(tiny_diffusers, tmp_path):
    folder, _ = tiny_diffusers("sd1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="--force"):
        convert(folder, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_and_failed_convert_leaves_nothing(tiny_diffusers, tiny_onnx, tmp_path, monkeypatch):
    import shutil

    folder, _ = tiny_diffusers("sd1")
    out = tmp_path / "out"
    shutil.copytree(tiny_onnx("sd1"), out)  # the model an earlier convert of the same folder wrote
    before = json.loads((out / MANIFEST_NAME).read_text())

    import converters.export as export

    def broken(spec, path, tolerance):
        raise export.ParityError(f"{spec.name}: simulated mismatch")

    monkeypatch.setattr(export, "parity_check", broken)
    with pytest.raises(export.ParityError):
        convert(folder, out, force=True)
    # the failed convert touched neither the old model nor left a staging folder behind
    assert json.loads((out / MANIFEST_NAME).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_convert_leaves_nothing_that_loads(tiny_diffusers, tmp_path, monkeypatch):
    folder, _ = tiny_diffusers("sd1")
    out = tmp_path / "fresh"
    import converters.convert as conv

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_save_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(folder, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_malicious_ckpt_is_refused_and_never_runs(tmp_path):
    import pickle
    import zipfile

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": Payload()}, protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(ConvertError, match="evil.ckpt"):
        convert(ckpt, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConvertError, match="could not download 'someone/some-model'"):
        convert("someone/some-model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_source_and_bad_options(tmp_path):
    with pytest.raises(ConvertError, match="not a folder, a checkpoint file"):
        convert("not a model", tmp_path / "out")
    with pytest.raises(ConvertError, match="does not exist"):
        convert(tmp_path / "missing.safetensors", tmp_path / "out")
    with pytest.raises(ConvertError, match="choose one of fp32, fp16"):
        convert(tmp_path, tmp_path / "out", dtype="int4")
    with pytest.raises(ConvertError, match="not a diffusers model"):
        convert(tmp_path, tmp_path / "out2")


def test_single_file_metadata_sets_native_size_and_family_override(tiny_diffusers, tmp_path):
    from safetensors.torch import load_file, save_file

    _, pipe = tiny_diffusers("sd1")
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(pipe, plain)
    tagged = tmp_path / "tagged.safetensors"
    save_file(load_file(str(plain)), str(tagged), metadata={"modelspec.resolution": "64x64"})
    m = convert(tagged, tmp_path / "tagged", family="sd1")
    assert m.native_size == 64
    # without the hint a single SD 1.x file is taken as 512x512: the manifest's native size is the loaded
    # UNet's sample_size times the VAE's factor (converters/convert.py), read here without exporting again
    loaded = load_source(plain)
    assert loaded.unet.config.sample_size * 2 ** (len(loaded.vae.config.block_out_channels) - 1) == 512
