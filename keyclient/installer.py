"""The contract between the key source (KeySession) and a gateway's data plane.

KeySession decides when keys change; the gateway only installs them. Calls
come in this order for each epoch (make-before-break):

    install(epoch, key)   accept traffic protected under `key` (inbound first)
    activate(epoch)       protect outgoing traffic under it from now on
    retire(epoch)         forget an older key once the overlap has passed

and `invalidate(reason)` when no usable key is left: the gateway must stop
protecting traffic (drop it, never send it in clear) until the next activate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from keyclient.kdf import hkdf
from keyclient.policy import KeySource
from qgw.secret import Secret


@dataclass(frozen=True)
class SessionKey:
    """One epoch's key, the same at both gateways of a pair."""

    epoch: int
    source: KeySource
    key_id: str | None  # the QKD key's ID; None for an ML-KEM-only key
    secret: Secret

    def derive(self, label: str, length: int = 32) -> Secret:
        """A subkey for one purpose and direction; `label` names them (e.g. "esp/a>b")."""
        return hkdf(self.secret.expose(), salt=None,
                    label=f"gateway|epoch={self.epoch}|{label}", length=length)


class KeyInstaller(Protocol):
    def install(self, epoch: int, key: SessionKey) -> None: ...

    def activate(self, epoch: int) -> None: ...

    def retire(self, epoch: int) -> None: ...

    def invalidate(self, reason: str) -> None: ...
