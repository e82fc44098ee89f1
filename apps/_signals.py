"""SIGTERM/SIGINT as a stop request, for the demo apps' run loops."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event, *, enabled: bool = True) -> Iterator[None]:
    """Set `stop` on SIGTERM/SIGINT while inside the block (in the running loop); when not
    `enabled`, do nothing. The handlers are removed on leaving the block."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if enabled:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
