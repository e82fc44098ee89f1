"""What every gateway's configuration shares: its SAE, PKI, KME and metrics listener.

A gateway's model (e.g. `gateways.scada.config.ScadaConfig`) extends `GatewayConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from prometheus_client import CollectorRegistry, start_http_server
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def hostport(value: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as a tuple; ValueError names the bad value."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def checked_hostport(value: str) -> str:
    """A field validator: the text stays as written, but must be HOST:PORT."""
    hostport(value)
    return value


class Listen(Strict):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)]


class GatewayConfig(Strict):
    sae: str                      # this gateway's SAE ID (its certificate in pki/sae/)
    pki: Path                     # the network's PKI folder (qgw pki init)
    kme: str                      # this gateway's KME (ETSI 014)
    metrics: Listen | None = None  # Prometheus /metrics

    @field_validator("pki")
    @classmethod
    def _abs(cls, v: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base")
        return v if v.is_absolute() or base is None else base / v

    @field_validator("kme")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError("the KME URL must start with https:// (mutual TLS)")
        return v.rstrip("/")


class PairPeer(Strict):
    """The other gateway of a master/slave pair."""

    sae: str
    control: str | None = None       # HOST:PORT of the slave's control listener (master only)

    _check = field_validator("control")(lambda v: None if v is None else checked_hostport(v))


class PairConfig(GatewayConfig):
    """A gateway that is one end of a pair: the master connects its control channel to
    the slave's `control_listen` (mutual TLS, the same PKI)."""

    role: Literal["master", "slave"]
    peer: PairPeer
    control_listen: Listen | None = None   # slave only

    @model_validator(mode="after")
    def _pair_shape(self) -> PairConfig:
        if self.role == "master" and (self.peer.control is None or self.control_listen):
            raise ValueError("a master names the slave's control listener (peer.control) "
                             "and has no control_listen")
        if self.role == "slave" and (self.control_listen is None or self.peer.control):
            raise ValueError("a slave has control_listen (where the master connects) and "
                             "no peer.control")
        return self

    @property
    def control_connect(self) -> tuple[str, int] | None:
        return None if self.peer.control is None else hostport(self.peer.control)


def serve_metrics(listen: Listen | None, registry: CollectorRegistry) -> Callable[[], None]:
    """Serve `registry` on `listen` (if given); returns the function that stops it."""
    if listen is None:
        return lambda: None
    server, thread = start_http_server(listen.port, listen.host, registry=registry)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=2)

    return stop
