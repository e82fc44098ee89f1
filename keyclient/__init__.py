"""The one ETSI key client: every gateway gets its keys here.

- `Etsi014Client`: ETSI GS QKD 014 over mutual TLS (status, get_keys, get_keys_with_ids).
- `Etsi004Client`: ETSI GS QKD 004 key streams (open_connect, get_key, close_stream);
  `StreamKeySupply` lets a KeySession draw its keys from one open stream, and
  `SessionStreamSupply` opens (master) or follows (slave) the streams as needed.
- `KeySession`: one side of a gateway pair agreeing keys with its peer, with a
  prefetched pool, rekey budgets and the supply policy (qkd / hybrid / qkd-or-pqc).
"""

from keyclient.errors import (
    KeyExhausted,
    KeyStreamError,
    KeyStreamRefused,
    KeyStreamUnavailable,
    KeySupplyError,
    KMEAnswerLost,
    KMEBadRequest,
    KMEError,
    KMEUnauthorized,
    KMEUnavailable,
    KMEUnreachable,
)
from keyclient.etsi004 import (
    Chunk,
    Etsi004Client,
    Qos,
    SessionStreamSupply,
    StreamInfo,
    StreamKeySupply,
    StreamStatus,
)
from keyclient.etsi014 import Etsi014Client, Key, KmeStatus
from keyclient.supply import KeySupply

__all__ = [
    "Chunk",
    "Etsi004Client",
    "Etsi014Client",
    "KMEAnswerLost",
    "KMEBadRequest",
    "KMEError",
    "KMEUnauthorized",
    "KMEUnavailable",
    "KMEUnreachable",
    "Key",
    "KeyExhausted",
    "KeyStreamError",
    "KeyStreamRefused",
    "KeyStreamUnavailable",
    "KeySupply",
    "KeySupplyError",
    "KmeStatus",
    "Qos",
    "SessionStreamSupply",
    "StreamInfo",
    "StreamKeySupply",
    "StreamStatus",
]
