"""What a KeySession does when key supply fails: the supply policy (ARCHITECTURE.md).

    qkd          QKD keys only. No QKD key: keep the current key for `grace_s`
                 past its rekey time, then fail closed.
    hybrid       every key combines a QKD key and an ML-KEM-768 shared secret
                 (HKDF over both): safe while either holds. Needs both.
    qkd-or-pqc   QKD when the KME delivers, ML-KEM-768 alone when it does not,
                 back to QKD as soon as it returns.

Failing closed means the gateway stops protecting (drops traffic) and says so;
it never sends plaintext.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SupplyMode(StrEnum):
    QKD = "qkd"
    HYBRID = "hybrid"
    QKD_OR_PQC = "qkd-or-pqc"


class KeySource(StrEnum):
    QKD = "qkd"
    HYBRID = "hybrid"
    PQC = "pqc"


class SessionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SupplyMode = SupplyMode.QKD
    rekey_interval_s: Annotated[float, Field(gt=0)] | None = 60.0
    rekey_bytes: Annotated[int, Field(gt=0)] | None = None
    grace_s: Annotated[float, Field(ge=0)] = 0.0
    key_size: Annotated[int, Field(ge=128, multiple_of=8)] = 256
    pool_target: Annotated[int, Field(ge=0, le=128)] = 8
    pool_low: Annotated[int, Field(ge=0)] = 2
    overlap_s: Annotated[float, Field(ge=0)] = 2.0
    ack_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    retry_s: Annotated[float, Field(gt=0)] = 0.5

    @model_validator(mode="after")
    def _sane(self) -> SessionPolicy:
        if self.rekey_interval_s is None and self.rekey_bytes is None:
            raise ValueError("set rekey_interval_s, rekey_bytes or both")
        if self.pool_low > self.pool_target:
            raise ValueError("pool_low must not exceed pool_target")
        return self

    def key_lifetime_s(self) -> float | None:
        """How long the slave may use a key without hearing of the next one."""
        if self.rekey_interval_s is None:
            return None
        return self.rekey_interval_s + self.grace_s + self.ack_timeout_s
