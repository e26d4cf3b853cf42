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


def _spy_contexts(monkeypatch):
    """The cond context of every UNet call (batch [uncond, cond, ...]), in call order."""
    from sdonnx.runtime.components import UNet

    contexts, run = [], UNet.__call__
    monkeypatch.setattr(UNet, "__call__", lambda self, x, t, c: contexts.append(np.array(c)) or run(self, x, t, c))
    return contexts


def _which(pipe, contexts, index=1):
    """Name each call's context ("cat", "dog") by comparing with the plain prompts' encodings."""
    known = {name: pipe.encode_prompts(f"a {name}", "", guidance=False)[0].at(0)[1][0][0] for name in ("cat", "dog")}
    return [next((n for n, z in known.items() if np.allclose(c[index], z, atol=1e-6)), "?") for c in contexts]


@pytest.mark.parametrize("sampler, calls", [("Euler", 6), ("Heun", 11)])
def test_prompt_editing_switches_at_a1111_step(sd1, sampler, calls, monkeypatch):
    _, folder = sd1
    pipe = Pipeline.load(folder, provider="cpu")
    contexts = _spy_contexts(monkeypatch)
    result = pipe.generate("a [cat:dog:3] AND sky :0.5", "blurry", steps=6, cfg_scale=5.0, sampler=sampler, seed=1)
    assert len(contexts) == calls and "Steps: 6," in result.infotext
    # batch [uncond, cond AND-part 1, part 2]; A1111 counts denoiser calls from 0 and switches after call 3:
    # a step number counts model calls, so with Heun (2 calls a step) that is after its second step
    assert _which(pipe, contexts) == ["cat" if i <= 3 else "dog" for i in range(calls)]
    assert all(c.shape[0] == 3 for c in contexts)


# A1111 schedules prompts over SamplerData.total_steps: 2 model calls a step for its second-order samplers
SECOND_ORDER = ["Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"]


@pytest.mark.parametrize("sampler", [*SECOND_ORDER, "Euler", "DPM++ 2M", "LMS"])
def test_prompt_editing_fraction_counts_model_calls(sd1, sampler, monkeypatch):
    """[cat:dog:0.5] over 4 steps: A1111 switches after call int(0.5 * total_steps(4)), i.e. after call 4
    of 8 for second-order samplers (2 per step), after call 2 for the others."""
    _, folder = sd1
    pipe = Pipeline.load(folder, provider="cpu")
    contexts = _spy_contexts(monkeypatch)
    pipe.generate("a [cat:dog:0.5]", steps=4, cfg_scale=5.0, sampler=sampler, seed=1)
    switch = 4 if sampler in SECOND_ORDER else 2
    seen = _which(pipe, contexts)
    assert seen == ["cat" if i <= switch else "dog" for i in range(len(contexts))], seen
    assert "dog" in seen


def test_prompt_alternation_alternates_every_model_call_of_heun(sd1, monkeypatch):
    _, folder = sd1
    pipe = Pipeline.load(folder, provider="cpu")
    contexts = _spy_contexts(monkeypatch)
    pipe.generate("a [cat|dog]", steps=3, cfg_scale=5.0, sampler="Heun", seed=1)
    # entries end at calls 1..6 (cat, dog, cat, ...); call i takes the first entry ending at or after i
    assert _which(pipe, contexts) == ["cat", "cat", "dog", "cat", "dog"]


@pytest.mark.parametrize("prompt, first, second", [
    ("a [cat:dog:1.5]", ["cat"] * 4, ["cat"] * 3 + ["dog"]),  # a fraction past 1: into the hires pass
    ("a [cat:dog:6]", ["cat"] * 4, ["cat"] * 3 + ["dog"]),  # step 6 = call 2 of the hires pass (4 + 2)
    ("a [cat:dog:0.5]", ["cat"] * 3 + ["dog"], ["dog"] * 4),  # done in the first pass: "to" throughout
])
def test_hires_pass_continues_the_prompt_editing_timeline(sd1, prompt, first, second, monkeypatch):
    """A1111 >= 1.6 encodes the hires pass's prompt with the first pass's steps as offset: a step number n
    is call n - first_pass_steps of the hires pass, a fraction f is (f - 1) of the hires steps."""
    _, folder = sd1
    pipe = Pipeline.load(folder, provider="cpu")
    contexts = _spy_contexts(monkeypatch)
    pipe.generate(prompt, steps=4, cfg_scale=5.0, sampler="Euler", seed=1, width=64, height=64, hires=True,
                  hires_scale=1.5, hires_steps=4, hires_denoising=1.0)
    assert _which(pipe, contexts) == first + second


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
