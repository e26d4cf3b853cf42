"""Run-time LoRA against diffusers on the tiny models.

LoRA files are made here from PEFT adapters with random nonzero A/B on the tiny diffusers pipelines, and
written in the PEFT/diffusers layout (as `save_lora_weights` writes it, alpha in the adapter metadata) and
in kohya's layout (`lora_unet_...` / `lora_te_...`, lora_down/lora_up/alpha). The reference is the
diffusers pipeline with the same file loaded by `load_lora_weights` and `set_adapters` at the same
weights, on the same initial noise; tolerance as tests/test_parity.py (max 2, mean 0.05 pixel units).
"""
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file
from torch_reference import diffusers_images

from sdonnx import Pipeline

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
STEPS, CFG = 6, 7.0
TIGHT = {"max": 2, "mean": 0.05}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


# ------------------------------------------------------------------------------------------ LoRA files

def peft_lora(torch_pipe, rank, alpha, seed, scale=0.5):
    """{"unet": {PEFT key: tensor}, "text_encoder": {...}} and the LoraConfigs, random nonzero A and B."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = copy.deepcopy(torch_pipe)
    g = torch.Generator().manual_seed(seed)
    out, configs = {}, {}
    for name, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS)):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model = inject_adapter_in_model(config, getattr(pipe, name))
        state = get_peft_model_state_dict(model)
        out[name] = {k: torch.randn(v.shape, generator=g) * scale / v[0].numel() ** 0.5 for k, v in state.items()}
        configs[name] = config
    return out, configs


def te_module(key):
    return key if key.startswith("text_model.") else "text_model." + key


def write_peft(path, layers, configs):
    """The layout diffusers' save_lora_weights writes: `unet.<module>.lora_A.weight`, metadata with alpha."""
    tensors = {f"{c}.{k}": v.contiguous() for c, sd in layers.items() for k, v in sd.items()}
    metadata = {f"{c}.{k}": v for c, cfg in configs.items() for k, v in _config_dict(cfg).items()}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata), "format": "pt"})
    return path


def _config_dict(config):
    d = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def write_kohya(path, layers, configs, ldm_names=None):
    """kohya layout: lora_unet_<module with _>.lora_down.weight / lora_up.weight / alpha."""
    tensors = {}
    for component, sd in layers.items():
        prefix = "lora_unet_" if component == "unet" else "lora_te_"
        alpha = configs[component].lora_alpha
        for key, value in sd.items():
            module, _, rest = key.partition(".lora_")
            if component == "text_encoder":
                module = te_module(module)
            elif ldm_names:
                module = ldm_names[module]
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = value.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------------------------------------ helpers

def _noise(pipe, seed=0):
    size = pipe.manifest.native_size
    shape = (1, pipe.manifest.latent_channels, size // 8, size // 8)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _images(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


def _compare(ours, reference, label):
    diff = np.abs(_images(ours) - reference.astype(np.int16))
    print(f"{label}: max {diff.max()} mean {diff.mean():.4f} (pixel units)")
    assert diff.max() <= TIGHT["max"] and diff.mean() <= TIGHT["mean"], f"{label}: max {diff.max()} mean {diff.mean():.4f}"


def _reference(torch_pipe, files, weights, latents):
    """diffusers with the LoRA files loaded as adapters; weights [(te, unet)] per file."""
    pipe = copy.deepcopy(torch_pipe)
    _peft_text_encoder_loading(pipe.text_encoder)
    names = []
    for i, path in enumerate(files):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[{"unet": u, "text_encoder": t} for t, u in weights])
    sched = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                         timestep_spacing="linspace")
    return diffusers_images(pipe, sched, PROMPT, NEGATIVE, latents, STEPS, CFG)


def _peft_text_encoder_loading(model):
    """diffusers hands text-encoder LoRAs to transformers' load_adapter, which wants a newer peft than
    PyPI has for this transformers; do what it does with peft itself, on this copy of the model only."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    names = set(model.state_dict())

    def load_adapter(adapter_name, adapter_state_dict, peft_config, **_):
        inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
        state = {k if k.split(".lora_")[0] + ".weight" in names else k.removeprefix("text_model."): v
                 for k, v in adapter_state_dict.items()}
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        assert not [k for k in result.unexpected_keys if "lora" in k], result.unexpected_keys
        model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: peft_config}

    model.load_adapter = load_adapter


def _generate(pipe, prompt, latents):
    return pipe.generate(prompt, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras",
                         seed=1, latents=latents)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(request, tiny_diffusers, tiny_onnx, tmp_path_factory):
    family = request.param
    _, torch_pipe = tiny_diffusers(family)
    lora_dir = tmp_path_factory.mktemp(f"{family}-loras")
    layers, configs = peft_lora(torch_pipe, rank=4, alpha=8, seed=1)
    write_peft(lora_dir / "peft_a.safetensors", layers, configs)
    write_kohya(lora_dir / "kohya_a.safetensors", layers, configs)
    layers_b, configs_b = peft_lora(torch_pipe, rank=2, alpha=1, seed=2)
    write_kohya(lora_dir / "kohya_b.safetensors", layers_b, configs_b)
    pipe = Pipeline.load(tiny_onnx(family), provider="cpu", lora_dir=lora_dir)
    return family, torch_pipe, pipe, lora_dir


@pytest.mark.parametrize("name", ["kohya_a", "peft_a"])
def test_single_lora_matches_diffusers(setup, name):
    family, torch_pipe, pipe, lora_dir = setup
    latents = _noise(pipe)
    base = _images(_generate(pipe, PROMPT, latents))
    ours = _generate(pipe, f"{PROMPT} <lora:{name}:0.8>", latents)
    assert np.abs(_images(ours) - base).mean() > 2, "the LoRA hardly changes the image: the test would not see errors"
    ref = _reference(torch_pipe, [lora_dir / f"{name}.safetensors"], [(0.8, 0.8)], latents)
    _compare(ours, ref, f"{family} {name} @0.8 vs diffusers")


def test_several_loras_with_separate_weights_match_diffusers(setup):
    family, torch_pipe, pipe, lora_dir = setup
    latents = _noise(pipe, seed=3)
    ours = _generate(pipe, f"<lora:kohya_a:0.3:1.2> {PROMPT} <lora:kohya_b:te=1.5:unet=-0.5>", latents)
    ref = _reference(torch_pipe, [lora_dir / "kohya_a.safetensors", lora_dir / "kohya_b.safetensors"],
                     [(0.3, 1.2), (1.5, -0.5)], latents)
    _compare(ours, ref, f"{family} two LoRAs, separate te/unet weights vs diffusers")
    assert 'Lora hashes: "kohya_a: ' in ours.infotext and ", kohya_b: " in ours.infotext


def test_removing_the_tag_restores_the_base_exactly(setup):
    _, _, pipe, _ = setup
    latents = _noise(pipe, seed=4)
    base = _images(_generate(pipe, PROMPT, latents))
    with_lora = _images(_generate(pipe, f"{PROMPT} <lora:peft_a:1>", latents))
    zero = _images(_generate(pipe, f"{PROMPT} <lora:peft_a:0>", latents))
    again = _generate(pipe, PROMPT, latents)
    assert np.abs(with_lora - base).mean() > 2
    assert np.array_equal(_images(again), base) and np.array_equal(zero, base)
    assert "Lora hashes" not in again.infotext
