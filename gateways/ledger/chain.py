"""The ledger client: the RecordAnchor contract on an Ethereum chain, over web3 (synchronous).

    ledger = Ledger.connect("http://127.0.0.1:8545")   # or "ws://...", or "eth-tester"
    ledger.use(address)                                 # or: address = ledger.deploy(owner)
    receipt = ledger.anchor(writer, root, count, batch, signature)
    for anchored in ledger.batches(from_block=next_block): ...

"eth-tester" is an embedded py-evm chain in this process, shared by every Ledger that
connects to it ("eth-tester:NAME" names a separate one), so a writer and a reader gateway in
one process (tests, the demo) see the same ledger. A URL is a real node (anvil, geth, a
consortium chain). Transactions are signed here with the writer's eth-account key and sent
raw, so the node never holds a key; the nonce is the node's pending count for the account,
so a restarted writer carries on from wherever the chain is.

The batch travels in the Anchored event, so a reader needs eth_getLogs only, not a
transaction fetch and calldata decoding per batch. Gas used per anchor (150-byte records of
random bytes; a contract's first anchor costs 17,100 more), measured on anvil 1.7.1:

    records   Prague or later: event or calldata   Cancun: batch in event / calldata only
    1                      62,500 / 60,500                      62,500 / 60,500
    100                   625,500 / 625,500                    425,600 / 303,500
    1000                6,010,000 / 6,010,000                3,765,300 / 2,550,500

From Prague on (py-evm under eth-tester, anvil's default) the EIP-7623 calldata floor,
40 gas a non-zero byte, exceeds calldata plus log gas, so the event costs nothing extra.

Errors, translated from web3, requests and websockets in one place (_errors):

    LedgerError              node unreachable or failing, no contract, no receipt in time
     +-- Reverted            the contract reverted the transaction; .reason is its message
          +-- AlreadyAnchored    the root was anchored before (.root, .block)
          +-- NotAWriter         the contract's owner has not allowed this account
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import requests
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception, Web3RPCError
from web3.providers import BaseProvider, JSONBaseProvider
from web3.types import BlockData, EventData, RPCEndpoint, RPCResponse, TxParams, TxReceipt
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from gateways.ledger.contract import ARTIFACT_FILE, load_artifact
from qgw.errors import QgwError

# EIP-7825 (Osaka) caps a transaction at 2**24 gas, about 2,790 records of 150 bytes.
# Applied on every chain, so a batch that anchors on one backend anchors on all.
TX_GAS_CAP = 2**24
INTRINSIC_GAS = 21_000
FLOOR_GAS_PER_TOKEN = 10       # EIP-7623: a zero calldata byte is 1 token, any other 4
RECEIPT_POLL_SECONDS = 0.05


class LedgerError(QgwError):
    """The ledger could not be reached or did not do what was asked."""


class Reverted(LedgerError):
    """The contract reverted the transaction."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or f"the RecordAnchor contract refused: {reason}")


class AlreadyAnchored(Reverted):
    def __init__(self, root: bytes, block: int | None) -> None:
        self.root = root
        self.block = block
        where = f" in block {block}" if block is not None else ""
        super().__init__("already anchored",
                         f"batch already anchored: root 0x{root.hex()}{where}")


class NotAWriter(Reverted):
    def __init__(self, account: str, contract: str) -> None:
        self.account = account
        super().__init__("not a writer", f"account {account} is not an allowed writer of "
                         f"the RecordAnchor contract at {contract}: its owner must allow it")


@dataclass(frozen=True)
class AnchoredBatch:
    batch_id: int
    root: bytes
    count: int
    writer: str            # checksum address of the account that sent the transaction
    batch: bytes
    content_hash: bytes    # keccak256(batch), computed by the contract
    signature: bytes
    tx_hash: str
    block: int
    block_time: int        # the block's timestamp, seconds since the Unix epoch


@dataclass(frozen=True)
class Receipt:
    batch_id: int
    tx_hash: str
    block: int
    gas_used: int


class Ledger:
    """One connection to a chain, attached to at most one RecordAnchor contract.

    Transactions are sent one at a time (estimate, nonce, send, receipt under one lock), so
    threads sharing a Ledger never race for a nonce.
    """

    def __init__(self, w3: Web3, url: str, chain_id: int, close: Callable[[], None],
                 receipt_timeout: float) -> None:
        """Use Ledger.connect."""
        self.url = url
        self._w3 = w3
        self._chain_id = chain_id
        self._close = close
        self._receipt_timeout = receipt_timeout
        self._artifact = load_artifact()
        self._contract: Contract | None = None
        self._send_lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, *, timeout: float = 10.0,
                receipt_timeout: float = 60.0) -> Ledger:
        """A ledger at `url`: "eth-tester[:NAME]", "http(s)://host:port" or "ws(s)://host:port".

        `timeout` bounds each request to the node; `receipt_timeout` the wait for a
        transaction to be mined.
        """
        provider, close = _provider(url, timeout)
        w3 = Web3(provider)
        # Transactions carry their chain id and gas from here, and no address is an ENS
        # name: these layers would only add requests (validation asks eth_chainId before
        # every call) and time.
        for layer in ("validation", "ens_name_to_address", "gas_price_strategy",
                      "gas_estimate"):
            w3.middleware_onion.remove(layer)
        try:
            with _errors(url, "connect"):
                chain_id = w3.eth.chain_id
        except LedgerError:
            close()
            raise
        return cls(w3, url, chain_id, close, receipt_timeout)

    @property
    def chain_id(self) -> int:
        """The chain's id (EIP-155), read once at connect: deployments are per chain."""
        return self._chain_id

    @property
    def address(self) -> str | None:
        """The contract this ledger is attached to."""
        return self._contract.address if self._contract is not None else None

    def fund(self, address: str, wei: int) -> None:
        """Dev chains only: send ether from the node's first prefunded, unlocked account."""
        with _errors(self.url, "fund"):
            dev_accounts = self._w3.eth.accounts
            if not dev_accounts:
                raise LedgerError(f"ledger node at {self.url} has no unlocked dev accounts "
                                  f"(not a dev chain): fund {address} from a wallet")
            transfer: dict[str, Any] = {"from": dev_accounts[0], "to": _checksum(address),
                                        "value": wei, "gas": INTRINSIC_GAS,
                                        **self._fees(self._w3.eth.get_block("latest"))}
            tx_hash = self._w3.eth.send_transaction(cast(TxParams, transfer))
            self._mined(tx_hash, "fund")

    def deploy(self, account: LocalAccount) -> str:
        """Deploy RecordAnchor with `account` as owner (and first writer); attach to it."""
        receipt = self._transact(account, None, self._artifact.bytecode, "deploy")
        if receipt["status"] != 1:
            raise LedgerError(f"deploying RecordAnchor failed: transaction "
                              f"{receipt['transactionHash'].to_0x_hex()} reverted")
        address = receipt["contractAddress"]
        assert address is not None  # a successful creation always has one
        self.use(address)
        return address

    def use(self, address: str) -> None:
        """Attach to a deployed RecordAnchor; LedgerError if the code there is not it."""
        checksum = _checksum(address)
        with _errors(self.url, "use"):
            code = self._w3.eth.get_code(checksum)
        if not code:
            raise LedgerError(f"contract not found at {checksum} (ledger node at {self.url})")
        if bytes(code) != self._artifact.deployed_bytecode:
            raise LedgerError(f"the contract at {checksum} is not RecordAnchor: its code "
                              f"differs from {ARTIFACT_FILE}")
        self._contract = self._w3.eth.contract(address=checksum, abi=self._artifact.abi)

    def set_writer(self, owner: LocalAccount, writer: str, allowed: bool = True) -> None:
        """Allow (or stop) `writer` to anchor; only the contract's owner may."""
        contract = self._attached()
        data = _encode(contract, "setWriter", [_checksum(writer), allowed])
        receipt = self._transact(owner, contract.address, data, "set writer")
        if receipt["status"] != 1:
            raise LedgerError(f"setWriter transaction {receipt['transactionHash'].to_0x_hex()}"
                              " reverted")

    def is_writer(self, address: str) -> bool:
        contract = self._attached()
        with _errors(self.url, "is_writer"):
            return bool(contract.functions.writers(_checksum(address)).call())

    def anchor(self, account: LocalAccount, root: bytes, count: int, batch: bytes,
               signature: bytes) -> Receipt:
        """Anchor one batch under its Merkle root, signed by `account`, and wait until mined.

        AlreadyAnchored if the root is on the ledger: checked before sending, and mapped from
        the revert when another transaction anchored it in between.
        """
        contract = self._attached()
        _check_root(root)
        block = self.anchored_at(root)
        if block is not None:
            raise AlreadyAnchored(root, block)
        data = _encode(contract, "anchor", [root, count, batch, signature])
        try:
            receipt = self._transact(account, contract.address, data, "anchor")
        except Reverted as e:
            raise self._refusal(e, account, root) from e
        tx_hash = receipt["transactionHash"].to_0x_hex()
        if receipt["status"] != 1:
            block = self.anchored_at(root)
            if block is not None:
                raise AlreadyAnchored(root, block)
            raise LedgerError(f"anchor transaction {tx_hash} reverted in block "
                              f"{receipt['blockNumber']}")
        (event,) = contract.events.Anchored().process_receipt(receipt)
        return Receipt(batch_id=event["args"]["id"], tx_hash=tx_hash,
                       block=receipt["blockNumber"], gas_used=receipt["gasUsed"])

    def anchored_at(self, root: bytes) -> int | None:
        """The block that anchored `root`, or None."""
        contract = self._attached()
        _check_root(root)
        with _errors(self.url, "anchoredAt"):
            block = int(contract.functions.anchoredAt(root).call())
        return block or None

    def batches(self, from_block: int = 0, to_block: int | None = None) -> list[AnchoredBatch]:
        """Batches anchored in blocks from_block..to_block (inclusive; None: the latest)."""
        contract = self._attached()
        with _errors(self.url, "read batches"):
            logs = contract.events.Anchored.get_logs(
                from_block=from_block, to_block=to_block if to_block is not None else "latest")
            return self._anchored(logs)

    def batch_by_root(self, root: bytes) -> AnchoredBatch | None:
        """The batch anchored under `root`: how a restarted writer learns what got through."""
        block = self.anchored_at(root)
        if block is None:
            return None
        contract = self._attached()
        with _errors(self.url, "read batch"):
            logs = contract.events.Anchored.get_logs(
                argument_filters={"root": root}, from_block=block, to_block=block)
            found = self._anchored(logs)
        return found[0] if found else None

    def head(self) -> int:
        """The number of the latest block."""
        with _errors(self.url, "head"):
            return self._w3.eth.block_number

    def close(self) -> None:
        self._close()

    # -- internals --

    def _attached(self) -> Contract:
        if self._contract is None:
            raise LedgerError("no RecordAnchor contract: call deploy() or use(address) first")
        return self._contract

    def _refusal(self, refused: Reverted, account: LocalAccount, root: bytes) -> Reverted:
        if refused.reason == "already anchored":
            return AlreadyAnchored(root, self.anchored_at(root))
        if refused.reason == "not a writer":
            return NotAWriter(account.address, self._attached().address)
        return refused

    def _transact(self, account: LocalAccount, to: str | None, data: bytes,
                  doing: str) -> TxReceipt:
        """Estimate, sign locally, send raw, wait for the receipt."""
        call: TxParams = {"from": account.address, "data": HexBytes(data)}
        if to is not None:
            call["to"] = cast(Any, to)
        with self._send_lock, _errors(self.url, doing):
            estimate = self._w3.eth.estimate_gas(call)  # a revert surfaces here, with its reason
            latest = self._w3.eth.get_block("latest")
            tx: dict[str, Any] = {
                "data": HexBytes(data),
                "value": 0,
                "gas": _gas_limit(estimate, data, latest["gasLimit"]),
                # Pending, not latest: counts what this account already sent but is unmined.
                "nonce": self._w3.eth.get_transaction_count(account.address, "pending"),
                "chainId": self._chain_id,
                "type": 2,
                **self._fees(latest),
            }
            if to is not None:
                tx["to"] = to
            signed = account.sign_transaction(tx)
            tx_hash = self._w3.eth.send_raw_transaction(signed.raw_transaction)
            return self._mined(tx_hash, doing)

    def _fees(self, latest: BlockData) -> dict[str, int]:
        """EIP-1559 fees: the node's suggested tip over twice the latest base fee."""
        tip = self._w3.eth.max_priority_fee
        # Twice the base fee stays valid through six full blocks of base fee rises.
        return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * latest["baseFeePerGas"] + tip}

    def _mined(self, tx_hash: HexBytes, doing: str) -> TxReceipt:
        try:
            return self._w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self._receipt_timeout, poll_latency=RECEIPT_POLL_SECONDS)
        except TimeExhausted as e:
            raise LedgerError(
                f"{doing}: transaction {tx_hash.to_0x_hex()} not mined after "
                f"{self._receipt_timeout:g} s (ledger node at {self.url}); it may be mined "
                "later: anchored_at() or batch_by_root() will tell") from e

    def _anchored(self, logs: tuple[EventData, ...] | list[EventData]) -> list[AnchoredBatch]:
        block_times: dict[int, int] = {}
        found = []
        for log in logs:
            number = log["blockNumber"]
            if number not in block_times:
                block_times[number] = self._w3.eth.get_block(number)["timestamp"]
            args = log["args"]
            found.append(AnchoredBatch(
                batch_id=args["id"], root=bytes(args["root"]), count=args["count"],
                writer=args["writer"], batch=bytes(args["batch"]),
                content_hash=bytes(args["contentHash"]), signature=bytes(args["signature"]),
                tx_hash=log["transactionHash"].to_0x_hex(), block=number,
                block_time=block_times[number]))
        return found


def _gas_limit(estimate: int, data: bytes, block_gas_limit: int) -> int:
    """The estimate with a margin, but never below the EIP-7623 calldata floor.

    eth-tester's estimate leaves the floor out, though py-evm charges it; a real node
    refuses a transaction whose limit is below it.
    """
    nonzero = len(data) - data.count(0)
    floor = INTRINSIC_GAS + FLOOR_GAS_PER_TOKEN * (len(data) - nonzero + 4 * nonzero)
    needed = max(estimate, floor)
    ceiling = min(block_gas_limit, TX_GAS_CAP)
    if needed > ceiling:
        raise LedgerError(f"transaction too large: it needs {needed:,} gas, a transaction may "
                          f"use {ceiling:,}: anchor smaller batches")
    return min(max(estimate * 6 // 5, floor), ceiling)


def _encode(contract: Contract, function: str, args: list[Any]) -> bytes:
    return bytes(HexBytes(contract.encode_abi(function, args=args)))


def _check_root(root: bytes) -> None:
    if len(root) != 32:
        raise ValueError(f"a Merkle root is 32 bytes, not {len(root)}")


def _checksum(address: str) -> ChecksumAddress:
    if not Web3.is_address(address):
        raise LedgerError(f"not an Ethereum address: {address!r}")
    return Web3.to_checksum_address(address)


@contextmanager
def _errors(url: str, doing: str) -> Iterator[None]:
    """The one place where web3 and transport errors become LedgerErrors.

    The embedded chain raises what a node would (_EmbeddedProvider), so it needs no case.
    """
    try:
        yield
    except LedgerError:
        raise
    except ContractLogicError as e:
        raise Reverted(str(e.message or e).removeprefix("execution reverted: ")) from e
    except OSError as e:  # requests' errors, websockets' and sockets' timeouts are OSErrors
        raise LedgerError(f"ledger node at {url} unreachable ({doing}): {e}") from e
    except WebSocketException as e:
        raise LedgerError(f"ledger node at {url} unreachable ({doing}): {e}") from e
    except Web3RPCError as e:
        raise LedgerError(f"ledger node at {url} refused {doing}: {e.message}") from e
    except Web3Exception as e:
        raise LedgerError(f"{doing} failed (ledger node at {url}): {e}") from e


# -- providers --

def _provider(url: str, timeout: float) -> tuple[BaseProvider, Callable[[], None]]:
    """The web3 provider for `url`, and how to release it."""
    if url == "eth-tester" or url.startswith("eth-tester:"):
        return _EmbeddedProvider(url), lambda: None
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        # Web3's own retries would hide an unreachable node for seconds; the gateway's
        # outbox retries instead, and says why.
        session = requests.Session()
        http = HTTPProvider(url, request_kwargs={"timeout": timeout}, session=session,
                            exception_retry_configuration=None)
        return http, session.close
    if scheme in ("ws", "wss"):
        ws = _WebSocketProvider(url, timeout)
        return ws, ws.close
    raise LedgerError(f"ledger URL {url!r}: expected eth-tester, http://host:port "
                      "or ws://host:port")


_embedded: dict[str, tuple[Any, threading.Lock]] = {}   # name -> (EthereumTester, its lock)
_embedded_lock = threading.Lock()


class _EmbeddedProvider(EthereumTesterProvider):
    """A py-evm chain in this process, one per name, shared by every Ledger using the name.

    py-evm is not thread-safe: a lock per chain serialises requests. eth-tester's own
    exceptions become the ones web3 raises for a real node, so that _errors has one
    vocabulary. eth-tester (and py-evm) load only when an embedded chain is used.
    """

    def __init__(self, name: str) -> None:
        from eth_tester import EthereumTester
        from eth_tester.exceptions import TransactionFailed, ValidationError

        self._failures = (TransactionFailed, ValidationError)
        with _embedded_lock:
            if name not in _embedded:
                _embedded[name] = (EthereumTester(), threading.Lock())
            tester, self._chain_lock = _embedded[name]
        super().__init__(ethereum_tester=tester)

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        reverted, invalid = self._failures
        with self._chain_lock:
            try:
                return super().make_request(method, params)
            except reverted as e:    # already "execution reverted: <reason>", as from a node
                raise ContractLogicError(str(e)) from e
            except invalid as e:
                raise Web3RPCError(f"{method}: {e}") from e


class _WebSocketProvider(JSONBaseProvider):
    """JSON-RPC over a websocket, synchronously (web3's WebSocketProvider is async only).

    One request at a time. A broken connection is dropped and reopened by the next
    request, so a restarted node is picked up again.
    """

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__()
        self._url = url
        self._timeout = timeout
        self._socket: ClientConnection | None = None
        self._opened = ExitStack()
        self._lock = threading.Lock()

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        request = self.encode_rpc_request(method, params)
        request_id = json.loads(request)["id"]
        with self._lock:
            try:
                return self._exchange(request, request_id)
            except ConnectionClosed:
                # A connection the node closed since its last use (it restarted): one new
                # connection. A repeated request is harmless: a resent signed transaction
                # has the same hash.
                self._drop()
            except (OSError, WebSocketException) as e:
                self._drop()
                raise ConnectionError(f"websocket {self._url}: {e}") from e
            try:
                return self._exchange(request, request_id)
            except (OSError, WebSocketException) as e:
                self._drop()
                raise ConnectionError(f"websocket {self._url}: {e}") from e

    def _exchange(self, request: bytes, request_id: Any) -> RPCResponse:
        if self._socket is None:
            # No frame size limit: a getLogs answer holds whole batches.
            self._socket = self._opened.enter_context(
                ws_connect(self._url, open_timeout=self._timeout, max_size=None))
        self._socket.send(request.decode())
        while True:  # skip anything that is not the answer (subscription messages)
            raw = self._socket.recv(self._timeout)
            response = self.decode_rpc_response(raw.encode() if isinstance(raw, str) else raw)
            if response.get("id") == request_id:
                return response

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        self._socket = None
        self._opened.close()
