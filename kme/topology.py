"""A QKD network described in a file: KMEs (nodes), QKD links between them, SAEs.

    name: madrid
    nodes:
      KME_NORTE: {site: "Telefonica Norte (MAD-04)"}
      KME_DISTRITO: {}
    links:
      - {a: KME_NORTE, b: KME_DISTRITO, length_km: 4, loss_db: 10.2,
         key_rate_bps: 8400, channel_thz: 193.7}
    saes:
      SAE_NORTE: KME_NORTE

A link's key rate is the measured `key_rate_bps` when given, otherwise the
loss-to-rate fit of kme/rate_model.py applied to `loss_db`. Shipped
topologies (`madrid`, the OPENQKD Madrid network) are in kme/topologies/.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kme.network import LinkSpec, NetworkSpec
from kme.rate_model import rate_from_loss
from qgw.config import load_model
from qgw.errors import ConfigError, PkiError
from qgw.pki import check_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Node(_Strict):
    site: str = ""


class TopologyLink(_Strict):
    a: str
    b: str
    loss_db: Annotated[float, Field(ge=0)]
    length_km: Annotated[float, Field(ge=0)] | None = None
    key_rate_bps: Annotated[float, Field(ge=0)] | None = None
    channel_thz: Annotated[float, Field(gt=0)] | None = None

    @property
    def rate_bps(self) -> float:
        return self.key_rate_bps if self.key_rate_bps is not None else rate_from_loss(self.loss_db)

    @property
    def rate_source(self) -> str:
        return "measured" if self.key_rate_bps is not None else "loss fit"


class Topology(_Strict):
    name: str
    source: str = ""
    nodes: dict[str, Node]
    links: list[TopologyLink]
    saes: dict[str, str] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        try:
            for kme in self.nodes:
                check_id("KME", kme)
            for sae in self.saes:
                check_id("SAE", sae)
        except PkiError as exc:
            raise ValueError(str(exc)) from None
        seen: set[frozenset[str]] = set()
        for link in self.links:
            for end in (link.a, link.b):
                if end not in self.nodes:
                    raise ValueError(f"link {link.a}-{link.b}: {end} is not a node")
            if link.a == link.b:
                raise ValueError(f"link {link.a}-{link.b} joins a node to itself")
            pair = frozenset((link.a, link.b))
            if pair in seen:
                raise ValueError(f"two links between {link.a} and {link.b}")
            seen.add(pair)
        for sae, kme in self.saes.items():
            if kme not in self.nodes:
                raise ValueError(f"SAE {sae} is attached to {kme}, which is not a node")
        return self

    def link(self, a: str, b: str) -> TopologyLink | None:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        return None

    def to_spec(self) -> NetworkSpec:
        return NetworkSpec(
            kmes=list(self.nodes),
            saes=dict(self.saes),
            links=[LinkSpec(link.a, link.b, link.rate_bps, link.loss_db) for link in self.links],
            name=self.name,
        )


def shipped() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in files("kme").joinpath("topologies")
                  .iterdir() if p.name.endswith(".yaml"))


def load_topology(name_or_path: str | Path) -> Topology:
    """A shipped topology by name (`madrid`) or a topology file."""
    text = str(name_or_path)
    if text in shipped():
        path = Path(str(files("kme").joinpath("topologies", f"{text}.yaml")))
    else:
        path = Path(text)
        if not path.exists():
            raise ConfigError(text, None, f"no such topology file; shipped topologies: "
                              f"{', '.join(shipped())}")
    return load_model(path, Topology)
