"""ML-KEM-768 (FIPS 203) from pyca/cryptography, for the hybrid and fallback policies."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import mlkem

from keyclient.errors import PeerError


class KemKeyPair:
    """The slave's decapsulation key for one agreement session."""

    def __init__(self) -> None:
        self._private = mlkem.MLKEM768PrivateKey.generate()
        self.public_bytes = self._private.public_key().public_bytes_raw()

    def decapsulate(self, ciphertext: bytes) -> bytes:
        try:
            return self._private.decapsulate(ciphertext)
        except ValueError:
            raise PeerError("malformed ML-KEM ciphertext from the peer") from None

    def __repr__(self) -> str:
        return "<KemKeyPair ML-KEM-768>"


def encapsulate(public_bytes: bytes) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext) for the peer's public key."""
    try:
        public = mlkem.MLKEM768PublicKey.from_public_bytes(public_bytes)
    except ValueError:
        raise PeerError("the peer's ML-KEM-768 public key is malformed") from None
    return public.encapsulate()
