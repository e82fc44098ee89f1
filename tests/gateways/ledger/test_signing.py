"""The writer's signature over a batch root: who wrote it, for which chain and contract."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keys import keys
from eth_utils import keccak

from gateways.ledger.signing import (
    SignatureInvalid,
    recover_signer,
    root_message,
    sign_root,
    verify_root,
)

WRITER: LocalAccount = Account.from_key(bytes.fromhex("11" * 32))
OTHER: LocalAccount = Account.from_key(bytes.fromhex("22" * 32))
ROOT = bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
CHAIN = 1337
CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.fixture(scope="module")
def sig() -> bytes:
    return sign_root(WRITER, ROOT, chain_id=CHAIN, contract=CONTRACT)


def test_recovers_the_writer(sig: bytes) -> None:
    assert isinstance(sig, bytes) and len(sig) == 65
    assert recover_signer(ROOT, sig, chain_id=CHAIN, contract=CONTRACT) == WRITER.address
    verify_root(ROOT, sig, chain_id=CHAIN, contract=CONTRACT, writer=WRITER.address)
    verify_root(ROOT, sig, chain_id=CHAIN, contract=CONTRACT, writer=WRITER.address.lower())


def test_message_is_eip191_over_the_documented_text(sig: bytes) -> None:
    text = ("qkdgw ledger batch root v1\nchain_id: 1337\n"
            f"contract: {CONTRACT}\nroot: 0x{ROOT.hex()}").encode()
    msg = root_message(ROOT, chain_id=CHAIN, contract=CONTRACT)
    assert msg.version == b"E" and msg.body == text
    # recovered independently: keccak256("\x19Ethereum Signed Message:\n" + len + text)
    digest = keccak(b"\x19Ethereum Signed Message:\n" + str(len(text)).encode() + text)
    signature = keys.Signature(sig[:64] + bytes([sig[64] - 27]))
    assert signature.recover_public_key_from_msg_hash(digest).to_checksum_address() \
        == WRITER.address


def test_contract_address_case_does_not_matter() -> None:
    lower = sign_root(WRITER, ROOT, chain_id=CHAIN, contract=CONTRACT.lower())
    assert recover_signer(ROOT, lower, chain_id=CHAIN, contract=CONTRACT) == WRITER.address


def test_another_account_is_told_apart(sig: bytes) -> None:
    forged = sign_root(OTHER, ROOT, chain_id=CHAIN, contract=CONTRACT)
    assert recover_signer(ROOT, forged, chain_id=CHAIN, contract=CONTRACT) == OTHER.address
    with pytest.raises(SignatureInvalid, match=f"signed by {OTHER.address}, not by the writer"):
        verify_root(ROOT, forged, chain_id=CHAIN, contract=CONTRACT, writer=WRITER.address)


@pytest.mark.parametrize(("root", "chain_id", "contract"), [
    (bytes(32), CHAIN, CONTRACT),                                      # altered root
    (ROOT[:-1] + bytes([ROOT[-1] ^ 1]), CHAIN, CONTRACT),               # one bit of it
    (ROOT, 1, CONTRACT),                                                # other chain
    (ROOT, CHAIN, "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"),        # other contract
])
def test_signature_is_bound_to_root_chain_and_contract(sig: bytes, root: bytes, chain_id: int,
                                                       contract: str) -> None:
    assert recover_signer(root, sig, chain_id=chain_id, contract=contract) != WRITER.address
    with pytest.raises(SignatureInvalid, match="not by the writer"):
        verify_root(root, sig, chain_id=chain_id, contract=contract, writer=WRITER.address)


def _with(sig: bytes, *, r: int | None = None, s: int | None = None,
          v: int | None = None) -> bytes:
    r_ = int.from_bytes(sig[:32], "big") if r is None else r
    s_ = int.from_bytes(sig[32:64], "big") if s is None else s
    return r_.to_bytes(32, "big") + s_.to_bytes(32, "big") + bytes([sig[64] if v is None else v])


def test_garbage_signatures_are_refused(sig: bytes) -> None:
    s = int.from_bytes(sig[32:64], "big")
    garbage = [b"", b"x", sig[:64], sig + b"\x00", bytes(65), b"\xff" * 65,
               _with(sig, v=0), _with(sig, v=1), _with(sig, v=29), _with(sig, r=0),
               _with(sig, r=N), _with(sig, s=0),
               _with(sig, s=N - s, v=55 - sig[64])]     # the high-s twin (EIP-2 malleability)
    for bad in garbage:
        with pytest.raises(SignatureInvalid):
            recover_signer(ROOT, bad, chain_id=CHAIN, contract=CONTRACT)
        with pytest.raises(SignatureInvalid):
            verify_root(ROOT, bad, chain_id=CHAIN, contract=CONTRACT, writer=WRITER.address)


def test_unrecoverable_point_is_refused(sig: bytes) -> None:
    # r in range but not the x of any curve point: nothing recovers from it
    for r in range(1, 200):
        try:
            recover_signer(ROOT, _with(sig, r=r), chain_id=CHAIN, contract=CONTRACT)
        except SignatureInvalid:
            return
    pytest.fail("every small r recovered a key")


@pytest.mark.parametrize(("root", "chain_id", "contract", "message"), [
    (ROOT[:31], CHAIN, CONTRACT, "32 bytes"),
    (ROOT, 0, CONTRACT, "chain_id 0"),
    (ROOT, True, CONTRACT, "chain_id True"),
    (ROOT, CHAIN, "0x1234", "not an Ethereum address"),
    (ROOT, CHAIN, CONTRACT.replace("F", "f", 1), "not an Ethereum address"),  # bad checksum
])
def test_bad_arguments(root: bytes, chain_id: int, contract: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sign_root(WRITER, root, chain_id=chain_id, contract=contract)
