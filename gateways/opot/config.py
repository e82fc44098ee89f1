"""Configuration of an OPoT node (`qgw gateway opot --config FILE`).

Every node of a service chain runs one; `role` says which part it plays.
The egress is also the chain's controller: it derives the PoT profiles from
QKD key material, pushes each node its share over mutual TLS and rotates them.

    role: transit                    # ingress | transit | egress
    node: SF1                        # this node's name in path.nodes
    path: {id: chain1, spi: 42, nodes: [INGRESS, SF1, SF2, EGRESS], ordered: true}
    sae: SAE_SF1                     # this node's SAE (certificate in pki/sae/)
    pki: /state/pki
    kme: https://kme-b:8443
    interfaces: {left: left, right: right}     # towards the source / the destination
    keys: {rekey_interval_s: 60}               # the link mask keys (keyclient SessionPolicy)
    upstream: {sae: SAE_INGRESS, listen: {host: 0.0.0.0, port: 7201}}  # not on the ingress
    downstream: {sae: SAE_SF2, connect: "sf2:7201"}                     # not on the egress
    controller_sae: SAE_EGRESS                 # who may push profiles (not on the egress)
    profiles_listen: {host: 0.0.0.0, port: 7301}   # where it does (not on the egress)
    metrics: {host: 0.0.0.0, port: 9700}

On the egress, instead of `controller_sae` and `profiles_listen`:

    controller:
      rotate_s: 60                   # a new profile this often (two indices, as in the draft)
      overlap_s: 2                   # the old one stays valid this long after the switch
      nodes:                         # every other node: its SAE and profile address
        - {node: INGRESS, sae: SAE_INGRESS, address: "ingress:7301"}
        - {node: SF1, sae: SAE_SF1, address: "sf1:7301"}
        - {node: SF2, sae: SAE_SF2, address: "sf2:7301"}

Each link's masks come from a KeySession between its two nodes (the upstream
node is the master). Relative paths resolve against the file's folder; fields
can be set from the environment (`QGW_OPOT__INTERFACES__LEFT=eth1`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from gateways.config import GatewayConfig, Listen, Strict, checked_hostport
from keyclient.policy import SessionPolicy
from qgw.config import load_model


class PathCfg(Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    spi: Annotated[int, Field(ge=0, lt=1 << 24)]
    nodes: Annotated[list[str], Field(min_length=2, max_length=64)]
    ordered: bool = True


class Interfaces(Strict):
    left: Annotated[str, Field(min_length=1, max_length=15)]
    right: Annotated[str, Field(min_length=1, max_length=15)]


class Upstream(Strict):
    sae: str
    listen: Listen


class Downstream(Strict):
    sae: str
    connect: str

    _check = field_validator("connect")(checked_hostport)


class ControlledNode(Strict):
    node: str
    sae: str
    address: str

    _check = field_validator("address")(checked_hostport)


class ControllerCfg(Strict):
    rotate_s: Annotated[float, Field(gt=0)] = 60.0
    overlap_s: Annotated[float, Field(ge=0)] = 2.0
    nodes: list[ControlledNode]

    @model_validator(mode="after")
    def _overlap_within_rotation(self) -> ControllerCfg:
        # The next rotation reuses the index retired at this one: its overlap must be over.
        if self.overlap_s >= self.rotate_s:
            raise ValueError(f"controller.overlap_s ({self.overlap_s}) must be shorter than "
                             f"controller.rotate_s ({self.rotate_s})")
        return self


class OpotConfig(GatewayConfig):
    role: Literal["ingress", "transit", "egress"]
    node: str
    path: PathCfg
    interfaces: Interfaces
    keys: SessionPolicy = SessionPolicy()
    upstream: Upstream | None = None
    downstream: Downstream | None = None
    controller_sae: str | None = None
    profiles_listen: Listen | None = None
    controller: ControllerCfg | None = None

    @model_validator(mode="after")
    def _shape(self) -> OpotConfig:
        nodes = self.path.nodes
        if len(set(nodes)) != len(nodes):
            raise ValueError("path.nodes repeats a node")
        if self.node not in nodes:
            raise ValueError(f"node {self.node!r} is not in path.nodes")
        where = nodes.index(self.node)
        expected = "ingress" if where == 0 else "egress" if where == len(nodes) - 1 \
            else "transit"
        if self.role != expected:
            raise ValueError(f"node {self.node} is at position {where + 1} of the path, so its "
                             f"role is {expected}, not {self.role}")
        if (self.upstream is None) != (self.role == "ingress"):
            raise ValueError("every node but the ingress has an upstream link")
        if (self.downstream is None) != (self.role == "egress"):
            raise ValueError("every node but the egress has a downstream link")
        if self.role == "egress":
            if self.controller is None:
                raise ValueError("the egress is the chain's controller: give `controller`")
            if {n.node for n in self.controller.nodes} != set(nodes[:-1]):
                raise ValueError("controller.nodes must list every node but the egress")
        elif self.controller_sae is None or self.profiles_listen is None:
            raise ValueError("give controller_sae and profiles_listen (the controller pushes "
                             "this node's profiles there)")
        return self


def load(path: Path) -> OpotConfig:
    return load_model(path, OpotConfig, env_prefix="QGW_OPOT")
