"""Configuration of an IPsec gateway (`qgw gateway ipsec --config FILE`).

Site A (the key master: fetches QKD keys, offers each to site B):

    role: master
    sae: SAE_A                       # this gateway's SAE ID (certificate in pki/sae/)
    pki: /state/pki                  # the network's PKI folder (qgw pki init)
    kme: https://kme-a:8443          # this gateway's KME (ETSI 014)
    local: 192.0.2.1                 # this gateway's tunnel (outer) address
    local_subnets: [10.1.0.0/24]     # the site's networks behind this gateway
    peer: {sae: SAE_B, address: 192.0.2.2, control: "192.0.2.2:7201",
           subnets: [10.2.0.0/24]}
    keys: {mode: qkd, rekey_interval_s: 60, grace_s: 30}    # keyclient SessionPolicy
    lifetime: {soft_bytes: 1000000000, hard_bytes: 2000000000}  # kernel safety net
    metrics: {host: 0.0.0.0, port: 9610}

Site B (the slave) has `role: slave`, its own `sae`/`kme`/`local`/`local_subnets`,
`peer: {sae: SAE_A, address: 192.0.2.1, subnets: [10.1.0.0/24]}` and
`control_listen: {host: 0.0.0.0, port: 7201}` where the master connects
(mutual TLS, the same PKI).

`reqid` tags every SA and policy this pair installs: a restarted gateway
removes leftovers with its reqid, and nothing else. Two pairs on one host need
two reqids. Relative paths are resolved against the config file's folder; any
field can be set from the environment (`QGW_IPSEC__PEER__ADDRESS=192.0.2.9`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from gateways.config import PairConfig, PairPeer, Strict
from keyclient.policy import SessionPolicy
from qgw.config import load_model

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Peer(PairPeer):
    address: Address                 # the peer gateway's tunnel (outer) address
    subnets: Annotated[list[Network], Field(min_length=1)]


class Lifetime(Strict):
    """The kernel's own limits on each SA: a backstop should rekeys stop.

    Soft limits make the kernel tell the gateway to rekey; hard limits make it
    delete the SA (traffic then stops: fail closed). Seconds default to
    unlimited, since the key session's own timers drive rekeys.
    """

    soft_bytes: Annotated[int, Field(gt=0)] | None = 2**40
    hard_bytes: Annotated[int, Field(gt=0)] | None = 2**41
    soft_s: Annotated[int, Field(gt=0)] | None = None
    hard_s: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _order(self) -> Lifetime:
        for soft, hard, unit in ((self.soft_bytes, self.hard_bytes, "bytes"),
                                 (self.soft_s, self.hard_s, "s")):
            if soft is not None and hard is not None and soft >= hard:
                raise ValueError(f"soft_{unit} must be below hard_{unit}")
        return self


class IpsecConfig(PairConfig):
    local: Address
    local_subnets: Annotated[list[Network], Field(min_length=1)]
    peer: Peer
    reqid: Annotated[int, Field(ge=1, le=0xFFFF)] = 0x51D0
    priority: Annotated[int, Field(ge=0)] = 1000
    replay_window: Annotated[int, Field(ge=0, le=32)] = 32
    lifetime: Lifetime = Lifetime()
    keys: SessionPolicy = SessionPolicy()

    @model_validator(mode="after")
    def _shape(self) -> IpsecConfig:
        if self.local.version != self.peer.address.version:
            raise ValueError("local and peer.address must be the same IP version")
        if self.local == self.peer.address:
            raise ValueError("local and peer.address are the same address")
        return self


def load(path: Path) -> IpsecConfig:
    return load_model(path, IpsecConfig, env_prefix="QGW_IPSEC")
