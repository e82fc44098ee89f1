"""The ledger client on the embedded chain (eth-tester) and on a real node (anvil)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from gateways.ledger.chain import (
    AlreadyAnchored,
    Ledger,
    LedgerError,
    NotAWriter,
    Reverted,
    _gas_limit,
)
from qgw.ports import free_ports
from tests.gateways.ledger.nodes import AnvilNode

ETHER = 10**18
RECORD = 150  # bytes of one encrypted record, about


def records(count: int) -> bytes:
    return os.urandom(RECORD * count)


def root() -> bytes:
    return os.urandom(32)


@pytest.fixture(params=["eth-tester", "anvil"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "eth-tester":
        yield f"eth-tester:{uuid.uuid4()}"  # a chain of its own, shared by reconnects
        return
    with AnvilNode(tmp_path).start() as node:
        yield node.url


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    ledger = Ledger.connect(ledger_url, receipt_timeout=30)
    yield ledger
    ledger.close()


@pytest.fixture
def new_account(ledger: Ledger) -> Callable[[], LocalAccount]:
    def make() -> LocalAccount:
        account: LocalAccount = Account.create()
        ledger.fund(account.address, 10 * ETHER)
        return account
    return make


@pytest.fixture
def writer(new_account: Callable[[], LocalAccount]) -> LocalAccount:
    return new_account()


@pytest.fixture
def deployed(ledger: Ledger, writer: LocalAccount) -> str:
    return ledger.deploy(writer)


def nonce(ledger: Ledger, account: LocalAccount) -> int:
    return ledger._w3.eth.get_transaction_count(account.address)


def test_anchored_batches_read_back_identical(ledger: Ledger, writer: LocalAccount,
                                              deployed: str) -> None:
    sent = [(root(), 1, records(1), os.urandom(65)), (root(), 100, records(100), os.urandom(65))]
    receipts = [ledger.anchor(writer, *batch) for batch in sent]

    assert [r.batch_id for r in receipts] == [1, 2]
    assert all(r.gas_used > 21_000 and r.tx_hash.startswith("0x") for r in receipts)
    read = ledger.batches()
    assert [(b.root, b.count, b.batch, b.signature) for b in read] == sent
    for anchored, receipt in zip(read, receipts, strict=True):
        assert anchored.batch_id == receipt.batch_id
        assert (anchored.tx_hash, anchored.block) == (receipt.tx_hash, receipt.block)
        assert anchored.writer == writer.address
        assert anchored.content_hash == keccak(anchored.batch)
        assert anchored.block_time > 1_600_000_000
        assert ledger.anchored_at(anchored.root) == receipt.block
    assert ledger.anchored_at(root()) is None
    assert ledger.head() >= receipts[-1].block
    assert ledger.chain_id > 0
    assert ledger.batches(from_block=receipts[1].block) == read[1:]
    assert ledger.batches(to_block=receipts[0].block) == read[:1]
    assert ledger.batch_by_root(sent[1][0]) == read[1]
    assert ledger.batch_by_root(root()) is None


def test_a_root_anchors_once(ledger: Ledger, writer: LocalAccount, deployed: str) -> None:
    first = ledger.anchor(writer, same := root(), 3, records(3), b"sig")
    sent_before = nonce(ledger, writer)

    with pytest.raises(AlreadyAnchored, match="batch already anchored") as refused:
        ledger.anchor(writer, same, 3, records(3), b"sig")  # other bytes, same root

    assert refused.value.block == first.block
    assert nonce(ledger, writer) == sent_before          # checked before sending: no tx
    assert len(ledger.batches()) == 1


def test_a_revert_for_a_known_root_is_already_anchored(
        ledger: Ledger, writer: LocalAccount, deployed: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another transaction anchored the root between the check and ours."""
    ledger.anchor(writer, same := root(), 1, records(1), b"sig")
    real = ledger.anchored_at
    answers: list[int | None] = [None]  # the check before sending misses it, later ones not

    def anchored_at(r: bytes) -> int | None:
        return answers.pop() if answers else real(r)

    monkeypatch.setattr(ledger, "anchored_at", anchored_at)

    with pytest.raises(AlreadyAnchored, match="batch already anchored"):
        ledger.anchor(writer, same, 1, records(1), b"sig")
    assert len(ledger.batches()) == 1


def test_an_empty_batch_is_refused(ledger: Ledger, writer: LocalAccount, deployed: str) -> None:
    with pytest.raises(Reverted, match="empty batch") as refused:
        ledger.anchor(writer, root(), 0, b"", b"sig")
    assert refused.value.reason == "empty batch"
    assert ledger.batches() == []


def test_a_restarted_writer_continues(ledger_url: str, ledger: Ledger, writer: LocalAccount,
                                      deployed: str) -> None:
    last = root()
    ledger.anchor(writer, root(), 1, records(1), b"sig")
    ledger.anchor(writer, last, 1, records(1), b"sig")
    ledger.close()

    again = Ledger.connect(ledger_url)
    again.use(deployed)
    with pytest.raises(AlreadyAnchored):  # the batch it was not sure about
        again.anchor(writer, last, 1, records(1), b"sig")
    receipts = [again.anchor(writer, root(), 1, records(1), b"sig") for _ in range(2)]

    assert [r.batch_id for r in receipts] == [3, 4]
    assert nonce(again, writer) == 1 + 4  # the deployment and four anchors
    assert [b.batch_id for b in again.batches()] == [1, 2, 3, 4]
    again.close()


def test_the_writer_of_each_batch_is_on_the_ledger(
        ledger: Ledger, writer: LocalAccount, deployed: str,
        new_account: Callable[[], LocalAccount]) -> None:
    other = new_account()
    with pytest.raises(NotAWriter, match=f"{other.address} is not an allowed writer"):
        ledger.anchor(other, root(), 1, records(1), b"sig")
    with pytest.raises(Reverted, match="not the owner"):
        ledger.set_writer(other, other.address)

    ledger.set_writer(writer, other.address)
    assert ledger.is_writer(other.address)
    ledger.anchor(other, root(), 1, records(1), b"sig")
    ledger.anchor(writer, root(), 1, records(1), b"sig")
    ledger.set_writer(writer, other.address, allowed=False)
    with pytest.raises(NotAWriter):
        ledger.anchor(other, root(), 1, records(1), b"sig")

    # A reader refuses batches from writers it does not know: it can tell them apart.
    assert [b.writer for b in ledger.batches()] == [other.address, writer.address]


def test_no_record_anchor_at_the_address(ledger: Ledger, writer: LocalAccount,
                                         deployed: str) -> None:
    nowhere = Account.create().address
    with pytest.raises(LedgerError, match=f"contract not found at {nowhere}"):
        ledger.use(nowhere)
    with pytest.raises(LedgerError, match="not an Ethereum address"):
        ledger.use("0x1234")
    # A contract whose code is one STOP: some contract, not RecordAnchor.
    creation = bytes.fromhex("6001600c60003960016000f300")
    other = ledger._transact(writer, None, creation, "deploy")["contractAddress"]
    assert other is not None
    with pytest.raises(LedgerError, match=f"the contract at {other} is not RecordAnchor"):
        ledger.use(other)
    assert ledger.address == deployed  # still attached to the right one


def test_nothing_to_anchor_to_before_deploy_or_use(ledger: Ledger,
                                                   writer: LocalAccount) -> None:
    with pytest.raises(LedgerError, match=r"call deploy\(\) or use\(address\) first"):
        ledger.anchor(writer, root(), 1, b"x", b"sig")


@pytest.mark.parametrize("scheme", ["http", "ws"])
def test_an_unreachable_node_is_a_ledger_error(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(LedgerError, match=f"ledger node at {url} unreachable"):
        Ledger.connect(url, timeout=2)


def test_a_url_that_is_no_ledger() -> None:
    with pytest.raises(LedgerError, match="expected eth-tester, http://host:port"):
        Ledger.connect("ftp://127.0.0.1:21")


def test_gas_limit_covers_the_calldata_floor_and_stays_under_the_cap() -> None:
    data = b"\x01" * 100_000                # 400,000 tokens: a floor of 4,021,000
    assert _gas_limit(1_000_000, data, 30_000_000) == 4_021_000
    assert _gas_limit(10_000_000, data, 30_000_000) == 12_000_000   # estimate + 20 %
    assert _gas_limit(15_000_000, data, 30_000_000) == 2**24        # margin capped
    with pytest.raises(LedgerError, match="transaction too large"):
        _gas_limit(1_000_000, b"\x01" * 500_000, 30_000_000)


# -- anvil only: the node goes away and comes back --

def test_anvil_restarted_with_its_state_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "chain.json"
    with AnvilNode(tmp_path).start(state_file=state) as node:
        ledger = Ledger.connect(node.url, timeout=5)
        writer: LocalAccount = Account.create()
        ledger.fund(writer.address, 10 * ETHER)
        ledger.deploy(writer)
        first = ledger.anchor(writer, known := root(), 100, records(100), b"sig")
        before = ledger.batches()

        node.stop()
        assert state.stat().st_size > 100 * RECORD
        with pytest.raises(LedgerError, match=f"ledger node at {node.url} unreachable"):
            ledger.head()
        node.start(state_file=state)

        # The same Ledger object carries on: same URL, chain, logs and nonces.
        assert ledger.batches() == before
        assert ledger.anchored_at(known) == first.block
        with pytest.raises(AlreadyAnchored):
            ledger.anchor(writer, known, 100, records(100), b"sig")
        assert ledger.anchor(writer, root(), 1, records(1), b"sig").batch_id == 2
        assert nonce(ledger, writer) == 3
        ledger.close()


def test_anvil_over_websocket(tmp_path: Path) -> None:
    state = tmp_path / "chain.json"
    with AnvilNode(tmp_path).start(state_file=state) as node:
        ledger = Ledger.connect(node.ws_url, timeout=5)
        writer: LocalAccount = Account.create()
        ledger.fund(writer.address, 10 * ETHER)
        ledger.deploy(writer)
        # Two batches make a getLogs answer over 1 MiB, the default websocket frame limit.
        sent = (root(), 2000, records(2000), os.urandom(65))
        ledger.anchor(writer, *sent)
        ledger.anchor(writer, root(), 2000, records(2000), os.urandom(65))
        (read, _) = ledger.batches()
        assert (read.root, read.count, read.batch, read.signature) == sent

        node.stop()
        node.start(state_file=state)
        assert ledger.batches()[0] == read  # a new websocket to the restarted node
        ledger.close()
