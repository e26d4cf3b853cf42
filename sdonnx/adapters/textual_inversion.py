"""Textual inversion embeddings (A1111 and diffusers files), used by file name in the prompt.

The vectors are spliced into the numpy token-embedding lookup (`inputs_embeds`) by the prompt stage:
no torch, no re-export. `.pt`/`.bin` are read by the restricted unpickler (no code runs).

SD 1.x/2.x embeddings are one tensor [n, D]; SDXL ones hold two parts, `clip_l` [n, 768] and `clip_g`
[n, 1280], one for each text encoder (both encoders share the CLIP BPE vocabulary, so one name in the
prompt stands for both). An embedding whose layout does not fit the model is skipped, as A1111 does.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..infotext import short_hash
from .torch_pickle import load_torch_file

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pt", ".bin")
# the part of an SDXL embedding each text encoder takes, by its diffusers component name (CLIP-L, OpenCLIP bigG)
SDXL_PARTS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


class EmbeddingError(ValueError):
    """An embedding file that cannot be used (unreadable, unknown layout, wrong width)."""


@dataclass
class Embedding:
    name: str
    vectors: object  # [n, D] float32, or {part: [n, D_part]} for SDXL files (parts "clip_l", "clip_g")
    path: Path = None
    _hash: str = field(default=None, repr=False)

    @property
    def shorthash(self):
        """A1111's `TI hashes` entry: the first 12 hex digits of the file's sha256."""
        if self._hash is None and self.path is not None:
            self._hash = short_hash(self.path)
        return self._hash

    @property
    def num_vectors(self):
        """How many prompt tokens the embedding takes (the same for every part)."""
        return len(next(iter(self.vectors.values())) if isinstance(self.vectors, dict) else self.vectors)

    @property
    def widths(self):
        """{part: width}; part None for a one-tensor embedding."""
        if isinstance(self.vectors, dict):
            return {part: v.shape[1] for part, v in self.vectors.items()}
        return {None: self.vectors.shape[1]}

    def check_fits(self, widths):
        """widths: {part: width} of the model's text encoders (part None: they take one-tensor embeddings).
        Raises EmbeddingError, naming both layouts, when the embedding was made for another model family."""
        mine = self.widths
        if any(mine.get(part) != width for part, width in widths.items()):
            raise EmbeddingError(f"embedding {self.name!r} ({self.path}) has {_layout(mine)}; this model's text "
                                 f"encoder{'s take' if len(widths) > 1 else ' takes'} {_layout(widths)} (an embedding "
                                 f"made for another model family: SD 1.x/2.x files hold one tensor, SDXL files "
                                 f"clip_l and clip_g)")

    def vectors_for(self, part, width):
        """The [n, width] vectors of the text encoder that takes `part` (None: the one tensor)."""
        self.check_fits({part: width})
        return self.vectors[part] if part is not None else self.vectors


def _layout(widths):
    return " and ".join(f"{part + ' ' if part else ''}vectors {width} wide" for part, width in widths.items())


def embedding_parts(components):
    """Text encoder component names -> the embedding part each takes: all None (one-tensor embeddings) for
    SD 1.x/2.x, clip_l / clip_g where the model has a text_encoder_2 (SDXL base; the refiner's only
    encoder is text_encoder_2, bigG, and takes clip_g)."""
    components = list(components)
    if "text_encoder_2" not in components:
        return [None] * len(components)
    return [SDXL_PARTS[c] for c in components]


def load_embedding(path, name=None):
    """An embedding file -> Embedding named after the file (A1111: `string_to_param` {'*': [n, D]};
    diffusers: {token: [D] or [n, D]}, `emb_params`; SDXL: {clip_l: [n, 768], clip_g: [n, 1280]})."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from .lora import read_safetensors

            data, _ = read_safetensors(path)
        else:
            data = load_torch_file(path)
    except EmbeddingError:
        raise
    except Exception as e:  # damaged files raise many types; the unpickler's refusal says why
        raise EmbeddingError(f"cannot read embedding {path}: {e}") from e
    return Embedding(name or path.stem, _vectors(data, path), path)


def _vectors(data, path):
    if not isinstance(data, dict) or not data:
        raise EmbeddingError(f"{path} is neither an A1111 nor a diffusers embedding (no tensor dictionary)")
    if all(part in data for part in SDXL_PARTS.values()):
        parts = {part: _matrix(data[part], path) for part in SDXL_PARTS.values()}
        counts = {part: len(v) for part, v in parts.items()}
        if len(set(counts.values())) != 1:
            raise EmbeddingError(f"{path}: the SDXL parts have different numbers of vectors ({counts})")
        return parts
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: expected one term in string_to_param, found {len(params)}")
        vec = next(iter(params.values()))
    elif all(isinstance(v, np.ndarray) for v in data.values()):
        if len(data) != 1:
            raise EmbeddingError(f"{path} holds {len(data)} tensors ({', '.join(data)}); an embedding has one "
                                 f"(or two named clip_l and clip_g for SDXL)")
        vec = next(iter(data.values()))
    else:
        raise EmbeddingError(f"{path} is neither an A1111 nor a diffusers embedding")
    return _matrix(vec, path)


def _matrix(vec, path):
    """A tensor -> [vectors, width] float32 ([D] is one vector)."""
    if not isinstance(vec, np.ndarray):
        raise EmbeddingError(f"{path}: expected a tensor, found {type(vec).__name__}")
    vec = np.asarray(vec, np.float32)
    vec = vec[None] if vec.ndim == 1 else vec
    if vec.ndim != 2:
        raise EmbeddingError(f"{path}: embedding tensor has shape {vec.shape}; expected [vectors, width]")
    return vec


class EmbeddingDatabase:
    """Embeddings of a folder, matched in token ids (longest name first) as A1111 does.

    The folder is rescanned when its modification time changes; a missing default folder is empty.
    widths: {part: width} of the model's text encoders (see `embedding_parts`); embeddings that do not fit
    are skipped with a warning, as A1111 lists them, and their name in a prompt is an error that says why
    (rather than plain words, which would hide the mistake). None: no check here (the encoders check).
    """

    def __init__(self, folder, tokenizer, required=False, widths=None):
        self.folder = Path(folder) if folder else None
        self.tokenizer = tokenizer
        self.widths = widths
        if required and (self.folder is None or not self.folder.is_dir()):
            raise EmbeddingError(f"embeddings folder {folder} does not exist")
        self._stamp = None
        self._by_first = {}  # first token id -> [(ids, Embedding)], longest ids first
        self.embeddings = {}
        self.skipped = {}  # name -> why it does not fit this model

    def add(self, embedding):
        ids = tuple(self.tokenizer.encode(embedding.name))
        if not ids:
            return
        self.embeddings.pop(embedding.name, None)
        self.skipped.pop(embedding.name, None)
        try:
            if self.widths is not None:
                embedding.check_fits(self.widths)
        except EmbeddingError as e:
            log.warning("skipping %s", e)
            self.skipped[embedding.name] = str(e)
        else:
            self.embeddings[embedding.name] = embedding
        entries = [e for e in self._by_first.get(ids[0], []) if e[1].name != embedding.name] + [(ids, embedding)]
        self._by_first[ids[0]] = sorted(entries, key=lambda e: len(e[0]), reverse=True)

    def refresh(self):
        if self.folder is None or not self.folder.is_dir():
            return
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in self._files()))
        if stamp == self._stamp:
            return
        self._stamp, self._by_first, self.embeddings, self.skipped = stamp, {}, {}, {}
        for path in self._files():
            if path.stat().st_size == 0:
                continue
            try:
                self.add(load_embedding(path))
            except EmbeddingError as e:  # one bad file must not hide the others (A1111 logs and goes on)
                log.warning("%s", e)

    def _files(self):
        return sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())

    def find_at(self, ids, pos):
        """(Embedding, number of prompt tokens it covers) starting at ids[pos], or (None, 0).
        Raises EmbeddingError when the name found is a skipped embedding's."""
        for name_ids, embedding in self._by_first.get(ids[pos], ()):
            if tuple(ids[pos:pos + len(name_ids)]) == name_ids:
                if embedding.name in self.skipped:
                    raise EmbeddingError(self.skipped[embedding.name])
                return embedding, len(name_ids)
        return None, 0
