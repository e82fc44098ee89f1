"""The lifecycle every gateway shares, and the registry of gateways.

A gateway is a folder `gateways/<name>/` with `config.py` (a pydantic model),
`gateway.py` (a `Gateway` subclass) and its data plane. It gets keys only from
`KeySession`s and gives each session a `KeyInstaller` for its data plane (one
per gateway pair: a control centre keys many substations); both ends of a pair
run the same class with a `role`.

    created -> starting -> running <-> degraded -> stopping -> stopped
                                   \\-> failed-closed (no usable key: traffic dropped)

Built-in gateways are listed in BUILTIN; plugins register under the entry
point group `qkdgw.gateways`. A plugin that fails to load is an error naming
it, never silently skipped.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import entry_points
from typing import Any, ClassVar

from qgw.errors import QgwError

ENTRY_POINT_GROUP = "qkdgw.gateways"

# name -> "module:Class"; filled as gateways land (ipsec, scada, webrtc, ledger, opot).
BUILTIN: dict[str, str] = {
    "ipsec": "gateways.ipsec.gateway:IpsecGateway",
    "scada": "gateways.scada.gateway:ScadaGateway",
    "opot": "gateways.opot.gateway:OpotGateway",
    "ledger": "gateways.ledger.gateway:LedgerGateway",
    "webrtc": "gateways.webrtc.gateway:WebrtcGateway",
}


class GatewayState(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED_CLOSED = "failed-closed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Gateway(abc.ABC):
    """Base of every gateway: start, stop, stats."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self) -> None:
        self.state = GatewayState.CREATED

    @abc.abstractmethod
    async def start(self) -> None:
        """Bring up the data plane and the key session; return once running."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Remove everything the gateway installed (keys, SAs, routes) and stop."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters and state for status output and metrics; never key material."""


class ThreadedGateway(Gateway):
    """A gateway whose data plane runs in threads of its own: `open` and `close` do the
    work, from any thread (the CLI calls them directly); start and stop wrap them."""

    async def start(self) -> None:
        self.open()

    async def stop(self) -> None:
        self.close()

    @abc.abstractmethod
    def open(self) -> None:
        """Bring up the data plane and the key session(s); return once running."""

    @abc.abstractmethod
    def close(self) -> None:
        """Remove everything the gateway installed and stop; safe after a failed open."""


@dataclass(frozen=True)
class GatewayEntry:
    name: str
    target: str
    summary: str

    def load(self) -> type[Gateway]:
        module, _, attr = self.target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise QgwError(f"gateway plugin {self.name!r} ({self.target}) failed to load: "
                           f"{exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Gateway)):
            raise QgwError(f"gateway plugin {self.name!r}: {self.target} is not a Gateway")
        return cls


def registry() -> dict[str, GatewayEntry]:
    found = {name: GatewayEntry(name, target, "built in") for name, target in BUILTIN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            raise QgwError(f"gateway plugin {ep.name!r} clashes with a built-in gateway")
        found[ep.name] = GatewayEntry(ep.name, ep.value, f"plugin from {ep.dist or 'unknown'}")
    return found
