"""A simulated QKD link between two KMEs, and the background work it needs.

The emitter (the KME whose ID sorts first) plays both QKD devices: it draws
secret key from the OS CSPRNG at the link's modelled rate, in blocks, and
pushes each block to the peer KME over mutual TLS. A block becomes usable only
once the peer has stored it, so both stores always hold every usable byte.
No key is produced while the peer is unreachable (a QKD link needs its
classical channel), nor beyond the store capacity (devices stop when full).

Reservations for the peer are batched: while a reservation call is in
flight, new ones queue and leave together in the next call, so a burst of
enc_keys requests costs the peer a few HTTPS requests, not one each.

Both ends also run the releaser: key IDs promised to a master whose delivery
failed (peer error, crash) are released at the peer and their stream bytes
discarded on both sides.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from kme.config import Link
from kme.metrics import KmeMetrics
from kme.peer import PeerClient, PeerError
from kme.store import Pending, Store, StreamGap

log = logging.getLogger("qgw.kme.link")

PUSH_MAX_BLOCKS = 512
PUSH_MAX_BYTES = 1 << 20
RESERVE_MAX_GROUPS = 256
RESERVE_MAX_IN_FLIGHT = 2
HEARTBEAT_S = 1.0
MAX_BACKOFF_S = 2.0


class LinkRuntime:
    def __init__(self, kme_id: str, cfg: Link, client: PeerClient, store: Store,
                 metrics: KmeMetrics, capacity_bytes: int, tick_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peer = cfg.peer
        self.emitter = kme_id < cfg.peer
        self.cfg = cfg
        self.client = client
        self.store = store
        self.metrics = metrics
        self.capacity_bytes = capacity_bytes
        self.tick_s = tick_s
        self.clock = clock
        # A receiver learns the modelled rate from the emitter's pushes.
        self.rate_bps: float | None = cfg.rate_bps if self.emitter else None
        # A block never exceeds the store: devices deliver what fits.
        self.block_size = min(cfg.block_size, capacity_bytes)
        self.up = False
        self.admin_down = False  # an operator cut the link: no new key, stored key remains
        self.last_contact: float | None = None
        self._release_queue: dict[str, Pending] = {}
        self._release_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reserve_queue: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._reserve_in_flight = 0
        self._stopping = False
        self._flush_scheduled = False
        store.ensure_link(self.peer)
        metrics.link_admin_up.labels(peer=self.peer).set(1)
        if self.rate_bps is not None:
            metrics.link_rate.labels(peer=self.peer).set(self.rate_bps)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.queue_release(self.store.pending(self.peer))
        if self.emitter:
            self._tasks.append(asyncio.create_task(self._emit_loop(), name=f"emit-{self.peer}"))
        self._tasks.append(asyncio.create_task(self._release_loop(), name=f"release-{self.peer}"))

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    # -- state -----------------------------------------------------------------

    def available_bytes(self) -> int:
        return self.store.available_bytes(self.peer, emitter=self.emitter)

    def mark_contact(self, ok: bool) -> None:
        self.up = ok
        if ok:
            self.last_contact = self.clock()
        self.metrics.link_up.labels(peer=self.peer).set(1 if ok else 0)

    def describe(self) -> dict[str, object]:
        return {
            "peer_KME_ID": self.peer,
            "role": "emitter" if self.emitter else "receiver",
            "state": "down (operator)" if self.admin_down else "up" if self.up else "down",
            "key_rate_bps": self.rate_bps,
            "available_bits": self.available_bytes() * 8,
        }

    # -- emitter ---------------------------------------------------------------

    async def _emit_loop(self) -> None:
        block = self.block_size
        credit = 0.0
        last = self.clock()
        backoff = self.tick_s
        while not self._stopping:
            now = self.clock()
            if self.up and not self.admin_down:
                credit += (self.rate_bps or 0.0) * (now - last)
            last = now
            try:
                credit -= self._generate(credit)
                if self.store.held_bytes(self.peer) + block > self.capacity_bytes:
                    credit = 0.0  # full: devices stop, and do not catch up later
                await self._push()
                backoff = self.tick_s
                await asyncio.sleep(self.tick_s)
            except PeerError as exc:
                if self.up:
                    log.warning("link to %s down: %s", self.peer, exc.message)
                self.mark_contact(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except Exception:  # a bug must not end key generation silently
                log.exception("link to %s: key generation step failed", self.peer)
                self.mark_contact(False)
                await asyncio.sleep(MAX_BACKOFF_S)

    def _generate(self, credit_bits: float) -> int:
        """Turn whole blocks of credit into stream blocks; returns the bits used."""
        block = self.block_size
        count = int(credit_bits // (block * 8))
        room = (self.capacity_bytes - self.store.held_bytes(self.peer)) // block
        count = max(0, min(count, room))
        if not count:
            return 0
        end = self.store.link_state(self.peer).end
        blocks = [(end + i * block, os.urandom(block)) for i in range(count)]
        self.store.append_blocks(self.peer, blocks, confirmed=False)
        self.metrics.key_bits_generated.labels(peer=self.peer).inc(count * block * 8)
        return count * block * 8

    async def _push(self) -> None:
        blocks: list[tuple[int, bytes]] = []
        size = 0
        for block in self.store.unconfirmed_blocks(self.peer)[:PUSH_MAX_BLOCKS]:
            if blocks and size + len(block[1]) > PUSH_MAX_BYTES:
                break
            blocks.append(block)
            size += len(block[1])
        due = self.last_contact is None or self.clock() - self.last_contact >= HEARTBEAT_S
        if not blocks and self.up and not due:
            return
        body = {
            "blocks": [{"offset": off, "data": base64.b64encode(d).decode()} for off, d in blocks],
            "cursor": self.store.link_state(self.peer).cursor,
            "key_rate_bps": self.rate_bps,
        }
        await self.client.call("/kme/v1/stream", body)
        if not self.up:
            log.info("link to %s up", self.peer)
        self.mark_contact(True)
        if blocks:
            off, data = blocks[-1]
            self.store.confirm_blocks(self.peer, off + len(data))
        self.metrics.link_available_bits.labels(peer=self.peer).set(self.available_bytes() * 8)

    # -- batched reservations --------------------------------------------------

    async def reserve(self, group: dict[str, Any]) -> dict[str, Any]:
        """Reserve one enc_keys request's keys at the peer; raises PeerError."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reserve_queue.append((group, fut))
        self._schedule_flush()
        return await fut

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._reserve_in_flight < RESERVE_MAX_IN_FLIGHT:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._reserve_queue or self._reserve_in_flight >= RESERVE_MAX_IN_FLIGHT:
            return
        batch = self._reserve_queue[:RESERVE_MAX_GROUPS]
        del self._reserve_queue[:len(batch)]
        self._reserve_in_flight += 1
        task = asyncio.create_task(self._send_reservations(batch))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _send_reservations(
            self, batch: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            reply = await self.client.call("/kme/v1/reserve",
                                           {"groups": [group for group, _ in batch]})
            results = reply.get("groups")
            if not isinstance(results, list) or len(results) != len(batch):
                raise PeerError(self.peer, 200, "reservation answer does not match the request")
        except PeerError as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                error = result.get("error") if isinstance(result, dict) else None
                if isinstance(error, dict):
                    fut.set_exception(PeerError(self.peer, int(error.get("status", 503)),
                                                str(error.get("message", "refused"))))
                elif isinstance(result, dict):
                    fut.set_result(result)
                else:
                    fut.set_exception(PeerError(self.peer, 200, "malformed reservation answer"))
        finally:
            self._reserve_in_flight -= 1
            if self._reserve_queue:
                self._schedule_flush()

    # -- releaser --------------------------------------------------------------

    def queue_release(self, entries: list[Pending]) -> None:
        for p in entries:
            self._release_queue[p.key_id] = p
        if self._release_queue:
            self._release_wake.set()

    async def _release_loop(self) -> None:
        backoff = self.tick_s
        while not self._stopping:
            await self._release_wake.wait()
            batch = list(self._release_queue.values())[:PUSH_MAX_BLOCKS]
            if not batch:
                self._release_wake.clear()
                continue
            body = {"keys": [
                {"key_ID": p.key_id, "length": p.length}
                | ({"offset": p.offset} if p.offset is not None else {})
                for p in batch
            ]}
            try:
                reply = await self.client.call("/kme/v1/release", body)
                self._discard_locally(batch, reply)
            except PeerError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            except Exception:  # keep the releaser alive; the entries stay queued
                log.exception("link to %s: releasing keys failed", self.peer)
                await asyncio.sleep(MAX_BACKOFF_S)
                continue
            backoff = self.tick_s
            for p in batch:
                self._release_queue.pop(p.key_id, None)
            if not self._release_queue:
                self._release_wake.clear()

    def _discard_locally(self, batch: list[Pending], reply: dict[str, object]) -> None:
        known: dict[str, int] = {}
        released = reply.get("released")
        if isinstance(released, list):
            for item in released:
                if isinstance(item, dict) and isinstance(item.get("offset"), int):
                    known[str(item.get("key_ID"))] = item["offset"]
        with self.store.tx():
            for p in batch:
                offset = p.offset if p.offset is not None else known.get(p.key_id)
                if offset is None:
                    continue
                try:
                    self.store.carve(self.peer, offset, p.length)
                except StreamGap:
                    log.warning("released range of a key from %s was already gone", self.peer)
            self.store.drop_pending([p.key_id for p in batch])
