"""CLIP tokenizer through the `tokenizers` library, reading the model folder's tokenizer.json."""
from pathlib import Path


class ClipTokenizer:
    """Token ids without start/end tokens; chunking and padding belong to the prompt stage."""

    def __init__(self, path, info):
        from tokenizers import Tokenizer

        from ..manifest import ModelFileError

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or damaged file
            raise ModelFileError(f"tokenizer {path} cannot be read ({e}); convert the model again") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos_id, self.eos_id, self.pad_id = info.bos_id, info.eos_id, info.pad_id
        self.max_length = info.max_length

    @classmethod
    def from_model(cls, folder, info):
        return cls(Path(folder) / info.tokenizer, info)

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def id_to_token(self, token_id):
        return self._tok.id_to_token(token_id)

    @property
    def comma_id(self):
        """Id of the `,` word token (A1111 backtracks chunk boundaries to it); None if the vocab lacks it."""
        return self._tok.token_to_id(",</w>")
