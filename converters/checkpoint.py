"""Safe reading of single-file checkpoints (.safetensors, or .ckpt/.pt/.pth/.bin pickles).

Pickles are read with `torch.load(weights_only=True)`: torch's restricted unpickler only rebuilds
tensors and plain containers, so a file can never run code on load. Files that need more than that
are refused with a CheckpointError that says so and points to safetensors.
"""
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, is refused for safety, or is not a supported model."""


def load_state_dict(path) -> dict:
    """Read a checkpoint into {key: tensor}, unwrapping a top-level "state_dict" entry."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint extension {path.suffix!r}; "
            f"expected one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    loaded = _load_safetensors(path) if suffix in SAFETENSORS_SUFFIXES else _load_pickle(path)
    return _tensors_only(_unwrap(loaded, path), path)


def read_metadata(path) -> dict:
    """The string metadata of a .safetensors header ({} for pickles): may hold hints such as
    `modelspec.prediction_type`."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any parse failure is the same problem for the user
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _load_safetensors(path):
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _load_pickle(path):
    try:
        # Zip-format files (torch >= 1.6) are memory-mapped rather than read into RAM at once.
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal_message(path, e)) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic number, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def _refusal_message(path, error):
    """Why torch's weights-only unpickler refused the file, without its advice to allowlist globals."""
    advice = "If you trust the file's source, convert it to .safetensors with a trusted tool and load that instead."
    text = str(error)
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    if wanted:
        return (
            f"{path}: refused to load: the file contains code or Python objects that a safe weights-only "
            f"load refuses (it asks to call or build {wanted.group(1)}; only tensors and plain containers "
            f"are allowed). Nothing from it was run. {advice}"
        )
    operand = re.search(r"Unsupported operand[^\n]*", text)
    detail = operand.group(0).strip() if operand else "unsupported pickle content"
    return (
        f"{path}: refused to load: not a readable torch checkpoint, or it contains code or Python objects "
        f"that a safe weights-only load refuses ({detail}). Nothing from it was run. {advice}"
    )


def _unwrap(loaded, path):
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        return loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    return loaded


def _tensors_only(state_dict, path):
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(set(state_dict) - set(tensors))
    if skipped:
        logger.debug("%s: ignoring %d non-tensor entries: %s", path, len(skipped), skipped[:10])
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors
