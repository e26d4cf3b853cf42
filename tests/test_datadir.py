"""`--data-dir`: an A1111 install's folders by A1111's names, checkpoints converted on first use into a cache.

A fake A1111 tree is built here: tiny random checkpoints in the original single-file layout, a LoRA, an
embedding, styles.csv. Conversions run in child processes, as in use; each test that converts says why.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdonnx.cache import ConversionCache, ConverterMissing
from sdonnx.cli import main
from sdonnx.datadir import DataDir, HashCache, ModelNotFound, legacy_hash, read_config
from sdonnx.infotext import sha256_file

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _checkpoint(path, family="sd1", seed=0):
    from converters.original_layout import save_checkpoint
    from tiny_models import make_pipeline

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(make_pipeline(family, seed=seed), path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An A1111 data folder with one SD 1.x checkpoint in a subfolder, a LoRA, an embedding and styles."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("webui")
    _checkpoint(root / "models" / "Stable-diffusion" / "sub" / "tiny15.safetensors")
    rng = np.random.default_rng(0)
    (root / "models" / "Lora").mkdir(parents=True)
    save_file({f"{LAYER}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
               f"{LAYER}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32),
               f"{LAYER}.alpha": np.array(4.0, np.float32)}, root / "models" / "Lora" / "detail.safetensors")
    (root / "embeddings").mkdir()
    save_file({"emb_params": rng.standard_normal((2, 64)).astype(np.float32)}, root / "embeddings" / "bad-hands.safetensors")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nframed,"a photo of {prompt}",blurry\n')
    return root


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _generate_cli(tree, model, outdir, *extra):
    return [sys.executable, "-m", "sdonnx.cli", "generate", "-m", model, "--data-dir", str(tree),
            "a cat <lora:detail:1>, bad-hands", "--steps", "2", "-W", "64", "-H", "64", "--seed", "3",
            "-o", str(outdir), *extra]


def _entries(tree):
    return ConversionCache(tree / "models" / "ONNX").entries()


# ------------------------------------------------------------------------------------------ names, hashes


def test_checkpoint_names_as_a1111(tree):
    data = DataDir(tree)
    (ckpt,) = data.checkpoints()
    path = tree / "models" / "Stable-diffusion" / "sub" / "tiny15.safetensors"
    assert (ckpt.name, ckpt.model_name, ckpt.stem) == ("sub/tiny15.safetensors", "sub_tiny15", "tiny15")
    digest = sha256_file(path)
    assert ckpt.title == "sub/tiny15.safetensors"  # not hashed yet: A1111 lists it without [hash]
    assert data.find_checkpoint(f"tiny15 [{digest[:10]}]") == ckpt  # as an infotext from elsewhere names it
    with pytest.raises(ModelNotFound):
        data.find_checkpoint("tiny15 [0123456789]")
    for name in ("sub/tiny15.safetensors", "sub_tiny15", "tiny15", digest[:10], legacy_hash(path), digest):
        assert data.find_checkpoint(name) == ckpt, name
    # once hashed, titles carry the short hash, as A1111 lists them
    assert ckpt.title == f"sub/tiny15.safetensors [{digest[:10]}]"
    assert data.find_checkpoint(f"tiny15 [{digest[:10]}]") == ckpt
    with pytest.raises(ModelNotFound, match=r"'nope' not found; checkpoints: sub/tiny15.safetensors \["):
        data.find_checkpoint("nope")


def test_hash_cache_keys_on_size_and_mtime_and_reads_a1111s(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"a" * 1000)
    cache = HashCache(tmp_path / "hashes.json")
    first = cache.sha256(f)
    assert first == sha256_file(f) and cache.lookup(f) == first
    f.write_bytes(b"b" * 1000)  # same size, new mtime: hashed again
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert cache.lookup(f) is None and cache.sha256(f) == sha256_file(f)
    # A1111's cache.json entry is used when its mtime matches the file's
    g = tmp_path / "other.safetensors"
    g.write_bytes(b"c")
    fake = "ab" * 32
    (tmp_path / "cache.json").write_text(json.dumps({"hashes": {"checkpoint/other.safetensors": {
        "mtime": g.stat().st_mtime, "sha256": fake}}}))
    theirs = HashCache(tmp_path / "mine.json", tmp_path / "cache.json")
    assert theirs.sha256(g, "other.safetensors") == fake


def test_yaml_config_facts(tmp_path):
    v2 = ("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n"
          "    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n")
    sd1 = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    cond_stage_config:\n" \
          "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"
    xl = ("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n    denoiser_config:\n"
          "      params:\n        scaling_config:\n          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n")
    for text, facts in ((v2, {"family": "sd2", "prediction": "v_prediction"}),
                        (sd1, {"family": "sd1", "prediction": "epsilon"}),
                        (xl, {"family": "sdxl", "prediction": "v_prediction"}), ("!!python/object: x\n", {})):
        (tmp_path / "m.yaml").write_text(text)
        assert read_config(tmp_path / "m.yaml") == facts, text


def test_missing_converter_says_how_to_get_one(tree, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    cache = ConversionCache(tree / "elsewhere")
    with pytest.raises(ConverterMissing, match=r"pip install 'sdonnx\[convert\]'.*sdonnx convert tiny15.safetensors"):
        cache.get("checkpoint", tree / "models" / "Stable-diffusion" / "sub" / "tiny15.safetensors")
    assert not [p for p in (tree / "elsewhere").iterdir() if p.is_dir()]  # nothing but the hash it took


# ------------------------------------------------------------------------------------------ first use


def test_two_first_uses_at_once_make_one_entry_and_the_next_converts_nothing(tree, tmp_path):
    """Two real processes generate with the unconverted checkpoint at the same moment: one converts, the other
    waits for it and uses its entry; a third run converts nothing. LoRA, embedding found by A1111's folders."""
    procs = [subprocess.Popen(_generate_cli(tree, "tiny15", tmp_path / f"out{i}"), env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    converted = [err for _, err in outputs if "converted tiny15.safetensors" in err]
    assert len(converted) == 1, [err[-600:] for _, err in outputs]
    assert "once: about" in converted[0]  # the time it takes, stated up front
    (entry,) = _entries(tree)
    assert entry.path.name.startswith("tiny15-") and entry.source_present and entry.current
    assert not list(entry.path.parent.glob(".*partial*"))
    images = [Path(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert np.array_equal(*(np.asarray(__import__("PIL.Image").Image.open(p)) for p in images))

    made = entry.path.stat().st_mtime_ns
    result = CliRunner().invoke(main, _generate_cli(tree, "sub/tiny15.safetensors", tmp_path / "out3")[3:])
    assert result.exit_code == 0, result.output
    assert "convert" not in result.output and entry.path.stat().st_mtime_ns == made
    from sdonnx.image import read_infotext

    text = read_infotext(result.output.strip().splitlines()[-1])
    assert 'Lora hashes: "detail: ' in text and 'TI hashes: "bad-hands: ' in text and "Model: tiny15," in text


def test_a_replaced_file_converts_again_and_a_killed_convert_leaves_nothing_that_loads(tree, tmp_path):
    """The checkpoint is replaced by another one of the same name. A first convert is killed half-way: no entry
    appears, only a staging folder, which the next run removes before it converts the new file."""
    path = tree / "models" / "Stable-diffusion" / "sub" / "tiny15.safetensors"
    if not _entries(tree):  # runs after the first-use test, whose entry becomes the old one here
        pytest.skip("needs the entry of the first-use test")
    _checkpoint(path, seed=1)
    onnx = tree / "models" / "ONNX"
    killed = subprocess.Popen(_generate_cli(tree, "tiny15", tmp_path / "a"), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(onnx.glob(".tiny15-*.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the converter child has started
    os.killpg(killed.pid, signal.SIGKILL)  # the generate process and its converter child
    killed.wait()
    assert len(_entries(tree)) == 1, "a killed convert made an entry"
    assert list(onnx.glob(".tiny15-*.partial-*"))

    listing = CliRunner().invoke(main, ["cache", "list", "--data-dir", str(tree)])
    assert "1 unfinished convert folder" in listing.output and "source missing or changed" in listing.output

    result = CliRunner().invoke(main, _generate_cli(tree, "tiny15", tmp_path / "b")[3:])
    assert result.exit_code == 0, result.output
    assert "converted tiny15.safetensors" in result.output
    assert not list(onnx.glob(".tiny15-*.partial-*"))
    old, new = sorted(_entries(tree), key=lambda e: e.source_present)
    assert not old.source_present and new.source_present
    assert new.record["sha256"] == sha256_file(path) != old.record["sha256"]

    dry = CliRunner().invoke(main, ["cache", "prune", "--data-dir", str(tree), "--missing-source"])
    assert dry.exit_code == 1 and f"would remove {old.path.name}" in dry.output and old.path.is_dir()
    done = CliRunner().invoke(main, ["cache", "prune", "--data-dir", str(tree), "--missing-source", "--yes"])
    assert done.exit_code == 0 and not old.path.exists() and new.path.is_dir()


# ------------------------------------------------------------------------------------------ external VAEs


def _save_vae(vae, path, layout="original"):
    from converters.original_layout import _vae
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = _vae(vae) if layout == "original" else vae.state_dict()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def test_vae_changes_the_image_exactly_as_diffusers_with_that_vae(tree):
    """--vae NAME: a VAE file from models/VAE (original layout) is converted once on its own and decodes in
    place of the model's; the image equals diffusers' pipeline built from the checkpoint with that VAE (same
    initial noise, Euler Karras), within TIGHT (2 levels max, 0.05 mean: fp32 graphs against torch, as the
    LoRA tests). `Automatic` picks MODEL.vae.safetensors beside the checkpoint, `None` the model's own."""
    import diffusers
    from test_lora import TIGHT
    from tiny_models import make_pipeline
    from torch_reference import diffusers_images

    from converters.checkpoint import load_state_dict
    from converters.single_file import detect, load_components
    from sdonnx import GenerationRequest, Pipeline

    other = make_pipeline("sd1", seed=2).vae
    vae_file = _save_vae(other, tree / "models" / "VAE" / "tinyvae.safetensors")
    pipe = Pipeline.load("tiny15", provider="cpu", data_dir=tree)
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    settings = dict(steps=3, cfg_scale=5.0, sampler="Euler", scheduler="Karras", seed=1, latents=noise, width=64,
                    height=64)
    ours = pipe.generate("a cat", "ugly", vae="tinyvae.safetensors", **settings)
    own = pipe.generate("a cat", "ugly", vae="None", **settings)

    state = load_state_dict(pipe.checkpoint)
    parts = load_components(state, detect(state), prediction="epsilon")
    reference = diffusers.StableDiffusionPipeline(
        vae=other.eval(), text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=diffusers.EulerDiscreteScheduler.from_config(parts["scheduler_config"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    sched = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config, use_karras_sigmas=True,
                                                         timestep_spacing="linspace")
    want = diffusers_images(reference, sched, "a cat", "ugly", noise, 3, 5.0).astype(np.int16)
    diff = np.abs(np.asarray(ours.images[0]).astype(np.int16) - want[0])
    assert diff.max() <= TIGHT["max"] and diff.mean() <= TIGHT["mean"], (diff.max(), diff.mean())
    assert np.abs(np.asarray(own.images[0]).astype(np.int16) - want[0]).mean() > 10 * TIGHT["mean"]

    digest = sha256_file(vae_file)
    assert f"VAE hash: {digest[:10]}, VAE: tinyvae.safetensors" in ours.infotext
    assert "VAE" not in own.infotext
    assert GenerationRequest.from_infotext(ours.infotext).vae.vae == "tinyvae.safetensors"

    # Automatic: the VAE beside the checkpoint (the same file: one cache entry serves both names)
    beside = Path(pipe.checkpoint).with_name("tiny15.vae.safetensors")
    beside.write_bytes(vae_file.read_bytes())
    auto = pipe.generate("a cat", "ugly", **settings)
    assert np.array_equal(np.asarray(auto.images[0]), np.asarray(ours.images[0]))
    assert "VAE: tiny15.vae.safetensors" in auto.infotext
    assert len([e for e in _entries(tree) if e.kind == "vae"]) == 1

    # the same VAE in diffusers' layout (as sdxl-vae-fp16-fix ships it) reads as the same weights
    from converters.vae import vae_state

    diffusers_file = _save_vae(other, tree / "models" / "VAE" / "tinyvae-diffusers.safetensors", layout="diffusers")
    original, same = vae_state(load_state_dict(vae_file)), vae_state(load_state_dict(diffusers_file))
    assert original.keys() == same.keys() and all(torch.equal(original[k], same[k]) for k in original)

    # a VAE for the other latent space is refused before anything converts, with the reason
    _save_vae(other, tree / "models" / "VAE" / "sdxl_vae.safetensors")
    with pytest.raises(ValueError, match=r"VAE sdxl_vae.safetensors is an SDXL VAE; tiny15 is an SD 1.x/2.x model"):
        pipe.generate("a cat", vae="sdxl_vae.safetensors", **settings)
    with pytest.raises(ValueError, match=r"VAE 'nope' not found; choose Automatic, None, .*tinyvae.safetensors"):
        pipe.generate("a cat", vae="nope", **settings)


def test_an_sd_vae_on_sdxl_is_refused_with_the_reason():
    from types import SimpleNamespace

    from sdonnx.vae import check_space, vae_family

    xl = SimpleNamespace(family="sdxl", name="sd_xl_base_1.0")
    with pytest.raises(ValueError, match=r"is an SD 1.x/2.x VAE; sd_xl_base_1.0 is an SDXL model .*cannot decode"):
        check_space(vae_family(Path("vae-ft-mse-840000-ema-pruned.safetensors")), "vae-ft-mse", xl)
    check_space(vae_family(Path("sdxl-vae-fp16-fix.safetensors")), "fix", xl)  # fits
    assert vae_family(Path("anything.vae.pt"), beside_family="sdxl") == "sdxl"


# ------------------------------------------------------------------------------------------ upscalers


def test_an_upscaler_file_in_the_data_folder_converts_on_first_use(tree):
    """models/RealESRGAN/realesr-general-x4v3.pth as A1111 downloads it, not converted: with a data folder the
    upscaler converts once into the cache (kind postprocess) and upscales as A1111's tiled loop on the torch
    module does (1 level: uint8 rounding of fp32 graphs against torch); the next lookup converts nothing."""
    from upscaler_reference import SRVGGNetCompact, a1111_model_upscale, randomize

    from sdonnx.datadir import model_cache
    from sdonnx.postprocess.upscale import Upscalers, upscaler_folders
    from sdonnx.runtime.providers import plan

    module = randomize(SRVGGNetCompact(8, 1, 4), 5)
    (tree / "models" / "RealESRGAN").mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), tree / "models" / "RealESRGAN" / "realesr-general-x4v3.pth")
    folders = upscaler_folders(tree / "models")
    with pytest.raises(ValueError, match="not converted yet"):  # without a data folder's cache: as before
        Upscalers(folders, plan("cpu")).get("R-ESRGAN General 4xV3")
    upscaler = Upscalers(folders, plan("cpu"), cache=model_cache(DataDir(tree))).get("R-ESRGAN General 4xV3")
    (entry,) = [e for e in _entries(tree) if e.kind == "postprocess"]
    assert upscaler.folder == entry.path
    image = __import__("PIL.Image").Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8))
    ours = np.asarray(upscaler.do_upscale(image, 4)).astype(np.int16)
    want = np.asarray(a1111_model_upscale(module, image)).astype(np.int16)
    assert ours.shape == want.shape and np.abs(ours - want).max() <= 1
    made = entry.path.stat().st_mtime_ns
    again = Upscalers(folders, plan("cpu"), cache=model_cache(DataDir(tree))).get("R-ESRGAN General 4xV3")
    assert again.folder == entry.path and entry.path.stat().st_mtime_ns == made


def test_a_controlnet_file_in_the_data_folder_converts_on_first_use(tree):
    """models/ControlNet/control_tiny.pth (original layout), not converted: with the data folder a unit naming it
    has it converted once into the cache; without one, the message says how to convert it, as before."""
    import tiny_controlnet
    from PIL import Image
    from tiny_models import make_pipeline

    from sdonnx import Pipeline
    from sdonnx.controlnet.model import ControlNetError, Library
    from sdonnx.datadir import model_cache

    folder = tree / "models" / "ControlNet"
    folder.mkdir(parents=True, exist_ok=True)
    tiny_controlnet.save(tiny_controlnet.make(make_pipeline("sd1").unet, seed=3), folder / "control_tiny.pth",
                         "original")
    with pytest.raises(ControlNetError, match="is not converted yet"):
        Library((folder,)).find("control_tiny")
    pipe = Pipeline.load("tiny15", provider="cpu", data_dir=tree)
    hint = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8))
    result = pipe.generate("a cat", steps=2, width=64, height=64, seed=1,
                           controlnet=[dict(model="control_tiny", image=hint, weight=0.8)])
    (entry,) = [e for e in _entries(tree) if e.kind == "controlnet"]
    assert Library((folder,), cache=model_cache(DataDir(tree))).find("control_tiny") == entry.path
    assert "ControlNet 0: " in result.infotext and "control_tiny" in result.infotext


# ------------------------------------------------------------------------------------------ the server

V_CONFIG = ("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n"
            "    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n")


def test_serve_lists_as_a1111_converts_on_first_request_and_reports_progress(tree):
    """A second checkpoint (SD 2.x, a .ckpt, with v2-inference-v.yaml renamed beside it) is listed unconverted;
    the first txt2img on it converts it as a worker job that /progress shows while it runs, then generates."""
    import threading

    import httpx
    from test_server import API, LiveServer

    from sdonnx.server import create_app

    sd = tree / "models" / "Stable-diffusion"
    _checkpoint(sd / "tiny21v.ckpt", family="sd2")
    (sd / "tiny21v.yaml").write_text(V_CONFIG)
    app = create_app(None, provider="cpu", data_dir=tree)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=600) as client:
        listed = {m["model_name"]: m for m in client.get(f"{API}/sd-models").json()}
        assert set(listed) == {"sub_tiny15", "tiny21v"}
        assert listed["tiny21v"] == {"title": "tiny21v.ckpt", "model_name": "tiny21v", "hash": None, "sha256": None,
                                     "filename": str(sd / "tiny21v.ckpt"), "config": str(sd / "tiny21v.yaml")}
        assert listed["sub_tiny15"]["title"] == f"sub/tiny15.safetensors [{listed['sub_tiny15']['hash']}]"
        assert [s["name"] for s in client.get(f"{API}/prompt-styles").json()] == ["framed"]
        vaes = [v["model_name"] for v in client.get(f"{API}/sd-vae").json()]
        assert vaes == ["sdxl_vae.safetensors", "tiny15.vae.safetensors", "tinyvae-diffusers.safetensors",
                        "tinyvae.safetensors"], vaes

        answer = {}
        payload = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1,
                   "override_settings": {"sd_model_checkpoint": "tiny21v"}}
        worker = threading.Thread(target=lambda: answer.update(r=client.post(f"{API}/txt2img", json=payload)))
        worker.start()
        seen = []
        while worker.is_alive():
            progress = client.get(f"{API}/progress").json()
            if progress["state"]["job"] == "convert":
                seen.append(progress)
            time.sleep(0.2)
        worker.join()
        r = answer["r"]
        assert r.status_code == 200, r.text
        assert seen and any("converting tiny21v.ckpt" in (p["textinfo"] or "") for p in seen), seen[:3]
        assert any(p["state"]["sampling_steps"] >= 10 for p in seen)  # the stages of the convert
        info = json.loads(r.json()["info"])
        digest = sha256_file(sd / "tiny21v.ckpt")
        assert info["sd_model_name"] == "tiny21v" and info["sd_model_hash"] == digest[:10]
        listed = {m["model_name"]: m for m in client.get(f"{API}/sd-models").json()}
        assert listed["tiny21v"]["title"] == f"tiny21v.ckpt [{digest[:10]}]"

        # sd_vae as A1111's setting: a VAE of the model's latent space is used and named; another is refused
        vae = {**payload, "override_settings": {"sd_model_checkpoint": "tiny21v", "sd_vae": "tinyvae.safetensors"}}
        r = client.post(f"{API}/txt2img", json=vae)
        info = json.loads(r.json()["info"])
        vae_hash = sha256_file(tree / "models" / "VAE" / "tinyvae.safetensors")[:10]
        assert (info["sd_vae_name"], info["sd_vae_hash"]) == ("tinyvae.safetensors", vae_hash)
        assert f"VAE hash: {vae_hash}, VAE: tinyvae.safetensors" in info["infotexts"][0]
        vae["override_settings"]["sd_vae"] = "sdxl_vae.safetensors"
        r = client.post(f"{API}/txt2img", json=vae)
        assert r.status_code == 422 and "sdxl_vae.safetensors is an SDXL VAE" in r.json()["detail"], r.text
    from sdonnx.manifest import load_manifest

    (entry,) = [e for e in _entries(tree) if e.source.endswith("tiny21v.ckpt")]
    assert load_manifest(entry.path).prediction_type == "v_prediction"  # from the yaml beside the file
    assert entry.record["options"] == {"family": "sd2", "prediction": "v_prediction"}
