"""Configuration of one KME (`qgw kme serve --config FILE`).

Example:

    kme_id: KME_A
    listen: {host: 0.0.0.0, port: 8443}
    metrics: {host: 127.0.0.1, port: 9443}
    tls: {ca: pki/ca.pem, cert: pki/kme/KME_A.pem, key: pki/kme/KME_A.key}
    store: state/KME_A.sqlite
    saes: {SAE_1: KME_A, SAE_2: KME_B}     # every SAE and the KME it is attached to
    links:
      - peer: KME_B
        url: https://kme-b:8443
        loss_db: 10                        # or key_rate_bps: 8000

Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kme.rate_model import rate_from_loss
from qgw.config import load_model
from qgw.tls import TlsFiles


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    return value if value.is_absolute() or base is None else (base / value)


class Listen(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8443


class Metrics(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)]


class Tls(Strict):
    ca: Path
    cert: Path
    key: Path

    _abs = field_validator("ca", "cert", "key")(_resolve)

    def files(self) -> TlsFiles:
        return TlsFiles(self.ca, self.cert, self.key)


class KeyLimits(Strict):
    """ETSI GS QKD 014 status limits. Sizes in bits."""

    key_size: Annotated[int, Field(gt=0, multiple_of=8)] = 256
    min_key_size: Annotated[int, Field(gt=0, multiple_of=8)] = 64
    max_key_size: Annotated[int, Field(gt=0, multiple_of=8)] = 8192
    max_key_per_request: Annotated[int, Field(ge=1)] = 128
    max_SAE_ID_count: Annotated[int, Field(ge=0)] = 8
    store_capacity_bits: Annotated[int, Field(ge=8)] = 8 * 1024 * 1024

    @model_validator(mode="after")
    def _ordered(self) -> KeyLimits:
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("need min_key_size <= key_size <= max_key_size")
        return self


class Link(Strict):
    """A simulated QKD link to a peer KME.

    The KME whose ID sorts first is the link's emitter: it generates the key
    stream, pushes it to the peer, and allocates stream ranges to keys.
    Only the emitter's rate settings are used.
    """

    peer: str
    url: str
    key_rate_bps: Annotated[float, Field(ge=0)] | None = None
    loss_db: Annotated[float, Field(ge=0)] = 10.0
    block_bytes: Annotated[int, Field(ge=8, le=1 << 20)] | None = None

    @field_validator("url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError("peer KME URL must start with https:// (mutual TLS is mandatory)")
        return v.rstrip("/")

    @property
    def rate_bps(self) -> float:
        return self.key_rate_bps if self.key_rate_bps is not None else rate_from_loss(self.loss_db)

    @property
    def block_size(self) -> int:
        """Bytes per delivered block: about 20 blocks a second, 32 B to 64 KiB.

        QKD devices deliver key after each round of error correction and
        privacy amplification; small blocks keep slow links responsive, big
        ones keep fast links cheap.
        """
        if self.block_bytes is not None:
            return self.block_bytes
        target = self.rate_bps / 8 / 20
        size = 32
        while size < target and size < 65536:
            size *= 2
        return size


class KmeConfig(Strict):
    kme_id: str
    listen: Listen = Listen()
    metrics: Metrics | None = None
    tls: Tls
    store: Path
    saes: dict[str, str]
    links: list[Link] = []
    limits: KeyLimits = KeyLimits()
    peer_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    tick_s: Annotated[float, Field(gt=0, le=10)] = 0.05

    _store_abs = field_validator("store")(_resolve)

    @model_validator(mode="after")
    def _consistent(self) -> KmeConfig:
        peers = [link.peer for link in self.links]
        if len(set(peers)) != len(peers):
            raise ValueError("two links to the same peer KME")
        if self.kme_id in peers:
            raise ValueError("a KME cannot have a link to itself")
        if not self.links and not any(kme == self.kme_id for kme in self.saes.values()):
            raise ValueError(f"{self.kme_id} has neither an SAE nor a link: it would serve nobody")
        return self

    def link_to(self, kme_id: str) -> Link | None:
        for link in self.links:
            if link.peer == kme_id:
                return link
        return None


def load(path: Path) -> KmeConfig:
    return load_model(path, KmeConfig, env_prefix="QGW_KME")
