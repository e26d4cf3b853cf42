"""Textual inversion embeddings (A1111 and diffusers files), used by file name in the prompt.

The vectors are spliced into the numpy token-embedding lookup (`inputs_embeds`) by the prompt stage:
no torch, no re-export. `.pt`/`.bin` are read by the restricted unpickler (no code runs).
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..infotext import short_hash
from .torch_pickle import load_torch_file

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pt", ".bin")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used (unreadable, unknown layout, wrong width)."""


@dataclass
class Embedding:
    name: str
    vectors: np.ndarray  # [n, D] float32
    path: Path = None
    _hash: str = field(default=None, repr=False)

    @property
    def shorthash(self):
        """A1111's `TI hashes` entry: the first 12 hex digits of the file's sha256."""
        if self._hash is None and self.path is not None:
            self._hash = short_hash(self.path)
        return self._hash

    def check_width(self, width):
        if self.vectors.shape[1] != width:
            raise EmbeddingError(f"embedding {self.name!r} ({self.path}) has vectors {self.vectors.shape[1]} wide; "
                                 f"this model's text encoder is {width} wide (an embedding made for another model family)")


def load_embedding(path, name=None):
    """An embedding file -> Embedding named after the file (A1111: `string_to_param` {'*': [n, D]};
    diffusers: {token: [D] or [n, D]}, `emb_params`)."""
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
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: expected one term in string_to_param, found {len(params)}")
        vec = next(iter(params.values()))
    elif all(isinstance(v, np.ndarray) for v in data.values()):
        if len(data) != 1:
            raise EmbeddingError(f"{path} holds {len(data)} tensors ({', '.join(data)}); an embedding has one")
        vec = next(iter(data.values()))
    else:
        raise EmbeddingError(f"{path} is neither an A1111 nor a diffusers embedding")
    vec = np.asarray(vec, np.float32)
    vec = vec[None] if vec.ndim == 1 else vec
    if vec.ndim != 2:
        raise EmbeddingError(f"{path}: embedding tensor has shape {vec.shape}; expected [vectors, width]")
    return vec


class EmbeddingDatabase:
    """Embeddings of a folder, matched in token ids (longest name first) as A1111 does.

    The folder is rescanned when its modification time changes; a missing default folder is empty.
    """

    def __init__(self, folder, tokenizer, required=False):
        self.folder = Path(folder) if folder else None
        self.tokenizer = tokenizer
        if required and (self.folder is None or not self.folder.is_dir()):
            raise EmbeddingError(f"embeddings folder {folder} does not exist")
        self._stamp = None
        self._by_first = {}  # first token id -> [(ids, Embedding)], longest ids first
        self.embeddings = {}

    def add(self, embedding):
        ids = tuple(self.tokenizer.encode(embedding.name))
        if not ids:
            return
        self.embeddings[embedding.name] = embedding
        entries = [e for e in self._by_first.get(ids[0], []) if e[1].name != embedding.name] + [(ids, embedding)]
        self._by_first[ids[0]] = sorted(entries, key=lambda e: len(e[0]), reverse=True)

    def refresh(self):
        if self.folder is None or not self.folder.is_dir():
            return
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in self._files()))
        if stamp == self._stamp:
            return
        self._stamp, self._by_first, self.embeddings = stamp, {}, {}
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
        """(Embedding, number of prompt tokens it covers) starting at ids[pos], or (None, 0)."""
        for name_ids, embedding in self._by_first.get(ids[pos], ()):
            if tuple(ids[pos:pos + len(name_ids)]) == name_ids:
                return embedding, len(name_ids)
        return None, 0
