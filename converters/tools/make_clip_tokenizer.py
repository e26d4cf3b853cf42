"""Build sdonnx/data/clip/tokenizer.json from CLIP's public BPE file.

The BPE merges are OpenAI's public CLIP vocabulary (`bpe_simple_vocab_16e6.txt.gz`, shipped in the
open_clip_torch wheel). Run once, by hand, when the data needs re-making:

    pip download --no-deps -d /tmp/oc open-clip-torch && unzip -o -d /tmp/oc /tmp/oc/open_clip_torch-*.whl
    python converters/tools/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

(vocab.json and merges.txt are made on the way; tokenizer.json holds both.) The vocabulary order follows CLIP's own tokenizer: the 256 byte symbols, the same with `</w>`, one entry
per merge, then `<|startoftext|>` and `<|endoftext|>` (49408 ids). tokenizer.json is transformers'
fast-tokenizer serialisation of the same files, read at run time by the `tokenizers` library.
"""
import gzip
import json
import sys
import tempfile
from pathlib import Path

from transformers import CLIPTokenizerFast


def bytes_to_unicode():
    """GPT-2/CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(bpe_path, out_dir):
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizerFast(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="<|endoftext|>")
        tok.save_pretrained(tmp / "fast")
        (out / "tokenizer.json").write_bytes((tmp / "fast" / "tokenizer.json").read_bytes())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else Path(__file__).parents[2] / "sdonnx" / "data" / "clip")
