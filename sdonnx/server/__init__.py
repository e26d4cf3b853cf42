"""`sdonnx serve`: A1111's HTTP API and a web page over a Pipeline (needs the `serve` extra)."""
from .app import create_app

__all__ = ["create_app"]
