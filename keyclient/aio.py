"""asyncio facade of KeySession, for gateways built on an event loop (WebRTC, ledger...).

The session's driver thread still does the blocking work (KME calls, control
channel); every installer call is run on the event loop and awaited by the
driver before it goes on, so make-before-break ordering holds: the slave has
really installed a key before it acknowledges it. Installer methods may be
plain functions or coroutines.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from keyclient.control import ControlChannel
from keyclient.errors import KeySupplyError
from keyclient.etsi014 import Etsi014Client
from keyclient.installer import SessionKey
from keyclient.policy import SessionPolicy
from keyclient.session import KeySession, Role, SessionState, SessionStatus

INSTALL_TIMEOUT_S = 10.0


class _OnLoop:
    """A KeyInstaller whose calls run on an event loop, called from the driver thread."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def _run(self, name: str, *args: Any) -> None:
        method = getattr(self._target, name)

        async def call() -> None:
            result = method(*args)
            if inspect.isawaitable(result):
                await result

        asyncio.run_coroutine_threadsafe(call(), self._loop).result(INSTALL_TIMEOUT_S)

    def install(self, epoch: int, key: SessionKey) -> None:
        self._run("install", epoch, key)

    def activate(self, epoch: int) -> None:
        self._run("activate", epoch)

    def retire(self, epoch: int) -> None:
        self._run("retire", epoch)

    def invalidate(self, reason: str) -> None:
        self._run("invalidate", reason)


class AsyncKeySession:
    def __init__(self, role: Role | str, *, kme: Etsi014Client | None, local_sae: str,
                 peer_sae: str, channel: ControlChannel, installer: Any,
                 policy: SessionPolicy | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self._args: dict[str, Any] = dict(role=role, kme=kme, local_sae=local_sae,
                                          peer_sae=peer_sae, channel=channel, policy=policy)
        if clock is not None:
            self._args["clock"] = clock
        self._installer = installer
        self._session: KeySession | None = None
        self._changed: asyncio.Event | None = None

    @property
    def session(self) -> KeySession:
        if self._session is None:
            raise RuntimeError("start() the session first")
        return self._session

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        self._changed = changed

        def on_status(_: SessionStatus) -> None:
            loop.call_soon_threadsafe(changed.set)

        self._session = KeySession(installer=_OnLoop(self._installer, loop),
                                   on_status=on_status, **self._args)
        await loop.run_in_executor(None, self._session.start)

    async def stop(self) -> None:
        if self._session is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._session.stop)

    def status(self) -> SessionStatus:
        return self.session.status()

    def add_bytes(self, n: int) -> None:
        self.session.add_bytes(n)

    def request_rekey(self) -> None:
        self.session.request_rekey()

    async def wait_for(self, predicate: Callable[[SessionStatus], bool],
                       timeout_s: float = 30.0) -> SessionStatus:
        """Wait until the session's status satisfies `predicate`."""
        assert self._changed is not None
        async with asyncio.timeout(timeout_s):
            while True:
                status = self.status()
                if predicate(status):
                    return status
                self._changed.clear()
                await self._changed.wait()

    async def wait_protected(self, timeout_s: float = 30.0) -> SessionStatus:
        status = await self.wait_for(
            lambda s: s.state in (SessionState.PROTECTED, SessionState.FAILED_CLOSED), timeout_s)
        if status.state is SessionState.FAILED_CLOSED:
            raise KeySupplyError(status.last_error or "key session failed closed")
        return status
