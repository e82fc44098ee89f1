"""ETSI GS QKD 004 V2.1.1 on the wire: status codes, the QoS structure, field checks.

The stream logic that uses them is in `kme.api004`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any

from kme.errors import ApiError
from kme.wire014 import UUID_RE

UINT32_MAX = 2**32 - 1


class Status(IntEnum):
    """ETSI GS QKD 004 V2.1.1 status codes (clause 6, table of status values)."""

    SUCCESSFUL = 0                  # Successful
    PEER_NOT_CONNECTED = 1          # Successful connection, but peer not connected
    GET_KEY_INSUFFICIENT_KEY = 2    # GET_KEY failed because insufficient key available
    GET_KEY_PEER_NOT_CONNECTED = 3  # GET_KEY failed because peer application is not connected
    NO_QKD_CONNECTION = 4           # No QKD connection available
    KSID_IN_USE = 5                 # OPEN_CONNECT failed because the KSID is already in use
    TIMEOUT_ERROR = 6               # The call failed because of the specified Timeout
    QOS_NOT_MET = 7                 # OPEN failed: QoS not met, counter-proposal returned
    METADATA_SIZE_INSUFFICIENT = 8  # GET_KEY failed: Metadata field size insufficient


class Outcome(Exception):
    """A 004 call ends with a non-zero status (an answer, not an error)."""

    def __init__(self, status: Status, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"status": int(self.status), "message": self.message, **self.extra}


@dataclass(frozen=True)
class Qos:
    """The spec's QoS structure; None is a field the request left to the KME."""

    Key_chunk_size: int | None = None
    Max_bps: int | None = None
    Min_bps: int | None = None
    Jitter: int | None = None
    Priority: int | None = None
    Timeout: int | None = None
    TTL: int | None = None
    Metadata_mimetype: str | None = None

    @classmethod
    def from_json(cls, data: object) -> Qos:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ApiError.bad_request("QoS must be an object", parameter="QoS")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = data.get(f.name)
            if value is None:
                continue
            if f.name == "Metadata_mimetype":
                if not isinstance(value, str) or len(value) > 256:
                    raise ApiError.bad_request("QoS.Metadata_mimetype must be a string",
                                               parameter="QoS.Metadata_mimetype")
            else:
                uint32(value, f"QoS.{f.name}")
            values[f.name] = value
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def uint32(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT32_MAX:
        raise ApiError.bad_request(f"{name} must be an integer from 0 to {UINT32_MAX}",
                                   parameter=name)
    return value


def key_stream_id(value: object) -> str:
    if not isinstance(value, str) or not UUID_RE.fullmatch(value.lower()):
        raise ApiError.bad_request("Key_stream_ID must be a UUID (8-4-4-4-12 hex digits)",
                                   parameter="Key_stream_ID")
    return value.lower()


def sae_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError.bad_request(f"{name} must be an SAE ID", parameter=name)
    return value


def chunk_id(ksid: str, index: int) -> str:
    """key_ID of chunk `index` of stream `ksid`, the same at both KMEs."""
    return str(uuid.uuid5(uuid.UUID(ksid), str(index)))
