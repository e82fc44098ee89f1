"""NETLINK_XFRM wire types as pyroute2 messages (pyroute2 0.9 ships none).

Layouts follow <linux/xfrm.h> on 64-bit Linux. pyroute2 packs each field on its own,
without C alignment, so every hole the compiler leaves is an explicit `x` pad field here;
the sizes the kernel checks are pinned in SIZES and in the tests:

    xfrm_selector         56   (3 pad bytes after proto: ifindex is 4-aligned)
    xfrm_id               24   (3 pad bytes after proto)
    xfrm_usersa_info     224   (lft is u64-aligned at 96; 7 tail pad bytes after flags)
    xfrm_usersa_id        24   (1 tail pad byte)
    xfrm_userpolicy_info 168  (4 tail pad bytes: u64 members make it 8-aligned)
    xfrm_userpolicy_id    64   (3 tail pad bytes)
    xfrm_user_tmpl        64   (2 pad bytes before saddr, 1 after optional)
    xfrm_user_expire     232   (7 tail pad bytes after hard)

Multi-byte fields are host order except the ones the header marks __be (SPI, ports).
Key bytes are encoded but never decoded: a decoded AEAD attribute has no `alg_key`.
"""

from __future__ import annotations

import struct
from typing import Any

from pyroute2.netlink import nla, nlmsg
from pyroute2.netlink.marshal import Marshal

NETLINK_XFRM = 6
XFRMNLGRP_EXPIRE = 2  # multicast group number; bind() takes the mask 1 << (group - 1)

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A

XFRMA_TMPL = 5
XFRMA_POLICY_TYPE = 16
XFRMA_ALG_AEAD = 18
XFRMA_MARK = 21
XFRMA_REPLAY_ESN_VAL = 23
XFRMA_PROTO = 25

XFRM_INF = 0xFFFF_FFFF_FFFF_FFFF
IPPROTO_ESP = 50
XFRM_MODE_TUNNEL = 1
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_POLICY_DIRS = {"in": 0, "out": 1, "fwd": 2}
ALL_ALGORITHMS = 0xFFFF_FFFF  # template aalgos/ealgos/calgos: the kernel's "any algorithm"

Fields = tuple[tuple[str, str], ...]


def _prefixed(prefix: str, fields: Fields) -> Fields:
    return tuple((f"{prefix}{name}" if not name.startswith("__") else f"__{prefix}{name[2:]}",
                  fmt) for name, fmt in fields)


ADDRESS = "16s"  # xfrm_address_t: IPv4 in the first 4 bytes, the rest zero

SELECTOR: Fields = (
    ("daddr", ADDRESS),
    ("saddr", ADDRESS),
    ("dport", ">H"),
    ("dport_mask", ">H"),
    ("sport", ">H"),
    ("sport_mask", ">H"),
    ("family", "H"),
    ("prefixlen_d", "B"),
    ("prefixlen_s", "B"),
    ("proto", "B"),
    ("__pad", "3x"),
    ("ifindex", "i"),
    ("user", "I"),
)

ID: Fields = (
    ("daddr", ADDRESS),
    ("spi", ">I"),
    ("proto", "B"),
    ("__pad", "3x"),
)

LIFETIME_CFG: Fields = tuple((name, "Q") for name in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds"))

LIFETIME_CUR: Fields = tuple((name, "Q") for name in ("bytes", "packets", "add_time", "use_time"))

STATS: Fields = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))

USERSA_INFO: Fields = (
    *_prefixed("sel_", SELECTOR),
    *_prefixed("id_", ID),
    ("saddr", ADDRESS),
    *_prefixed("lft_", LIFETIME_CFG),
    *_prefixed("curlft_", LIFETIME_CUR),
    *_prefixed("stats_", STATS),
    ("seq", "I"),
    ("reqid", "I"),
    ("family", "H"),
    ("mode", "B"),
    ("replay_window", "B"),
    ("flags", "B"),
    ("__pad", "7x"),
)

USERSA_ID: Fields = (
    ("daddr", ADDRESS),
    ("spi", ">I"),
    ("family", "H"),
    ("proto", "B"),
    ("__pad", "x"),
)

USERPOLICY_INFO: Fields = (
    *_prefixed("sel_", SELECTOR),
    *_prefixed("lft_", LIFETIME_CFG),
    *_prefixed("curlft_", LIFETIME_CUR),
    ("priority", "I"),
    ("index", "I"),
    ("dir", "B"),
    ("action", "B"),
    ("flags", "B"),
    ("share", "B"),
    ("__pad", "4x"),  # the struct holds u64s: its size rounds up to a multiple of 8
)

USERPOLICY_ID: Fields = (
    *_prefixed("sel_", SELECTOR),
    ("index", "I"),
    ("dir", "B"),
    ("__pad", "3x"),
)

USER_TMPL: Fields = (
    *_prefixed("id_", ID),
    ("family", "H"),
    ("__pad1", "2x"),  # saddr is a union holding __be32s: 4-aligned at 28
    ("saddr", ADDRESS),
    ("reqid", "I"),
    ("mode", "B"),
    ("share", "B"),
    ("optional", "B"),
    ("__pad2", "x"),
    ("aalgos", "I"),
    ("ealgos", "I"),
    ("calgos", "I"),
)

ALGO_AEAD_HEAD: Fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))


def size_of(fields: Fields) -> int:
    return sum(struct.calcsize(fmt) for _, fmt in fields)


def offset_of(fields: Fields, name: str) -> int:
    """Byte offset of field `name` (as the C compiler lays it out: see the module doc)."""
    offset = 0
    for field, fmt in fields:
        if field == name:
            return offset
        offset += struct.calcsize(fmt)
    raise KeyError(name)


SIZES = {
    "xfrm_selector": size_of(SELECTOR),
    "xfrm_id": size_of(ID),
    "xfrm_usersa_info": size_of(USERSA_INFO),
    "xfrm_usersa_id": size_of(USERSA_ID),
    "xfrm_userpolicy_info": size_of(USERPOLICY_INFO),
    "xfrm_userpolicy_id": size_of(USERPOLICY_ID),
    "xfrm_user_tmpl": size_of(USER_TMPL),
    "xfrm_algo_aead": size_of(ALGO_AEAD_HEAD),
}

def pack_tmpl(tmpl: dict[str, Any]) -> bytes:
    """One xfrm_user_tmpl; `tmpl` uses USER_TMPL's names, missing fields are zero."""
    out = bytearray()
    for name, fmt in USER_TMPL:
        if fmt.endswith("x"):
            out += struct.pack(fmt)
        else:
            out += struct.pack(fmt, tmpl.get(name, b"" if fmt.endswith("s") else 0))
    return bytes(out)


def unpack_tmpl(data: bytes | bytearray, offset: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fmt in USER_TMPL:
        if not fmt.endswith("x"):
            (out[name],) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
    return out


TMPL_SIZE = SIZES["xfrm_user_tmpl"]


# -- attributes and messages (lower-case: pyroute2 names classes after the C structs) --

class xfrma_algo_aead(nla):
    """struct xfrm_algo_aead followed by the key; the key is write-only."""

    __slots__ = ()
    fields = (*ALGO_AEAD_HEAD, ("alg_key", "s"))

    def ft_decode(self, offset: int) -> None:
        for name, fmt in ALGO_AEAD_HEAD:
            (self[name],) = struct.unpack_from(fmt, self.data, offset)
            offset += struct.calcsize(fmt)
        self["alg_name"] = self["alg_name"].rstrip(b"\0").decode("ascii", "replace")
        del self["attrs"]
        if "value" in self:
            del self["value"]


class xfrma_tmpl(nla):
    """XFRMA_TMPL: a bare array of xfrm_user_tmpl (no per-element attribute headers)."""

    __slots__ = ()
    fields = ()

    def ft_encode(self, offset: int) -> tuple[int, int]:
        payload = b"".join(pack_tmpl(t) for t in self.value)
        self.data.extend(payload)
        return offset + len(payload), 0

    def ft_decode(self, offset: int) -> None:
        end = self.offset + self.length
        cells = []
        while offset + TMPL_SIZE <= end:
            cells.append(unpack_tmpl(self.data, offset))
            offset += TMPL_SIZE
        self.setvalue(cells)
        del self["attrs"]


class xfrma_replay_esn(nla):
    """struct xfrm_replay_state_esn without its bitmap: the kernel accepts the bare head
    and sizes the bitmap from bmp_len (iproute2 sends it this way too)."""

    __slots__ = ()
    fields = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"),
              ("seq_hi", "I"), ("replay_window", "I"))


class xfrma_mark(nla):
    __slots__ = ()
    fields = (("v", "I"), ("m", "I"))


# Attribute types this module reads or writes; others decode as 'hex' bytes.
XFRM_ATTRS = (
    (1, "XFRMA_ALG_AUTH", "hex"),
    (2, "XFRMA_ALG_CRYPT", "hex"),
    (4, "XFRMA_ENCAP", "hex"),
    (XFRMA_TMPL, "XFRMA_TMPL", "xfrma_tmpl"),
    (10, "XFRMA_REPLAY_VAL", "hex"),
    (15, "XFRMA_LASTUSED", "uint64"),
    (XFRMA_POLICY_TYPE, "XFRMA_POLICY_TYPE", "hex"),
    (XFRMA_ALG_AEAD, "XFRMA_ALG_AEAD", "xfrma_algo_aead"),
    (XFRMA_MARK, "XFRMA_MARK", "xfrma_mark"),
    (XFRMA_REPLAY_ESN_VAL, "XFRMA_REPLAY_ESN_VAL", "xfrma_replay_esn"),
    (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
    (XFRMA_PROTO, "XFRMA_PROTO", "uint8"),
    (31, "XFRMA_IF_ID", "uint32"),
)


class _xfrm_msg(nlmsg):
    __slots__ = ()
    prefix = "XFRMA_"
    nla_map = XFRM_ATTRS
    xfrma_algo_aead = xfrma_algo_aead
    xfrma_tmpl = xfrma_tmpl
    xfrma_mark = xfrma_mark
    xfrma_replay_esn = xfrma_replay_esn

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # pyroute2 encodes an unset field as 0, which struct refuses for a byte string
        super().__init_subclass__(**kwargs)
        cls.defaults = {name: b"" for name, fmt in cls.fields if fmt.endswith("s")}


class xfrm_usersa_info(_xfrm_msg):
    """XFRM_MSG_NEWSA / UPDSA request, and the kernel's GETSA reply and dump entries."""

    __slots__ = ()
    fields = USERSA_INFO


class xfrm_usersa_id(_xfrm_msg):
    """XFRM_MSG_DELSA / GETSA request: (daddr, spi, proto) names one SA."""

    __slots__ = ()
    fields = USERSA_ID


class xfrm_userpolicy_info(_xfrm_msg):
    __slots__ = ()
    fields = USERPOLICY_INFO


class xfrm_userpolicy_id(_xfrm_msg):
    """XFRM_MSG_DELPOLICY request: by selector and direction, or by index."""

    __slots__ = ()
    fields = USERPOLICY_ID


class xfrm_user_expire(_xfrm_msg):
    """XFRM_MSG_EXPIRE, multicast to XFRMNLGRP_EXPIRE."""

    __slots__ = ()
    fields = (*USERSA_INFO, ("hard", "B"), ("__pad_hard", "7x"))


class xfrm_dump_request(_xfrm_msg):
    """A GETSA/GETPOLICY dump request: the kernel parses its body as attributes only."""

    __slots__ = ()
    fields = ()


class XfrmMarshal(Marshal):
    """Reply and event types mapped to their classes (an unknown type stays a bare nlmsg)."""

    msg_map = {  # noqa: RUF012 -- pyroute2's Marshal copies this per instance
        XFRM_MSG_NEWSA: xfrm_usersa_info,
        XFRM_MSG_UPDSA: xfrm_usersa_info,
        XFRM_MSG_GETSA: xfrm_usersa_id,
        XFRM_MSG_DELSA: xfrm_usersa_id,
        XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
        XFRM_MSG_EXPIRE: xfrm_user_expire,
    }


SIZES["xfrm_user_expire"] = size_of(xfrm_user_expire.fields)
