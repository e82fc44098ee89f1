"""The proof of transit on the wire: an NSH header (RFC 8300), MD type 2, one OPoT TLV.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |Ver|O|U|    TTL    |   Length  |U|U|U|U|MD Type| Next Protocol |  base header (2.2)
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |          Service Path Identifier (SPI)        | Service Index |  service path (2.3)
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |   Metadata Class = 0xFFF6     |  Type = 1|2   |U|  Length=28  |  MD type 2 TLV (2.5.1)
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |P|K|                 Reserved (zero)                           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                  Sequence number (64 bits)                    |
    +                                                               +
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                         RND (64 bits)                         |
    +                                                               +
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                  Cumulative CML (64 bits)                     |
    +                                                               +
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |          further MD type 2 TLVs (kept, passed on), payload ...

Ver = 0, Length = 10 words (40 bytes) plus any further TLVs, MD Type = 2. The metadata
class 0xFFF6 is the first of RFC 8300's Experimental range (0xFFF6-0xFFFE, section
9.1.4): no class is assigned to proof of transit. Type 1 is plain PoT (the draft's scheme;
K is zero), type 2 ordered PoT (CML masked per link, K the key phase of the link the
packet is on). P is the profile index (the draft's profile bit). The body mirrors the
draft's IOAM POT option (a flag byte with P, then RND and CML, 64 bits each), with the
ingress's sequence number added for anti-replay (draft 8.3). Reserved bits are sent as
zero and ignored on receipt. All fields are big-endian (network order).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from gateways.opot.pot import Proof, _new_proof

MD_CLASS = 0xFFF6           # RFC 8300 9.1.4: 0xFFF6-0xFFFE Experimental
TYPE_POT = 0x01             # plain proof of transit
TYPE_OPOT = 0x02            # ordered proof of transit
TLV_LEN = 28                # bytes of TLV body
MD_TYPE_2 = 0x2
HEADER_LEN = 40             # base + service path + TLV header + body
_FLAG_P = 1 << 31
_FLAG_K = 1 << 30

_FIXED = struct.Struct("!IIHBBIQQQ")
_BASE = struct.Struct("!II")
_TLV = struct.Struct("!HBB")
_BODY = struct.Struct("!IQQQ")


class NextProtocol(IntEnum):
    """RFC 8300 section 9.1.5."""

    IPV4 = 0x1
    IPV6 = 0x2
    ETHERNET = 0x3
    NSH = 0x4
    MPLS = 0x5


class WireError(ValueError):
    """Not an NSH header carrying an OPoT TLV (truncated, other version or MD type...)."""


@dataclass(slots=True)
class NshPot:
    """An NSH header whose MD type 2 metadata holds one OPoT TLV (and maybe others after it).

    Not frozen: building a frozen dataclass costs about 2 us here, more than parsing.
    """

    spi: int
    si: int
    proof: Proof
    next_protocol: int = NextProtocol.ETHERNET
    ttl: int = 63
    oam: bool = False
    extra: bytes = b""      # further MD type 2 TLVs, encoded, carried after ours

    @property
    def length(self) -> int:
        """Bytes of the whole NSH header: the inner packet starts here."""
        return HEADER_LEN + len(self.extra)

    def __bytes__(self) -> bytes:
        pr = self.proof
        if not (0 <= self.spi < 1 << 24 and 0 <= self.si < 256 and 0 <= self.ttl < 64
                and 0 <= self.next_protocol < 256 and pr.profile in (0, 1)
                and pr.phase in (0, 1) and len(self.extra) % 4 == 0
                and HEADER_LEN + len(self.extra) <= 63 * 4):
            raise WireError("field out of range")
        w0 = (self.oam << 29 | self.ttl << 22 | (self.length >> 2) << 16 | MD_TYPE_2 << 8
              | self.next_protocol)
        flags = pr.profile << 31 | pr.phase << 30
        try:
            fixed = _FIXED.pack(w0, self.spi << 8 | self.si, MD_CLASS,
                                TYPE_OPOT if pr.ordered else TYPE_POT, TLV_LEN, flags,
                                pr.seq, pr.rnd, pr.cml)
        except struct.error as exc:
            raise WireError("field out of range") from exc
        return fixed + self.extra

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> NshPot:
        if len(data) >= HEADER_LEN:          # ours first, alone: one unpack
            w0, w1, md_class, md_type, md_len, flags, seq, rnd, cml = _FIXED.unpack_from(data)
        elif len(data) >= 8:
            (w0, w1), md_class, md_type, md_len = _BASE.unpack_from(data), -1, -1, -1
            flags = seq = rnd = cml = 0
        else:
            raise WireError("truncated")
        if w0 >> 30 != 0 or (w0 >> 8) & 0xF != MD_TYPE_2:
            raise WireError("not NSH version 0 with MD type 2")
        total = (w0 >> 16 & 0x3F) * 4
        if total < 8 or len(data) < total:
            raise WireError("truncated")
        found = (md_class == MD_CLASS and md_len & 0x7F == TLV_LEN
                 and md_type in (TYPE_POT, TYPE_OPOT) and total >= HEADER_LEN)
        ordered = md_type == TYPE_OPOT
        off = HEADER_LEN if found else 8
        extra: list[bytes] = []
        while off < total:
            if off + 4 > total:
                raise WireError("truncated TLV")
            md_class, md_type, md_len = _TLV.unpack_from(data, off)
            md_len &= 0x7F
            end = off + 4 + (md_len + 3) // 4 * 4
            if end > total:
                raise WireError("truncated TLV")
            if (not found and md_class == MD_CLASS and md_len == TLV_LEN
                    and md_type in (TYPE_POT, TYPE_OPOT)):
                flags, seq, rnd, cml = _BODY.unpack_from(data, off + 4)
                found, ordered = True, md_type == TYPE_OPOT
            else:
                extra.append(bytes(data[off:end]))
            off = end
        if not found:
            raise WireError("no proof of transit TLV")
        return cls(w1 >> 8, w1 & 0xFF,
                   _new_proof(Proof, (flags >> 31, seq, rnd, cml, ordered,
                                      (flags >> 30) & 1 if ordered else 0)),
                   w0 & 0xFF, (w0 >> 22) & 0x3F, bool(w0 >> 29 & 1), b"".join(extra))
