"""`sdonnx serve`: A1111's HTTP API and a web page over a Pipeline (needs the `serve` extra).

create_app is imported on first use, so that the A1111 field tables (server.a1111) load without the web stack.
"""

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
