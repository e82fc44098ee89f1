"""The OPoT NSH header: known bytes, round trips, and byte-for-byte agreement with scapy."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.nsh import NSH, NSHTLV

from gateways.opot.pot import PRIME, Proof
from gateways.opot.wire import (
    HEADER_LEN,
    MD_CLASS,
    TYPE_OPOT,
    TYPE_POT,
    NextProtocol,
    NshPot,
    WireError,
)

VECTORS = json.loads((Path(__file__).parent / "vectors.json").read_text())
u64 = st.integers(0, 2**64 - 1)


def scapy_nsh(h: NshPot) -> NSH:
    p = h.proof
    body = struct.pack("!IQQQ", p.profile << 31 | p.phase << 30, p.seq, p.rnd, p.cml)
    tlv = NSHTLV(class_=MD_CLASS, type=TYPE_OPOT if p.ordered else TYPE_POT,
                 metadata=list(struct.unpack("!7I", body)))
    extra = []
    off = 0
    while off < len(h.extra):
        cls_, typ, ln = struct.unpack_from("!HBB", h.extra, off)
        words = (ln + 3) // 4
        extra.append(NSHTLV(class_=cls_, type=typ, metadata=list(
            struct.unpack_from(f"!{words}I", h.extra, off + 4))))
        off += 4 + 4 * words
    return NSH(ver=0, oam=int(h.oam), ttl=h.ttl, mdtype=2, nextproto=h.next_protocol,
               spi=h.spi, si=h.si, vlch=[tlv, *extra])


def test_known_answer_bytes() -> None:
    assert HEADER_LEN == 40
    for pkt in VECTORS["packets"]:
        h = NshPot(spi=pkt["nsh_spi"], si=pkt["nsh_si"], next_protocol=pkt["nsh_next_protocol"],
                   proof=Proof(0, pkt["seq"], pkt["rnd"], pkt["ordered_wire_cml"][-1], True,
                               pkt["nsh_phase"]))
        raw = bytes.fromhex(pkt["nsh"])
        assert bytes(h) == raw
        assert NshPot.parse(raw) == h
    raw = bytes.fromhex(VECTORS["packets"][0]["nsh"])
    assert raw[:12] == bytes.fromhex("0fca0201" "000042fc" "fff6021c")
    assert raw[12:16] == bytes.fromhex("40000000")                    # P=0, K=1
    assert raw[16:24] == (1).to_bytes(8, "big")                       # sequence
    assert raw[24:32] == bytes.fromhex("0123456789abcdef")            # RND


extra_tlvs = st.lists(
    st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 4)).map(
        lambda t: struct.pack("!HBB", t[0], t[1], 4 * t[2]) + bytes(range(4 * t[2]))),
    max_size=3).map(b"".join)


@given(st.integers(0, 2**24 - 1), st.integers(0, 255), st.integers(0, 1), u64,
       st.integers(0, PRIME - 1), u64, st.booleans(), st.integers(0, 1),
       st.sampled_from(list(NextProtocol)), st.integers(0, 63), st.booleans(), extra_tlvs)
def test_round_trip_and_scapy_agree(spi: int, si: int, profile: int, seq: int, rnd: int,
                                    cml: int, ordered: bool, phase: int, nxt: int, ttl: int,
                                    oam: bool, extra: bytes) -> None:
    if extra.startswith(struct.pack("!HB", MD_CLASS, TYPE_POT)) or \
            extra.startswith(struct.pack("!HB", MD_CLASS, TYPE_OPOT)):
        extra = b""
    h = NshPot(spi, si, Proof(profile, seq, rnd, cml, ordered, phase if ordered else 0),
               nxt, ttl, oam, extra)
    raw = bytes(h)
    assert len(raw) == h.length == HEADER_LEN + len(extra)
    assert NshPot.parse(raw + b"payload") == h
    theirs = scapy_nsh(h)
    assert bytes(theirs) == raw                   # scapy builds the very same bytes
    parsed = NSH(raw)                             # and reads ours back field by field
    assert (parsed.ver, parsed.mdtype, parsed.length) == (0, 2, h.length // 4)
    assert (parsed.spi, parsed.si, parsed.ttl, parsed.oam, parsed.nextproto) == \
        (spi, si, ttl, int(oam), nxt)
    tlv = parsed.vlch[0]
    assert (tlv.class_, tlv.type, tlv.length) == \
        (MD_CLASS, TYPE_OPOT if ordered else TYPE_POT, 28)
    assert struct.pack("!7I", *tlv.metadata) == raw[12:40]


def test_scapy_built_header_with_a_tlv_before_ours() -> None:
    other = NSHTLV(class_=0x0000, type=0x07, metadata=[0xDEADBEEF])
    proof = Proof(1, 77, 5, 6, True, 1)
    ours = NSHTLV(class_=MD_CLASS, type=TYPE_OPOT, metadata=list(
        struct.unpack("!7I", struct.pack("!IQQQ", 3 << 30, 77, 5, 6))))
    raw = bytes(NSH(mdtype=2, nextproto=1, spi=0xABCDEF, si=9, vlch=[other, ours]))
    h = NshPot.parse(raw)
    assert h.proof == proof
    assert (h.spi, h.si, h.next_protocol, h.ttl) == (0xABCDEF, 9, 1, 63)
    assert h.extra == bytes.fromhex("00000704deadbeef")
    assert h.length == len(raw) == 48


def test_reserved_bits_and_plain_key_phase_are_ignored() -> None:
    h = NshPot(1, 2, Proof(1, 3, 4, 5, False, 0))
    raw = bytearray(bytes(h))
    raw[12:16] = bytes.fromhex("c0ffffff")         # K set on a plain proof, reserved bits set
    raw[11] = 0x80 | 28                            # the TLV's U bit
    assert NshPot.parse(bytes(raw)).proof == h.proof


def good() -> bytes:
    return bytes(NshPot(1, 255, Proof(0, 1, 2, 3, True, 0)))


@pytest.mark.parametrize("raw", [
    b"", good()[:7], good()[:39],
    bytes([good()[0] | 0x40]) + good()[1:],                    # version 1
    good()[:2] + b"\x01" + good()[3:],                         # MD type 1
    good()[:8] + struct.pack("!HBB", 0xFFF7, 1, 28) + good()[12:],   # another class only
    good()[:8] + struct.pack("!HBB", MD_CLASS, 9, 28) + good()[12:],  # another type only
    good()[:8] + struct.pack("!HBB", MD_CLASS, 2, 24) + good()[12:],  # wrong length
    good()[:8] + struct.pack("!HBB", 0, 0, 127) + good()[12:],  # TLV runs past the header
    bytes([good()[0], 0x01]) + good()[2:],                     # NSH length 1 word
])
def test_not_an_opot_header(raw: bytes) -> None:
    with pytest.raises(WireError):
        NshPot.parse(raw)


@pytest.mark.parametrize("h", [
    NshPot(1 << 24, 0, Proof(0, 1, 2, 3)), NshPot(0, 256, Proof(0, 1, 2, 3)),
    NshPot(0, 0, Proof(2, 1, 2, 3)), NshPot(0, 0, Proof(0, 1, 2, 3, True, 2)),
    NshPot(0, 0, Proof(0, 2**64, 2, 3)), NshPot(0, 0, Proof(0, 1, 2, -1)),
    NshPot(0, 0, Proof(0, 1, 2, 3), ttl=64), NshPot(0, 0, Proof(0, 1, 2, 3), extra=b"\0"),
])
def test_out_of_range_fields_are_refused(h: NshPot) -> None:
    with pytest.raises(WireError):
        bytes(h)


def test_the_chain_over_the_wire() -> None:
    from tests.gateways.opot.test_pot import Chain

    chain = Chain(ordered=True)
    for _ in range(50):
        h = NshPot(0x42, 255, chain.ingress.start(), NextProtocol.IPV4)
        for sf in (chain.sf1, chain.sf2):
            h = NshPot.parse(bytes(h))
            h = NshPot(h.spi, h.si - 1, sf.forward(h.proof), h.next_protocol)
        chain.egress.verify(NshPot.parse(bytes(h)).proof)
    assert chain.egress.verified == 50
