"""Give the ledger writer of the compose profile "ledger" anvil's first dev account.

    python /etc/qgw/dev_account.py /state/ledger-writer/account.key

anvil funds ten accounts derived from its default mnemonic ("test test ... junk"); the
first, 0xf39F...2266, is the writer's here, so that reader.yaml can name the writer before
the writer ever ran. That key is public knowledge: fit for a development chain only. A real
deployment lets the writer create its own key (state/account.key, 0600, on first start)
and names the writer's address in the reader's config.

Writes the key, 0600, if FILE is absent (its folder created 0700); exits 0 if FILE holds
that account already, 1 if it holds another (the reader would refuse its batches).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
ANVIL_ACCOUNT_0 = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"   # named in reader.yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the writer's account key file")
    args = parser.parse_args(argv)
    from eth_account import Account

    from gateways.ledger.state import load_or_create_account
    from qgw.tls import write_private

    path: Path = args.file
    if path.exists():
        address = load_or_create_account(path).address   # refuses a key others can read
        if address != ANVIL_ACCOUNT_0:
            print(f"{path} holds account {address}, not {ANVIL_ACCOUNT_0}, which reader.yaml "
                  "names as the writer: remove the file or change reader.yaml", file=sys.stderr)
            return 1
        print(f"{path}: account {address} (kept)")
        return 0
    Account.enable_unaudited_hdwallet_features()
    account = Account.from_mnemonic(ANVIL_MNEMONIC)    # m/44'/60'/0'/0/0
    assert account.address == ANVIL_ACCOUNT_0
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, account.key.hex().encode() + b"\n")
    print(f"{path}: account {account.address} (anvil's first dev account)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
