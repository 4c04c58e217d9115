"""The OpenAI-compatible HTTP server (`edge-safe serve`): :func:`create_app` over one EdgeSafe.

``app`` holds the routes and the request queue, ``schema`` the request bodies and settings.
Needs the ``[server]`` extra (fastapi, uvicorn); the runtime never imports this package.
"""
from edge_safe.server.app import create_app

__all__ = ["create_app"]
