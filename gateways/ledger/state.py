"""What a ledger gateway keeps in its state folder besides the outbox and the vault.

    account.key     the writer's Ethereum private key (hex), created 0600 on first start
    contract.json   the RecordAnchor deployment the writer uses: {"address", "chain_id",
                    "block", "owner"}; a reader may read a copy of it (`contract_file`)

Files are written whole (temporary file, fsync, rename), so a crash leaves the old
version or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateways.ledger.signing import checksum_address
from qgw.errors import ConfigError
from qgw.tls import check_key_file, write_private


def load_or_create_account(path: Path) -> LocalAccount:
    """The account whose key is in `path`; a new one (file created 0600) if there is none.

    A key file readable by others is refused (PkiError), as are the PKI's keys.
    """
    if not path.exists():
        account: LocalAccount = Account.create()
        write_private(path, account.key.hex().encode() + b"\n")
        _fsync_dir(path.parent)
        return account
    check_key_file(path)
    text = path.read_text().strip()
    try:
        loaded: LocalAccount = Account.from_key(text)
    except (ValueError, TypeError):
        # The message must not quote the file: it holds a private key.
        raise ConfigError(str(path), None, "not an Ethereum private key (64 hex digits)") \
            from None
    return loaded


@dataclass(frozen=True)
class Deployment:
    address: str
    chain_id: int
    block: int          # the block the contract was deployed in: readers start there
    owner: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            raw = json.loads(path.read_text())
            return cls(checksum_address(raw["address"]), int(raw["chain_id"]),
                       int(raw["block"]), checksum_address(raw["owner"]))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(str(path), None, f"not a contract file: {exc}") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
