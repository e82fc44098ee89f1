"""Headless Chromium for the WebRTC gateway's browser tests, driven over DevTools.

The Debian package `chromium` (CI installs it). Each `Browser` has a profile
directory and a process group of its own, and `close` ends that group (the
browser, its renderers, GPU and utility processes) by its id.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest

# Root in a container: no sandbox. The fake camera is Chromium's moving test picture
# (640x480) and a beeping microphone; fake-ui grants getUserMedia without a prompt.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--enable-logging=stderr",
    "--v=0",
)
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("the browser tests need Chromium: apt-get install chromium")
    return path


class Browser:
    """One headless Chromium showing `url`; `evaluate` runs JS in that page."""

    def __init__(self, profile: Path, url: str, extra_flags: Sequence[str] = ()) -> None:
        self.profile = profile
        self.url = url
        self.extra_flags = list(extra_flags)
        self.log_path = profile.parent / f"{profile.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Browser:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [chromium(), *CHROMIUM_FLAGS, *self.extra_flags,
                 f"--user-data-dir={self.profile}", self.url],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)   # its own process group, ended as one in close()
        try:
            port = await self._devtools_port()
            self._session = aiohttp.ClientSession()
            page = await self._page_target(port)
            self._ws = await self._session.ws_connect(page, max_msg_size=0)
        except BaseException:
            await self.close()
            raise

    async def _devtools_port(self) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise AssertionError(f"chromium exited ({self._proc.returncode}):\n"
                                     + self.log_tail())
            if marker.exists():
                text = marker.read_text().split()
                if text:
                    return int(text[0])
            await asyncio.sleep(0.05)
        raise AssertionError("chromium did not open its DevTools port:\n" + self.log_tail())

    async def _page_target(self, port: int) -> str:
        assert self._session is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            await asyncio.sleep(0.1)
        raise AssertionError("chromium shows no page")

    async def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of `expression` (awaited if a promise) in the page, as JSON."""
        assert self._ws is not None, "browser not started"
        ident = next(self._ids)
        await self._ws.send_json({"id": ident, "method": "Runtime.evaluate", "params": {
            "expression": expression, "awaitPromise": True, "returnByValue": True}})
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self._ws.receive(), deadline - time.monotonic())
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"DevTools connection ended: {msg.type}")
            reply = json.loads(msg.data)
            if reply.get("id") != ident:
                continue   # an event of some domain
            if "error" in reply:
                raise AssertionError(f"DevTools: {reply['error']}")
            result = reply["result"]
            if "exceptionDetails" in result:
                details = result["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                raise AssertionError(f"the page threw: {text}")
            return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """The first truthy value of `expression`, polled."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def console(self) -> list[str]:
        """What the page wrote to its console (Chromium logs it to stderr)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if ":CONSOLE" in line]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        end_group(proc)
        shutil.rmtree(self.profile, ignore_errors=True)


def end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, to the process group that `proc` leads; reap `proc`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            proc.poll()   # reap the leader, or it stays a member of its group
            if not group_alive(proc.pid):
                break
            time.sleep(0.05)
        if not group_alive(proc.pid):
            break
    proc.wait(STOP_TIMEOUT_S)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
