"""Errors of the OPoT gateway.

    OpotError
     +-- InvalidProof   a packet's proof of transit did not verify, for whatever reason
     |                  (wrong CML, replayed, unknown profile or key phase, wrong mode);
     |                  one opaque error, like Fernet's InvalidToken: the reason goes to
     |                  the node's counters, never to the sender
     +-- NotKeyed       this node holds no active profile or mask key to stamp a packet
                        with: it must drop traffic (fail closed) until keyed again
"""

from __future__ import annotations

from qgw.errors import QgwError


class OpotError(QgwError):
    """Root of the OPoT gateway's errors."""


class InvalidProof(OpotError):
    def __init__(self) -> None:
        super().__init__("invalid proof of transit")


class NotKeyed(OpotError):
    pass
