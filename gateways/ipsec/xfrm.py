"""Kernel ESP security associations and policies over NETLINK_XFRM.

The IPsec gateway installs QKD keys as tunnel-mode ESP SAs using the AEAD
rfc4106(gcm(aes)), and policies whose template *requires* ESP, so a packet that
matches a policy never leaves in clear: with no SA the kernel drops it.

    XfrmError (QgwError)   an XFRM request failed; names the operation, never key bytes
     +-- EspUnsupported    the kernel lacks ESP, the AEAD or XFRM netlink: names the
     |                     CONFIG_ option and module to enable
     +-- EventsLost        XfrmMonitor's socket overflowed: expire events were dropped

Every netlink error is translated in `_failure` (and `_unsupported` for the kernel's
"I can't do ESP/GCM" answers), so callers see one tree with English messages.

pyroute2 0.9's synchronous sockets drive a private asyncio loop, so they cannot be used
from a thread that is already running one (every gateway's `start()` is), and they give
each calling thread its own socket. `Xfrm` therefore runs its socket on one worker thread
of its own; its methods block the caller for one netlink round trip (well under a
millisecond) and may be called from any thread, one call at a time.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkSocket

from gateways.ipsec.xfrm_messages import (
    ALL_ALGORITHMS,
    IPPROTO_ESP,
    NETLINK_XFRM,
    XFRM_INF,
    XFRM_MODE_TUNNEL,
    XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA,
    XFRM_MSG_EXPIRE,
    XFRM_MSG_GETPOLICY,
    XFRM_MSG_GETSA,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_NEWSA,
    XFRM_POLICY_ALLOW,
    XFRM_POLICY_DIRS,
    XFRMNLGRP_EXPIRE,
    XfrmMarshal,
    xfrm_dump_request,
    xfrm_userpolicy_id,
    xfrm_userpolicy_info,
    xfrm_usersa_id,
    xfrm_usersa_info,
)
from qgw.errors import QgwError
from qgw.secret import Secret

log = logging.getLogger(__name__)

AEAD_NAME = "rfc4106(gcm(aes))"
SALT_BYTES = 4  # RFC 4106: the last 4 key bytes are the nonce salt
KEY_BYTES = (32 + SALT_BYTES, 16 + SALT_BYTES)  # AES-256 (the default) or AES-128, + salt
ICV_BITS = (64, 96, 128)  # RFC 4106 allows 8, 12 or 16-byte ICVs
# The plain replay state is a 32-bit bitmap; wider windows travel in the ESN-style
# replay attribute (without the ESN flag), as iproute2 does it. 4096 is the kernel's cap.
PLAIN_REPLAY_WINDOW = 32
MAX_REPLAY_WINDOW = 4096
MIN_SPI = 256  # RFC 4303: SPIs 1-255 are reserved by IANA, 0 is never on the wire
MAX_U32 = 0xFFFF_FFFF
# check_support's throwaway SA: on loopback, never referenced by a policy, reserved
# here so nothing the gateway installs collides with it.
PROBE_SPI = 0xFFFF_FFFE
PROBE_REQID = 0xFFFF_FFFE
PROBE_HARD_S = 30  # if we die between add and delete, the kernel removes it itself
REPLY_TIMEOUT_S = 30.0

# XFRM tells add from update by message type (NEWSA/UPDSA) and ignores NLM_F_CREATE and
# NLM_F_EXCL, so requests carry only REQUEST|ACK, as iproute2's do.
REQUEST_ACK = NLM_F_REQUEST | NLM_F_ACK
REQUEST_DUMP = NLM_F_REQUEST | NLM_F_DUMP

Direction = Literal["in", "out", "fwd"]
_DIRECTION_NAMES = {number: name for name, number in XFRM_POLICY_DIRS.items()}


class XfrmError(QgwError):
    """An XFRM request failed; the message names the operation and the reason."""


class EspUnsupported(XfrmError):
    """The kernel cannot do what the gateway needs; the message names the CONFIG_ option."""


class EventsLost(XfrmError):
    """The expire-event socket overflowed; `events` holds the ones that were read."""

    def __init__(self, message: str, events: list[Expire]) -> None:
        super().__init__(message)
        self.events = events


# -- what callers pass and get back ----------------------------------------------------

@dataclass(frozen=True)
class Lifetime:
    """SA limits; None is unlimited. A soft limit makes the kernel announce an Expire
    (time to rekey); a hard limit makes it delete the SA (and announce that too)."""

    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_s: int | None = None
    hard_s: int | None = None

    def __post_init__(self) -> None:
        for name in ("soft_bytes", "hard_bytes", "soft_s", "hard_s"):
            value = getattr(self, name)
            if value is not None and not 1 <= value < XFRM_INF:
                raise ValueError(f"lifetime {name} must be a positive integer or None, "
                                 f"not {value!r}")
        for soft, hard in (("soft_bytes", "hard_bytes"), ("soft_s", "hard_s")):
            s, h = getattr(self, soft), getattr(self, hard)
            if s is not None and h is not None and s > h:
                raise ValueError(f"lifetime {soft} ({s}) is above {hard} ({h})")


@dataclass(frozen=True)
class EspSa:
    """One direction of a tunnel-mode ESP SA with rfc4106(gcm(aes)) and an any-selector.

    `src`/`dst` are the outer tunnel endpoints. `key` is the AES key followed by the
    4-byte salt (36 bytes for AES-256, 20 for AES-128). The key is left out of repr,
    equality and hashing (a hash of key bytes would leak them)."""

    src: str
    dst: str
    spi: int
    reqid: int
    key: bytes | Secret = field(repr=False, compare=False)
    icv_bits: int = 128
    replay_window: int = 32
    lifetime: Lifetime = Lifetime()

    def __post_init__(self) -> None:
        _same_family(("SA source", self.src), ("SA destination", self.dst))
        if not MIN_SPI <= self.spi <= MAX_U32:
            raise ValueError(f"SPI {self.spi!r} is out of range: 0-255 are reserved "
                             f"(RFC 4303), the largest is 0xffffffff")
        _check_reqid(self.reqid)
        if len(self.key) not in KEY_BYTES:
            raise ValueError(f"an {AEAD_NAME} key is 36 bytes (AES-256 + 4-byte salt) or "
                             f"20 bytes (AES-128 + salt), not {len(self.key)} bytes")
        if self.icv_bits not in ICV_BITS:
            raise ValueError(f"icv_bits must be 64, 96 or 128, not {self.icv_bits!r}")
        if not 0 <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise ValueError(f"replay_window must be 0-{MAX_REPLAY_WINDOW} packets, "
                             f"not {self.replay_window!r}")

    def describe(self) -> str:
        return f"ESP SA {self.src} -> {self.dst} spi 0x{self.spi:08x} reqid {self.reqid}"


@dataclass(frozen=True)
class Policy:
    """Traffic from `src` to `dst` (CIDRs) in `direction` must use an ESP tunnel
    `tmpl_src` -> `tmpl_dst` whose SA has `reqid` (level required: no SA, no packet)."""

    src: str
    dst: str
    direction: Direction
    tmpl_src: str
    tmpl_dst: str
    reqid: int
    priority: int = 1000

    def __post_init__(self) -> None:
        _selector(self.src, self.dst)
        _check_direction(self.direction)
        _same_family(("template source", self.tmpl_src), ("template destination",
                                                          self.tmpl_dst))
        _check_reqid(self.reqid)
        if not 0 <= self.priority <= MAX_U32:
            raise ValueError(f"policy priority must be 0-{MAX_U32}, not {self.priority!r}")

    def describe(self) -> str:
        return f"policy {self.src} -> {self.dst} dir {self.direction}"


@dataclass(frozen=True)
class SaInfo:
    """An ESP SA as the kernel reports it (never its key)."""

    src: str
    dst: str
    spi: int
    reqid: int
    bytes: int
    packets: int
    replay_window: int
    add_time: int  # Unix time the SA was added
    use_time: int  # Unix time of first use, 0 if unused
    replayed: int  # packets dropped as replays
    out_of_window: int  # packets dropped for falling behind the replay window
    integrity_failed: int  # packets dropped for a bad ICV
    mode: str
    algorithm: str | None
    icv_bits: int | None
    lifetime: Lifetime


@dataclass(frozen=True)
class PolicyInfo:
    src: str
    dst: str
    direction: str
    reqids: tuple[int, ...]  # one per template
    priority: int
    index: int
    action: str  # "allow" or "block"


@dataclass(frozen=True)
class Expire:
    """The kernel's notice that an SA hit a soft limit (rekey now) or a hard limit
    (the kernel has deleted it)."""

    src: str
    dst: str
    spi: int
    reqid: int
    hard: bool


# -- validation and address helpers ----------------------------------------------------

def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IPv4 or IPv6 address") from None


def _same_family(*named: tuple[str, str]) -> int:
    addresses = [(what, _address(text, what)) for what, text in named]
    versions = {a.version for _, a in addresses}
    if len(versions) > 1:
        raise ValueError(" and ".join(f"{w} {a}" for w, a in addresses)
                         + " are not the same address family")
    return _family(addresses[0][1])


def _family(address: ipaddress.IPv4Address | ipaddress.IPv6Address
            | ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def _unpacked(family: int, raw: bytes) -> str:
    return str(ipaddress.ip_address(raw[:4] if family == socket.AF_INET else raw[:16]))


def _check_reqid(reqid: int) -> None:
    if not 1 <= reqid <= MAX_U32:
        raise ValueError(f"reqid must be 1-{MAX_U32} (0 means 'any SA'), not {reqid!r}")


def _check_direction(direction: str) -> int:
    if direction not in XFRM_POLICY_DIRS:
        raise ValueError(f"policy direction must be 'in', 'out' or 'fwd', not {direction!r}")
    return XFRM_POLICY_DIRS[direction]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _selector(src: str, dst: str) -> tuple[Network, Network]:
    nets = []
    for what, text in (("selector source", src), ("selector destination", dst)):
        try:
            nets.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ValueError(f"{what} {text!r} is not a network in CIDR notation "
                             f"({exc})") from None
    if nets[0].version != nets[1].version:
        raise ValueError(f"selector {src} -> {dst} mixes IPv4 and IPv6")
    return nets[0], nets[1]


def _key_bytes(key: bytes | Secret) -> bytes:
    return key.expose() if isinstance(key, Secret) else bytes(key)


# -- messages ----------------------------------------------------------------------------

def _lifetime_fields(lifetime: Lifetime) -> dict[str, int]:
    # Byte and packet limits say "unlimited" with XFRM_INF; time limits with 0 (the
    # kernel arms no timer for 0, whereas XFRM_INF seconds would overflow its sums).
    def limit(value: int | None) -> int:
        return XFRM_INF if value is None else value

    return {
        "lft_soft_byte_limit": limit(lifetime.soft_bytes),
        "lft_hard_byte_limit": limit(lifetime.hard_bytes),
        "lft_soft_packet_limit": XFRM_INF,
        "lft_hard_packet_limit": XFRM_INF,
        "lft_soft_add_expires_seconds": lifetime.soft_s or 0,
        "lft_hard_add_expires_seconds": lifetime.hard_s or 0,
        "lft_soft_use_expires_seconds": 0,
        "lft_hard_use_expires_seconds": 0,
    }


def _newsa_message(sa: EspSa, *, attrs: list[Any] | None = None) -> xfrm_usersa_info:
    family = _same_family(("SA source", sa.src), ("SA destination", sa.dst))
    msg = xfrm_usersa_info()
    msg.update({
        # the selector stays all-zero, "any": the kernel sets its family to the SA's
        "id_daddr": _packed(sa.dst),
        "id_spi": sa.spi,
        "id_proto": IPPROTO_ESP,
        "saddr": _packed(sa.src),
        **_lifetime_fields(sa.lifetime),
        "reqid": sa.reqid,
        "family": family,
        "mode": XFRM_MODE_TUNNEL,
        "replay_window": sa.replay_window if sa.replay_window <= PLAIN_REPLAY_WINDOW else 0,
    })
    if attrs is None:
        key = _key_bytes(sa.key)
        attrs = [["XFRMA_ALG_AEAD", {"alg_name": AEAD_NAME.encode(),
                                     "alg_key_len": len(key) * 8,  # bits, salt included
                                     "alg_icv_len": sa.icv_bits,
                                     "alg_key": key}]]
    if sa.replay_window > PLAIN_REPLAY_WINDOW:
        attrs = [*attrs, ["XFRMA_REPLAY_ESN_VAL",
                          {"bmp_len": (sa.replay_window + 31) // 32,
                           "replay_window": sa.replay_window}]]
    msg["attrs"] = attrs
    return msg


def encode_newsa(sa: EspSa, seq: int = 0, pid: int = 0) -> bytes:
    """The XFRM_MSG_NEWSA request `Xfrm.add_sa` sends for `sa` (the socket picks seq/pid).

    The result holds the key: for byte-level tests, never for logs."""
    msg = _newsa_message(sa)
    msg["header"].update({"type": XFRM_MSG_NEWSA, "flags": REQUEST_ACK,
                          "sequence_number": seq, "pid": pid})
    msg.encode()
    data = bytes(msg.data)
    _wipe(msg)
    return data


def _sa_id_message(dst: str, spi: int) -> xfrm_usersa_id:
    address = _address(dst, "SA destination")
    if not 0 <= spi <= MAX_U32:
        raise ValueError(f"SPI {spi!r} does not fit in 32 bits")
    msg = xfrm_usersa_id()
    msg.update({"daddr": _packed(dst), "spi": spi, "family": _family(address),
                "proto": IPPROTO_ESP})
    return msg


def _selector_fields(src: str, dst: str) -> dict[str, int | bytes]:
    s, d = _selector(src, dst)
    return {"sel_daddr": _packed(str(d.network_address)),
            "sel_saddr": _packed(str(s.network_address)),
            "sel_prefixlen_d": d.prefixlen, "sel_prefixlen_s": s.prefixlen,
            "sel_family": _family(s)}


def _newpolicy_message(p: Policy) -> xfrm_userpolicy_info:
    tmpl_family = _same_family(("template source", p.tmpl_src),
                               ("template destination", p.tmpl_dst))
    msg = xfrm_userpolicy_info()
    msg.update({**_selector_fields(p.src, p.dst), **_lifetime_fields(Lifetime()),
                "priority": p.priority, "dir": XFRM_POLICY_DIRS[p.direction],
                "action": XFRM_POLICY_ALLOW})
    template = {"id_daddr": _packed(p.tmpl_dst), "id_proto": IPPROTO_ESP,
                "family": tmpl_family, "saddr": _packed(p.tmpl_src), "reqid": p.reqid,
                "mode": XFRM_MODE_TUNNEL,
                "optional": 0,  # level required: without a matching SA the packet is dropped
                # all-ones is the kernel's "any algorithm"; 0 would match no SA at all
                "aalgos": ALL_ALGORITHMS, "ealgos": ALL_ALGORITHMS, "calgos": ALL_ALGORITHMS}
    msg["attrs"] = [["XFRMA_TMPL", [template]]]
    return msg


def _delpolicy_message(*, direction: int, index: int = 0, src: str | None = None,
                       dst: str | None = None) -> xfrm_userpolicy_id:
    msg = xfrm_userpolicy_id()
    if src is not None and dst is not None:
        msg.update(_selector_fields(src, dst))
    msg.update({"index": index, "dir": direction})
    return msg


def _wipe(msg: Any) -> None:
    """Overwrite an encoded request's buffer (it held key bytes). Best effort: Python
    may have copied the bytes elsewhere."""
    data = getattr(msg, "data", None)
    if isinstance(data, bytearray):
        data[:] = bytes(len(data))


def _lifetime_from(msg: Any) -> Lifetime:
    def limit(value: int) -> int | None:
        return None if value in (0, XFRM_INF) else value

    return Lifetime(soft_bytes=limit(msg["lft_soft_byte_limit"]),
                    hard_bytes=limit(msg["lft_hard_byte_limit"]),
                    soft_s=limit(msg["lft_soft_add_expires_seconds"]),
                    hard_s=limit(msg["lft_hard_add_expires_seconds"]))


def _sa_info(msg: Any) -> SaInfo:
    family = msg["family"]
    aead = msg.get_attr("XFRMA_ALG_AEAD")
    esn = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
    return SaInfo(
        src=_unpacked(family, msg["saddr"]), dst=_unpacked(family, msg["id_daddr"]),
        spi=msg["id_spi"], reqid=msg["reqid"], bytes=msg["curlft_bytes"],
        packets=msg["curlft_packets"],
        replay_window=esn["replay_window"] if esn is not None else msg["replay_window"],
        add_time=msg["curlft_add_time"], use_time=msg["curlft_use_time"],
        replayed=msg["stats_replay"], out_of_window=msg["stats_replay_window"],
        integrity_failed=msg["stats_integrity_failed"],
        mode="tunnel" if msg["mode"] == XFRM_MODE_TUNNEL else f"mode {msg['mode']}",
        algorithm=aead["alg_name"] if aead is not None else None,
        icv_bits=aead["alg_icv_len"] if aead is not None else None,
        lifetime=_lifetime_from(msg))


def _policy_info(msg: Any) -> PolicyInfo:
    family = msg["sel_family"]
    templates = msg.get_attr("XFRMA_TMPL") or []
    return PolicyInfo(
        src=f"{_unpacked(family, msg['sel_saddr'])}/{msg['sel_prefixlen_s']}",
        dst=f"{_unpacked(family, msg['sel_daddr'])}/{msg['sel_prefixlen_d']}",
        direction=_DIRECTION_NAMES.get(msg["dir"], f"dir {msg['dir']}"),
        reqids=tuple(t["reqid"] for t in templates), priority=msg["priority"],
        index=msg["index"], action="allow" if msg["action"] == XFRM_POLICY_ALLOW else "block")


def _expire(msg: Any) -> Expire:
    family = msg["family"]
    return Expire(src=_unpacked(family, msg["saddr"]), dst=_unpacked(family, msg["id_daddr"]),
                  spi=msg["id_spi"], reqid=msg["reqid"], hard=bool(msg["hard"]))


# -- errors: the one place netlink answers become XfrmErrors ---------------------------

NEEDS_ADMIN = "the gateway needs CAP_NET_ADMIN (run as root or with cap_add: [NET_ADMIN])"


def _failure(operation: str, exc: NetlinkError | OSError, exists: str = "it") -> XfrmError:
    code = exc.code if isinstance(exc, NetlinkError) else (exc.errno or 0)
    if code == errno.EPERM:
        return XfrmError(f"{operation}: {NEEDS_ADMIN}")
    if code == errno.EEXIST:
        return XfrmError(f"{operation}: {exists} already exists")
    reason = os.strerror(code)
    said = exc.args[1] if isinstance(exc, NetlinkError) and len(exc.args) > 1 else None
    if said and said != reason:  # the kernel's extended-ack explanation
        reason = f"{said.rstrip('.')} ({reason})"
    return XfrmError(f"{operation}: the kernel refused: {reason} "
                     f"[{errno.errorcode.get(code, code)}]")


def _esp_missing(family: int) -> str:
    if family == socket.AF_INET6:
        return "the kernel has no IPv6 ESP support: enable CONFIG_INET6_ESP (module esp6)"
    return "the kernel has no ESP support: enable CONFIG_INET_ESP (module esp4)"


GCM_MISSING = (f"the kernel has no {AEAD_NAME} AEAD: enable CONFIG_CRYPTO_GCM "
               f"(module gcm)")
# The kernel's answers that mean "missing feature", not "bad request":
# ENOSYS/ENOENT: no such algorithm; EPROTONOSUPPORT: no xfrm type for ESP in this family;
# EAFNOSUPPORT: no XFRM for this address family at all.
UNSUPPORTED = (errno.ENOSYS, errno.ENOENT, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT)

T = TypeVar("T")


# -- the socket ----------------------------------------------------------------------------

class Xfrm:
    """One NETLINK_XFRM socket for adding, listing and removing ESP SAs and policies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfrm-netlink")
        self._sock: NetlinkSocket | None = None
        self._closed = False
        try:
            self._call(self._open)
        except BaseException:
            self._worker.shutdown(wait=True)
            self._closed = True
            raise

    def __enter__(self) -> Xfrm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- SAs ----------------------------------------------------------------------------

    def add_sa(self, sa: EspSa) -> None:
        """XFRM_MSG_NEWSA; fails if an SA with the same (dst, spi) exists."""
        self._call(lambda: self._add_sa(sa))
        log.debug("added %s", sa.describe())

    def delete_sa(self, dst: str, spi: int) -> bool:
        """XFRM_MSG_DELSA for ESP (dst, spi); False if there was no such SA."""
        msg = _sa_id_message(dst, spi)
        return self._call(lambda: self._delete(msg, XFRM_MSG_DELSA,
                                               f"deleting ESP SA {dst} spi 0x{spi:08x}"))

    def get_sa(self, dst: str, spi: int) -> SaInfo | None:
        msg = _sa_id_message(dst, spi)
        return self._call(lambda: self._get_sa(msg, f"reading ESP SA {dst} spi 0x{spi:08x}"))

    def list_sas(self) -> list[SaInfo]:
        """Every ESP SA in this network namespace (whoever installed it)."""
        return [_sa_info(m) for m in self._call(self._dump_sas)]

    # -- policies ---------------------------------------------------------------------

    def add_policy(self, p: Policy) -> None:
        """XFRM_MSG_NEWPOLICY, not UPDPOLICY: a policy for the same selector and direction
        may belong to another IPsec daemon, and silently replacing it would redirect its
        traffic. The gateway removes its own leftovers with `flush_owned` first."""
        msg = _newpolicy_message(p)
        self._call(lambda: self._create(msg, XFRM_MSG_NEWPOLICY, f"adding {p.describe()}",
                                        exists="a policy with this selector and direction"))
        log.debug("added %s reqid %d", p.describe(), p.reqid)

    def delete_policy(self, src: str, dst: str, direction: str) -> bool:
        """XFRM_MSG_DELPOLICY by selector and direction; False if there was none."""
        msg = _delpolicy_message(direction=_check_direction(direction), src=src, dst=dst)
        return self._call(lambda: self._delete(
            msg, XFRM_MSG_DELPOLICY, f"deleting policy {src} -> {dst} dir {direction}"))

    def list_policies(self) -> list[PolicyInfo]:
        return [_policy_info(m) for m in self._call(self._dump_policies)]

    # -- housekeeping ---------------------------------------------------------------------

    def flush_owned(self, reqids: Collection[int]) -> tuple[int, int]:
        """Delete every ESP SA with a reqid in `reqids` and every policy with a template
        naming one; return how many (SAs, policies) were removed. For leftovers of a
        crashed run: nothing with another reqid is touched."""
        owned = frozenset(reqids)
        return self._call(lambda: self._flush_owned(owned))

    def check_support(self) -> None:
        """Add and delete a throwaway ESP SA on loopback: raises EspUnsupported naming
        the missing CONFIG_ option, or XfrmError when the process lacks CAP_NET_ADMIN."""
        self._call(self._check_support)

    def dump_raw(self, what: Literal["sa", "policy"]) -> list[bytes]:
        """The kernel's dump messages, byte for byte (header included). SA messages hold
        key material: for byte-level comparisons in tests, never for logs."""
        dump = self._dump_sas if what == "sa" else self._dump_policies
        return [bytes(m.data[m.offset:m.offset + m["header"]["length"]])
                for m in self._call(dump)]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._worker.submit(self._close_socket).result(timeout=REPLY_TIMEOUT_S)
            finally:
                self._worker.shutdown(wait=False)

    # -- plumbing: everything below runs on the worker thread ------------------------------

    def _call(self, job: Callable[[], T]) -> T:
        with self._lock:
            if self._closed:
                raise XfrmError("the XFRM socket is closed")
            future = self._worker.submit(job)
            try:
                return future.result(timeout=REPLY_TIMEOUT_S)
            except FutureTimeout:
                raise XfrmError(f"the kernel did not answer an XFRM request within "
                                f"{REPLY_TIMEOUT_S:.0f} s") from None

    def _open(self) -> None:
        try:
            sock = NetlinkSocket(family=NETLINK_XFRM, ext_ack=True)
        except OSError as exc:
            if exc.errno == errno.EPROTONOSUPPORT:
                raise EspUnsupported("the kernel has no XFRM netlink interface: enable "
                                     "CONFIG_XFRM_USER (module xfrm_user)") from None
            raise _failure("opening the NETLINK_XFRM socket", exc) from None
        sock.set_marshal(XfrmMarshal())
        self._sock = sock

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _request(self, msg: Any, msg_type: int, flags: int) -> list[Any]:
        assert self._sock is not None
        # pyroute2 0.9 returns a generator: the kernel's answer (and any error in it)
        # is only read while it is consumed.
        return list(self._sock.nlm_request(msg, msg_type=msg_type, msg_flags=flags))

    def _create(self, msg: Any, msg_type: int, operation: str, exists: str) -> None:
        try:
            self._request(msg, msg_type, REQUEST_ACK)
        except NetlinkError as exc:
            raise _failure(operation, exc, exists) from None

    def _delete(self, msg: Any, msg_type: int, operation: str) -> bool:
        try:
            self._request(msg, msg_type, REQUEST_ACK)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise _failure(operation, exc) from None
        return True

    def _add_sa(self, sa: EspSa) -> None:
        try:
            self._send_newsa(sa)
        except NetlinkError as exc:
            raise self._add_sa_failure(sa, exc) from None

    def _send_newsa(self, sa: EspSa) -> None:
        msg = _newsa_message(sa)
        try:
            self._request(msg, XFRM_MSG_NEWSA, REQUEST_ACK)
        finally:
            _wipe(msg)

    def _add_sa_failure(self, sa: EspSa, exc: NetlinkError,
                        operation: str | None = None) -> XfrmError:
        operation = operation or f"adding {sa.describe()}"
        if exc.code in UNSUPPORTED:
            family = _same_family(("SA source", sa.src), ("SA destination", sa.dst))
            return EspUnsupported(f"{operation}: {self._unsupported(family, exc)}")
        return _failure(operation, exc, "an SA with this destination and SPI")

    def _get_sa(self, msg: Any, operation: str) -> SaInfo | None:
        try:
            # no NLM_F_ACK: the reply itself is the answer (an ack after it would be
            # left unread on the socket)
            replies = self._request(msg, XFRM_MSG_GETSA, NLM_F_REQUEST)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return None
            raise _failure(operation, exc) from None
        found = [r for r in replies if r["header"]["type"] == XFRM_MSG_NEWSA]
        return _sa_info(found[0]) if found else None

    def _dump(self, msg: Any, msg_type: int, operation: str) -> list[Any]:
        try:
            return self._request(msg, msg_type, REQUEST_DUMP)
        except NetlinkError as exc:
            raise _failure(operation, exc) from None

    def _dump_sas(self) -> list[Any]:
        msg = xfrm_dump_request()
        msg["attrs"] = [["XFRMA_PROTO", IPPROTO_ESP]]  # the kernel filters by protocol
        return [m for m in self._dump(msg, XFRM_MSG_GETSA, "listing SAs")
                if m["header"]["type"] == XFRM_MSG_NEWSA and m["id_proto"] == IPPROTO_ESP]

    def _dump_policies(self) -> list[Any]:
        return [m for m in self._dump(xfrm_dump_request(), XFRM_MSG_GETPOLICY,
                                      "listing policies")
                if m["header"]["type"] == XFRM_MSG_NEWPOLICY]

    def _flush_owned(self, owned: frozenset[int]) -> tuple[int, int]:
        sas = policies = 0
        for info in (_sa_info(m) for m in self._dump_sas()):
            if info.reqid in owned and self._delete(
                    _sa_id_message(info.dst, info.spi), XFRM_MSG_DELSA,
                    f"deleting ESP SA {info.dst} spi 0x{info.spi:08x}"):
                sas += 1
        for p in (_policy_info(m) for m in self._dump_policies()):
            if owned.intersection(p.reqids) and p.direction in XFRM_POLICY_DIRS:
                # by index: exact even when another policy shares the selector
                msg = _delpolicy_message(direction=XFRM_POLICY_DIRS[p.direction],
                                         index=p.index)
                if self._delete(msg, XFRM_MSG_DELPOLICY, f"deleting policy {p.src} -> "
                                                         f"{p.dst} dir {p.direction}"):
                    policies += 1
        if sas or policies:
            log.info("removed %d leftover SAs and %d leftover policies", sas, policies)
        return sas, policies

    def _check_support(self) -> None:
        probe = EspSa("127.0.0.1", "127.0.0.1", PROBE_SPI, PROBE_REQID, os.urandom(36),
                      lifetime=Lifetime(hard_s=PROBE_HARD_S))
        operation = "checking kernel ESP support (with a throwaway SA on 127.0.0.1)"
        delete = (_sa_id_message(probe.dst, PROBE_SPI), XFRM_MSG_DELSA,
                  "deleting the ESP probe SA")
        for attempt in (1, 2):
            try:
                self._send_newsa(probe)
                break
            except NetlinkError as exc:
                if exc.code != errno.EEXIST or attempt == 2:
                    raise self._add_sa_failure(probe, exc, operation) from None
                # a probe left by a run that died between add and delete: replace it
                self._delete(*delete)
        self._delete(*delete)

    def _unsupported(self, family: int, exc: NetlinkError) -> str:
        """Name what the kernel lacks. It checks the algorithm before the protocol, so
        when the AEAD is missing, ESP itself is tested with a cipher the kernel has."""
        if exc.code == errno.EAFNOSUPPORT:
            return ("the kernel has no XFRM support for IPv6: enable CONFIG_IPV6 "
                    "(IPv6 may also be disabled at boot)")
        if exc.code == errno.EPROTONOSUPPORT:
            return _esp_missing(family)
        if self._esp_present(family) is False:
            return f"{_esp_missing(family)}; and {GCM_MISSING}"
        return GCM_MISSING

    def _esp_present(self, family: int) -> bool | None:
        """Add (then delete) a loopback ESP SA with a cipher other than GCM: True when
        ESP exists, False when the kernel has no ESP type, None when no cipher to test
        with was found."""
        loopback = "127.0.0.1" if family == socket.AF_INET else "::1"
        for name, key_bytes in (("ecb(cipher_null)", 0), ("cbc(aes)", 16)):
            payload = name.encode().ljust(64, b"\0") + (key_bytes * 8).to_bytes(4, "little")
            algo = payload + bytes(key_bytes)  # struct xfrm_algo; a zero key for a probe
            probe = EspSa(loopback, loopback, PROBE_SPI, PROBE_REQID, bytes(36),
                          lifetime=Lifetime(hard_s=PROBE_HARD_S))
            msg = _newsa_message(probe, attrs=[["XFRMA_ALG_CRYPT", algo]])
            try:
                self._request(msg, XFRM_MSG_NEWSA, REQUEST_ACK)
            except NetlinkError as exc:
                if exc.code == errno.EPROTONOSUPPORT:
                    return False
                if exc.code in (errno.ENOSYS, errno.ENOENT):
                    continue  # this cipher is missing too: try the next
                return True  # the kernel got past the ESP type lookup
            self._delete(_sa_id_message(loopback, PROBE_SPI), XFRM_MSG_DELSA,
                         "deleting the ESP probe SA")
            return True
        return None


# -- expire events ---------------------------------------------------------------------

class XfrmMonitor:
    """The kernel's SA expire events (XFRMNLGRP_EXPIRE), on a socket of its own.

    A plain netlink socket rather than pyroute2's: pyroute2 0.9 reads only while one of
    its calls runs its private event loop, so `fileno()` readiness and what `read()`
    returns would disagree. Here `fileno()` can go into a selector or `loop.add_reader`."""

    RCVBUF = 1 << 20

    def __init__(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_XFRM)
        except OSError as exc:
            if exc.errno == errno.EPROTONOSUPPORT:
                raise EspUnsupported("the kernel has no XFRM netlink interface: enable "
                                     "CONFIG_XFRM_USER (module xfrm_user)") from None
            raise _failure("opening the XFRM event socket", exc) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
            sock.bind((0, 1 << (XFRMNLGRP_EXPIRE - 1)))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise _failure("subscribing to XFRM expire events", exc) from None
        self._sock = sock
        self._marshal = XfrmMarshal()

    def __enter__(self) -> XfrmMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout: float | None = None) -> list[Expire]:
        """Expire events received since the last read. Waits up to `timeout` seconds
        for the first one (None: until one arrives; 0: do not wait); [] on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events, lost = self._drain()
            if lost:
                raise EventsLost("XFRM expire events were lost (the event socket "
                                 "overflowed): re-check SAs with Xfrm.list_sas()", events)
            if events:
                return events
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            try:
                select.select([self._sock], [], [], remaining)
            except (OSError, ValueError):  # closed by another thread while we waited
                raise XfrmError("the XFRM event socket is closed") from None

    def _drain(self) -> tuple[list[Expire], bool]:
        events: list[Expire] = []
        lost = False
        if self._sock.fileno() == -1:
            raise XfrmError("the XFRM event socket is closed")
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return events, lost
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise _failure("reading XFRM expire events", exc) from None
            events += [_expire(m) for m in self._marshal.parse(data)
                       if m["header"]["type"] == XFRM_MSG_EXPIRE]

    def close(self) -> None:
        self._sock.close()
