"""The reader: watches the ledger, checks every anchored batch, decrypts what checks out.

For each batch anchored since the cursor, in chain order:

    unknown_writer    the anchoring account is not one of the configured writers
    forged_signature  the root's signature does not recover that writer (signing.py)
    malformed         the batch bytes do not decode (batch.py)
    bad_root          the records' Merkle root is not the anchored root (integrity)
    bad_proof         a record's inclusion proof does not lead to the anchored root
    replayed          the (device, seq) was delivered before, by another batch
    no_key            neither the vault nor the reader's KME has the record's key
    tampered          the record does not authenticate under its key (records.py)

The first four reject the whole batch (counted once per batch), the others one record
each. Every rejection is logged with the batch (transaction, block) and record it is
about; none stops the reader. What checks out is appended to the output file
(journal.py), exactly once across restarts.

A key the KME cannot hand out *now* (KME unreachable, chunk not arrived yet) is not a
rejection: the batch is left unread, and read again at the next poll.

`audit(record, proof)` checks one record the way a third party with an inclusion proof
(outbox.proof) would: its root anchored by an allowed writer, correctly signed, the
proof leading from the record to that root, then decrypts it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from gateways.ledger.batch import BatchInvalid, batch_root, decode_batch
from gateways.ledger.chain import AnchoredBatch, Ledger, LedgerError
from gateways.ledger.journal import Delivered, ReaderJournal
from gateways.ledger.keys import NoKey, ReaderKeys
from gateways.ledger.merkle import MerkleTree, verify_inclusion
from gateways.ledger.outbox import InclusionProof
from gateways.ledger.reading import Reading
from gateways.ledger.records import RecordInvalid, SealedRecord, open_record
from gateways.ledger.signing import SignatureInvalid, verify_root
from qgw.errors import QgwError
from qgw.secret import Secret

log = logging.getLogger("qgw.gateway.ledger")

BLOCK_SPAN = 2000            # blocks per eth_getLogs request
REASONS = ("unknown_writer", "forged_signature", "malformed", "bad_root", "bad_proof",
           "replayed", "no_key", "tampered")


class Rejected(QgwError):
    """A batch or record that does not check out; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class _Later(Exception):
    """A key that may still come: leave the batch for the next poll."""


@dataclass(frozen=True)
class ReaderStats:
    batches: int                 # batches handled by this run (delivered or rejected)
    delivered: int               # readings appended to the output by this run
    rejected: dict[str, int]     # by reason (batch reasons count batches, others records)
    cursor: int | None           # last block read completely
    waiting: str | None          # why the reader is waiting (a key, the ledger, the contract)
    keys_fetched: int
    key_fetch_p50_ms: float | None


class LedgerReader:
    def __init__(self, *, ledger: Ledger, keys: ReaderKeys, journal: ReaderJournal,
                 writers: list[str], chain_id: int, contract: Callable[[], str | None],
                 start_block: Callable[[], int], poll_s: float) -> None:
        """`contract` gives the contract address once known (None: not yet: a reader may
        start before its writer has deployed); `start_block` where to read from first."""
        self.ledger = ledger
        self.keys = keys
        self.journal = journal
        self.writers = frozenset(writers)
        self.chain_id = chain_id
        self._contract_source = contract
        self._start_block = start_block
        self.poll_s = poll_s
        self.contract: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batches = self._delivered = 0
        self._rejected: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
        self._waiting: str | None = None

    # -- running --------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ledger-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except LedgerError as exc:
                self._wait_for(f"ledger: {exc}")
            except QgwError as exc:     # the contract file, the journal: an operator's job
                self._wait_for(str(exc))
            except Exception as exc:    # a reader bug must not end the reader; say so loudly
                if self._waiting != repr(exc):
                    log.exception("reading the ledger failed")
                self._waiting = repr(exc)
            self._stop.wait(self.poll_s)

    def _wait_for(self, why: str) -> None:
        if self._waiting != why:
            log.warning("reader waits: %s", why)
        self._waiting = why

    def _attach(self) -> bool:
        if self.contract is None:
            address = self._contract_source()
            if address is None:
                self._wait_for("the contract file (the writer writes it when it deploys)")
                return False
            self.ledger.use(address)
            self.contract = address
            log.info("reading batches of RecordAnchor at %s", address)
        return True

    def poll(self) -> int:
        """Read every batch anchored since the cursor; the number of readings delivered."""
        if not self._attach():
            return 0
        head = self.ledger.head()
        cursor = self.journal.cursor
        start = self._start_block() if cursor is None else cursor + 1
        delivered = 0
        while start <= head and not self._stop.is_set():
            end = min(head, start + BLOCK_SPAN - 1)
            for anchored in self.ledger.batches(from_block=start, to_block=end):
                try:
                    delivered += self._handle(anchored)
                except _Later as later:
                    self._wait_for(str(later))
                    if anchored.block > start:
                        self.journal.advance(anchored.block - 1)
                    return delivered
            self.journal.advance(end)
            start = end + 1
        if self._waiting is not None:
            log.info("reader goes on (was waiting for %s)", self._waiting)
            self._waiting = None
        return delivered

    # -- one batch ------------------------------------------------------------------

    def _handle(self, anchored: AnchoredBatch) -> int:
        if self.journal.batch_outcome(anchored.tx_hash) is not None:
            return 0               # handled before a restart, in a block read in part
        rejected: Counter[str] = Counter()
        try:
            records = self._check_batch(anchored)
        except Rejected as exc:
            log.warning("batch %s (block %d, writer %s) rejected: %s", anchored.tx_hash,
                        anchored.block, anchored.writer, exc)
            self.journal.commit(anchored.tx_hash, anchored.block, exc.reason, [])
            self._count(rejected=Counter({exc.reason: 1}))
            return 0
        delivered = self._open_records(anchored, records, rejected)
        self.journal.commit(anchored.tx_hash, anchored.block,
                            "delivered" if not rejected else "partly delivered", delivered)
        self._count(delivered=len(delivered), rejected=rejected)
        return len(delivered)

    def _check_batch(self, anchored: AnchoredBatch) -> list[SealedRecord]:
        """The batch's records, if the batch itself checks out; Rejected otherwise."""
        assert self.contract is not None
        if anchored.writer not in self.writers:
            raise Rejected("unknown_writer", f"anchored by {anchored.writer}, not an allowed "
                                             "writer")
        try:
            verify_root(anchored.root, anchored.signature, chain_id=self.chain_id,
                        contract=self.contract, writer=anchored.writer)
        except SignatureInvalid as exc:
            raise Rejected("forged_signature", str(exc)) from None
        try:
            records = decode_batch(anchored.batch)
        except BatchInvalid as exc:
            raise Rejected("malformed", str(exc)) from None
        if len(records) != anchored.count or batch_root(records) != anchored.root:
            raise Rejected("bad_root", "the records' Merkle root is not the anchored root "
                                       "(the batch was altered)")
        return records

    def _open_records(self, anchored: AnchoredBatch, records: list[SealedRecord],
                      rejected: Counter[str]) -> list[Delivered]:
        leaves = [rec.leaf() for rec in records]
        proofs = MerkleTree(leaves).proofs()
        keys: dict[str, Secret] = {}     # one QKD key roots many records: fetch it once
        delivered = []
        try:
            for index, rec in enumerate(records):
                try:
                    if not verify_inclusion(leaves[index], index, len(records), proofs[index],
                                            anchored.root):
                        raise Rejected("bad_proof", "inclusion proof does not verify")
                    earlier = self.journal.delivered_by(rec.device, rec.seq)
                    if earlier is not None:
                        raise Rejected("replayed", f"delivered before by batch {earlier}")
                    reading = self._open(rec, keys)
                except Rejected as exc:
                    log.warning("record %s in batch %s (block %d) rejected: %s: %s", rec.name,
                                anchored.tx_hash, anchored.block, exc.reason, exc)
                    rejected[exc.reason] += 1
                    continue
                delivered.append(Delivered(reading.device, reading.seq, reading.ts_ms,
                                           dict(reading.values), rec.key_id, anchored.writer,
                                           anchored.tx_hash, anchored.block))
        finally:
            for key in keys.values():
                key.wipe()
        return delivered

    def _open(self, rec: SealedRecord, keys: dict[str, Secret]) -> Reading:
        key = keys.get(rec.key_id)
        if key is None:
            try:
                key = keys[rec.key_id] = self.keys.get(rec.key_id)
            except NoKey as exc:
                if exc.transient:
                    raise _Later(f"record {rec.name}: {exc}") from None
                raise Rejected("no_key", str(exc)) from None
        try:
            return open_record(rec, key)
        except RecordInvalid as exc:
            raise Rejected("tampered", str(exc)) from None

    def _count(self, *, delivered: int = 0, rejected: Counter[str] | None = None) -> None:
        with self._lock:
            self._batches += 1
            self._delivered += delivered
            self._rejected.update(rejected or Counter())

    # -- one record, with its proof ------------------------------------------------------

    def audit(self, record: SealedRecord, proof: InclusionProof) -> Reading:
        """The reading in `record`, if `proof` ties it to a root an allowed writer anchored
        and signed; Rejected (counted) otherwise. NoKey if its key cannot be had now."""
        try:
            if not self._attach():
                raise Rejected("bad_root", "no contract to check the root against yet")
            anchored = self.ledger.batch_by_root(proof.batch_root)
            if anchored is None:
                raise Rejected("bad_root", f"root 0x{proof.batch_root.hex()} is not anchored")
            if anchored.writer not in self.writers:
                raise Rejected("unknown_writer", f"root anchored by {anchored.writer}")
            try:
                verify_root(anchored.root, anchored.signature, chain_id=self.chain_id,
                            contract=self.contract or "", writer=anchored.writer)
            except SignatureInvalid as exc:
                raise Rejected("forged_signature", str(exc)) from None
            if proof.size != anchored.count or not proof.verify(record.leaf()):
                raise Rejected("bad_proof", f"the proof does not lead from {record.name} to "
                                            "the anchored root")
            keys: dict[str, Secret] = {}
            try:
                return self._open(record, keys)
            except _Later as later:
                raise NoKey(str(later)) from None
            finally:
                for key in keys.values():
                    key.wipe()
        except Rejected as exc:
            log.warning("audit of record %s: %s: %s", record.name, exc.reason, exc)
            self._count_audit(exc.reason)
            raise

    def _count_audit(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    # -- status ---------------------------------------------------------------------

    def stats(self) -> ReaderStats:
        with self._lock:
            return ReaderStats(self._batches, self._delivered, dict(self._rejected),
                               self.journal.cursor, self._waiting, self.keys.fetched,
                               self.keys.fetch_time.percentile_ms(50))

