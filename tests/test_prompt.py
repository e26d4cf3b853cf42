"""A1111 prompt language without a model: parser examples from A1111's docs, tokenizer identity with
transformers' CLIPTokenizer, chunking rules, textual-inversion files (and a refused malicious one)."""
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sdonnx.prompt import ExtraNetwork, extract_networks, parse_attention, schedule, split_and
from sdonnx.prompt.conditioning import tokenize_line
from sdonnx.text.tokenizer import ClipTokenizer

TOKENIZER_JSON = Path(__file__).resolve().parents[1] / "sdonnx" / "data" / "clip" / "tokenizer.json"


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer(TOKENIZER_JSON, SimpleNamespace(bos_id=49406, eos_id=49407, pad_id=49407, max_length=77))


# ------------------------------------------------------------------ parse_attention (A1111 docstring)

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("(x: 1.5 )", [("x", 1.5)]),
    ("a) b] \\\\", [("a) b] \\", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_attention(text, expected):
    assert parse_attention(text) == expected


# ------------------------------------------------------------------ schedule (A1111 doctests, 10 steps)

@pytest.mark.parametrize("text, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    # beyond the doctests, checked against A1111's lark grammar
    ("a | b [c:3]", [(10, "a | b [c:3]")]),  # a stray | makes the whole prompt literal
    ("[a:b:1e1]", [(10, "a")]),
    ("[a:b:2.5]", [(10, "a")]),  # a decimal is a fraction of the steps, capped at the last step
    ("[a:b:0]", [(10, "b")]),
    ("[[a:b:2]|c]", [(1, "a"), (2, "c"), (3, "b"), (4, "c"), (5, "b"), (6, "c"), (7, "b"), (8, "c"), (9, "b"), (10, "c")]),
    ("[a|b]:3]", [(i, ("a" if i % 2 else "b") + ":3]") for i in range(1, 11)]),
    ("[a:1]):2", [(10, "[a:1]):2")]),  # lark prefers the literal reading here
    ("[a:1]) x", [(1, ") x"), (10, "a) x")]),
])
def test_schedule(text, expected):
    assert schedule(text, 10) == expected


def test_schedule_doc_example_100_steps():
    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful")]


# A1111's hires doctests: get_learned_conditioning_prompt_schedules([p], 10, 10), the hires pass of a job
# whose first pass took 10 steps
@pytest.mark.parametrize("text, expected", [
    ("a [b:.5] c", [(10, "a b c")]),
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [b:15] c", [(5, "a  c"), (10, "a b c")]),  # a step number goes on counting from the first pass's end
    ("a [b:c:8] d", [(10, "a c d")]),
    ("[a|b]", [(i, "a" if i % 2 else "b") for i in range(1, 11)]),
])
def test_schedule_hires_pass(text, expected):
    assert schedule(text, 10, first_pass_steps=10) == expected


def test_total_steps_counts_model_calls_as_a1111():
    from sdonnx.samplers import SAMPLER_INFO

    # A1111 v1.10 sd_samplers_kdiffusion: second_order on Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, Restart
    doubled = {name for name, info in SAMPLER_INFO.items() if info.total_steps(7) == 14}
    assert doubled == {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}
    assert all(info.total_steps(7) in (7, 14) for info in SAMPLER_INFO.values())


def test_split_and_and_networks():
    assert split_and("a cat AND a dog :1.2 AND x:-0.5") == [("a cat", 1.0), (" a dog", 1.2), (" x", -0.5)]
    assert split_and("ANDROID") == [("ANDROID", 1.0)]
    text, nets = extract_networks("a <lora:detail:0.7> cat <lora:x:1:0.5><hypernet:h:1> <lora:y:te=0.5>")
    assert text == "a  cat  "
    assert nets == [ExtraNetwork("lora", "detail", ("0.7",)), ExtraNetwork("lora", "x", ("1", "0.5")),
                    ExtraNetwork("hypernet", "h", ("1",)), ExtraNetwork("lora", "y", ("te=0.5",))]


# ------------------------------------------------------------------ tokenizer identity with transformers

CORPUS = [
    "a photo of an astronaut riding a horse on mars",
    "Café déjà vu, naïve façade — 東京タワー, 🚀🔥, ünïcödé",
    "masterpiece, best quality, (ultra-detailed:1.2), 8k, 1girl, solo!!!  ...  ?? $100 #tag @user",
    "numbers 1234567890 3.14159 1,000,000 2nd 21st 100% 4k/8k",
    "  leading and   trailing   whitespace \n new\tline  ",
    "don't can't won't it's y'all O'Neil",
    "UPPER lower MiXeD",
    ", ".join(f"word{i}" for i in range(120)),
    "",
]


@pytest.mark.parametrize("fast", [False, True])
def test_tokenizer_matches_transformers(tok, fast):
    transformers = pytest.importorskip("transformers")
    if fast:
        ref = transformers.CLIPTokenizerFast(tokenizer_file=str(TOKENIZER_JSON))
    else:
        vocab, merges = _vocab_merges()
        ref = transformers.CLIPTokenizer(vocab, merges)
    for text in CORPUS:
        assert tok.encode(text) == ref(text, add_special_tokens=False, truncation=False)["input_ids"], text


def _vocab_merges():
    import json
    import tempfile

    data = json.loads(TOKENIZER_JSON.read_text())
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = data["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


# ------------------------------------------------------------------ chunks

def test_short_prompt_is_one_chunk_like_diffusers(tok):
    (chunk,) = tokenize_line("a red circle", tok)
    ids = tok.encode("a red circle")
    assert chunk.ids == [49406, *ids, *[49407] * (76 - len(ids))]
    assert chunk.weights == [1.0] * 77


def test_long_prompt_backtracks_to_comma_and_break_starts_chunk(tok):
    words = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    chunks = tokenize_line(words, tok)
    assert len(chunks) == 2
    comma = tok.comma_id
    assert chunks[0].ids[71] == comma and chunks[0].ids[72:] == [49407] * 5  # cut after the comma
    assert chunks[1].ids[1:11] == tok.encode("dog") * 10
    far = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 40)  # comma 24 tokens back: no backtracking
    assert tokenize_line(far, tok)[0].ids[52:76] == tok.encode("dog") * 24
    broken = tokenize_line("a BREAK (b:1.5)", tok)
    assert len(broken) == 2 and broken[1].ids[1] == tok.encode("b")[0] and broken[1].weights[1] == 1.5
    assert all(len(c.ids) == 77 and len(c.weights) == 77 for c in chunks + broken)


# ------------------------------------------------------------------ textual inversion files

def _save(obj, path):
    torch = pytest.importorskip("torch")
    torch.save(obj, path)
    return path


def test_embedding_formats(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from sdonnx.adapters.textual_inversion import load_embedding

    vec = torch.randn(3, 64)
    a1111 = _save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_()},
                   "name": "x", "step": 10}, tmp_path / "a1111.pt")
    diffusers_bin = _save({"<tok>": vec[0].clone()}, tmp_path / "single.bin")
    save_file({"emb_params": vec.clone()}, str(tmp_path / "kohya.safetensors"))
    np.testing.assert_array_equal(load_embedding(a1111).vectors, vec.numpy())
    assert load_embedding(a1111).name == "a1111"
    np.testing.assert_array_equal(load_embedding(diffusers_bin).vectors, vec[:1].numpy())
    np.testing.assert_array_equal(load_embedding(tmp_path / "kohya.safetensors").vectors, vec.numpy())


class _Payload:
    def __reduce__(self):
        import os

        return os.system, (f"touch {_Payload.marker}",)


def test_malicious_embedding_is_refused_and_never_runs(tmp_path):
    import pickle

    from sdonnx.adapters.textual_inversion import EmbeddingError, load_embedding

    _Payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:  # torch's zip layout with a code-running pickle inside
        zf.writestr("evil/data.pkl", pickle.dumps({"string_to_param": {"*": _Payload()}}, protocol=2))
        zf.writestr("evil/version", "3\n")
    with pytest.raises(EmbeddingError, match="refusing to load .*system"):
        load_embedding(path)
    assert not _Payload.marker.exists()
