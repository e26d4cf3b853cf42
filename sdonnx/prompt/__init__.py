"""A1111 prompt language: emphasis, editing/alternation schedules, AND, extra-network tags, chunks."""
from .attention import parse_attention
from .extras import ExtraNetwork, extract_networks, split_and
from .schedule import schedule

__all__ = ["parse_attention", "schedule", "split_and", "extract_networks", "ExtraNetwork"]
