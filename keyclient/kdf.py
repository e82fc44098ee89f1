"""HKDF derivations with labels that name product, purpose and direction.

A session key is derived from the QKD key (and the ML-KEM secret in hybrid
mode), bound to the gateway pair, the agreement session and the epoch; a
gateway derives its per-direction, per-SA keys from the session key with its
own labels (`SessionKey.derive("ipsec/esp/in/spi=...")`).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qgw.secret import Secret

PREFIX = b"qkdgw/v1/"


def hkdf(ikm: bytes, *, salt: bytes | None, label: str, length: int = 32) -> Secret:
    return Secret(HKDF(hashes.SHA256(), length, salt, PREFIX + label.encode()).derive(ikm))


def session_key(ikm: bytes, *, session_id: bytes, master_sae: str, slave_sae: str, epoch: int,
                source: str) -> Secret:
    label = f"keysession|{master_sae}>{slave_sae}|epoch={epoch}|source={source}"
    return hkdf(ikm, salt=session_id, label=label)
