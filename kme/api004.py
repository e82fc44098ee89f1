"""ETSI GS QKD 004 V2.1.1 key streams: OPEN_CONNECT, GET_KEY and CLOSE over HTTPS.

The spec defines the calls, not a transport. Here each call is a POST of a JSON
object to /api/v2/004/{open_connect,get_key,close} on the SAE's own KME, over
the same mutual-TLS listener as ETSI 014; the caller is the SAE its client
certificate names. Parameters keep the spec's names (source, destination, QoS,
Key_stream_ID, index, Metadata, key_buffer, status). Every 004 outcome is HTTP
200 with the 004 `status` in the body (plus a `message` when it is not 0);
HTTP 400 is for a malformed request (bad JSON or field, unknown SAE ID or
stream) and 401 for a certificate that is not the SAE the request names.

A stream is one (source SAE, destination SAE, Key_stream_ID) at two KMEs,
joined by a QKD link or a trusted-node relay path (`kme.relay`). Each KME
knows only its own SAE's side:

- The source's KME is the producer. Chunk `index` of stream KSID is a key
  with key_ID uuid5(KSID, str(index)), made with `Kme.share_keys(keep=True)`:
  reserved at the destination's KME for the destination SAE, and kept here for
  the source, in the transactions that carve it. A chunk is made when the
  source reads it, and up to PREFETCH chunks ahead of the source's reads, no
  faster than the stream's Max_bps. Each index is made at most once.
- The destination's KME is the consumer: chunk `index` is the key
  uuid5(KSID, index) the producer reserved in its store. GET_KEY waits up to
  the QoS Timeout for it to arrive.

Either side takes a chunk from its own store (`Store.take_keys`), so both sides
read the same bytes at the same index, and each side gets a chunk once.

When the 004 status codes arise (`Status`):

  SUCCESSFUL                 (0) the call did what was asked.
  PEER_NOT_CONNECTED         (1) OPEN_CONNECT opened the stream, but the peer's side is
                             not there yet. The producer calls the peer connected
                             once the destination's KME has stored a chunk (chunk 0
                             is made during OPEN_CONNECT; with no key on the link the
                             stream opens without it and the producer keeps trying).
                             The consumer calls it connected once a chunk of the
                             stream from the source has reached its store.
  GET_KEY_INSUFFICIENT_KEY   (2) the link has not enough key for the chunk (producer),
                             or the index was already handed to this SAE (or lost
                             with a failed reservation): there is no key for it.
  GET_KEY_PEER_NOT_CONNECTED (3) consumer: no chunk of the stream has ever arrived
                             and none did within Timeout (the source has not opened).
  NO_QKD_CONNECTION          (4) no working QKD link nor relay path between the two
                             SAEs' KMEs (SAEs on the same KME, a KME nothing reaches),
                             or the peer KME did not answer.
  KSID_IN_USE                (5) OPEN_CONNECT with a Key_stream_ID that is open at this
                             KME, or was (Key_stream_IDs are not reused: a chunk key_ID
                             must never name two keys).
  TIMEOUT_ERROR              (6) the chunk could not be handed within Timeout: the
                             consumer's chunk did not arrive although the source is
                             connected, or Max_bps does not allow making it sooner.
  QOS_NOT_MET                (7) OPEN_CONNECT refused; the answer's QoS is the counter-
                             proposal (e.g. Min_bps above the link's key rate,
                             Key_chunk_size beyond the KME's key size limits).
  METADATA_SIZE_INSUFFICIENT (8) GET_KEY's Metadata_size is smaller than the chunk's
                             metadata; the answer's Metadata_size is the size needed.
                             The chunk is not handed out, and may be read again.

QoS in force (the OPEN_CONNECT answer fills in what the request left out):
Key_chunk_size in bytes (default key_size / 8), Max_bps (default the
link's key rate) paces chunk making, Min_bps must not exceed the link's key
rate (unknown rate: not checked), Timeout in ms (at most MAX_TIMEOUT_MS) bounds
each GET_KEY, TTL in s closes a stream nobody used for that long, Jitter and
Priority are recorded and echoed, Metadata_mimetype is application/json.
Chunks are as long as the source's Key_chunk_size says; the destination's QoS
is its own and should ask for the same.

CLOSE forgets the stream at this KME and discards the unread chunks this side
holds. The producer's chunks already reserved at the destination's KME stay
readable there until the destination closes its side (or its TTL passes).
Streams live in memory: a KME restart closes them (their KSIDs stay unusable
only until then).

Metrics: since every 004 outcome is HTTP 200, each answer is counted by call
and 004 status in qgw_kme_etsi004_outcomes; each chunk handed to an SAE counts
as a key served (qgw_kme_keys_served, source and destination as master and
slave; qgw_kme_keys_delivered, role master at the source's KME, slave at the
destination's).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kme.errors import ApiError
from kme.wire004 import (
    UINT32_MAX,
    Outcome,
    Qos,
    Status,
    chunk_id,
    key_stream_id,
    sae_id,
    uint32,
)
from kme.wire014 import parse_json_body
from qgw.tls import Identity, peer_identity

if TYPE_CHECKING:
    from kme.node import Kme

log = logging.getLogger("qgw.kme.api004")

PREFIX = "/api/v2/004"
PREFETCH = 4                  # chunks made ahead of the source's reads
MAX_TIMEOUT_MS = 30_000       # a GET_KEY holds an HTTP request open at most this long
DEFAULT_TIMEOUT_MS = 1_000
DEFAULT_TTL_S = 3_600
POLL_S = 0.02                 # how often a waiting consumer looks for its chunk
RETRY_S = 0.2                 # producer: wait after "no key" before trying again
RETIRED_KEEP_S = 86_400.0
MIMETYPE = "application/json"


class IndexSet:
    """Stream indices, kept small: everything below a low-water mark, plus a set above it."""

    def __init__(self) -> None:
        self.below = 0
        self.above: set[int] = set()

    def add(self, index: int) -> None:
        if index >= self.below:
            self.above.add(index)
            while self.below in self.above:
                self.above.discard(self.below)
                self.below += 1

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and (index < self.below or index in self.above)


@dataclass(eq=False)
class Stream:
    """One side of a key stream at this KME (its local SAE is `sae`)."""

    ksid: str
    source: str
    destination: str
    producer: bool
    peer_kme: str
    qos: Qos
    last_used: float
    peer_seen: bool = False
    last_index: int = -1
    delivered: IndexSet = field(default_factory=IndexSet)
    produced: IndexSet = field(default_factory=IndexSet)  # producer: made (or lost) indices
    ready: set[int] = field(default_factory=set)          # producer: made, not yet read here
    next_slot: float = 0.0                                # producer: Max_bps pacing
    closed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def sae(self) -> str:
        return self.source if self.producer else self.destination

    @property
    def chunk_bytes(self) -> int:
        assert self.qos.Key_chunk_size is not None
        return self.qos.Key_chunk_size

    def __repr__(self) -> str:
        role = "producer" if self.producer else "consumer"
        return f"<Stream {self.ksid} {self.source}->{self.destination} {role}>"

    def metadata(self, index: int) -> str:
        return json.dumps({"Key_stream_ID": self.ksid, "index": index,
                           "key_ID": chunk_id(self.ksid, index), "source": self.source,
                           "destination": self.destination}, separators=(",", ":"))


class StreamRegistry:
    """The key streams open at one KME, and the Key_stream_IDs it used."""

    def __init__(self, kme: Kme, clock: Any = time.monotonic) -> None:
        self.kme = kme
        self.clock = clock
        self.streams: dict[str, Stream] = {}
        self.retired: dict[str, float] = {}

    async def aclose(self, app: web.Application | None = None) -> None:
        """Stop the producers' background work (the KME is shutting down)."""
        tasks = [s.task for s in self.streams.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- OPEN_CONNECT ----------------------------------------------------------

    async def open_connect(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        sae = self.kme.local_sae(caller)
        source = sae_id(body.get("source"), "source")
        destination = sae_id(body.get("destination"), "destination")
        qos = Qos.from_json(body.get("QoS"))
        raw_ksid = body.get("Key_stream_ID")
        ksid = key_stream_id(raw_ksid) if raw_ksid is not None else None
        if sae not in (source, destination):
            raise ApiError.unauthorized(
                f"SAE {sae} may open streams only with itself as source or destination")
        if source == destination:
            raise ApiError.bad_request("source and destination must be different SAEs")
        producer = sae == source
        peer_sae = destination if producer else source
        peer_kme = self.kme.known_sae(peer_sae, "destination" if producer else "source")
        if ksid is None and not producer:
            raise ApiError.bad_request(
                "the destination must give the Key_stream_ID the source's OPEN_CONNECT returned",
                parameter="Key_stream_ID")
        self.expire()
        echo = {"Key_stream_ID": ksid}
        if peer_kme == self.kme.kme_id:
            raise Outcome(Status.NO_QKD_CONNECTION,
                          f"{source} and {destination} are at the same KME; keys are shared "
                          f"over QKD links only", **echo, QoS=qos.to_json())
        up, rate_bps = self.kme.reach(peer_kme)
        if not up:
            raise Outcome(Status.NO_QKD_CONNECTION,
                          f"no working QKD link or relay path to {peer_kme}",
                          **echo, QoS=qos.to_json())
        offer = self._negotiate(qos, rate_bps)
        if any(getattr(qos, f.name) not in (None, getattr(offer, f.name)) for f in fields(qos)):
            raise Outcome(Status.QOS_NOT_MET, "the requested QoS cannot be met; QoS holds what "
                          "this KME offers", **echo, QoS=offer.to_json())
        if ksid is None:
            ksid = str(uuid.uuid4())
        elif ksid in self.streams or ksid in self.retired:
            raise Outcome(Status.KSID_IN_USE, f"Key_stream_ID {ksid} is in use at this KME",
                          Key_stream_ID=ksid, QoS=offer.to_json())
        stream = Stream(ksid, source, destination, producer, peer_kme, offer, self.clock())
        self.streams[ksid] = stream
        answer = {"Key_stream_ID": ksid, "QoS": offer.to_json()}
        if producer:
            try:
                await self._make(stream, 0)
            except Outcome as out:
                if out.status is not Status.GET_KEY_INSUFFICIENT_KEY:
                    self._forget(stream)
                    raise Outcome(Status.NO_QKD_CONNECTION, out.message, **answer) from None
            stream.task = asyncio.create_task(self._prefetch(stream), name=f"004-{ksid}")
        else:
            self._look_for_peer(stream)
        if not stream.peer_seen:
            side = "destination's KME holds no chunk yet" if producer else \
                "no chunk from the source has arrived yet"
            raise Outcome(Status.PEER_NOT_CONNECTED, f"stream open; the {side}", **answer)
        return {"status": int(Status.SUCCESSFUL), **answer}

    def _negotiate(self, qos: Qos, rate_bps: float | None) -> Qos:
        """The QoS this KME can give, as close to `qos` as it can."""
        lim = self.kme.limits
        lo, hi = max(1, lim.min_key_size // 8), lim.max_key_size // 8
        asked = qos.Key_chunk_size
        chunk = min(max(asked if asked is not None else lim.key_size // 8, lo), hi)
        rate = int(rate_bps) if rate_bps is not None else None
        min_bps = qos.Min_bps or 0
        if rate is not None:
            min_bps = min(min_bps, rate)
        max_bps = qos.Max_bps if qos.Max_bps is not None else (rate or UINT32_MAX)
        max_bps = max(max_bps, min_bps, 1)
        timeout = min(qos.Timeout if qos.Timeout is not None else DEFAULT_TIMEOUT_MS,
                      MAX_TIMEOUT_MS)
        ttl = max(qos.TTL if qos.TTL is not None else DEFAULT_TTL_S, 1)
        return Qos(chunk, max_bps, min_bps, qos.Jitter or 0, qos.Priority or 0, timeout, ttl,
                   MIMETYPE)

    # -- GET_KEY ---------------------------------------------------------------

    async def get_key(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        stream = self._stream_of(caller, body)
        raw_index = body.get("index")
        index = self._next_index(stream) if raw_index is None else uint32(raw_index, "index")
        if index > UINT32_MAX:
            raise Outcome(Status.GET_KEY_INSUFFICIENT_KEY, "the stream has no index left")
        metadata = stream.metadata(index)
        room = self._metadata_room(body.get("Metadata"))
        if room is not None and room < len(metadata.encode()):
            raise Outcome(Status.METADATA_SIZE_INSUFFICIENT,
                          f"the metadata of a chunk needs {len(metadata.encode())} bytes",
                          index=index, Metadata={"Metadata_size": len(metadata.encode())})
        if index in stream.delivered:
            raise Outcome(Status.GET_KEY_INSUFFICIENT_KEY,
                          f"chunk {index} of this stream was already handed to {stream.sae}",
                          index=index)
        assert stream.qos.Timeout is not None
        deadline = self.clock() + stream.qos.Timeout / 1000
        stream.last_used = self.clock()
        if stream.producer:
            key = await self._take_produced(stream, index, deadline)
        else:
            key = await self._take_arrived(stream, index, deadline)
        stream.delivered.add(index)
        stream.last_index = max(stream.last_index, index)
        stream.last_used = self.clock()
        self._count_served(stream)
        if stream.producer:
            stream.wake.set()  # make the next chunks ahead
        return {"status": int(Status.SUCCESSFUL), "index": index,
                "key_buffer": base64.b64encode(key).decode(),
                "Metadata": {"Metadata_size": len(metadata.encode()),
                             "Metadata_buffer": metadata}}

    def _count_served(self, stream: Stream) -> None:
        """A chunk handed out counts as a key served, as an ETSI 014 key does."""
        metrics = self.kme.metrics
        metrics.keys_delivered.labels(role="master" if stream.producer else "slave").inc()
        metrics.keys_served.labels(master=stream.source, slave=stream.destination).inc()

    @staticmethod
    def _next_index(stream: Stream) -> int:
        """The index after the last one read here, past chunks lost by the producer."""
        index = stream.last_index + 1
        while stream.producer and index in stream.produced and index not in stream.ready:
            index += 1
        return index

    @staticmethod
    def _metadata_room(value: object) -> int | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ApiError.bad_request("Metadata must be an object with Metadata_size",
                                       parameter="Metadata")
        size = value.get("Metadata_size")
        return None if size is None else uint32(size, "Metadata.Metadata_size")

    async def _take_produced(self, stream: Stream, index: int, deadline: float) -> bytes:
        async with stream.lock:
            if index not in stream.produced:
                if not self._link_up(stream):
                    raise Outcome(Status.NO_QKD_CONNECTION,
                                  f"the QKD link to {stream.peer_kme} is down", index=index)
                wait = stream.next_slot - self.clock()
                if wait > deadline - self.clock():
                    raise Outcome(Status.TIMEOUT_ERROR,
                                  f"Max_bps {stream.qos.Max_bps} allows the next chunk in "
                                  f"{wait * 1000:.0f} ms, after Timeout", index=index)
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._make(stream, index)
            if index not in stream.ready:
                raise Outcome(Status.GET_KEY_INSUFFICIENT_KEY,
                              f"chunk {index} was lost with a failed reservation; read another "
                              f"index", index=index)
            with self.kme.store.tx():
                (key,) = self.kme.store.take_keys(stream.source, stream.source,
                                                  [chunk_id(stream.ksid, index)])
            stream.ready.discard(index)
            return bytes(key)

    async def _take_arrived(self, stream: Stream, index: int, deadline: float) -> bytes:
        kid = chunk_id(stream.ksid, index)
        store = self.kme.store
        while True:
            record = store.key_record(kid)
            if record is not None and record[0] == stream.source:
                stream.peer_seen = True
                try:
                    with store.tx():
                        (key,) = store.take_keys(stream.destination, stream.source, [kid])
                except ApiError:  # the key is there, but not for this SAE
                    raise Outcome(Status.GET_KEY_INSUFFICIENT_KEY,
                                  f"chunk {index} is not held for {stream.destination}",
                                  index=index) from None
                return bytes(key)
            left = deadline - self.clock()
            if left <= 0 or stream.closed:
                break
            await asyncio.sleep(min(POLL_S, left))
        if self._look_for_peer(stream):
            raise Outcome(Status.TIMEOUT_ERROR, f"chunk {index} did not arrive within "
                          f"{stream.qos.Timeout} ms", index=index)
        raise Outcome(Status.GET_KEY_PEER_NOT_CONNECTED,
                      f"source {stream.source} has not opened stream {stream.ksid}", index=index)

    def _look_for_peer(self, stream: Stream) -> bool:
        """Consumer: has a chunk from the source reached this KME (chunk 0 comes first)?"""
        if not stream.peer_seen:
            record = self.kme.store.key_record(chunk_id(stream.ksid, 0))
            stream.peer_seen = record is not None and record[0] == stream.source
        return stream.peer_seen

    # -- making chunks (producer) ------------------------------------------------

    async def _make(self, stream: Stream, index: int) -> None:
        """Make chunk `index` (call with the stream's lock, or before the stream is shared)."""
        assert stream.qos.Max_bps is not None
        try:
            await self.kme.share_keys(stream.source, [stream.destination],
                                      [chunk_id(stream.ksid, index)], stream.chunk_bytes,
                                      keep=True)
        except ApiError as exc:
            no_key = bool(exc.details) and "available_bits" in (exc.details or [{}])[0]
            if exc.status == 503 and no_key:
                raise Outcome(Status.GET_KEY_INSUFFICIENT_KEY,
                              "not enough key on the QKD link for the chunk", index=index) \
                    from None
            # The key_ID may have been reserved, then released: never make it again.
            stream.produced.add(index)
            if exc.status == 503 and "unreachable" in exc.message:
                raise Outcome(Status.NO_QKD_CONNECTION, exc.message, index=index) from None
            raise Outcome(Status.GET_KEY_INSUFFICIENT_KEY, exc.message, index=index) from None
        stream.produced.add(index)
        stream.ready.add(index)
        stream.peer_seen = True
        stream.next_slot = max(stream.next_slot, self.clock()) + \
            stream.chunk_bytes * 8 / stream.qos.Max_bps
        if stream.closed:
            self._discard(stream)

    def _link_up(self, stream: Stream) -> bool:
        return self.kme.reach(stream.peer_kme)[0]

    async def _prefetch(self, stream: Stream) -> None:
        """Keep up to PREFETCH chunks made ahead of the source's reads, within Max_bps."""
        assert stream.qos.TTL is not None
        while not stream.closed:
            base = stream.last_index + 1
            todo = next((i for i in range(base, min(base + PREFETCH, UINT32_MAX + 1))
                         if i not in stream.produced), None)
            if todo is None:
                stream.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(stream.qos.TTL):
                        await stream.wake.wait()
                self.expire()
                continue
            if not self._link_up(stream):
                await asyncio.sleep(RETRY_S)
                continue
            wait = stream.next_slot - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            async with stream.lock:
                if stream.closed or todo in stream.produced:
                    continue
                try:
                    await self._make(stream, todo)
                    continue
                except Outcome as out:
                    failed = out
            log.info("stream %s: chunk %d not made yet: %s", stream.ksid, todo, failed.message)
            await asyncio.sleep(RETRY_S)

    # -- CLOSE and TTL ------------------------------------------------------------

    def close(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        stream = self._stream_of(caller, body)
        self._forget(stream)
        return {"status": int(Status.SUCCESSFUL)}

    def expire(self) -> None:
        """Close streams unused for their TTL; forget Key_stream_IDs retired long ago."""
        now = self.clock()
        for stream in list(self.streams.values()):
            assert stream.qos.TTL is not None
            if now - stream.last_used >= stream.qos.TTL:
                log.info("stream %s unused for its TTL (%d s): closed", stream.ksid,
                         stream.qos.TTL)
                self._forget(stream)
        for ksid, at in list(self.retired.items()):
            if now - at >= RETIRED_KEEP_S:
                del self.retired[ksid]

    def _forget(self, stream: Stream) -> None:
        stream.closed = True
        stream.wake.set()
        self.streams.pop(stream.ksid, None)
        self.retired[stream.ksid] = self.clock()
        self._discard(stream)

    def _discard(self, stream: Stream) -> None:
        """Drop the unread chunks this side holds (nobody else may read them)."""
        store = self.kme.store
        with store.tx():
            if stream.producer:
                for i in sorted(stream.ready):
                    self._drop(stream, i)
                stream.ready.clear()
                return
            # The producer makes chunks from index 0 on, at most PREFETCH beyond the
            # source's reads: look until PREFETCH + 1 indices in a row hold nothing.
            index, misses = stream.delivered.below, 0
            while misses <= PREFETCH or index <= stream.last_index:
                if index in stream.delivered or self._drop(stream, index):
                    misses = 0
                else:
                    misses += 1
                index += 1

    def _drop(self, stream: Stream, index: int) -> bool:
        kid = chunk_id(stream.ksid, index)
        record = self.kme.store.key_record(kid)
        if record is None or record[0] != stream.source:
            return False
        with contextlib.suppress(ApiError):
            self.kme.store.take_keys(stream.sae, stream.source, [kid])
        return True

    def _stream_of(self, caller: Identity | None, body: dict[str, Any]) -> Stream:
        sae = self.kme.local_sae(caller)
        ksid = key_stream_id(body.get("Key_stream_ID"))
        self.expire()
        stream = self.streams.get(ksid)
        if stream is None:
            raise ApiError.bad_request(f"no open key stream {ksid} at this KME",
                                       parameter="Key_stream_ID")
        if stream.sae != sae:
            raise ApiError.unauthorized(f"key stream {ksid} is not open for SAE {sae}")
        return stream


# -- HTTP -------------------------------------------------------------------------------

STREAMS = web.AppKey("streams_004", StreamRegistry)


def _json(data: Any) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), content_type="application/json")


def _caller(request: web.Request) -> Identity | None:
    transport = request.transport
    return peer_identity(transport.get_extra_info("peercert") if transport else None)


async def _answer(request: web.Request, call: str) -> web.Response:
    registry = request.app[STREAMS]
    body = parse_json_body(await request.read(), allow_empty=False)
    caller = _caller(request)
    try:
        if call == "open_connect":
            out = await registry.open_connect(caller, body)
        elif call == "get_key":
            out = await registry.get_key(caller, body)
        else:
            out = registry.close(caller, body)
    except Outcome as outcome:
        out = outcome.body()
    status = Status(out["status"])
    registry.kme.metrics.etsi004_outcomes.labels(call=call, status=str(int(status)),
                                                 outcome=status.name).inc()
    return _json(out)


async def open_connect(request: web.Request) -> web.Response:
    return await _answer(request, "open_connect")


async def get_key(request: web.Request) -> web.Response:
    return await _answer(request, "get_key")


async def close(request: web.Request) -> web.Response:
    return await _answer(request, "close")


def add_routes(app: web.Application) -> None:
    """Register the ETSI 004 routes on the KME's API application."""
    from kme.server import KME_KEY  # kme.server imports this module

    registry = StreamRegistry(app[KME_KEY])
    app[STREAMS] = registry
    app.on_cleanup.append(registry.aclose)
    r = app.router
    r.add_post(f"{PREFIX}/open_connect", open_connect, name="etsi004_open_connect")
    r.add_post(f"{PREFIX}/get_key", get_key, name="etsi004_get_key")
    r.add_post(f"{PREFIX}/close", close, name="etsi004_close")


__all__ = ["STREAMS", "Qos", "Status", "StreamRegistry", "add_routes", "chunk_id"]
