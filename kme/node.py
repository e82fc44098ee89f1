"""One KME: the ETSI 014 key service and the KME-to-KME side of key reservation.

How a key reaches two SAEs (master M at this KME, slave S at peer KME P):

1. M calls enc_keys. This KME makes key IDs and records them as pending.
   If it is the link's emitter it also allocates stream ranges now.
2. It asks P to reserve those IDs for (M, S): P allocates the ranges if P is
   the emitter, carves the bytes from its copy of the stream and stores the
   keys for S. Only then
3. does this KME carve the same ranges from its copy, drop the pending record
   and answer M, in one transaction.

So a slave can never be told "unknown key" for a key its master holds, and a
crash at any point leaves either a delivered key that the slave can fetch,
or a pending record that is released at the peer on restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import time
import uuid
from typing import Any

from kme.config import KmeConfig
from kme.errors import ApiError
from kme.link import LinkRuntime
from kme.metrics import KmeMetrics
from kme.peer import PeerClient, PeerError
from kme.relay import Relay, hop_cost_bytes, relay_sae
from kme.routing import LinkAd, LinkStateDb, NoPath
from kme.store import Pending, Store, StreamGap
from kme.wire014 import KeyRequest, Limits
from qgw.tls import ROLE_ADMIN, ROLE_KME, ROLE_SAE, Identity, client_context

log = logging.getLogger("qgw.kme")

RELEASED_RETENTION_S = 86400.0
ADVERTISE_S = 1.0
LOCAL_COPY = "local"  # `peer` of keys this KME keeps for its own SAEs (no stream range)


class Kme:
    def __init__(self, cfg: KmeConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self.kme_id = cfg.kme_id
        self.store = store or Store(cfg.store)
        self.metrics = KmeMetrics(cfg.kme_id)
        lim = cfg.limits
        self.limits = Limits(lim.key_size, lim.min_key_size, lim.max_key_size,
                             lim.max_key_per_request, lim.max_SAE_ID_count)
        self.capacity_bytes = lim.store_capacity_bits // 8
        ctx = client_context(cfg.tls.files())
        self.links: dict[str, LinkRuntime] = {
            link.peer: LinkRuntime(
                cfg.kme_id, link, PeerClient(link.peer, link.url, ctx, cfg.peer_timeout_s),
                self.store, self.metrics, self.capacity_bytes, cfg.tick_s,
            )
            for link in cfg.links
        }
        self.routes = LinkStateDb(cfg.kme_id)
        self.relay = Relay(self)
        self._advertiser: asyncio.Task[None] | None = None
        self._advertise_now = asyncio.Event()
        # Labelled metric children, looked up once (labels() costs a lock and a dict probe).
        self._delivered = {role: self.metrics.keys_delivered.labels(role=role)
                           for role in ("master", "slave")}
        self._served: dict[tuple[str, str], Any] = {}

    async def start(self) -> None:
        self.store.prune_released(RELEASED_RETENTION_S)
        for link in self.links.values():
            link.start()
        self._advertiser = asyncio.create_task(self._advertise_loop(), name="advertise")

    async def stop(self) -> None:
        if self._advertiser is not None:
            self._advertiser.cancel()
            await asyncio.gather(self._advertiser, return_exceptions=True)
        await asyncio.gather(*(link.stop() for link in self.links.values()))
        self.store.close()

    # -- who is who --------------------------------------------------------------

    def local_sae(self, caller: Identity | None) -> str:
        if caller is None or caller.role != ROLE_SAE:
            raise ApiError.unauthorized("the client certificate does not identify an SAE")
        if self.cfg.saes.get(caller.name) != self.kme_id:
            raise ApiError.unauthorized(f"SAE {caller.name} is not attached to KME {self.kme_id}")
        return caller.name

    def known_sae(self, sae: str, role: str) -> str:
        kme = self.cfg.saes.get(sae)
        if kme is None:
            raise ApiError.bad_request(f"unknown {role} SAE ID {sae!r}", parameter=role)
        return kme

    def _target_kme(self, master: str, slaves: list[str]) -> str:
        """The one KME all `slaves` are attached to (another KME than this one)."""
        kmes = set()
        for slave in slaves:
            if slave == master:
                raise ApiError.bad_request("the slave SAE must differ from the master SAE")
            kme = self.known_sae(slave, "slave")
            if kme == self.kme_id:
                raise ApiError.bad_request(
                    f"SAE {slave} is attached to this KME too; keys are shared only over a "
                    f"QKD link, with an SAE at another KME"
                )
            kmes.add(kme)
        if len(kmes) != 1:
            raise ApiError.bad_request("all slave SAEs of one request must be at the same KME")
        return kmes.pop()

    def peer_link(self, caller: Identity | None) -> LinkRuntime:
        if caller is None or caller.role != ROLE_KME or caller.name not in self.links:
            raise ApiError.unauthorized("only a linked peer KME may call the KME-to-KME API")
        return self.links[caller.name]

    # -- ETSI GS QKD 014 ---------------------------------------------------------

    def status(self, caller: Identity | None, slave: str) -> dict[str, Any]:
        master = self.local_sae(caller)
        target = self._target_kme(master, [slave])
        key_bytes = self.limits.key_size // 8
        link = self.links.get(target)
        if link is not None:
            stored = link.available_bytes() // key_bytes
            extension: dict[str, Any] = {"qkdgw_link": link.describe()}
        else:
            stored, extension = self._relay_status(target, key_bytes)
        return {
            "source_KME_ID": self.kme_id,
            "target_KME_ID": target,
            "master_SAE_ID": master,
            "slave_SAE_ID": slave,
            "key_size": self.limits.key_size,
            "stored_key_count": stored,
            "max_key_count": self.capacity_bytes // key_bytes,
            "max_key_per_request": self.limits.max_key_per_request,
            "max_key_size": self.limits.max_key_size,
            "min_key_size": self.limits.min_key_size,
            "max_SAE_ID_count": self.limits.max_SAE_ID_count,
            "status_extension": extension,
        }

    def _relay_status(self, target: str, key_bytes: int) -> tuple[int, dict[str, Any]]:
        """Keys a relay could deliver now: the path's scarcest link over the cost per key."""
        cost_bits = hop_cost_bytes(key_bytes) * 8
        try:
            path = self.path_to(target, cost_bits)
        except NoPath:
            return 0, {"qkdgw_relay": {"path": None, "reason": "no path of working links"}}
        hops = len(path) - 1
        return self.routes.bottleneck_bits(path) // cost_bits, {"qkdgw_relay": {
            "path": path, "hops": hops, "link_key_bits_per_key": cost_bits * hops}}

    async def enc_keys(self, caller: Identity | None, slave: str,
                       req: KeyRequest) -> list[tuple[str, bytes]]:
        master = self.local_sae(caller)
        slaves = [slave, *req.additional_slave_SAE_IDs]
        if len(set(slaves)) != len(slaves):
            raise ApiError.bad_request("additional_slave_SAE_IDs repeats the slave SAE",
                                       parameter="additional_slave_SAE_IDs")
        ids = [str(uuid.uuid4()) for _ in range(req.number)]
        keys = await self.share_keys(master, slaves, ids, req.size // 8)
        self._delivered["master"].inc(len(keys))
        self._served_counter(master, slave).inc(len(keys))
        return keys

    async def share_keys(self, master: str, slaves: list[str], ids: list[str], length: int,
                         *, keep: bool = False) -> list[tuple[str, bytes]]:
        """Make keys `ids` of `length` bytes shared by SAE `master` (here) and `slaves`.

        The slaves' KME stores them for the slaves. With `keep`, this KME also stores
        its copies for `master` (holder and master both `master`), in the same
        transaction that carves them, for key streams (ETSI 004) and SKIP.
        """
        target = self._target_kme(master, slaves)
        link = self.links.get(target)
        total = length * len(ids)
        if link is not None and link.up and link.available_bytes() >= total:
            return await self.share_on_link(link, master, slaves, ids, length, keep=keep)
        try:
            keys = await self.relay.originate(target, master, slaves, ids, length)
        except ApiError:
            if link is None:
                raise
            # No detour either: the direct link's own answer says best what is missing.
            return await self.share_on_link(link, master, slaves, ids, length, keep=keep)
        if keep:
            with self.store.tx():
                for kid, material in keys:
                    self.store.add_key(kid, LOCAL_COPY, master, -1, length, material, [master])
        return keys

    def reach(self, target: str) -> tuple[bool, float | None]:
        """Can keys be shared with KME `target` now (directly or relayed), at what key rate.

        The rate of a relayed way is that of its slowest link; unknown rates are None.
        """
        link = self.links.get(target)
        if link is not None and link.up:
            return True, link.rate_bps
        try:
            path = self.path_to(target, 8)
        except NoPath:
            return False, None
        rates = [self.routes.rate_bps(a, b) for a, b in itertools.pairwise(path)]
        known = [r for r in rates if r is not None]
        return True, min(known) if len(known) == len(rates) else None

    def path_to(self, target: str, need_bits: int,
                avoid: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
        """Cheapest working path to KME `target` (this KME first); raises NoPath."""
        self.routes.set_own(self._own_links())
        return self.routes.path(self.kme_id, target, need_bits, avoid)

    async def share_on_link(self, link: LinkRuntime, master: str, slaves: list[str],
                            ids: list[str], length: int,
                            keep: bool = False) -> list[tuple[str, bytes]]:
        """Keys from the link's own stream, reserved at the linked KME for `slaves`."""
        total = length * len(ids)
        cursor: int | None = None  # the emitter's new allocation cursor, for the peer
        if link.emitter:
            with self.store.tx():
                allocated = self.store.allocate(link.peer, [length] * len(ids))
                pend = [Pending(k, o, length) for k, o in zip(ids, allocated, strict=True)]
                self.store.add_pending(link.peer, pend)
            cursor = allocated[-1] + length
        else:
            available = link.available_bytes()
            if available < total:
                raise ApiError.no_key(available, total)
            pend = [Pending(k, None, length) for k in ids]
            with self.store.tx():
                self.store.add_pending(link.peer, pend)
        body: dict[str, Any] = {
            "master": master,
            "slaves": slaves,
            "keys": [{"key_ID": p.key_id, "length": p.length}
                     | ({"offset": p.offset} if p.offset is not None else {}) for p in pend],
        }
        if cursor is not None:
            body["cursor"] = cursor
        try:
            reply = await link.reserve(body)
            link.mark_contact(True)
        except PeerError as exc:
            link.queue_release(pend)
            if exc.status is None:
                link.mark_contact(False)
                raise ApiError.unavailable(
                    f"peer KME {link.peer} is unreachable; no key can be shared now") from None
            if exc.status == 503:
                raise ApiError.unavailable(exc.message) from None
            raise ApiError.unavailable(
                f"peer KME {link.peer} refused the reservation: {exc.message}") from None
        try:
            offsets = self._reply_offsets(reply, pend) if not link.emitter else \
                [p.offset for p in pend]
            with self.store.tx():
                keys = [(p.key_id, self.store.carve(link.peer, off, p.length))
                        for p, off in zip(pend, offsets, strict=True) if off is not None]
                if keep:
                    for kid, material in keys:
                        self.store.add_key(kid, LOCAL_COPY, master, -1, length, material,
                                           [master])
                self.store.drop_pending(ids)
                if not link.emitter and isinstance(reply.get("cursor"), int):
                    self.store.note_cursor(link.peer, reply["cursor"])
        except (StreamGap, ValueError) as exc:
            log.error("cannot deliver keys reserved at %s: %s", link.peer, exc)
            link.queue_release(pend)
            raise ApiError.unavailable("key stream out of step with the peer KME") from None
        return keys

    def _served_counter(self, master: str, slave: str) -> Any:
        counter = self._served.get((master, slave))
        if counter is None:
            counter = self._served[(master, slave)] = self.metrics.keys_served.labels(
                master=master, slave=slave)
        return counter

    @staticmethod
    def _reply_offsets(reply: dict[str, Any], pend: list[Pending]) -> list[int | None]:
        got = {k.get("key_ID"): k.get("offset") for k in reply.get("keys", [])
               if isinstance(k, dict)}
        offsets = [got.get(p.key_id) for p in pend]
        if not all(isinstance(o, int) and o >= 0 for o in offsets):
            raise ValueError("reservation reply lacks stream offsets")
        return offsets

    def dec_keys(self, caller: Identity | None, master: str,
                 key_ids: list[str]) -> list[tuple[str, bytes]]:
        slave = self.local_sae(caller)
        self.known_sae(master, "master")
        if master == slave:
            raise ApiError.bad_request("the master SAE must differ from the slave SAE")
        with self.store.tx():
            material = self.store.take_keys(slave, master, key_ids)
        self._delivered["slave"].inc(len(material))
        self._served_counter(master, slave).inc(len(material))
        return list(zip(key_ids, material, strict=True))

    # -- KME-to-KME --------------------------------------------------------------

    def peer_stream(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        link = self.peer_link(caller)
        if link.emitter:
            raise ApiError.bad_request(
                f"{self.kme_id} is the emitter of this link, not {link.peer}")
        blocks = []
        for item in _list(body, "blocks"):
            off, data = item.get("offset"), item.get("data")
            if not isinstance(off, int) or off < 0 or not isinstance(data, str):
                raise ApiError.bad_request("stream block needs an offset and base64 data")
            try:
                blocks.append((off, base64.b64decode(data, validate=True)))
            except ValueError:
                raise ApiError.bad_request("stream block data is not base64") from None
        with self.store.tx():
            if blocks:
                self.store.append_blocks(link.peer, blocks, confirmed=True)
            cursor = body.get("cursor")
            if isinstance(cursor, int):
                self.store.note_cursor(link.peer, cursor)
        rate = body.get("key_rate_bps")
        if isinstance(rate, int | float):
            link.rate_bps = float(rate)
            self.metrics.link_rate.labels(peer=link.peer).set(rate)
        link.mark_contact(True)
        self.metrics.link_available_bits.labels(peer=link.peer).set(link.available_bytes() * 8)
        return {"end": self.store.link_state(link.peer).end}

    def peer_reserve(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        """Reserve keys for the peer's masters: a batch of groups, each all or nothing."""
        link = self.peer_link(caller)
        results: list[dict[str, Any]] = []
        # One commit for the whole batch; each group is a savepoint, undone alone if refused.
        with self.store.tx():
            for group in _list(body, "groups"):
                try:
                    results.append(self._reserve_group(link, group))
                except ApiError as exc:
                    results.append({"error": {"status": exc.status, "message": exc.message}})
        return {"groups": results}

    def _reserve_group(self, link: LinkRuntime, body: dict[str, Any]) -> dict[str, Any]:
        master = body.get("master")
        slaves = body.get("slaves")
        hop_key = master == relay_sae(link.peer) and slaves == [relay_sae(self.kme_id)]
        if hop_key:
            pass  # a one-time pad for a relay message the peer is about to send
        elif not isinstance(master, str) or self.cfg.saes.get(master) != link.peer:
            raise ApiError.bad_request(f"master SAE {master!r} is not attached to {link.peer}")
        elif (not isinstance(slaves, list) or not slaves or len(set(slaves)) != len(slaves)
                or any(self.cfg.saes.get(s) != self.kme_id for s in slaves)):
            raise ApiError.bad_request(f"slave SAEs {slaves!r} are not all attached to "
                                       f"{self.kme_id}")
        assert isinstance(master, str) and isinstance(slaves, list)
        ids: list[str] = []
        lengths: list[int] = []
        offsets: list[int] = []
        for k in _list(body, "keys"):
            kid, length, off = k.get("key_ID"), k.get("length"), k.get("offset")
            if not isinstance(kid, str) or not isinstance(length, int) or length <= 0:
                raise ApiError.bad_request("each key needs a key_ID and a length")
            if not link.emitter and (not isinstance(off, int) or off < 0):
                raise ApiError.bad_request("the emitter must give each key's stream offset")
            ids.append(kid)
            lengths.append(length)
            offsets.append(off if isinstance(off, int) else -1)
        if not ids or len(set(ids)) != len(ids):
            raise ApiError.bad_request("keys must list distinct key IDs")
        try:
            with self.store.savepoint():
                if self.store.any_released(ids):
                    raise ApiError.bad_request("a key ID in this reservation was released")
                if link.emitter:
                    offsets = list(self.store.allocate(link.peer, lengths))
                else:
                    cursor = body.get("cursor")
                    if isinstance(cursor, int):
                        self.store.note_cursor(link.peer, cursor)
                for kid, off, length in zip(ids, offsets, lengths, strict=True):
                    material = self.store.carve(link.peer, off, length)
                    self.store.add_key(kid, link.peer, master, off, length, material, slaves)
        except StreamGap as exc:
            log.error("reservation from %s for a range this KME lacks: %s", link.peer, exc)
            raise ApiError.unavailable("key stream out of step with the peer KME") from None
        out: dict[str, Any] = {"keys": [{"key_ID": k, "offset": o}
                                        for k, o in zip(ids, offsets, strict=True)]}
        if link.emitter:
            out["cursor"] = offsets[-1] + lengths[-1]  # allocate() moved it just past
        return out

    def peer_release(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        """Forget keys the peer could not deliver; idempotent, since answers can be lost."""
        link = self.peer_link(caller)
        released = []
        with self.store.tx():
            for k in _list(body, "keys"):
                kid, off, length = k.get("key_ID"), k.get("offset"), k.get("length")
                if not isinstance(kid, str) or not isinstance(length, int) or length <= 0:
                    raise ApiError.bad_request("each key needs a key_ID and a length")
                before = self.store.released(kid)
                if before is not None:  # released already: answer as the first time
                    if before.range is not None:
                        released.append({"key_ID": kid, "offset": before.range[0],
                                         "length": before.range[1]})
                    continue
                rng = self.store.drop_key(kid, link.peer)
                self.store.add_released(kid, rng)
                if rng is not None:
                    released.append({"key_ID": kid, "offset": rng[0], "length": rng[1]})
                elif isinstance(off, int) and off >= 0:
                    # Never reserved here: discard the range, unless already discarded.
                    with contextlib.suppress(StreamGap):
                        self.store.carve(link.peer, off, length)
        return {"released": released}

    async def peer_relay(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        link = self.peer_link(caller)
        return await self.relay.receive(link.peer, body)

    def peer_adverts(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        """Link-state adverts from a neighbour (see kme.routing)."""
        self.peer_link(caller)
        adverts = body.get("adverts")
        if not isinstance(adverts, list):
            raise ApiError.bad_request("adverts must be an array")
        if self.routes.merge(adverts):
            self._advertise_now.set()
        return {}

    def peer_link_state(self, caller: Identity | None, body: dict[str, Any]) -> dict[str, Any]:
        """The peer's operator took the shared link down or up: a fibre cut hits both ends."""
        link = self.peer_link(caller)
        up = body.get("up")
        if not isinstance(up, bool):
            raise ApiError.bad_request("up must be true or false")
        self._set_admin(link, up)
        return {"up": up}

    # -- operations ---------------------------------------------------------------

    @staticmethod
    def require_operator(caller: Identity | None) -> None:
        if caller is None or caller.role != ROLE_ADMIN:
            raise ApiError.unauthorized("only the network operator's certificate may do this")

    async def set_link(self, peer: str, up: bool) -> dict[str, Any]:
        """Take the QKD link to `peer` down or bring it back (both ends)."""
        link = self.links.get(peer)
        if link is None:
            raise ApiError.bad_request(f"{self.kme_id} has no QKD link to {peer!r}")
        self._set_admin(link, up)
        try:
            await link.client.call("/kme/v1/link_state", {"up": up})
            told = True
        except PeerError as exc:
            log.warning("could not tell %s that the link is %s: %s", peer,
                        "up" if up else "down", exc.message)
            told = False
        return link.describe() | {"peer_told": told}

    def _set_admin(self, link: LinkRuntime, up: bool) -> None:
        if link.admin_down == (not up):
            return
        link.admin_down = not up
        self.metrics.link_admin_up.labels(peer=link.peer).set(1 if up else 0)
        log.warning("QKD link %s-%s set %s by an operator", self.kme_id, link.peer,
                    "up" if up else "down")
        self._advertise_now.set()

    def _own_links(self) -> dict[str, LinkAd]:
        return {peer: LinkAd(link.up and not link.admin_down, link.available_bytes() * 8,
                             link.rate_bps)
                for peer, link in self.links.items()}

    async def _advertise_loop(self) -> None:
        """Tell neighbours what this KME knows of the network, each second and on change."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ADVERTISE_S):
                    await self._advertise_now.wait()
            self._advertise_now.clear()
            try:
                self.routes.set_own(self._own_links())
                body = {"adverts": [a.to_json() for a in self.routes.fresh()]}
                await asyncio.gather(*(
                    link.client.call("/kme/v1/adverts", body)
                    for link in self.links.values() if link.up
                ), return_exceptions=True)
            except Exception:  # routing news must keep flowing whatever one round did
                log.exception("advertising links failed")

    def describe(self) -> dict[str, Any]:
        return {
            "kme_id": self.kme_id,
            "time": time.time(),
            "links": [link.describe() for link in self.links.values()],
            "reserved_keys": self.store.reserved_key_count(),
            "network": [a.to_json() for a in self.routes.fresh()],
        }


def _list(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = body.get(name)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ApiError.bad_request(f"{name} must be an array of objects")
    return value
