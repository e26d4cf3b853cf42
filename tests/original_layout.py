"""Moved to converters/original_layout.py (the demo training script writes with it); kept for old imports."""
from converters.original_layout import save_checkpoint, to_original  # noqa: F401
