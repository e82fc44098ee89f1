"""Run one KME process until SIGTERM/SIGINT (`qgw kme serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from kme.config import KmeConfig
from kme.server import KmeServer

log = logging.getLogger("qgw.kme")


async def _main(cfg: KmeConfig) -> None:
    server = KmeServer(cfg)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("KME %s stopping", cfg.kme_id)
    await server.stop()


def run(cfg: KmeConfig) -> None:
    try:
        import uvloop  # optional (extra "fast"): a faster event loop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(_main(cfg))
