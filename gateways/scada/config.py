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

from pydantic import Field, field_validator, model_validator

from gateways.config import GatewayConfig, Listen, Strict, checked_hostport, hostport
from gateways.scada.modbus import ModbusPolicy
from keyclient.policy import SessionPolicy
from qgw.config import load_model

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


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

    _check = field_validator("control")(checked_hostport)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            hostport(v)
        return v


class ControlCentre(Strict):
    pair: Annotated[int, Field(ge=1, le=65535)]
    sae: str
    endpoint: str
    control_listen: Listen
    routes: list[Network] = Field(default_factory=list)

    _check = field_validator("endpoint")(checked_hostport)


class ScadaConfig(GatewayConfig):
    role: Literal["control-centre", "substation"]
    tun: Tun
    listen: Listen = Listen(port=51820)
    keys: SessionPolicy = SessionPolicy()
    modbus: ModbusPolicy | None = None
    substations: list[Substation] = Field(default_factory=list)
    control_centre: ControlCentre | None = None

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
        return hostport(value)


def load(path: Path) -> ScadaConfig:
    return load_model(path, ScadaConfig, env_prefix="QGW_SCADA")
