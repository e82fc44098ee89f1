"""SKIP key provider (placeholder, being written)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the SKIP routes on the KME's API application."""
