import hashlib
import struct

import numpy as np
import pytest

from sdonnx.infotext import (
    addnet_hash,
    format_infotext,
    model_hash,
    parse_hashes,
    parse_infotext,
    short_hash,
)

# The example line of REFERENCE.md's infotext section, with a concrete Version.
A1111_EXAMPLE = (
    "a photo of a cat, (masterpiece:1.2)\n"
    "on a sofa\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    'Hires upscale: 2, Hires steps: 12, Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1'
)


def test_a1111_example_parses_to_its_keys():
    res = parse_infotext(A1111_EXAMPLE)
    assert res["Prompt"] == "a photo of a cat, (masterpiece:1.2)\non a sofa"
    assert res["Negative prompt"] == "blurry, lowres"
    assert res["Steps"] == "20"
    assert res["Sampler"] == "DPM++ 2M"
    assert res["Schedule type"] == "Karras"
    assert res["CFG scale"] == "7"
    assert res["Seed"] == "1234"
    assert (res["Size"], res["Size-1"], res["Size-2"]) == ("512x768", "512", "768")
    assert res["Model hash"] == "6ce0161689"
    assert res["Model"] == "v1-5-pruned-emaonly"
    assert res["Denoising strength"] == "0.45"
    assert res["Clip skip"] == "2"
    assert res["Hires upscale"] == "2"
    assert res["Hires steps"] == "12"
    assert res["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert res["TI hashes"] == "EasyNegative: c74b4e810b03"
    assert res["Version"] == "v1.10.1"
    assert parse_hashes(res["Lora hashes"]) == {"add_detail": "7c6bad76eb54"}


def test_format_writes_the_a1111_example():
    params = {
        # given out of order on purpose: known keys go first in A1111's order, Version last
        "Version": "v1.10.1",
        "Hires upscale": 2.0,
        "Hires steps": 12,
        "Lora hashes": {"add_detail": "7c6bad76eb54"},
        "TI hashes": "EasyNegative: c74b4e810b03",
        "Clip skip": 2,
        "Denoising strength": 0.45,
        "Model": "v1-5-pruned-emaonly",
        "Model hash": "6ce0161689",
        "Size": (512, 768),
        "Seed": 1234,
        "CFG scale": 7.0,
        "Schedule type": "Karras",
        "Sampler": "DPM++ 2M",
        "Steps": 20,
    }
    text = format_infotext("a photo of a cat, (masterpiece:1.2)\non a sofa", "blurry, lowres", params)
    assert text == A1111_EXAMPLE


def test_round_trip_gives_back_values_as_strings():
    params = {
        "Steps": 30, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 4294967295, "Size": "640x448",
        "Model hash": "0123456789", "Variation seed": 5, "Variation seed strength": 0.3,
        "Seed resize from": (512, 512), "ENSD": 31337, "RNG": "CPU", "Tiling": True,
        "Mask blur": 4, "Hires prompt": "a, b: c\nd", "Emphasis": "No norm", "Version": "sdonnx 0.1.0",
    }
    res = parse_infotext(format_infotext("line one\nline two", "neg\nmore", params))
    assert res["Prompt"] == "line one\nline two"
    assert res["Negative prompt"] == "neg\nmore"
    expected = {
        "Steps": "30", "Sampler": "Euler a", "CFG scale": "7.5", "Seed": "4294967295", "Size": "640x448",
        "Size-1": "640", "Size-2": "448", "Model hash": "0123456789", "Variation seed": "5",
        "Variation seed strength": "0.3", "Seed resize from": "512x512", "Seed resize from-1": "512",
        "Seed resize from-2": "512", "ENSD": "31337", "RNG": "CPU", "Tiling": "True", "Mask blur": "4",
        "Hires prompt": "a, b: c\nd", "Emphasis": "No norm", "Version": "sdonnx 0.1.0",
    }
    assert {k: v for k, v in res.items() if k not in ("Prompt", "Negative prompt")} == expected


def test_values_with_comma_colon_or_newline_are_json_quoted():
    params = {"Steps": 1, "Seed": 2, "Ka": "x, y", "Kb": "k: v", "Kc": "l\nm", "Kd": "plain"}
    text = format_infotext("p", "", params)
    last = text.split("\n")[-1]
    assert last == 'Steps: 1, Seed: 2, Ka: "x, y", Kb: "k: v", Kc: "l\\nm", Kd: plain'
    res = parse_infotext(text)
    assert (res["Ka"], res["Kb"], res["Kc"], res["Kd"]) == ("x, y", "k: v", "l\nm", "plain")


def test_quoted_value_with_escaped_quotes_round_trips():
    value = 'say "hi", then: go'
    res = parse_infotext(format_infotext("p", "", {"Steps": 1, "Seed": 2, "Note": value, "Odd": '"q"'}))
    assert res["Note"] == value
    assert res["Odd"] == '"q"'


def test_none_clip_skip_and_tiling_omission_rules():
    params = {
        "Steps": 20, "Seed": 1, "CFG scale": 7, "Face restoration": None, "Clip skip": 1,
        "Tiling": False, "RNG": "GPU", "Denoising strength": None,
    }
    text = format_infotext("p", "", params)
    assert text == "p\nSteps: 20, CFG scale: 7, Seed: 1"
    assert "Clip skip: 2" in format_infotext("p", "", {**params, "Clip skip": 2})
    assert "Tiling: True" in format_infotext("p", "", {**params, "Tiling": True})


def test_negative_prompt_line_omitted_when_empty():
    text = format_infotext("p", "", {"Steps": 20, "Seed": 1, "CFG scale": 7})
    assert "Negative prompt" not in text
    assert parse_infotext(text)["Negative prompt"] == ""


def test_float_formatting_like_a1111():
    text = format_infotext("p", "", {
        "CFG scale": 7.0, "Denoising strength": np.float32(0.45), "Steps": np.int64(20), "Seed": 3, "Eta": 1.0,
    })
    assert text.endswith("Steps: 20, CFG scale: 7, Seed: 3, Denoising strength: 0.45, Eta: 1")


def test_last_line_needs_three_pairs_to_be_parameters():
    res = parse_infotext("a cat\nstyle: oil, mood: calm")
    assert res["Prompt"] == "a cat\nstyle: oil, mood: calm"
    assert "style" not in res
    res = parse_infotext("a cat\nSteps: 20, Seed: 1, CFG scale: 7")
    assert res["Prompt"] == "a cat" and res["Steps"] == "20"


@pytest.mark.parametrize("key", ["Bad:key", "A", "x(y)"])
def test_key_that_would_not_read_back_is_refused(key):
    with pytest.raises(ValueError, match="infotext key"):
        format_infotext("p", "", {key: 1})


def test_model_hash_and_short_hash_match_hashlib(tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytes(range(256)) * 5000  # > 1 MiB chunk, so the streaming path is exercised
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert model_hash(path) == digest[:10]
    assert short_hash(path) == digest[:12]
    assert short_hash(str(path), n=8) == digest[:8]


def test_addnet_hash_skips_the_safetensors_header(tmp_path):
    header = b'{"__metadata__": {"ss_name": "x"}}'
    body = b"\x01\x02" * 1000
    path = tmp_path / "lora.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    assert addnet_hash(path) == hashlib.sha256(body).hexdigest()
