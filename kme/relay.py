"""Trusted-node key relay: a key for an SAE whose KME shares no QKD link with ours.

The master's KME draws fresh keys from the OS CSPRNG and sends them hop by
hop along a path of QKD links (`kme.routing`). On every hop the sender
reserves a one-time hop key on that link (the usual reservation, between the
pseudo-SAEs `#relay:<KME>`), encrypts the keys with it as a one-time pad and
authenticates header and ciphertext with Poly1305 under 32 more bytes of it:
one-time pad plus one-time authenticator, so the hop is as secret as the
link key itself. The next KME takes that hop key (once: a replayed message
finds no key), checks the tag, decrypts, and either stores the keys for the
slave SAEs (last hop) or re-encrypts them for the next hop. Every
intermediate KME sees the keys: that is what "trusted node" means.

A relayed key of n bytes therefore costs n + 32 bytes of link key on every
hop. A hop that fails answers 503 naming the failed link; the master's KME
then tries another path avoiding it, and gives up with a 503. The keys
travel whole, so nothing is stored at the far end unless every hop worked;
keys already stored anywhere are never touched by a failed relay.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from kme.errors import ApiError
from kme.peer import PeerError
from kme.routing import NoPath

if TYPE_CHECKING:
    from kme.node import Kme

log = logging.getLogger("qgw.kme.relay")

MAC_KEY_BYTES = 32
MAX_ATTEMPTS = 3
OP = "/kme/v1/relay"


def relay_sae(kme_id: str) -> str:
    """Pseudo-SAE name under which hop keys are reserved; `#` never occurs in an SAE ID."""
    return f"#relay:{kme_id}"


def hop_cost_bytes(key_bytes: int) -> int:
    """Link key one hop spends to relay `key_bytes` of keys."""
    return key_bytes + MAC_KEY_BYTES


class HopAuthError(Exception):
    """A relay message whose tag does not verify: one opaque failure."""


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "big") ^ int.from_bytes(b[:n], "big")).to_bytes(n, "big")


def seal(pad: bytes, header: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """One-time-pad `payload` and tag header+ciphertext; `pad` is hop_cost_bytes long."""
    if len(pad) != hop_cost_bytes(len(payload)):
        raise ValueError("hop key length does not match the payload")
    ct = _xor(payload, pad[MAC_KEY_BYTES:])
    tag = Poly1305.generate_tag(pad[:MAC_KEY_BYTES], _mac_input(header, ct))
    return ct, tag


def unseal(pad: bytes, header: bytes, ct: bytes, tag: bytes) -> bytes:
    if len(pad) != hop_cost_bytes(len(ct)):
        raise HopAuthError
    try:
        Poly1305.verify_tag(pad[:MAC_KEY_BYTES], _mac_input(header, ct), tag)
    except InvalidSignature:
        raise HopAuthError from None
    return _xor(ct, pad[MAC_KEY_BYTES:])


def _mac_input(header: bytes, ct: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header + ct


class HopFailed(Exception):
    def __init__(self, link: tuple[str, str], message: str) -> None:
        super().__init__(message)
        self.link = link
        self.message = message


class Relay:
    def __init__(self, kme: Kme) -> None:
        self.kme = kme

    # -- the master's KME ---------------------------------------------------------

    async def originate(self, target: str, master: str, slaves: list[str], ids: list[str],
                        length: int) -> list[tuple[str, bytes]]:
        kme = self.kme
        material = os.urandom(length * len(ids))
        need_bits = hop_cost_bytes(len(material)) * 8
        avoid: set[tuple[str, str]] = set()
        last = "no path"
        started = time.perf_counter()
        for _ in range(MAX_ATTEMPTS):
            try:
                path = kme.path_to(target, need_bits, frozenset(avoid))
            except NoPath as exc:
                last = str(exc)
                break
            try:
                await self._send(path, 1, master, slaves, ids, length, material)
            except HopFailed as exc:
                log.warning("relay to %s via %s failed at %s-%s: %s", target, "-".join(path),
                            *exc.link, exc.message)
                avoid.add(exc.link)
                last = f"link {exc.link[0]}-{exc.link[1]}: {exc.message}"
                kme.metrics.relay_failures.inc()
                continue
            hops = len(path) - 1
            kme.metrics.relay_hops.observe(hops)
            kme.metrics.relay_seconds.observe(time.perf_counter() - started)
            kme.metrics.relayed_keys.labels(role="origin").inc(len(ids))
            return [(kid, material[i * length:(i + 1) * length]) for i, kid in enumerate(ids)]
        raise ApiError.unavailable(f"no key can be relayed from {kme.kme_id} to {target} "
                                   f"now ({last})")

    # -- every hop ----------------------------------------------------------------

    async def _send(self, path: list[str], hop: int, master: str, slaves: list[str],
                    ids: list[str], length: int, material: bytes) -> dict[str, Any]:
        """Carry the keys from path[hop-1] (this KME) to path[hop]; raises HopFailed."""
        kme = self.kme
        here, nxt = path[hop - 1], path[hop]
        link = kme.links.get(nxt)
        if link is None or link.admin_down or not link.up:
            raise HopFailed((here, nxt), "link down")
        hop_id = str(uuid.uuid4())
        try:
            ((_, pad),) = await kme.share_on_link(
                link, relay_sae(here), [relay_sae(nxt)], [hop_id], hop_cost_bytes(len(material)))
        except ApiError as exc:
            raise HopFailed((here, nxt), exc.message) from None
        header = json.dumps({
            "path": path, "hop": hop, "hop_key_ID": hop_id, "master": master,
            "slaves": slaves, "keys": [{"key_ID": k, "length": length} for k in ids],
        }, sort_keys=True).encode()
        ct, tag = seal(pad, header, material)
        kme.metrics.relay_link_bits.labels(peer=nxt).inc(len(pad) * 8)
        body = {"header": _b64(header), "ct": _b64(ct), "tag": _b64(tag)}
        timeout = kme.cfg.peer_timeout_s * (len(path) - hop)
        try:
            return await link.client.call(OP, body, timeout_s=timeout)
        except PeerError as exc:
            if exc.status is None:
                link.mark_contact(False)
                raise HopFailed((here, nxt), exc.message) from None
            for d in exc.details or []:
                failed = d.get("failed_link") if isinstance(d, dict) else None
                if (isinstance(failed, list) and len(failed) == 2
                        and all(isinstance(x, str) for x in failed)):
                    raise HopFailed((failed[0], failed[1]), str(d.get("reason", "failed"))) \
                        from None
            if exc.status == 503:
                raise HopFailed((here, nxt), exc.message) from None
            raise ApiError.unavailable(f"relay refused by {nxt}: {exc.message}") from None

    async def receive(self, prev: str, body: dict[str, Any]) -> dict[str, Any]:
        """A relay message from linked KME `prev`: check, decrypt, store or pass on."""
        kme = self.kme
        try:
            header = base64.b64decode(body["header"], validate=True)
            ct = base64.b64decode(body["ct"], validate=True)
            tag = base64.b64decode(body["tag"], validate=True)
            h = json.loads(header)
            path, hop, hop_id = h["path"], h["hop"], h["hop_key_ID"]
            master, slaves, keys = h["master"], h["slaves"], h["keys"]
            lengths = [k["length"] for k in keys]
            ids = [k["key_ID"] for k in keys]
        except (KeyError, TypeError, ValueError):
            raise ApiError.bad_request("malformed relay message") from None
        if (not isinstance(path, list) or not isinstance(hop, int) or not 1 <= hop < len(path)
                or path[hop] != kme.kme_id or path[hop - 1] != prev
                or len(set(path)) != len(path)):
            raise ApiError.bad_request("relay message is not for this hop")
        if (not isinstance(master, str) or not isinstance(slaves, list) or not ids
                or not all(isinstance(x, str) for x in ids)
                or not all(isinstance(n, int) and n > 0 for n in lengths)
                or len(set(lengths)) != 1 or sum(lengths) != len(ct)):
            raise ApiError.bad_request("malformed relay message")
        with kme.store.tx():
            (pad,) = kme.store.take_keys(relay_sae(kme.kme_id), relay_sae(prev), [hop_id])
        try:
            material = unseal(pad, header, ct, tag)
        except HopAuthError:
            log.warning("relay message from %s failed authentication", prev)
            raise ApiError.bad_request("relay message failed authentication") from None
        if hop == len(path) - 1:
            self._store(path, master, slaves, ids, lengths[0], material)
            kme.metrics.relayed_keys.labels(role="destination").inc(len(ids))
            return {"stored": len(ids)}
        try:
            await self._send(path, hop + 1, master, slaves, ids, lengths[0], material)
        except HopFailed as exc:
            raise ApiError(503, f"relay failed at {exc.link[0]}-{exc.link[1]}: {exc.message}",
                           [{"failed_link": list(exc.link), "reason": exc.message}]) from None
        kme.metrics.relayed_keys.labels(role="transit").inc(len(ids))
        return {"stored": len(ids)}

    def _store(self, path: list[str], master: str, slaves: list[str], ids: list[str],
               length: int, material: bytes) -> None:
        kme = self.kme
        if kme.cfg.saes.get(master) != path[0]:
            raise ApiError.bad_request(f"master SAE {master!r} is not attached to {path[0]}")
        if (not slaves or len(set(slaves)) != len(slaves)
                or any(kme.cfg.saes.get(s) != kme.kme_id for s in slaves)):
            raise ApiError.bad_request(f"slave SAEs {slaves!r} are not all attached to "
                                       f"{kme.kme_id}")
        chunks = [material[i * length:(i + 1) * length] for i in range(len(ids))]
        with kme.store.tx():
            for kid, chunk in zip(ids, chunks, strict=True):
                known = kme.store.key_record(kid)
                if known is not None:
                    # The same relay again (its answer was lost and the master retried).
                    if known != (master, chunk):
                        raise ApiError.bad_request(f"key_ID {kid} is already in use")
                    continue
                kme.store.add_key(kid, relay_sae(path[0]), master, -1, length, chunk, slaves)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
