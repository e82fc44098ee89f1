"""Configuration of a SCADA gateway (`qgw gateway scada --config FILE`).

Control centre (one per network; the key master of every pair):

    role: control-centre
    sae: SAE_CC                      # this gateway's SAE ID (certificate in pki/sae/)
    pki: /state/pki                  # the network's PKI folder (qgw pki init)
    kme: https://kme-a:8443          # this gateway's KME (ETSI 014)
    tun: {name: scada0, address: 10.99.0.1/24}
    listen: {host: 0.0.0.0, port: 51820}        # UDP, the encrypted tunnel
    metrics: {host: 0.0.0.0, port: 9600}        # optional Prometheus /metrics
    keys: {mode: qkd, rekey_interval_s: 60}     # keyclient SessionPolicy
    substations:
      - {pair: 1, sae: SAE_SUB1, endpoint: "172.30.0.11:51820",
         control: "172.30.0.11:7101", routes: [10.99.1.0/24]}

Substation:

    role: substation
    sae: SAE_SUB1
    pki: /state/pki
    kme: https://kme-b:8443
    tun: {name: scada0, address: 10.99.1.1/24}
    listen: {host: 0.0.0.0, port: 51820}
    control_centre: {pair: 1, sae: SAE_CC, endpoint: "172.30.0.10:51820",
                     control_listen: {host: 0.0.0.0, port: 7101}, routes: [10.99.0.0/24]}
    modbus: {inbound: [{functions: [1, 2, 3, 4]}, {functions: [5, 15], ranges: [[0, 3]]}]}

Each pair has its own keys: the control centre fetches them from its KME and
agrees them with the substation over mutual TLS (the control centre connects
to the substation's `control_listen`). Relative paths are resolved against
the config file's folder; any field can be set from the environment
(`QGW_SCADA__LISTEN__PORT=51821`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gateways.scada.modbus import ModbusPolicy
from keyclient.policy import SessionPolicy
from qgw.config import load_model

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _checked(value: str) -> str:
    _hostport(value)
    return value


class Listen(Strict):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)]


class Tun(Strict):
    name: Annotated[str, Field(min_length=1, max_length=15)] = "scada0"
    address: Interface
    mtu: Annotated[int, Field(ge=576, le=9000)] = 1400


class Substation(Strict):
    pair: Annotated[int, Field(ge=1, le=65535)]
    sae: str
    endpoint: str | None = None      # HOST:PORT of its tunnel; else learnt from its packets
    control: str                     # HOST:PORT of its control listener
    routes: list[Network]

    _check = field_validator("control")(_checked)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            _hostport(v)
        return v


class ControlCentre(Strict):
    pair: Annotated[int, Field(ge=1, le=65535)]
    sae: str
    endpoint: str
    control_listen: Listen
    routes: list[Network] = []

    _check = field_validator("endpoint")(_checked)


class ScadaConfig(Strict):
    role: Literal["control-centre", "substation"]
    sae: str
    pki: Path
    kme: str
    tun: Tun
    listen: Listen = Listen(port=51820)
    metrics: Listen | None = None
    keys: SessionPolicy = SessionPolicy()
    modbus: ModbusPolicy | None = None
    substations: list[Substation] = []
    control_centre: ControlCentre | None = None

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

    @model_validator(mode="after")
    def _shape(self) -> ScadaConfig:
        if self.role == "control-centre":
            if not self.substations or self.control_centre is not None:
                raise ValueError("a control centre lists its substations (and has no "
                                 "control_centre section)")
            pairs = [s.pair for s in self.substations]
            if len(set(pairs)) != len(pairs):
                raise ValueError("two substations with the same pair number")
        elif self.control_centre is None or self.substations:
            raise ValueError("a substation has a control_centre section (and no substations)")
        return self

    def endpoint(self, value: str) -> tuple[str, int]:
        return _hostport(value)


def load(path: Path) -> ScadaConfig:
    return load_model(path, ScadaConfig, env_prefix="QGW_SCADA")
