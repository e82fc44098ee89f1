"""What every gateway's configuration shares: its SAE, PKI, KME and metrics listener.

A gateway's model (e.g. `gateways.scada.config.ScadaConfig`) extends `GatewayConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from prometheus_client import CollectorRegistry, start_http_server
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


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


def serve_metrics(listen: Listen | None, registry: CollectorRegistry) -> Callable[[], None]:
    """Serve `registry` on `listen` (if given); returns the function that stops it."""
    if listen is None:
        return lambda: None
    server, thread = start_http_server(listen.port, listen.host, registry=registry)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=2)

    return stop
