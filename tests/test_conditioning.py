"""Conditioning on the tiny models: A1111's weighted/long-prompt method written plainly in torch,
prompt editing inside the sampling loop, and textual inversion against diffusers."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdonnx import Pipeline  # noqa: E402
from sdonnx.prompt import parse_attention  # noqa: E402


@pytest.fixture(scope="module")
def sd1(tiny_diffusers, tiny_onnx):
    _, torch_pipe = tiny_diffusers("sd1")
    return torch_pipe, tiny_onnx("sd1")


def _a1111_reference(torch_pipe, prompt, clip_skip):
    """A1111's FrozenCLIPEmbedderWithCustomWords for a prompt without commas or embeddings: 75-token
    chunks, start/end tokens, Original emphasis per chunk, clip skip through the final layer norm."""
    tok, enc = torch_pipe.tokenizer, torch_pipe.text_encoder
    ids, weights = [], []
    chunks = []
    for text, weight in parse_attention(prompt):
        if (text, weight) == ("BREAK", -1):
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            if len(ids) == 75:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(t)
            weights.append(weight)
    chunks.append((ids, weights))
    out = []
    with torch.no_grad():
        for ids, weights in chunks:
            pad = 75 - len(ids)
            row = torch.tensor([[49406, *ids, *[49407] * pad, 49407]])
            mult = torch.tensor([1.0, *weights, *[1.0] * pad, 1.0])[None, :, None]
            res = enc(row, output_hidden_states=True)
            z = getattr(enc, "text_model", enc).final_layer_norm(res.hidden_states[-clip_skip]) if clip_skip > 1 else res.last_hidden_state
            mean = z.mean()
            z = z * mult
            out.append(z * (mean / z.mean()))
    return torch.cat(out, dim=1)[0].numpy()


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_weighted_long_prompt_matches_a1111_method(sd1, clip_skip):
    torch_pipe, folder = sd1
    pipe = Pipeline.load(folder, provider="cpu")
    prompt = ("a (red:1.3) circle on a [blue] ((background)) " + " ".join(["tiny star"] * 40)
              + " BREAK (green square:0.7)")
    cond, _ = pipe.encode_prompts(prompt, "", steps=4, clip_skip=clip_skip, guidance=False)
    ours = cond.at(0)[1][0][0]
    ref = _a1111_reference(torch_pipe, prompt, clip_skip)
    assert ours.shape == ref.shape == (77 * 3, 64)
    diff = np.abs(ours - ref).max()
    print(f"clip skip {clip_skip}: max abs diff {diff:.2e} (values up to {np.abs(ref).max():.2f})")
    assert diff < 1e-4


@pytest.mark.parametrize("sampler, calls", [("Euler", 6), ("Heun", 11)])
def test_prompt_editing_switches_at_a1111_step(sd1, sampler, calls, monkeypatch):
    from sdonnx.runtime.components import UNet

    _, folder = sd1
    pipe = Pipeline.load(folder, provider="cpu")
    contexts, run = [], UNet.__call__
    monkeypatch.setattr(UNet, "__call__", lambda self, x, t, c: contexts.append(np.array(c)) or run(self, x, t, c))
    pipe.generate("a [cat:dog:3] AND sky :0.5", "blurry", steps=6, cfg_scale=5.0, sampler=sampler, seed=1)
    assert len(contexts) == calls
    cat, _ = pipe.encode_prompts("a cat", "", steps=6, guidance=False)
    dog, _ = pipe.encode_prompts("a dog", "", steps=6, guidance=False)
    cat, dog = cat.at(0)[1][0][0], dog.at(0)[1][0][0]
    # batch [uncond, cond AND-part 1, part 2]; A1111 counts denoiser calls from 0 and switches after step 3
    seen = ["cat" if np.allclose(c[1], cat, atol=1e-6) else "dog" if np.allclose(c[1], dog, atol=1e-6) else "?"
            for c in contexts]
    # calls past the last end step fall back to the first entry, as A1111's reconstruct_cond_batch does
    # (Heun's extra calls: steps 7..10 see "cat" again)
    assert seen == ["cat" if i <= 3 or i > 6 else "dog" for i in range(calls)]
    assert all(c.shape[0] == 3 for c in contexts)


def test_textual_inversion_matches_diffusers(sd1, tmp_path):
    from test_parity import CFG, STEPS, _compare, _noise, _scheduler  # the parity tests' conventions
    from torch_reference import diffusers_images

    torch_pipe, folder = sd1
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    vec = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)) * 0.5
    torch.save({"string_to_param": {"*": vec}, "name": "shinything"}, embeddings / "shinything.pt")
    pipe = Pipeline.load(folder, provider="cpu", embeddings_dir=embeddings)
    latents = _noise(pipe, 1, pipe.manifest.native_size)
    prompt = "a shinything circle"
    result = pipe.generate(prompt, "blurry", steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras",
                           seed=1, latents=latents)
    assert "TI hashes: \"shinything: " in result.infotext
    plain = pipe.generate("a circle", "blurry", steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras",
                          seed=1, latents=latents)
    torch_pipe.load_textual_inversion({"shinything": vec}, token="shinything")
    try:
        ref = diffusers_images(torch_pipe, _scheduler(torch_pipe, "EulerDiscreteScheduler", use_karras_sigmas=True,
                                                      timestep_spacing="linspace"),
                               prompt, "blurry", latents, STEPS, CFG)
    finally:
        torch_pipe.unload_textual_inversion()
    _compare(result.images, ref, dict(max=2, mean=0.05), "textual inversion vs diffusers load_textual_inversion")
    changed = np.abs(np.asarray(plain.images[0], np.int16) - ref[0].astype(np.int16)).mean()
    assert changed > 1, "the embedding should change the image"


def test_wrong_width_embedding_is_named(sd1, tmp_path):
    _, folder = sd1
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, tmp_path / "bigmodel.pt")
    pipe = Pipeline.load(folder, provider="cpu", embeddings_dir=tmp_path)
    with pytest.raises(ValueError, match=r"'bigmodel'.*768 wide.*64 wide"):
        pipe.encode_prompts("a bigmodel cat", "", steps=2)
