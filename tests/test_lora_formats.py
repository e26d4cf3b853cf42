"""LoRA file formats and failure modes, checked on the merged weights of the tiny SD 1.x model.

References: PEFT's own delta weights for LoHa / LoKr (same tensors, written in the LyCORIS layout), the
converter's single-file key map (diffusers' LDM -> diffusers conversion) for original-layout kohya names,
and A1111's formulas written out in torch for full diffs and DoRA.
"""
import copy
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file
from test_lora import peft_lora, write_kohya

from sdonnx.adapters.lora import (
    LoraError,
    LoraLibrary,
    LoraMerger,
    LoraRequest,
    load_lora,
)
from sdonnx.manifest import load_manifest

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def model(tiny_diffusers, tiny_onnx):
    _, torch_pipe = tiny_diffusers("sd1")
    folder = tiny_onnx("sd1")
    return torch_pipe, LoraMerger(folder, load_manifest(folder))


def _merged(merger, path, te=1.0, unet=1.0):
    return merger.apply([(load_lora(path), te, unet)])


def _weight(merger, applied, module, param="weight", component="unet"):
    name = merger.manifest.components[component].weights[f"{component}.{module}.{param}"]
    return applied.replacements[component][name], merger.base(component).get(name)


def _kohya_name(module):
    return "lora_unet_" + module.replace(".", "_")


def test_original_layout_names_match_diffusers_names(model, tmp_path):
    """kohya files naming UNet layers as input_blocks_1_1_... merge exactly as the diffusers-named file."""
    original_layout = pytest.importorskip("original_layout")
    from converters.single_file import detect, key_map

    torch_pipe, merger = model
    original = original_layout.to_original(torch_pipe)
    ldm = {new.rpartition(".")[0]: old[len("model.diffusion_model."):].rpartition(".")[0]
           for old, news in key_map(original, detect(original))["unet"].items() for new in news}
    layers, configs = peft_lora(torch_pipe, rank=4, alpha=8, seed=5)
    a = _merged(merger, write_kohya(tmp_path / "diffusers_names.safetensors", layers, configs))
    b = _merged(merger, write_kohya(tmp_path / "ldm_names.safetensors", layers, configs, ldm_names=ldm))
    assert a.replacements["unet"].keys() == b.replacements["unet"].keys() and len(a.replacements["unet"]) > 20
    for name, value in a.replacements["unet"].items():
        assert np.array_equal(value, b.replacements["unet"][name]), name
    assert not b.reports[0].unmatched


def test_pt_file_reads_like_safetensors(model, tmp_path):
    torch_pipe, merger = model
    layers, configs = peft_lora(torch_pipe, rank=4, alpha=8, seed=6)
    write_kohya(tmp_path / "a.safetensors", layers, configs)
    from safetensors.torch import load_file

    torch.save(load_file(str(tmp_path / "a.safetensors")), tmp_path / "b.pt")
    a, b = _merged(merger, tmp_path / "a.safetensors"), _merged(merger, tmp_path / "b.pt")
    for component in ("unet", "text_encoder"):
        for name, value in a.replacements[component].items():
            assert np.array_equal(value, b.replacements[component][name])


def _peft_lycoris(torch_pipe, config_cls, targets, seed, **kwargs):
    """A PEFT LoHa/LoKr adapter on a copy of the UNet with random weights: (state dict, {module: delta})."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet = inject_adapter_in_model(config_cls(target_modules=targets, init_weights=False, **kwargs),
                                   copy.deepcopy(torch_pipe.unet))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    modules = dict(unet.named_modules())
    state = get_peft_model_state_dict(unet)
    layers = {k.rpartition(".")[0] for k in state}
    return state, {m: modules[m].get_delta_weight("default").detach().numpy() for m in layers}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_matches_peft(model, tmp_path, kind):
    torch_pipe, merger = model
    from peft import LoHaConfig, LoKrConfig

    if kind == "loha":
        state, deltas = _peft_lycoris(torch_pipe, LoHaConfig, ["to_q", "ff.net.2", "conv1"], 7, r=4, alpha=6)
        alpha = 6
    else:  # rank 2 makes PEFT factor w2 (lokr_w2_a/b), the case where LyCORIS scales by alpha / dim too
        state, deltas = _peft_lycoris(torch_pipe, LoKrConfig, ["to_q", "ff.net.2"], 8, r=2, alpha=3)
        alpha = 3
    tensors = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        tensors[f"{_kohya_name(module)}.{param}"] = value.contiguous()
        tensors[f"{_kohya_name(module)}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(tmp_path / f"{kind}.safetensors"))
    applied = _merged(merger, tmp_path / f"{kind}.safetensors", unet=0.7)
    assert len(applied.reports[0].matched) == len(deltas) and not applied.reports[0].unmatched
    for module, delta in deltas.items():
        merged, base = _weight(merger, applied, module)
        np.testing.assert_allclose(merged, base + 0.7 * delta.reshape(base.shape), rtol=0, atol=2e-6)
    if kind == "loha":
        assert any(d.ndim == 4 or "conv1" in m for m, d in deltas.items())


def test_full_diff_and_dora(model, tmp_path):
    """diff/diff_b add as they are; DoRA rescales W + dW to dora_scale's column norms (A1111's
    apply_weight_decompose), then the multiplier applies to the resulting delta."""
    _, merger = model
    rng = np.random.default_rng(0)
    base_q = _base(merger, Q)
    conv_w, conv_b = _base(merger, CONV), _base(merger, CONV, "bias")
    diff_b = rng.standard_normal(conv_b.shape).astype(np.float32)
    down = rng.standard_normal((4, base_q.shape[1])).astype(np.float32) * 0.2
    up = rng.standard_normal((base_q.shape[0], 4)).astype(np.float32) * 0.2
    dora = rng.uniform(0.5, 1.5, (1, base_q.shape[1])).astype(np.float32)
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    base_ff = _base(merger, ff)
    save_file({f"{_kohya_name(ff)}.diff": torch.from_numpy(rng.standard_normal(base_ff.shape).astype(np.float32)),
               f"{_kohya_name(CONV)}.diff": torch.from_numpy(np.zeros_like(conv_w)),
               f"{_kohya_name(CONV)}.diff_b": torch.from_numpy(diff_b),
               f"{_kohya_name(Q)}.lora_down.weight": torch.from_numpy(down),
               f"{_kohya_name(Q)}.lora_up.weight": torch.from_numpy(up),
               f"{_kohya_name(Q)}.alpha": torch.tensor(2.0),
               f"{_kohya_name(Q)}.dora_scale": torch.from_numpy(dora)}, str(tmp_path / "x.safetensors"))
    applied = _merged(merger, tmp_path / "x.safetensors", unet=0.5)
    merged_b, _ = _weight(merger, applied, CONV, "bias")
    np.testing.assert_allclose(merged_b, conv_b + 0.5 * diff_b, atol=1e-6)
    w = torch.from_numpy(base_q.astype(np.float32))
    m1 = w + torch.from_numpy(up) @ torch.from_numpy(down) * (2.0 / 4)
    norm = m1.transpose(0, 1).reshape(m1.shape[1], -1).norm(dim=1, keepdim=True).reshape(m1.shape[1], 1).transpose(0, 1)
    expected = w + 0.5 * (m1 * (torch.from_numpy(dora) / norm) - w)
    np.testing.assert_allclose(_weight(merger, applied, Q)[0], expected.numpy(), atol=2e-6)


def _base(merger, module, param="weight"):
    return merger.base("unet").get(merger.manifest.components["unet"].weights[f"unet.{module}.{param}"])


# ------------------------------------------------------------------------------------------ failures

def _save(path, tensors):
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_unknown_keys_are_reported_and_logged(model, tmp_path, caplog):
    torch_pipe, merger = model
    layers, configs = peft_lora(torch_pipe, rank=2, alpha=2, seed=9)
    path = write_kohya(tmp_path / "a.safetensors", layers, configs)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.ones(2, 32)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 2)
    tensors["lora_unet_mid_block_only_down.lora_down.weight"] = torch.ones(2, 32)
    tensors["something_else"] = torch.ones(1)
    _save(tmp_path / "b.safetensors", tensors)
    with caplog.at_level(logging.WARNING, logger="sdonnx.adapters.lora"):
        report = _merged(merger, tmp_path / "b.safetensors").reports[0]
    assert report.unmatched == {"lora_unet_down_blocks_9_attentions_0_proj_in": f"no such layer in {merger.manifest.name}",
                                "lora_unet_mid_block_only_down": "incomplete module (only down)",
                                "something_else": "not a LoRA tensor"}
    assert len(report.matched) == len(layers["unet"]) // 2 + len(layers["text_encoder"]) // 2
    assert "3 keys unmatched" in caplog.text


def test_lora_for_another_family_is_an_error(model, tmp_path, tiny_diffusers):
    _, merger = model
    _, sd2_pipe = tiny_diffusers("sd2")
    layers, configs = peft_lora(sd2_pipe, rank=2, alpha=2, seed=10)  # sd2 tiny: other widths
    with pytest.raises(LoraError, match=rf"does not fit {merger.manifest.name} \(sd1\)"):
        _merged(merger, write_kohya(tmp_path / "sd2.safetensors", layers, configs))
    sdxl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((2, 1280), np.float32),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((1280, 2), np.float32)}
    with pytest.raises(LoraError, match="is for SDXL"):
        _merged(merger, _save(tmp_path / "xl.safetensors", sdxl))
    wide = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((2, 1024), np.float32),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((1024, 2), np.float32)}
    with pytest.raises(LoraError, match="made for SD 2.x"):
        _merged(merger, _save(tmp_path / "wide.safetensors", wide))
    with pytest.raises(LoraError, match="none of the 1 modules"):
        _merged(merger, _save(tmp_path / "none.safetensors", {"lora_unet_nothing.lora_down.weight": np.ones((2, 2)),
                                                                 "lora_unet_nothing.lora_up.weight": np.ones((2, 2))}))


def test_bad_files(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraError, match="cannot read LoRA file"):
        load_lora(tmp_path / "broken.safetensors")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(LoraError, match="refusing to load"):
        load_lora(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    library = LoraLibrary(tmp_path)
    with pytest.raises(LoraError, match="'missing' not found .*available: broken, evil"):
        library.get("missing")
    with pytest.raises(LoraError, match="multipliers must be numbers"):
        LoraRequest.from_args("x", ["strong"])


def test_library_finds_by_stem_in_subfolders_and_rereads_changed_files(model, tmp_path):
    torch_pipe, _ = model
    layers, configs = peft_lora(torch_pipe, rank=2, alpha=2, seed=11)
    (tmp_path / "styles").mkdir()
    path = write_kohya(tmp_path / "styles" / "ink.safetensors", layers, configs)
    library = LoraLibrary(tmp_path)
    first = library.get("ink")
    assert library.get("ink") is first and first.path == path and len(first.shorthash) == 12
    from sdonnx.infotext import addnet_hash

    assert first.shorthash == addnet_hash(path)[:12]
    layers2, _ = peft_lora(torch_pipe, rank=2, alpha=2, seed=12)
    write_kohya(path, layers2, configs)
    assert library.get("ink") is not first


def test_switching_never_rereads_base_weights(model, tmp_path, monkeypatch):
    torch_pipe, _ = model
    merger = LoraMerger(model[1].folder, model[1].manifest)  # fresh: nothing read yet
    layers, configs = peft_lora(torch_pipe, rank=2, alpha=2, seed=13)
    lora = load_lora(write_kohya(tmp_path / "a.safetensors", layers, configs))
    reads = []
    for component in ("unet", "text_encoder"):
        weights = merger.base(component)
        original = weights._read
        monkeypatch.setattr(weights, "_read", lambda t, original=original: reads.append(t.name) or original(t))
    first = merger.apply([(lora, 1.0, 1.0)])
    count = len(reads)
    assert count == sum(len(r) for r in first.replacements.values())
    again = merger.apply([(lora, 0.5, -1.0)])
    assert len(reads) == count
    for component, arrays in again.replacements.items():
        for name, value in arrays.items():
            assert value.dtype == merger.base(component).get(name).dtype and not np.array_equal(value, first.replacements[component][name])


def test_bfloat16_and_fp16_tensors_are_read(tmp_path):
    from sdonnx.adapters.lora import read_safetensors

    a = torch.randn(3, 4)
    save_file({"x": a.bfloat16(), "y": a.half(), "alpha": torch.tensor(2.0)}, str(tmp_path / "t.safetensors"))
    tensors, _ = read_safetensors(tmp_path / "t.safetensors")
    assert np.array_equal(tensors["x"], a.bfloat16().float().numpy())
    assert np.array_equal(tensors["y"], a.half().numpy()) and tensors["alpha"].shape == ()
