"""The HTTP server: OpenAI/OpenRouter-compatible routes, SSE, errors, auth."""

from openfusion.server.app import create_app

__all__ = ["create_app"]
