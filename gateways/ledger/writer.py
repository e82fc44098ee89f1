"""The writer: readings sealed into the outbox, batches signed and anchored on the ledger.

    readings --take--> WriterKeys.seal each --> Outbox.add_many (one transaction, one
                       fsync: on disk before the sensors are acknowledged)
    anchor thread: Outbox.take_batch --> sign_root --> Ledger.anchor --> Outbox.mark_anchored

The ingest hands readings over in groups (one MQTT network pass, one REST request),
so at a high rate one fsync serves many readings. A (device, seq) the outbox holds
already is refused as "replayed" (a sensor that resent, or MQTT's at-least-once
delivery), and counted. A reading is sealed before the outbox says whether it is a
replay (one lookup per reading would cost more than the rare replay's seal); a
replay's record is thrown away, never stored or sent.

Nothing is lost and nothing anchored twice. A batch's bytes and root are stored when
it is taken; on start, and after any failure, each batch still pending is first
looked up on the ledger by its root (anchored by a run that died before recording
it: marked anchored from the chain) and otherwise sent again, the same bytes. The
contract refuses a root twice, so a retry can never anchor the records again under
the same root, and the outbox never puts a record in two batches. An unreachable
ledger only delays: the thread retries with backoff (0.5 s doubling up to 10 s)
while readings keep being sealed into the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from gateways.ledger.chain import AlreadyAnchored, Ledger, LedgerError
from gateways.ledger.config import BatchPolicy
from gateways.ledger.ingest import Refused
from gateways.ledger.keys import NoKey, Timings, WriterKeys
from gateways.ledger.outbox import Outbox, OutboxError, PendingBatch
from gateways.ledger.reading import Reading
from gateways.ledger.records import RecordInvalid, SealedRecord
from gateways.ledger.signing import sign_root

log = logging.getLogger("qgw.gateway.ledger")

RETRY_S = 0.5
RETRY_MAX_S = 10.0


@dataclass(frozen=True)
class WriterStats:
    sealed: int                 # readings sealed and stored in the outbox by this run
    replayed: int               # readings refused: (device, seq) stored before
    batches_anchored: int       # by this run (including those confirmed from the chain)
    records_anchored: int
    confirmed_from_chain: int   # pending batches an earlier run had anchored already
    queued: int                 # outbox: records not in a batch yet
    pending_batches: int        # outbox: batches taken, not confirmed anchored
    anchored_total: int         # outbox: records anchored, all runs
    anchor_p50_ms: float | None  # sign + send + mined, per batch
    ledger_error: str | None    # the last failure, while anchoring keeps failing
    gas_used: int = 0           # by this run's anchoring transactions (what anchoring costs)


class LedgerWriter:
    def __init__(self, *, keys: WriterKeys, outbox: Outbox, ledger: Ledger,
                 account: LocalAccount, chain_id: int, contract: str, policy: BatchPolicy,
                 stop_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`stop_timeout_s`: how long `stop` waits for a transaction in flight."""
        self.keys = keys
        self.outbox = outbox
        self.ledger = ledger
        self.account = account
        self.chain_id = chain_id
        self.contract = contract
        self.policy = policy
        self.stop_timeout_s = stop_timeout_s
        self.clock = clock
        self.anchor_time = Timings()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unbatched = outbox.stats()["queued"]
        self._sealed = self._replayed = 0
        self._batches = self._records = self._confirmed = self._gas = 0
        self._ledger_error: str | None = None

    # -- taking readings ------------------------------------------------------------

    def take(self, readings: list[Reading]) -> list[Refused | None]:
        """Seal `readings` and store them in one outbox transaction: on disk when this
        returns. Per reading, None (taken) or why not: Refused "replayed" (its (device,
        seq) was stored before, or came twice in `readings`) or "no_key" (no QKD key to
        seal it with: nothing is sealed under nothing, nothing stored in clear). Once one
        reading finds no key, the rest are refused at once rather than each waiting
        `wait_s` for one. Raises (OutboxError, sqlite3.Error) if the transaction failed:
        then none of them is stored."""
        outcomes: list[Refused | None] = []
        records: list[SealedRecord] = []
        sealed_at: list[int] = []          # index in `readings` of each record
        no_key: NoKey | None = None
        for index, reading in enumerate(readings):
            if no_key is None:
                try:
                    records.append(self.keys.seal(reading))
                    sealed_at.append(index)
                    outcomes.append(None)
                    continue
                except NoKey as exc:
                    no_key = exc
                except RecordInvalid as exc:   # cannot be sealed, now or ever
                    outcomes.append(Refused("bad_field", str(exc), reading.device))
                    continue
            outcomes.append(Refused("no_key", f"not taken ({no_key}); send it again later",
                                    reading.device))
        added = self.outbox.add_many(records) if records else []
        for index, stored in zip(sealed_at, added, strict=True):
            if not stored:
                reading = readings[index]
                outcomes[index] = Refused("replayed", f"seq {reading.seq} was taken before",
                                          reading.device)
        with self._lock:
            self._replayed += added.count(False)
        self._stored(added.count(True))
        return outcomes

    def _stored(self, n: int) -> None:
        with self._lock:
            self._sealed += n
            self._unbatched += n
            full = self._unbatched >= self.policy.max_records
        if full:
            self._wake.set()     # a full batch goes now, not at the next interval

    # -- anchoring ------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ledger-anchor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # A transaction in flight is left to finish: its batch is pending on disk and
            # is confirmed from the chain by the next run if it made it.
            self._thread.join(timeout=self.stop_timeout_s)
            if self._thread.is_alive():
                log.warning("anchoring still waits for the ledger after %g s; leaving it",
                            self.stop_timeout_s)
            self._thread = None

    def _run(self) -> None:
        delay = RETRY_S
        due = self.clock()
        while not self._stop.is_set():
            self._wake.wait(max(0.0, due - self.clock()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                more = self.anchor_due()
            except (LedgerError, OutboxError) as exc:
                self._failed(str(exc))
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                due = self.clock()
                continue
            if self._ledger_error is not None:
                log.info("anchoring works again")
                self._ledger_error = None
            delay = RETRY_S
            due = self.clock() if more else self.clock() + self.policy.interval_s

    def anchor_due(self) -> bool:
        """Anchor the pending batches, then one new batch; True if a full batch waits."""
        for pending in self.outbox.pending():
            if self._stop.is_set():
                return False
            self._recover(pending)
        batch = self.outbox.take_batch(self.policy.max_records, max_bytes=self.policy.max_bytes)
        if batch is None:
            return False
        with self._lock:
            self._unbatched = max(0, self._unbatched - batch.size)
        self._anchor(batch)
        with self._lock:
            return self._unbatched >= self.policy.max_records

    def _recover(self, batch: PendingBatch) -> None:
        """A batch taken before: confirmed from the chain if it got there, else sent again."""
        found = self.ledger.batch_by_root(batch.root)
        if found is None:
            log.info("batch %d (%d records) not on the ledger: sending it again",
                     batch.batch_id, batch.size)
            self._anchor(batch)
            return
        self.outbox.mark_anchored(batch.batch_id, found.tx_hash, found.block)
        log.info("batch %d was anchored by an earlier run in block %d", batch.batch_id,
                 found.block)
        with self._lock:
            self._confirmed += 1
            self._batches += 1
            self._records += batch.size

    def _anchor(self, batch: PendingBatch) -> None:
        started = time.perf_counter()
        signature = sign_root(self.account, batch.root, chain_id=self.chain_id,
                              contract=self.contract)
        try:
            receipt = self.ledger.anchor(self.account, batch.root, batch.size, batch.encoded,
                                         signature)
            tx_hash, block, gas = receipt.tx_hash, receipt.block, receipt.gas_used
        except AlreadyAnchored:
            # Sent before and mined, but the answer was lost (timeout, node restart).
            found = self.ledger.batch_by_root(batch.root)
            if found is None:
                raise LedgerError(f"the ledger says root 0x{batch.root.hex()} is anchored but "
                                  "has no event for it") from None
            if found.writer != self.account.address:
                log.warning("batch %d's root was anchored by %s, not by this writer",
                            batch.batch_id, found.writer)
            tx_hash, block, gas = found.tx_hash, found.block, 0   # paid by that send
        self.outbox.mark_anchored(batch.batch_id, tx_hash, block)
        self.anchor_time.add(time.perf_counter() - started)
        with self._lock:
            self._batches += 1
            self._records += batch.size
            self._gas += gas
        log.debug("batch %d: %d records anchored in block %d", batch.batch_id, batch.size,
                  block)

    def _failed(self, reason: str) -> None:
        if self._ledger_error != reason:
            log.error("cannot anchor (records stay in the outbox; retrying): %s", reason)
        self._ledger_error = reason

    # -- status ---------------------------------------------------------------------

    def stats(self) -> WriterStats:
        box = self.outbox.stats()
        with self._lock:
            return WriterStats(self._sealed, self._replayed, self._batches, self._records,
                               self._confirmed, box["queued"], box["pending_batches"],
                               box["anchored"], self.anchor_time.percentile_ms(50),
                               self._ledger_error, self._gas)
