"""QKD keys of the ledger gateway: the writer's prefetched supply, the reader's fetch by ID.

Writer. A background thread keeps `prefetch` QKD keys ready, each already stored in
the writer's vault (so the writer can re-open its own records later, as the reader
can). Sealing takes the current key from memory and never waits for the KME: in the
trial a key took 21.75 s to arrive, here a reading finds one ready (`key_wait_ms`
measures it; target under 10 ms). A key roots at most `records_per_key` records (each
with its own HKDF-derived AES key, records.py) and is retired after `max_key_age_s`.
With no key ready and the KME failing, `seal` raises NoKey at once: the reading is
refused, never sealed under nothing and never written in clear.

    ETSI 004 (default): the writer is the stream's source and reads the next chunk;
    key IDs are "<Key_stream_ID>:<index>". A stream the KME no longer knows (KME
    restarted, TTL passed) is replaced by a new one.
    ETSI 014: enc_keys for the reader's SAE, one key at a time; key IDs are UUIDs.

Reader. `ReaderKeys.get(key_id)` answers from the vault, else from its own KME by ID
(004: opens the destination side of the stream the ID names, or resumes it when an
earlier run of the reader opened it; 014: dec_keys), and stores the key in the vault
before handing it out: the KME hands a key out once, so a key not kept is lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateways.ledger.config import KeyPolicy
from gateways.ledger.reading import Reading
from gateways.ledger.records import SealedRecord, seal
from gateways.ledger.vault import KeyVault, VaultError
from keyclient import (
    Etsi004Client,
    Etsi014Client,
    Key,
    KeyStreamError,
    KeyStreamRefused,
    KeySupplyError,
    KMEBadRequest,
    KMEUnavailable,
    KMEUnreachable,
    Qos,
    StreamKeySupply,
    StreamStatus,
)
from qgw.errors import QgwError
from qgw.secret import Secret

log = logging.getLogger("qgw.gateway.ledger")

TIMINGS_KEPT = 1000


class NoKey(QgwError):
    """No QKD key for a record. `transient`: worth asking again later (KME unreachable)."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        self.transient = transient
        super().__init__(message)


class Timings:
    """The last TIMINGS_KEPT durations, for percentiles in status and metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: deque[float] = deque(maxlen=TIMINGS_KEPT)
        self.count = 0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._samples.append(seconds)
            self.count += 1

    def percentile_ms(self, p: float) -> float | None:
        with self._lock:
            ordered = sorted(self._samples)
        if not ordered:
            return None
        rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)   # nearest rank
        return ordered[min(rank, len(ordered) - 1)] * 1000


# ---- writer ---------------------------------------------------------------------------


class KeyFetcher(Protocol):
    """Where the writer gets new QKD keys shared with its reader."""

    def fetch(self) -> Key: ...

    def close(self) -> None: ...


class StreamFetcher:
    """Writer as the source of an ETSI 004 stream to the reader's SAE."""

    def __init__(self, client: Etsi004Client, local_sae: str, peer_sae: str) -> None:
        self.client = client
        self.local_sae = local_sae
        self.peer_sae = peer_sae
        self._supply: StreamKeySupply | None = None

    @property
    def key_stream_id(self) -> str | None:
        return None if self._supply is None else self._supply.key_stream_id

    def fetch(self) -> Key:
        if self._supply is None:
            self._supply = StreamKeySupply.open(self.client, source=self.local_sae,
                                                destination=self.peer_sae,
                                                local_sae=self.local_sae)
            log.info("opened ETSI 004 key stream %s to %s", self._supply.key_stream_id,
                     self.peer_sae)
        try:
            (key,) = self._supply.get_keys(self.peer_sae, 1)
        except KMEBadRequest:
            # The KME no longer knows the stream (it restarted, or the TTL passed): the
            # next fetch opens a new one. A chunk is never read twice, so nothing repeats.
            self._drop()
            raise
        return key

    def _drop(self) -> None:
        supply, self._supply = self._supply, None
        if supply is not None:
            with contextlib.suppress(KeySupplyError):   # the KME may have forgotten it
                supply.close()

    def close(self) -> None:
        self._drop()
        self.client.close()


class EncKeysFetcher:
    """Writer as the master of ETSI 014 enc_keys for the reader's SAE."""

    def __init__(self, client: Etsi014Client, peer_sae: str) -> None:
        self.client = client
        self.peer_sae = peer_sae

    def fetch(self) -> Key:
        (key,) = self.client.get_keys(self.peer_sae, 1)
        return key

    def close(self) -> None:
        self.client.close()


@dataclass
class _InUse:
    key: Key
    since: float
    records: int = 0


@dataclass(frozen=True)
class KeyStats:
    fetched: int               # keys from the KME (each stored in the vault)
    used: int                  # keys that sealed at least one record
    records: int               # records sealed
    ready: int                 # keys fetched and waiting
    key_wait_p50_ms: float | None   # sealing waiting for a ready key, at each key change
    key_wait_p99_ms: float | None
    fetch_p50_ms: float | None      # KME round trip plus vault write, in the background
    failing: str | None        # why the last fetch failed, while it keeps failing
    stream: str | None         # the ETSI 004 stream in use

    @property
    def records_per_key(self) -> float:
        return self.records / self.used if self.used else 0.0


class WriterKeys:
    """Keys ready for sealing, fetched ahead by a thread of their own (`start`/`stop`)."""

    def __init__(self, fetcher: KeyFetcher, vault: KeyVault, policy: KeyPolicy, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` dates keys for `max_key_age_s` (waits use the real monotonic clock)."""
        self.fetcher = fetcher
        self.vault = vault
        self.policy = policy
        self.clock = clock
        self._cond = threading.Condition()
        self._ready: deque[Key] = deque()
        self._current: _InUse | None = None
        self._failing: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.key_wait = Timings()
        self.fetch_time = Timings()
        self._fetched = self._used = self._records = 0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._prefetch, name="ledger-keys", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        with self._cond:
            for key in self._ready:
                key.secret.wipe()
            self._ready.clear()
            if self._current is not None:
                self._current.key.secret.wipe()
                self._current = None
        self.fetcher.close()

    # -- sealing --------------------------------------------------------------------

    def seal(self, reading: Reading) -> SealedRecord:
        """`reading` sealed under the current key (changed when used up or too old)."""
        with self._cond:
            cur = self._current if self._usable() else self._next_key()
            assert cur is not None
            record = seal(reading, cur.key.secret, cur.key.key_id)
            cur.records += 1
            self._records += 1
            return record

    def _next_key(self) -> _InUse:
        """Retire the current key and take the next ready one (call holding the lock)."""
        started = time.perf_counter()
        if self._current is not None:
            # It is in the vault; the copy in memory is not needed any more.
            self._current.key.secret.wipe()
            self._current = None
        deadline = time.monotonic() + self.policy.wait_s
        while not self._ready:
            left = deadline - time.monotonic()
            if self._failing is not None or left <= 0 or self._stop.is_set():
                raise NoKey(f"no QKD key ready: {self._failing or 'the KME is slow'}")
            self._cond.wait(left)
        self._current = _InUse(self._ready.popleft(), self.clock())
        self._used += 1
        self._cond.notify_all()    # room in the buffer: the prefetcher fetches the next
        self.key_wait.add(time.perf_counter() - started)
        return self._current

    def ready(self) -> bool:
        """Whether a reading arriving now would find a key (no wait)."""
        with self._cond:
            return bool(self._ready) or self._usable()

    def wait_ready(self, timeout: float) -> bool:
        """`ready()`, waiting up to `timeout` unless the supply is failing."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._ready or self._usable():
                    return True
                left = deadline - time.monotonic()
                if self._failing is not None or left <= 0:
                    return False
                self._cond.wait(left)

    def _usable(self) -> bool:
        """Whether the current key may seal one more record (call holding the lock)."""
        cur = self._current
        return cur is not None and cur.records < self.policy.records_per_key \
            and self.clock() - cur.since < self.policy.max_key_age_s

    @property
    def failing(self) -> str | None:
        return self._failing

    # -- prefetching ----------------------------------------------------------------

    def _prefetch(self) -> None:
        delay = self.policy.retry_s
        while not self._stop.is_set():
            with self._cond:
                while len(self._ready) >= self.policy.prefetch and not self._stop.is_set():
                    self._cond.wait()
            if self._stop.is_set():
                return
            started = time.perf_counter()
            key: Key | None = None
            try:
                key = self.fetcher.fetch()
                # Kept before it is used: a record whose key the writer lost could still be
                # read by the reader, but never again by the writer.
                self.vault.put(key.key_id, key.secret)
            except (KeySupplyError, VaultError) as exc:
                if key is not None:
                    key.secret.wipe()      # not kept, so never used
                self._fail(str(exc))
                self._stop.wait(delay)
                delay = min(delay * 2, self.policy.retry_max_s)
                continue
            self.fetch_time.add(time.perf_counter() - started)
            delay = self.policy.retry_s
            with self._cond:
                if self._failing is not None:
                    log.info("QKD keys arrive again")
                self._failing = None
                self._ready.append(key)
                self._fetched += 1
                self._cond.notify_all()

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self._failing != reason:
                log.error("cannot get a QKD key (readings are refused until one comes): %s",
                          reason)
            self._failing = reason
            self._cond.notify_all()   # waiting readings give up now rather than at wait_s

    def stats(self) -> KeyStats:
        with self._cond:
            fetched, used, records, ready = (self._fetched, self._used, self._records,
                                             len(self._ready))
            failing = self._failing
        stream = getattr(self.fetcher, "key_stream_id", None)
        return KeyStats(fetched, used, records, ready, self.key_wait.percentile_ms(50),
                        self.key_wait.percentile_ms(99), self.fetch_time.percentile_ms(50),
                        failing, stream)


# ---- reader ---------------------------------------------------------------------------


class KeyLookup(Protocol):
    """Where the reader gets a key the writer named, from its own KME."""

    def get(self, key_id: str) -> Key: ...

    def close(self) -> None: ...


# 004 statuses that say the chunk may still come; any other means it never will.
_STREAM_TRANSIENT = {StreamStatus.GET_KEY_PEER_NOT_CONNECTED, StreamStatus.NO_QKD_CONNECTION,
                     StreamStatus.TIMEOUT_ERROR}


class StreamLookup:
    """Reader as the destination of the writer's ETSI 004 streams (one per Key_stream_ID)."""

    def __init__(self, client: Etsi004Client, local_sae: str, peer_sae: str, *,
                 ttl_s: int) -> None:
        self.client = client
        self.local_sae = local_sae
        self.peer_sae = peer_sae
        # The destination's chunks are dropped when its side of the stream is unused for
        # the TTL: a long one lets the reader be down for a while without losing keys.
        self.qos = Qos(TTL=ttl_s)
        self._streams: dict[str, StreamKeySupply] = {}

    def get(self, key_id: str) -> Key:
        ksid, _, index = key_id.lower().rpartition(":")
        try:
            uuid.UUID(ksid)
        except ValueError:
            raise NoKey(f"key ID {key_id!r} names no ETSI 004 chunk", transient=False) from None
        if not index.isdigit():
            raise NoKey(f"key ID {key_id!r} names no ETSI 004 chunk", transient=False)
        supply = self._streams.get(ksid)
        if supply is not None:
            try:
                (key,) = supply.get_keys_with_ids(self.peer_sae, [key_id])
                return key
            except KMEBadRequest:
                # Our KME may have restarted since the stream was opened (streams live in
                # its memory, chunks in its store): open it again and ask once more.
                del self._streams[ksid]
        (key,) = self._open(ksid).get_keys_with_ids(self.peer_sae, [key_id])
        return key

    def _open(self, ksid: str) -> StreamKeySupply:
        try:
            supply = StreamKeySupply.open(self.client, source=self.peer_sae,
                                          destination=self.local_sae, local_sae=self.local_sae,
                                          qos=self.qos, key_stream_id=ksid)
        except KeyStreamRefused as exc:
            if exc.code != StreamStatus.KSID_IN_USE:
                raise
            # Open at our KME already: an earlier run of this reader opened it. Its
            # chunks are still ours to read (the KME checks the SAE on every GET_KEY);
            # the chunk size only matters to get_keys, which a destination never calls.
            supply = StreamKeySupply(self.client, ksid, peer_sae=self.peer_sae, chunk_bytes=1)
            log.info("taking up ETSI 004 key stream %s again (opened by an earlier run)", ksid)
        else:
            log.info("opened the destination side of ETSI 004 key stream %s", ksid)
        self._streams[ksid] = supply
        return supply

    def close(self) -> None:
        # Streams stay open at the KME: batches anchored later may still name their chunks.
        self._streams.clear()
        self.client.close()


class DecKeysLookup:
    """Reader as the slave of ETSI 014 dec_keys."""

    def __init__(self, client: Etsi014Client, peer_sae: str) -> None:
        self.client = client
        self.peer_sae = peer_sae

    def get(self, key_id: str) -> Key:
        (key,) = self.client.get_keys_with_ids(self.peer_sae, [key_id])
        return key

    def close(self) -> None:
        self.client.close()


class ReaderKeys:
    """The keys a reader needs, by ID: from its vault, else from its KME (then kept).

    A KME that cannot be reached is waited for as long as it takes. A KME that answers
    but has not got the key (the chunk has not arrived, the stream's peer is not
    connected) is given `patience_s` per key: after that the key is taken as missing
    for good (NoKey, not transient), so one record naming a key that never comes does
    not hold up every batch after it.
    """

    def __init__(self, lookup: KeyLookup, vault: KeyVault, *, patience_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lookup = lookup
        self.vault = vault
        self.patience_s = patience_s
        self.clock = clock
        self.fetched = 0
        self.fetch_time = Timings()
        self._first_miss: dict[str, float] = {}

    def get(self, key_id: str) -> Secret:
        """The key `key_id`; NoKey (transient or not) if neither vault nor KME has it."""
        try:
            kept = self.vault.get(key_id)
        except VaultError as exc:
            raise NoKey(str(exc), transient=False) from None
        if kept is not None:
            return kept
        started = time.perf_counter()
        try:
            key = self.lookup.get(key_id)
            self.vault.put(key_id, key.secret)   # under the ID the records name
        except NoKey:
            raise
        except KMEUnreachable as exc:
            raise NoKey(f"key {key_id}: {exc}") from None
        except KeyStreamError as exc:
            raise self._missing(key_id, str(exc), exc.code in _STREAM_TRANSIENT) from None
        except KeySupplyError as exc:
            raise self._missing(key_id, str(exc), isinstance(exc, KMEUnavailable)) from None
        except VaultError as exc:
            raise NoKey(f"key {key_id} fetched but not kept: {exc}") from None
        self._first_miss.pop(key_id, None)
        self.fetched += 1
        self.fetch_time.add(time.perf_counter() - started)
        return key.secret

    def _missing(self, key_id: str, reason: str, may_come: bool) -> NoKey:
        if may_come:
            first = self._first_miss.setdefault(key_id, self.clock())
            if self.clock() - first < self.patience_s:
                return NoKey(f"key {key_id}: {reason}")
            reason += f" (still missing after {self.patience_s:g} s: given up)"
        self._first_miss.pop(key_id, None)
        return NoKey(f"key {key_id}: {reason}", transient=False)

    def close(self) -> None:
        self.lookup.close()
