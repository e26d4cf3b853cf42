"""Run-time LoRA on SDXL against diffusers: a LoRA on both text encoders and the UNet, made locally from
PEFT adapters with random nonzero A/B, written in kohya's SDXL layout (lora_te1_ / lora_te2_ / lora_unet_)
and the PEFT/diffusers layout (unet. / text_encoder. / text_encoder_2.); diffusers loads the same file
(load_lora_weights + set_adapters); same initial noise; tolerance as test_parity.py."""
import copy

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402
from test_lora import (NEGATIVE, PROMPT, STEPS, TE_TARGETS, UNET_TARGETS, _compare, _images,  # noqa: E402
                       _peft_text_encoder_loading, te_module, write_peft)
from test_sdxl import CFG, EULER  # noqa: E402
from torch_reference import diffusers_images  # noqa: E402

from sdonnx import Pipeline  # noqa: E402
from sdonnx.adapters.lora import LoraRequest  # noqa: E402

COMPONENTS = {"unet": UNET_TARGETS, "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def sdxl_lora(torch_pipe, rank=4, alpha=8, seed=5, scale=0.5):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = copy.deepcopy(torch_pipe)
    g = torch.Generator().manual_seed(seed)
    layers, configs = {}, {}
    for name, targets in COMPONENTS.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        state = get_peft_model_state_dict(inject_adapter_in_model(config, getattr(pipe, name)))
        layers[name] = {k: torch.randn(v.shape, generator=g) * scale / v[0].numel() ** 0.5 for k, v in state.items()}
        configs[name] = config
    return layers, configs


def write_kohya_sdxl(path, layers, configs):
    tensors = {}
    for component, sd in layers.items():
        for key, value in sd.items():
            module, _, rest = key.partition(".lora_")
            module = te_module(module) if component.startswith("text_encoder") else module
            name = KOHYA[component] + module.replace(".", "_")
            tensors[f"{name}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = value.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(configs[component].lora_alpha))
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tiny_sdxl, tmp_path_factory):
    _, torch_pipe, folder = tiny_sdxl("base")
    lora_dir = tmp_path_factory.mktemp("sdxl-loras")
    layers, configs = sdxl_lora(torch_pipe)
    write_kohya_sdxl(lora_dir / "xl_kohya.safetensors", layers, configs)
    write_peft(lora_dir / "xl_peft.safetensors", layers, configs)
    return torch_pipe, Pipeline.load(folder, provider="cpu", lora_dir=lora_dir), lora_dir


@pytest.mark.parametrize("name", ["xl_kohya", "xl_peft"])
def test_sdxl_lora_matches_diffusers(setup, name):
    torch_pipe, pipe, lora_dir = setup
    import numpy as np

    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    args = dict(steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1, latents=latents)
    ours = pipe.generate(f"{PROMPT} <lora:{name}:0.8>", NEGATIVE, **args)
    applied = pipe.load_networks([LoraRequest(name, 0.8, 0.8)])
    assert {"text_encoder", "text_encoder_2", "unet"} <= set(applied.loras.keys)  # every key matched a layer
    base = pipe.generate(PROMPT, NEGATIVE, **args)
    assert np.abs(_images(ours) - _images(base)).mean() > 2, "the LoRA hardly changes the image"
    ref_pipe = copy.deepcopy(torch_pipe)
    _peft_text_encoder_loading(ref_pipe.text_encoder)
    _peft_text_encoder_loading(ref_pipe.text_encoder_2)
    ref_pipe.load_lora_weights(str(lora_dir), weight_name=f"{name}.safetensors", adapter_name="a")
    ref_pipe.set_adapters(["a"], adapter_weights=[0.8])
    sched = diffusers.EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config, **EULER)
    ref = diffusers_images(ref_pipe, sched, PROMPT, NEGATIVE, latents, STEPS, CFG)
    _compare(ours, ref, f"sdxl {name} @0.8 vs diffusers")
