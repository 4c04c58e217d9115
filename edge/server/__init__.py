"""The OpenAI-compatible HTTP server (`edge-safe serve`): :func:`create_app` over one EdgeSafe.

``app`` holds the routes and the request queue, ``schema`` the request bodies and settings.
Needs the ``[server]`` extra (fastapi, uvicorn); the runtime never imports this package.
"""
from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    # Lazy, so `edge-safe --help` (which reads serve's settings from .schema) loads neither fastapi nor llama.cpp.
    if name == "create_app":
        from edge_safe.server.app import create_app

        return create_app
    raise AttributeError(f"module 'edge_safe.server' has no attribute {name!r}")
