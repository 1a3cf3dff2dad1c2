"""The HTTP service: a Starlette app over a running Broker."""

from .app import create_app

__all__ = ["create_app"]
