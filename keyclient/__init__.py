"""The one ETSI key client: every gateway gets its keys here.

- `Etsi014Client`: ETSI GS QKD 014 over mutual TLS (status, get_keys, get_keys_with_ids).
- `KeySession`: one side of a gateway pair agreeing keys with its peer, with a
  prefetched pool, rekey budgets and the supply policy (qkd / hybrid / qkd-or-pqc).
"""

from keyclient.errors import (
    KeyExhausted,
    KeySupplyError,
    KMEBadRequest,
    KMEError,
    KMEUnauthorized,
    KMEUnavailable,
    KMEUnreachable,
)
from keyclient.etsi014 import Etsi014Client, Key, KmeStatus

__all__ = [
    "Etsi014Client",
    "KMEBadRequest",
    "KMEError",
    "KMEUnauthorized",
    "KMEUnavailable",
    "KMEUnreachable",
    "Key",
    "KeyExhausted",
    "KeySupplyError",
    "KmeStatus",
]
