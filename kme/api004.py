"""ETSI GS QKD 004 key streams (placeholder, being written)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the ETSI 004 routes on the KME's API application."""
