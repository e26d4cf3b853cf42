"""Single-file checkpoints in the original CompVis / A1111 layout -> diffusers modules.

Tiny random pipelines (tiny_models.py) are written in the original layout (original_layout.py), saved,
read back and rebuilt; the rebuilt modules must compute what the originals compute. Real-size SD 1.5 /
SD 2.1 shapes are checked on the meta device (no memory, no weights) for the inferred configs.
"""
import os
import pickle
from types import SimpleNamespace

import pytest
import torch

from converters import single_file
from converters.checkpoint import CheckpointError, load_state_dict, read_metadata
from converters.original_layout import save_checkpoint, to_original
from tiny_models import make_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipe(request):
    return make_pipeline(request.param)


def family_of(pipe):
    return "sd1" if pipe.text_encoder.config.hidden_act == "quick_gelu" else "sd2"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@torch.no_grad()
def test_round_trip_matches_original_modules(pipe, suffix, tmp_path):
    path = save_checkpoint(pipe, tmp_path / f"model{suffix}")
    state_dict = load_state_dict(path)
    guess = single_file.detect(state_dict)
    assert guess.family == family_of(pipe)
    parts = single_file.load_components(state_dict, guess, prediction="epsilon")

    torch.manual_seed(0)
    ids = torch.randint(0, 49408, (2, 77))
    want = pipe.text_encoder(ids, output_hidden_states=True)
    got = parts["text_encoder"](ids, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL)
    torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], **TOL)

    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 64)
    for t in (1, 500, 999):
        torch.testing.assert_close(parts["unet"](latents, t, context).sample, pipe.unet(latents, t, context).sample, **TOL)

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    want_dist, got_dist = pipe.vae.encode(image).latent_dist, parts["vae"].encode(image).latent_dist
    torch.testing.assert_close(got_dist.mean, want_dist.mean, **TOL)
    torch.testing.assert_close(got_dist.std, want_dist.std, **TOL)
    torch.testing.assert_close(parts["vae"].decode(latents).sample, pipe.vae.decode(latents).sample, **TOL)


def test_components_are_fp32_eval_with_family_tokenizer_and_schedule(pipe):
    # Half-precision files (the common download) still give fp32 modules.
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in to_original(pipe).items()}
    parts = single_file.load_components(state_dict, single_file.detect(state_dict), prediction="v_prediction")
    for name in ("text_encoder", "unet", "vae"):
        assert not parts[name].training
        assert {p.dtype for p in parts[name].parameters()} == {torch.float32}
    assert parts["vae"].config.scaling_factor == 0.18215
    tokenizer = parts["tokenizer"]
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == ("<|endoftext|>" if family_of(pipe) == "sd1" else "!")
    assert tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids
    assert parts["scheduler_config"] == {**parts["scheduler_config"], "beta_start": 0.00085, "beta_end": 0.012,
                                         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                                         "prediction_type": "v_prediction"}


def test_inferred_configs_match_the_tiny_models(pipe):
    family = family_of(pipe)
    converted = single_file.convert(to_original(pipe), single_file.detect(to_original(pipe)))
    unet = single_file.unet_config(converted["unet"], family)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
                "out_channels", "cross_attention_dim", "use_linear_projection", "attention_head_dim"):
        assert _plain(unet[key]) == _plain(pipe.unet.config[key]), key
    text = single_file.text_encoder_config(converted["text_encoder"], family)
    assert text["num_hidden_layers"] == pipe.text_encoder.config.num_hidden_layers  # extra OpenCLIP layer dropped
    assert text["num_attention_heads"] == pipe.text_encoder.config.num_attention_heads


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def test_detect_prediction(pipe):
    state_dict = to_original(pipe)
    guess = single_file.detect(state_dict)
    if family_of(pipe) == "sd1":
        assert (guess.prediction, guess.prediction_source) == ("epsilon", "family")
    else:
        assert (guess.prediction, guess.prediction_source) == (None, "undecided")
    marked = single_file.detect({**state_dict, "v_pred": torch.tensor([])})
    assert (marked.prediction, marked.prediction_source) == ("v_prediction", "marker")
    hinted = single_file.detect(state_dict, metadata={"modelspec.prediction_type": "v"})
    assert hinted.prediction == "v_prediction"
    assert single_file.detect(state_dict, metadata={"parameterization": "eps"}).prediction == "epsilon"


def test_metadata_hint_is_read_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"modelspec.prediction_type": "v"})
    assert read_metadata(path) == {"modelspec.prediction_type": "v"}
    assert read_metadata(tmp_path / "m.ckpt") == {}


def test_undecided_prediction_is_probed(pipe, monkeypatch):
    state_dict = to_original(pipe)
    guess = single_file.detect(state_dict)
    calls = []
    monkeypatch.setattr(single_file, "probe_v_prediction", lambda unet: calls.append(unet) or True)
    parts = single_file.load_components(state_dict, guess)
    assert len(calls) == (guess.prediction is None)
    expected = "v_prediction" if guess.prediction is None else guess.prediction
    assert parts["scheduler_config"]["prediction_type"] == expected
    assert parts["unet"].config.sample_size == (96 if guess.family == "sd2" else 64)


class _StubUNet(torch.nn.Module):
    """Returns a fixed function of its input, like an eps model (~x) or a v model (~-x0) at t=999."""

    def __init__(self, fn):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(in_channels=4, out_channels=4, cross_attention_dim=16)
        self.fn = fn

    def forward(self, sample, timestep, encoder_hidden_states):
        assert int(timestep) == 999 and encoder_hidden_states.shape == (1, 2, 16)
        return SimpleNamespace(sample=self.fn(sample))


def test_probe_v_prediction_reads_the_output_offset():
    assert single_file.probe_v_prediction(_StubUNet(lambda x: x * 0.98)) is False
    assert single_file.probe_v_prediction(_StubUNet(lambda x: -x * 2 - 0.5)) is True
    single_file.probe_v_prediction(make_pipeline("sd2").unet)  # runs on a real UNet


def test_inpaint_unet_is_detected_and_built(pipe):
    state_dict = to_original(pipe)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    weight = state_dict[key]
    state_dict[key] = torch.cat([weight, torch.randn(weight.shape[0], 5, *weight.shape[2:])], dim=1)
    guess = single_file.detect(state_dict)
    assert guess.inpaint and guess.in_channels == 9
    assert (guess.prediction, guess.prediction_source) == ("epsilon", "family")  # SD 2 inpainting: 512 eps
    unet = single_file.load_components(state_dict, guess)["unet"]
    assert unet.config.in_channels == 9 and unet.config.out_channels == 4


def test_text_encoder_saved_by_old_transformers_without_text_model_prefix():
    pipe = make_pipeline("sd1")
    old = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in to_original(pipe).items()}
    parts = single_file.load_components(old, single_file.detect(old))
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        torch.testing.assert_close(parts["text_encoder"](ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state)


def test_missing_vae_is_named():
    state_dict = {k: v for k, v in to_original(make_pipeline("sd1")).items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match=r"no VAE weights \(first_stage_model\.\*\)"):
        single_file.load_components(state_dict, single_file.detect(state_dict))


def test_unknown_layouts_are_refused_by_name():
    # SDXL is supported (test_sdxl_single_file.py); one without its bigG encoder is refused by name
    sdxl = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(CheckpointError, match=r"SDXL layout.*conditioner\.embedders\.1\.model"):
        single_file.detect(sdxl)
    other = {"vae.encoder.conv_in.weight": torch.zeros(1), "transformer.blocks.0.attn.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"found top-level groups .*vae\.encoder.*sd1, sd2"):
        single_file.detect(other)


def test_key_map_covers_every_converted_weight(pipe):
    state_dict = to_original(pipe)
    guess = single_file.detect(state_dict)
    mapping = single_file.key_map(state_dict, guess)
    converted = single_file.convert(state_dict, guess)
    for component, table in mapping.items():
        assert sorted(k for keys in table.values() for k in keys) == sorted(converted[component])
        for original, new_keys in table.items():
            if len(new_keys) == 3:  # OpenCLIP in_proj -> q, k, v
                assert original.endswith(("in_proj_weight", "in_proj_bias"))
                torch.testing.assert_close(torch.cat([converted[component][k] for k in new_keys]), state_dict[original])
            else:
                assert converted[component][new_keys[0]].flatten().equal(state_dict[original].flatten())


# --- real-size shapes, on the meta device ------------------------------------------------------------------

REAL = {
    "sd1": dict(hidden=768, layers=12, act="quick_gelu", heads=8, linear=False, file_layers=12),
    "sd2": dict(hidden=1024, layers=23, act="gelu", heads=(5, 10, 20, 20), linear=True, file_layers=24),
}


def _real_size_pipeline(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    real = REAL[family]
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=real["hidden"], intermediate_size=4 * real["hidden"], num_hidden_layers=real["layers"],
            num_attention_heads=real["hidden"] // 64, projection_dim=real["hidden"], hidden_act=real["act"]))
        unet = UNet2DConditionModel(
            cross_attention_dim=real["hidden"], attention_head_dim=real["heads"], use_linear_projection=real["linear"])
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return SimpleNamespace(text_encoder=text_encoder, unet=unet, vae=vae)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_size_layout_and_inferred_configs(family):
    real = REAL[family]
    state_dict = to_original(_real_size_pipeline(family))
    # Keys that real files carry (the ones diffusers itself uses to recognise SD 1 / SD 2 files).
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in state_dict
    assert "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight" in state_dict
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in state_dict
    assert state_dict["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    if family == "sd2":
        assert state_dict["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)

    guess = single_file.detect(state_dict)
    assert (guess.family, guess.context_dim, guess.linear_projection) == (family, real["hidden"], real["linear"])
    converted = single_file.convert(state_dict, guess)
    unet = single_file.unet_config(converted["unet"], family)
    assert unet["block_out_channels"] == (320, 640, 1280, 1280) and unet["layers_per_block"] == 2
    assert unet["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert unet["attention_head_dim"] == real["heads"] and unet["transformer_layers_per_block"] == 1
    assert (unet["cross_attention_dim"], unet["use_linear_projection"]) == (real["hidden"], real["linear"])
    text = single_file.text_encoder_config(converted["text_encoder"], family)
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]) == (
        real["hidden"], real["layers"], 4 * real["hidden"])
    assert (text["vocab_size"], text["max_position_embeddings"], text["hidden_act"]) == (49408, 77, real["act"])
    vae = single_file.vae_config(converted["vae"])
    assert vae["block_out_channels"] == (128, 256, 512, 512) and vae["layers_per_block"] == 2
    assert vae["latent_channels"] == 4


# --- loading files safely ------------------------------------------------------------------------------------

class _WritesMarker:
    """A pickle payload that creates a file when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_without_running(tmp_path):
    # The payload is live: an unsafe unpickler really creates its marker.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_WritesMarker(control), protocol=2)).close()
    assert control.exists()

    marker = tmp_path / "pwned_marker"
    zipped = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": _WritesMarker(marker)}, str(zipped))
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps({"state_dict": _WritesMarker(marker)}, protocol=2))
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match=r"refused.*code or Python objects.*open.*safetensors") as error:
            load_state_dict(path)
        assert path.name in str(error.value) and "allowlist" not in str(error.value)
        assert not marker.exists()
    # Newer pickle protocols are refused before any global is even looked at.
    modern = tmp_path / "evil_modern.bin"
    modern.write_bytes(pickle.dumps({"state_dict": _WritesMarker(marker)}, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(CheckpointError, match=r"refused.*code or Python objects.*safetensors"):
        load_state_dict(modern)
    assert not marker.exists()


def test_plain_ckpt_without_wrapper_and_non_tensor_entries(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"a": torch.ones(2), "global_step": 3}, str(path))
    assert list(load_state_dict(path)) == ["a"]


@pytest.mark.parametrize("name,content,message", [
    ("missing.safetensors", None, "no such checkpoint file"),
    ("model.onnx", b"x", "unknown checkpoint extension '.onnx'"),
    ("broken.safetensors", b"not a safetensors file", "not a readable safetensors file"),
    ("broken.ckpt", b"\x00garbage", "not a readable torch checkpoint"),
    ("truncated.ckpt", b"PK\x03\x04garbage", "not a readable torch checkpoint"),
])
def test_bad_files_give_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(path)
