"""SKIP key provider: the Secure Key Integration Protocol (IETF draft-cisco-skip) on a KME.

SKIP lets an encryptor (Cisco routers, among others) get a key from its Key
Provider. Here every KME is the Key Provider of its own SAEs; the two encryptors
are two SAEs at two KMEs, and the key between them is a QKD key from the link:

    GET /capabilities                            what this provider offers the caller
    GET /key?remoteSystemID=B[&size=bits]        initiator A: a new key shared with B
    GET /key/{keyId}?remoteSystemID=A            responder B: the key A got, then deleted
    GET /entropy[?minentropy=bits]               random bytes

The initiator sends the keyId to the responder in its own protocol (IKEv2 with
RFC 8784 PPK, for a router); the responder fetches the key once. Keys, keyIds and
random strings are hex; a keyId is 128 bits (a key ID of the store, as 32 hex
digits); sizes are in bits. Only GET exists: other methods get 405. Answers are
JSON; errors are `{"message": ...}` like the rest of the KME (the draft defines
status codes but no error body): 400 for a bad parameter, unknown
remoteSystemID or unknown keyId, 401 for a certificate that is not one of this
KME's SAEs, 503 when no key can be had now.

Identity is the TLS client certificate of the KME's listener (mutual TLS), as
for ETSI 014: localSystemID is the caller's SAE ID, remoteSystemID the SAE ID of
the encryptor at the other end. Cisco IOS XE speaks SKIP over TLS 1.2 with a
pre-shared key (TLS-PSK), which Python 3.11's ssl module cannot serve; a real
router needs a PSK-terminating proxy in front of the KME that presents the
router's SAE certificate.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiMapping

from kme.errors import ApiError
from kme.wire014 import INT_RE

if TYPE_CHECKING:
    from kme.node import Kme

log = logging.getLogger("qgw.kme")

KEY_ID_RE = re.compile(r"[0-9a-fA-F]{32}")  # used with fullmatch
DEFAULT_ENTROPY_BITS = 256
MAX_ENTROPY_BITS = 8192
NO_STORE = {"Cache-Control": "no-store"}


def add_routes(app: web.Application) -> None:
    """Register the SKIP routes on the KME's API application (GET only: others get 405).

    HEAD is refused too: a HEAD on /key would make a key and throw the initiator's
    copy away.
    """
    r = app.router
    r.add_get("/capabilities", capabilities, name="skip_capabilities", allow_head=False)
    r.add_get("/key", new_key, name="skip_key", allow_head=False)
    r.add_get("/key/{keyId:[^/]+}", key_with_id, name="skip_key_with_id", allow_head=False)
    r.add_get("/entropy", entropy, name="skip_entropy", allow_head=False)


async def capabilities(request: web.Request) -> web.Response:
    kme, sae = _context(request)
    remotes = sorted(s for s, at in kme.cfg.saes.items() if at != kme.kme_id)
    cipher = request.transport.get_extra_info("cipher") if request.transport else None
    return _json({
        "entropy": True,
        "key": True,
        # The draft's example names the TLS-PSK cipher suite; this is the suite of the
        # caller's own (certificate) connection.
        "algorithm": cipher[0] if cipher else "TLS",
        "localSystemID": sae,
        "remoteSystemID": remotes,
    })


async def new_key(request: web.Request) -> web.Response:
    """Initiator: a new key, reserved at the remote encryptor's KME for that encryptor."""
    kme, sae = _context(request)
    remote = _remote(kme, sae, request.query)
    lim = kme.limits
    size = _bits(request.query, "size", lim.key_size, lim.min_key_size, lim.max_key_size)
    ((kid, material),) = await kme.share_keys(sae, [remote], [str(uuid.uuid4())], size // 8)
    kme.metrics.keys_delivered.labels(role="master").inc()
    kme.metrics.keys_served.labels(master=sae, slave=remote).inc()
    log.debug("SKIP key %s made for %s (initiator) and %s", uuid.UUID(kid).hex, sae, remote)
    return _key(kid, material)


async def key_with_id(request: web.Request) -> web.Response:
    """Responder: the key `keyId` the remote initiator got, handed out once and deleted."""
    kme, sae = _context(request)
    remote = _remote(kme, sae, request.query)
    raw = request.match_info["keyId"]
    if not KEY_ID_RE.fullmatch(raw):
        raise ApiError.bad_request("keyId must be 32 hex digits (a 128-bit key ID)",
                                   parameter="keyId")
    kid = str(uuid.UUID(hex=raw.lower()))
    try:
        with kme.store.tx():
            (material,) = kme.store.take_keys(sae, remote, [kid])
    except ApiError as exc:
        if exc.status not in (400, 401):
            raise
        # One answer for unknown, already fetched and someone else's: the draft's 400,
        # and nothing told about keys of other pairs.
        raise ApiError.bad_request(
            f"unknown keyId {raw.lower()} for remoteSystemID {remote}: never made, already "
            f"retrieved, or not a key from {remote} to {sae}", parameter="keyId") from None
    kme.metrics.keys_delivered.labels(role="slave").inc()
    kme.metrics.keys_served.labels(master=remote, slave=sae).inc()
    log.debug("SKIP key %s handed to %s (responder) and deleted", raw.lower(), sae)
    return _key(kid, material)


async def entropy(request: web.Request) -> web.Response:
    """Random bytes for the caller. A QRNG would sit here; the simulator uses os.urandom."""
    _context(request)
    bits = _bits(request.query, "minentropy", DEFAULT_ENTROPY_BITS, 8, MAX_ENTROPY_BITS)
    return _json({"randomStr": os.urandom(bits // 8).hex(), "minentropy": bits}, NO_STORE)


# -- helpers -----------------------------------------------------------------------------

def _context(request: web.Request) -> tuple[Kme, str]:
    """The KME and the calling SAE (from its client certificate; 401 for anyone else)."""
    from kme import server  # kme.server imports this module to register the routes

    kme = request.app[server.KME_KEY]
    return kme, kme.local_sae(server._caller(request))


def _param(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise ApiError.bad_request(f"{name} is given more than once", parameter=name)
    return values[0] if values else None


def _remote(kme: Kme, sae: str, query: MultiMapping[str]) -> str:
    """The remoteSystemID: an SAE at another KME (keys are shared over QKD links)."""
    remote = _param(query, "remoteSystemID")
    if not remote:
        raise ApiError.bad_request("remoteSystemID is required", parameter="remoteSystemID")
    at = kme.cfg.saes.get(remote)
    if at is None:
        raise ApiError.bad_request(f"unknown remoteSystemID {remote!r}",
                                   parameter="remoteSystemID")
    if remote == sae or at == kme.kme_id:
        raise ApiError.bad_request(
            f"remoteSystemID {remote} is attached to this KME too; SKIP keys are shared "
            f"with an encryptor at another KME", parameter="remoteSystemID")
    return remote


def _bits(query: MultiMapping[str], name: str, default: int, low: int, high: int) -> int:
    raw = _param(query, name)
    if raw is None:
        return default
    if not INT_RE.fullmatch(raw) or int(raw) % 8 or not low <= int(raw) <= high:
        raise ApiError.bad_request(
            f"{name} must be a number of bits, a multiple of 8 from {low} to {high}",
            parameter=name)
    return int(raw)


def _key(kid: str, material: bytes) -> web.Response:
    return _json({"keyId": uuid.UUID(kid).hex, "key": material.hex()}, NO_STORE)


def _json(data: dict[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), content_type="application/json",
                        headers=headers)
