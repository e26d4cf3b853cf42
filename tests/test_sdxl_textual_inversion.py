"""Textual inversion on SDXL: a file with `clip_l` and `clip_g` parts, each spliced into its own text
encoder (A1111's behaviour), against diffusers' documented SDXL recipe (load_textual_inversion once per
text encoder and tokenizer); embeddings of the other layout are skipped and named when a prompt uses them.

Tolerance as in test_sdxl.py: Euler + Karras (linspace) against diffusers, max 2 / mean 0.05 in 8-bit
pixel units.
"""
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402
from test_parity import NEGATIVE, STEPS, TIGHT, _compare, _noise, _scheduler  # noqa: E402
from test_sdxl import CFG, EULER  # noqa: E402
from torch_reference import diffusers_images  # noqa: E402

from sdonnx import Pipeline  # noqa: E402
from sdonnx.adapters.textual_inversion import (EmbeddingDatabase, EmbeddingError, embedding_parts,  # noqa: E402
                                               load_embedding)
from sdonnx.prompt.conditioning import tokenize_line  # noqa: E402

NAME = "shinything"
PROMPT = f"a {NAME} circle on a blue background"


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    _, torch_pipe, folder = tiny_sdxl("base")
    return torch_pipe, folder


def _sdxl_state(torch_pipe, seed=3):
    """Two random vectors per part, as wide as the tiny encoders' token embeddings."""
    g = torch.Generator().manual_seed(seed)
    return {part: torch.randn(2, encoder.config.hidden_size, generator=g) * 0.5
            for part, encoder in (("clip_l", torch_pipe.text_encoder), ("clip_g", torch_pipe.text_encoder_2))}


def _embeddings_folder(tmp_path, torch_pipe):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    state = _sdxl_state(torch_pipe)
    save_file(state, str(folder / f"{NAME}.safetensors"))
    return folder, state


class _diffusers_embedding:
    """The diffusers SDXL recipe: each part loaded into its encoder under the same token; unloaded after."""

    def __init__(self, torch_pipe, state):
        self.pipe, self.state = torch_pipe, state
        self.pairs = {"clip_l": (torch_pipe.text_encoder, torch_pipe.tokenizer),
                      "clip_g": (torch_pipe.text_encoder_2, torch_pipe.tokenizer_2)}

    def __enter__(self):
        for part, (encoder, tokenizer) in self.pairs.items():
            self.pipe.load_textual_inversion(self.state[part], token=NAME, text_encoder=encoder, tokenizer=tokenizer)

    def __exit__(self, *exc):
        tokens = [NAME] + [f"{NAME}_{i}" for i in range(1, len(self.state["clip_l"]))]
        for encoder, tokenizer in self.pairs.values():
            self.pipe.unload_textual_inversion(tokens=tokens, text_encoder=encoder, tokenizer=tokenizer)


def test_sdxl_embedding_matches_diffusers(base, tmp_path):
    torch_pipe, folder = base
    embeddings, state = _embeddings_folder(tmp_path, torch_pipe)
    pipe = Pipeline.load(folder, provider="cpu", embeddings_dir=embeddings)
    latents = _noise(pipe, 1, pipe.manifest.native_size)
    run = dict(steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="Karras", seed=1, latents=latents)
    result = pipe.generate(PROMPT, NEGATIVE, **run)
    assert f'TI hashes: "{NAME}: {pipe.embeddings.embeddings[NAME].shorthash}"' in result.infotext
    plain = pipe.generate(PROMPT.replace(f"{NAME} ", ""), NEGATIVE, **run)
    cond, _ = pipe.encode_prompts(PROMPT, NEGATIVE)
    _, conds = cond.at(0)
    with _diffusers_embedding(torch_pipe, state):
        with torch.no_grad():
            c, _, pc, _ = torch_pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True,
                                                   negative_prompt=NEGATIVE)
        ref = diffusers_images(torch_pipe, _scheduler(torch_pipe, "EulerDiscreteScheduler", **EULER), PROMPT,
                               NEGATIVE, latents, STEPS, CFG)
    np.testing.assert_allclose(conds[0][0].context, c[0].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(conds[0][0].added["text_embeds"], pc[0].numpy(), atol=1e-4, rtol=1e-4)
    _compare(result.images, ref, TIGHT, "sdxl textual inversion vs diffusers load_textual_inversion (both encoders)")
    changed = np.abs(np.asarray(plain.images[0], np.int16) - ref[0].astype(np.int16)).mean()
    assert changed > 1, "the embedding should change the image"


def test_sd1_embedding_on_sdxl_is_skipped_and_named(base, tmp_path, caplog):
    torch_pipe, folder = base
    embeddings, _ = _embeddings_folder(tmp_path, torch_pipe)
    # as wide as the tiny CLIP-L, but one tensor: made for SD 1.x, not for SDXL's two encoders
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}, "name": "oldstyle"}, embeddings / "oldstyle.pt")
    pipe = Pipeline.load(folder, provider="cpu", embeddings_dir=embeddings)
    with caplog.at_level(logging.WARNING, logger="sdonnx.adapters.textual_inversion"):
        result = pipe.generate(PROMPT, NEGATIVE, steps=2, cfg_scale=CFG, seed=1)
    assert result.images and '"shinything: ' in result.infotext and "oldstyle" not in result.infotext
    reason = r"'oldstyle'.*has vectors 64 wide; this model's text encoders take clip_l vectors 64 wide and " \
             r"clip_g vectors 128 wide \(an embedding made for another model family"
    assert any("skipping embedding 'oldstyle'" in r.getMessage() for r in caplog.records)
    assert set(pipe.embeddings.skipped) == {"oldstyle"} and set(pipe.embeddings.embeddings) == {NAME}
    with pytest.raises(ValueError, match=reason):
        pipe.encode_prompts("an oldstyle circle", NEGATIVE, steps=2)


def test_sdxl_embedding_on_one_encoder_model_is_skipped_and_named(base, tmp_path):
    torch_pipe, folder = base
    embeddings, _ = _embeddings_folder(tmp_path, torch_pipe)
    tokenizer = Pipeline.load(folder, provider="cpu").tokenizer
    db = EmbeddingDatabase(embeddings, tokenizer, widths={None: 64})  # what an SD 1.x model as wide gives
    db.refresh()
    assert set(db.skipped) == {NAME} and not db.embeddings
    with pytest.raises(EmbeddingError, match=r"'shinything'.*has clip_l vectors 64 wide and clip_g vectors 128 "
                                             r"wide; this model's text encoder takes vectors 64 wide"):
        tokenize_line(PROMPT, tokenizer, db)
    assert tokenize_line("a circle", tokenizer, db)[0].fixes == []


def test_sdxl_embedding_files_and_parts(base, tmp_path):
    torch_pipe, _ = base
    state = _sdxl_state(torch_pipe)
    save_file(state, str(tmp_path / "a.safetensors"))
    torch.save(state, tmp_path / "b.pt")  # the same layout pickled (read without running code)
    for path in (tmp_path / "a.safetensors", tmp_path / "b.pt"):
        embedding = load_embedding(path)
        assert embedding.num_vectors == 2 and embedding.widths == {"clip_l": 64, "clip_g": 128}
        for part in ("clip_l", "clip_g"):
            np.testing.assert_array_equal(embedding.vectors_for(part, state[part].shape[1]), state[part].numpy())
    assert embedding_parts(["text_encoder", "text_encoder_2"]) == ["clip_l", "clip_g"]
    assert embedding_parts(["text_encoder_2"]) == ["clip_g"]  # the refiner: bigG only
    assert embedding_parts(["text_encoder"]) == [None]
    save_file({"clip_l": state["clip_l"], "clip_g": state["clip_g"][:1].contiguous()}, str(tmp_path / "c.safetensors"))
    with pytest.raises(EmbeddingError, match="different numbers of vectors"):
        load_embedding(tmp_path / "c.safetensors")
