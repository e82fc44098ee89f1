"""Logging setup for every `qgw` command: rich on a terminal, plain lines otherwise."""

from __future__ import annotations

import logging
import os
import sys

from rich.logging import RichHandler


def setup(level: str | None = None) -> None:
    level = (level or os.environ.get("QGW_LOG_LEVEL") or "INFO").upper()
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
