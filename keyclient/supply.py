"""What a `KeySession` draws QKD keys from (a module of its own: light to import)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from keyclient.etsi014 import Key


class KeySupply(Protocol):
    """Where a `KeySession` gets QKD keys: `Etsi014Client`, or `StreamKeySupply` (ETSI 004).

    Key IDs are opaque strings the master sends its peer; the slave's supply must
    resolve them with `get_keys_with_ids`.
    """

    def get_keys(self, slave_sae_id: str, number: int = 1,
                 size: int | None = None) -> list[Key]: ...

    def get_keys_with_ids(self, master_sae_id: str, key_ids: Sequence[str]) -> list[Key]: ...
