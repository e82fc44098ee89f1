"""The writer's signature over a batch root, checkable by anyone who holds the batch.

The anchoring transaction is signed too, but that signature stays with the chain;
this one travels with the batch, so a reader (or an auditor with a copy of the
batch) can tell who wrote it without trusting whoever handed it the bytes.

The signature is EIP-191 (`personal_sign`, version 0x45) over a text message that
names its purpose, the chain, the ledger contract and the root:

    qkdgw ledger batch root v1
    chain_id: 1337
    contract: 0x5FbDB2315678afecb367f032d93F642f64180aa3
    root: 0x<64 hex digits>

so it cannot be replayed on another chain or contract, nor taken for any other
message the same account signs. Signatures are the 65 bytes r || s || v with
v in {27, 28} and low s (EIP-2): anything else is refused, so each root has one
valid signature per signer.
"""

from __future__ import annotations

from eth_account import Account
from eth_account.messages import SignableMessage, encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import (
    is_address,
    is_checksum_address,
    is_checksum_formatted_address,
    to_checksum_address,
)

from qgw.errors import QgwError

SIGNATURE_LEN = 65
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class SignatureInvalid(QgwError):
    """A root signature that is malformed, or not by the expected writer."""


def checksum_address(value: str) -> str:
    """`value` in EIP-55 form; ValueError if it is no address or its mixed case is wrong."""
    if not isinstance(value, str) or not is_address(value):
        raise ValueError(f"{value!r} is not an Ethereum address")
    if is_checksum_formatted_address(value) and not is_checksum_address(value):
        # Mixed case is an EIP-55 checksum; a wrong one means a mistyped address.
        raise ValueError(f"{value!r} is not an Ethereum address (bad EIP-55 checksum)")
    return str(to_checksum_address(value))


def root_message(root: bytes, *, chain_id: int, contract: str) -> SignableMessage:
    """The EIP-191 message a writer signs for `root` on `chain_id` at `contract`."""
    if not isinstance(root, bytes) or len(root) != 32:
        raise ValueError("a batch root is 32 bytes")
    if not isinstance(chain_id, int) or isinstance(chain_id, bool) or chain_id <= 0:
        raise ValueError(f"chain_id {chain_id!r} is not a positive integer")
    text = (f"qkdgw ledger batch root v1\n"
            f"chain_id: {chain_id}\n"
            f"contract: {checksum_address(contract)}\n"
            f"root: 0x{root.hex()}")
    return encode_defunct(text=text)


def sign_root(account: LocalAccount, root: bytes, *, chain_id: int, contract: str) -> bytes:
    """The writer's 65-byte signature over `root`."""
    message = root_message(root, chain_id=chain_id, contract=contract)
    return bytes(account.sign_message(message).signature)


def _check_shape(signature: bytes) -> None:
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_LEN:
        raise SignatureInvalid(f"a root signature is {SIGNATURE_LEN} bytes")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if signature[64] not in (27, 28) or not 0 < r < _SECP256K1_N \
            or not 0 < s <= _SECP256K1_N // 2:
        raise SignatureInvalid("malformed root signature (r, s or v out of range)")


def recover_signer(root: bytes, signature: bytes, *, chain_id: int, contract: str) -> str:
    """The checksum address that signed `root`; SignatureInvalid if nobody could have.

    Any well-formed signature recovers to some address: compare the result with the
    writer you expect (or call `verify_root`).
    """
    message = root_message(root, chain_id=chain_id, contract=contract)
    _check_shape(signature)
    try:
        address = Account.recover_message(message, signature=bytes(signature))
    except Exception as exc:  # eth_keys raises BadSignature, ValueError, ...: all mean garbage
        raise SignatureInvalid(f"root signature does not verify: {exc}") from None
    return str(address)


def verify_root(root: bytes, signature: bytes, *, chain_id: int, contract: str,
                writer: str) -> None:
    """Raise SignatureInvalid unless `writer` signed `root` for this chain and contract."""
    expected = checksum_address(writer)
    signer = recover_signer(root, signature, chain_id=chain_id, contract=contract)
    if signer != expected:
        raise SignatureInvalid(f"batch root signed by {signer}, not by the writer {writer}")
