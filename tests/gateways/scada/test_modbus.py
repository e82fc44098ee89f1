"""Modbus/TCP policy: requests judged on raw IPv4/IPv6 packets, resets, counters, config.

Packets are built here with struct and checksummed with a plain word-by-word
RFC 1071 loop; Modbus ADUs come from pymodbus's own encoder, so neither side
of a test shares code with the module under test.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.diag_message import ReturnQueryDataRequest
from pymodbus.pdu.other_message import ReadExceptionStatusRequest
from pymodbus.pdu.register_message import (
    MaskWriteRegisterRequest,
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    ReadWriteMultipleRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from gateways.scada import modbus
from gateways.scada.modbus import (
    Direction,
    ModbusFilter,
    ModbusPolicy,
    ModbusRule,
    Verdict,
    checksum,
)
from qgw.config import load_model
from qgw.errors import ConfigError

IN, OUT = Direction.INBOUND, Direction.OUTBOUND
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
CLIENT4, SERVER4 = "10.0.0.1", "10.0.1.2"
CLIENT6, SERVER6 = "fd00::1", "fd00:1::2"

# The HMI may read unit 1, write coils 0..3, and write registers 100..109 (given as two
# adjacent ranges, which cover each other's neighbours together).
POLICY = ModbusPolicy(inbound=[
    ModbusRule(functions=[1, 2, 3, 4], units=[1]),
    ModbusRule(functions=[5, 15], units=[1], ranges=[(0, 3)]),
    ModbusRule(functions=[6, 16, 22, 23], units=[1], ranges=[(100, 104), (105, 109)]),
    ModbusRule(functions=[7]),                    # read exception status, any unit
    ModbusRule(functions=[8], ranges=[(0, 10)]),  # no known addresses + ranges: never matches
])
ANYTHING = ModbusPolicy(inbound=[ModbusRule(functions=list(range(1, 128)))])


# --- independent encoders and decoders -------------------------------------------------------

def rfc1071(data: bytes) -> int:
    """The Internet checksum, word by word with end-around carry (RFC 1071 section 4.1)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    if len(src) == 16:
        return src + dst + struct.pack("!I3xB", length, 6)
    return src + dst + struct.pack("!xBH", 6, length)


def ip4(payload: bytes, *, proto: int = 6, src: str = CLIENT4, dst: str = SERVER4,
        options: bytes = b"", frag: int = 0x4000) -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 1, frag, 64,
                       proto, 0, ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + options
    head = head[:10] + struct.pack("!H", rfc1071(head)) + head[12:]
    return head + payload


def ip6(payload: bytes, *, nh: int = 6, src: str = CLIENT6, dst: str = SERVER6,
        ext: bytes = b"") -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(ext) + len(payload), nh, 64)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + ext + payload)


def segment(payload: bytes = b"", *, v6: bool = False, sport: int = 40000, dport: int = 502,
            seq: int = 1000, ack: int = 5000, flags: int = PSH | ACK, **ip: Any) -> bytes:
    """A TCP segment with a correct checksum, wrapped in IPv4 or IPv6."""
    src = ip.get("src", CLIENT6 if v6 else CLIENT4)
    dst = ip.get("dst", SERVER6 if v6 else SERVER4)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 65535, 0, 0) + payload
    pseudo = pseudo_header(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                           len(tcp))
    tcp = tcp[:16] + struct.pack("!H", rfc1071(pseudo + tcp)) + tcp[18:]
    ip = {"src": src, "dst": dst, **ip}
    return ip6(tcp, **ip) if v6 else ip4(tcp, **ip)


def decode(packet: bytes) -> dict[str, Any]:
    """Fields of an IPv4/IPv6 + 20-byte TCP packet, with both checksums verified."""
    version = packet[0] >> 4
    if version == 4:
        assert packet[0] & 15 == 5
        total, proto = struct.unpack_from("!H", packet, 2)[0], packet[9]
        assert rfc1071(packet[:20]) == 0, "IPv4 header checksum"
        src, dst, tcp, ttl = packet[12:16], packet[16:20], packet[20:], packet[8]
        assert total == len(packet)
    else:
        assert version == 6
        plen, proto, ttl = struct.unpack_from("!HBB", packet, 4)
        src, dst, tcp = packet[8:24], packet[24:40], packet[40:]
        assert plen == len(tcp)
    assert proto == 6 and ttl > 0
    sport, dport, seq, ack, off, flags, _win, _sum, _urg = struct.unpack_from(
        "!HHIIBBHHH", tcp)
    assert off >> 4 == 5 and len(tcp) == 20
    assert rfc1071(pseudo_header(src, dst, len(tcp)) + tcp) == 0, "TCP checksum"
    return {"src": str(ipaddress.ip_address(src)), "dst": str(ipaddress.ip_address(dst)),
            "sport": sport, "dport": dport, "seq": seq, "ack": ack, "flags": flags}


FRAMER = FramerSocket(DecodePDU(is_server=False))


def adu(pdu: ModbusPDU) -> bytes:
    return FRAMER.buildFrame(pdu)


def raw(pdu: bytes, *, unit: int = 1, pid: int = 0, length: int | None = None) -> bytes:
    """An ADU with any header values, for the malformed cases pymodbus refuses to encode."""
    return struct.pack("!HHHB", 9, pid, len(pdu) + 1 if length is None else length, unit) + pdu


def read_holding(address: int = 0, count: int = 10, unit: int = 1) -> bytes:
    return adu(ReadHoldingRegistersRequest(address=address, count=count, dev_id=unit,
                                           transaction_id=7))


def write_coil(address: int, unit: int = 1) -> bytes:
    return adu(WriteSingleCoilRequest(address=address, bits=[True], dev_id=unit))


def write_registers(address: int, count: int) -> bytes:
    return adu(WriteMultipleRegistersRequest(address=address, registers=[0xBEEF] * count,
                                             dev_id=1))


def verdict(payload: bytes, policy: ModbusPolicy = POLICY, direction: Direction = IN,
            **kw: Any) -> Verdict:
    return ModbusFilter(policy).check(segment(payload, **kw), direction)


# --- allowed and denied requests -------------------------------------------------------------

@pytest.mark.parametrize("pdu", [
    ReadCoilsRequest(address=0, count=2000, dev_id=1),
    ReadDiscreteInputsRequest(address=65535, count=1, dev_id=1),
    ReadHoldingRegistersRequest(address=40000, count=125, dev_id=1),
    ReadInputRegistersRequest(address=7, count=1, dev_id=1),
    WriteSingleCoilRequest(address=3, bits=[False], dev_id=1),
    WriteMultipleCoilsRequest(address=0, bits=[True, False, True, True], dev_id=1),
    WriteSingleRegisterRequest(address=109, registers=[5], dev_id=1),
    WriteMultipleRegistersRequest(address=102, registers=[1, 2, 3, 4, 5], dev_id=1),
    MaskWriteRegisterRequest(address=100, and_mask=0xFF00, or_mask=1, dev_id=1),
    ReadWriteMultipleRegistersRequest(read_address=100, read_count=10, write_address=104,
                                      write_registers=[1, 2, 3], dev_id=1),
    ReadExceptionStatusRequest(dev_id=9),
], ids=lambda pdu: type(pdu).__name__)
def test_allowed_requests(pdu: ModbusPDU) -> None:
    f = ModbusFilter(POLICY)
    v = f.check(segment(adu(pdu)), IN)
    assert v == Verdict(True, "allowed", None)
    assert f.allowed_requests == 1 and f.refused == 0


@pytest.mark.parametrize("pdu", [
    WriteSingleCoilRequest(address=4, bits=[True], dev_id=1),        # coil outside 0..3
    WriteSingleRegisterRequest(address=99, registers=[1], dev_id=1),  # register outside
    WriteSingleRegisterRequest(address=110, registers=[1], dev_id=1),
    WriteMultipleRegistersRequest(address=0, registers=[1], dev_id=1),
    WriteMultipleCoilsRequest(address=2, bits=[True] * 3, dev_id=1),  # 2..4: partly outside
    WriteMultipleRegistersRequest(address=108, registers=[1, 2, 3], dev_id=1),  # 108..110
    WriteMultipleRegistersRequest(address=98, registers=[1, 2, 3], dev_id=1),   # 98..100
    MaskWriteRegisterRequest(address=5, dev_id=1),
    ReadWriteMultipleRegistersRequest(read_address=100, read_count=2, write_address=110,
                                      write_registers=[1], dev_id=1),  # write outside
    ReadWriteMultipleRegistersRequest(read_address=0, read_count=2, write_address=100,
                                      write_registers=[1], dev_id=1),  # read outside
    ReadHoldingRegistersRequest(address=0, count=1, dev_id=2),  # unit 2: reads are unit 1 only
    WriteSingleCoilRequest(address=1, bits=[True], dev_id=0),   # broadcast unit
    ReturnQueryDataRequest(message=b"\x00\x00", dev_id=1),  # FC8: rule has ranges
    ReadWriteMultipleRegistersRequest(read_address=100, read_count=1, write_address=100,
                                      write_registers=[1], dev_id=2),
], ids=lambda pdu: f"{type(pdu).__name__}-{getattr(pdu, 'address', '')}-{pdu.dev_id}")
def test_denied_requests(pdu: ModbusPDU) -> None:
    f = ModbusFilter(POLICY)
    v = f.check(segment(adu(pdu)), IN)
    assert not v.allowed and v.reason == "denied" and v.resets is not None
    assert f.refused == 1 and f.refused_by_reason["denied"] == 1 and f.allowed_requests == 0


def test_function_not_listed_is_denied_even_without_addresses() -> None:
    policy = ModbusPolicy(inbound=[ModbusRule(functions=[3])])
    assert verdict(read_holding(), policy).allowed
    assert verdict(write_coil(0), policy).reason == "denied"
    assert verdict(adu(ReadExceptionStatusRequest(dev_id=1)), policy).reason == "denied"


def test_ranges_are_united_not_judged_one_by_one() -> None:
    adjacent = ModbusPolicy(inbound=[ModbusRule(functions=[16], ranges=[(0, 3), (4, 7)])])
    gap = ModbusPolicy(inbound=[ModbusRule(functions=[16], ranges=[(0, 3), (5, 7)])])
    overlapping = ModbusPolicy(inbound=[ModbusRule(functions=[16], ranges=[(4, 9), (0, 5)])])
    assert verdict(write_registers(2, 4), adjacent).allowed          # 2..5
    assert verdict(write_registers(2, 4), gap).reason == "denied"
    assert verdict(write_registers(0, 10), overlapping).allowed      # 0..9
    assert verdict(write_registers(0, 11), overlapping).reason == "denied"


def test_some_rule_must_cover_every_extent_of_fc23() -> None:
    """Read range in one rule, write range in another: no single rule allows the request."""
    split = ModbusPolicy(inbound=[ModbusRule(functions=[23], ranges=[(0, 9)]),
                                  ModbusRule(functions=[23], ranges=[(100, 109)])])
    both = ModbusPolicy(inbound=[ModbusRule(functions=[23], ranges=[(0, 9), (100, 109)])])
    request = adu(ReadWriteMultipleRegistersRequest(read_address=0, read_count=5,
                                                    write_address=100, write_registers=[1]))
    assert verdict(request, split).reason == "denied"
    assert verdict(request, both).allowed


def test_unit_filter() -> None:
    policy = ModbusPolicy(inbound=[ModbusRule(functions=[3], units=[1, 7])])
    assert verdict(read_holding(unit=1), policy).allowed
    assert verdict(read_holding(unit=7), policy).allowed
    assert verdict(read_holding(unit=2), policy).reason == "denied"
    assert verdict(read_holding(unit=255), ModbusPolicy(
        inbound=[ModbusRule(functions=[3])])).allowed  # units unset: any unit


def test_directions_are_enforced_separately() -> None:
    default = ModbusFilter(POLICY)  # inbound enforced, outbound not
    write = segment(write_coil(9))
    assert default.check(write, IN).reason == "denied"
    assert default.check(write, OUT) == Verdict(True, "not-enforced", None)

    both = ModbusFilter(ModbusPolicy(enforce_outbound=True,
                                     outbound=[ModbusRule(functions=[3])]))
    assert both.check(segment(read_holding()), OUT).allowed
    assert both.check(write, OUT).reason == "denied"
    assert both.check(segment(read_holding()), IN).reason == "denied"  # no inbound rules

    neither = ModbusFilter(ModbusPolicy(enforce_inbound=False))
    assert neither.check(write, IN) == Verdict(True, "not-enforced", None)
    assert neither.check(b"junk", IN).allowed
    assert neither.refused == 0


def test_plain_string_direction_means_the_same() -> None:
    f = ModbusFilter(POLICY)
    assert f.check(segment(write_coil(9)), "inbound").reason == "denied"  # type: ignore[arg-type]
    assert f.check(segment(write_coil(9)), "outbound").reason == "not-enforced"  # type: ignore[arg-type]


# --- traffic that is not a Modbus request ----------------------------------------------------

@pytest.mark.parametrize("packet", [
    ip4(b"\0" * 1380, proto=17),                                 # UDP
    ip4(struct.pack("!HH", 40000, 502) + raw(b"\x05\x00\x09\xff\x00"), proto=17),  # Modbus/UDP
    ip4(b"\x08\0\0\0\0\0\0\0", proto=1),                          # ICMP echo
    segment(write_coil(9), dport=80),                             # TCP to another port
    segment(write_coil(9), sport=502, dport=40000),               # a response from the PLC
    segment(flags=SYN, ack=0),
    segment(flags=ACK),
    segment(flags=FIN | ACK),
    segment(flags=RST),
    ip6(b"\0" * 60, nh=17),
    ip6(b"\x80\0\0\0", nh=58),                                    # ICMPv6, shorter than 8
    segment(v6=True, flags=SYN),
], ids=["udp", "modbus-udp", "icmp", "tcp-80", "response", "syn", "ack", "fin", "rst",
        "udp6", "icmp6", "syn6"])
def test_non_requests_pass(packet: bytes) -> None:
    f = ModbusFilter(ModbusPolicy(enforce_outbound=True))  # no rules at all: deny every request
    for direction in (IN, OUT):
        assert f.check(packet, direction) == Verdict(True, "pass", None)
    assert f.refused == 0 and f.allowed_requests == 0


def test_configured_port() -> None:
    policy = ModbusPolicy(port=1502, inbound=[ModbusRule(functions=[3])])
    assert verdict(write_coil(0), policy, dport=502).reason == "pass"
    assert verdict(write_coil(0), policy, dport=1502).reason == "denied"


def test_ipv4_options_are_skipped() -> None:
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL: IHL 6
    assert verdict(read_holding(), options=options).allowed
    v = verdict(write_coil(9), options=options)
    assert v.reason == "denied" and v.resets is not None
    assert decode(v.resets[0])["dst"] == CLIENT4


# --- malformed requests ----------------------------------------------------------------------

MALFORMED = {
    "protocol-id": raw(b"\x03\x00\x00\x00\x01", pid=1),
    "length-past-segment": raw(b"\x03\x00\x00\x00\x01", length=7),
    "length-short": raw(b"\x03\x00\x00\x00\x01", length=5),
    "length-1": raw(b"", length=1),
    "length-255": raw(bytes([0x08]) + bytes(253)),
    "truncated-mbap": read_holding()[:5],
    "truncated-pdu": read_holding()[:-1],
    "pdu-extra-byte": raw(b"\x03\x00\x00\x00\x01\x00"),
    "fc3-quantity-0": raw(b"\x03\x00\x00\x00\x00"),
    "fc3-quantity-126": raw(b"\x03\x00\x00\x00\x7e"),
    "fc4-quantity-126": raw(b"\x04\x00\x00\x00\x7e"),
    "fc1-quantity-2001": raw(b"\x01\x00\x00\x07\xd1"),
    "fc2-quantity-0": raw(b"\x02\x00\x00\x00\x00"),
    "fc3-past-65535": raw(b"\x03\xff\xff\x00\x02"),
    "fc5-value": raw(b"\x05\x00\x01\x12\x34"),
    "fc5-short": raw(b"\x05\x00\x01\xff"),
    "fc6-long": raw(b"\x06\x00\x64\x00\x01\x00"),
    "fc15-quantity-1969": raw(b"\x0f\x00\x00\x07\xb1\xf7" + bytes(247)),
    "fc15-quantity-0": raw(b"\x0f\x00\x00\x00\x00\x00"),
    "fc15-byte-count": raw(b"\x0f\x00\x00\x00\x08\x02\xff\x00"),
    "fc15-data-short": raw(b"\x0f\x00\x00\x00\x10\x02\xff"),
    "fc16-quantity-124": raw(b"\x10\x00\x00\x00\x7c\x02\x00\x01"),
    "fc16-quantity-0": raw(b"\x10\x00\x00\x00\x00\x00"),
    "fc16-byte-count": raw(b"\x10\x00\x64\x00\x02\x02\x00\x01\x00\x02"),
    "fc16-header-short": raw(b"\x10\x00\x64\x00"),
    "fc16-past-65535": raw(b"\x10\xff\xff\x00\x02\x04\x00\x01\x00\x02"),
    "fc22-short": raw(b"\x16\x00\x64\x00\x01"),
    "fc23-write-122": raw(b"\x17\x00\x64\x00\x01\x00\x64\x00\x7a\x02\x00\x01"),
    "fc23-read-0": raw(b"\x17\x00\x64\x00\x00\x00\x64\x00\x01\x02\x00\x01"),
    "fc23-byte-count": raw(b"\x17\x00\x64\x00\x01\x00\x64\x00\x01\x04\x00\x01"),
    "fc0": raw(b"\x00\x00\x00"),
    "fc-exception": raw(b"\x83\x02"),
    "second-adu-partial": read_holding() + read_holding()[:9],
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_is_refused(payload: bytes) -> None:
    f = ModbusFilter(ANYTHING)  # every well-formed request would pass
    v = f.check(segment(payload), IN)
    assert (v.allowed, v.reason) == (False, "malformed")
    assert v.resets is not None and decode(v.resets[1])["flags"] == RST
    assert (f.refused, f.malformed, f.refused_by_reason["malformed"]) == (1, 1, 1)
    assert f.allowed_requests == 0


@pytest.mark.parametrize("payload", [
    raw(b"\x01\x00\x00\x07\xd0"),                                 # FC1: 2000 coils
    raw(b"\x03\xff\x83\x00\x7d"),                                 # FC3: 125 up to 65535
    raw(b"\x0f\x00\x00\x07\xb0\xf6" + bytes(246)),                # FC15: 1968 coils
    raw(b"\x10\x00\x00\x00\x7b\xf6" + bytes(246)),                # FC16: 123 registers
    raw(b"\x17\x00\x00\x00\x7d\x00\x00\x00\x79\xf2" + bytes(242)),  # FC23: read 125, write 121
    raw(b"\x05\x00\x00\x00\x00"),                                 # FC5 off
    raw(b"\x2b\x0e\x01\x00"),                                     # FC43: no known addresses
], ids=["fc1", "fc3", "fc15", "fc16", "fc23", "fc5-off", "fc43"])
def test_spec_limits_are_allowed(payload: bytes) -> None:
    assert verdict(payload, ANYTHING) == Verdict(True, "allowed", None)


@pytest.mark.parametrize("packet", [
    b"", b"\x45" * 19,
    b"\x50" + bytes(39),                                    # IP version 5
    segment(read_holding())[:-3],                            # IPv4 total length > packet
    ip4(b"\x00" * 10),                                       # TCP header cut off
    ip4(struct.pack("!HHIIBBHHH", 40000, 502, 0, 0, 0x40, ACK, 0, 0, 0) + b"x"),  # doff 4
    ip4(struct.pack("!HHIIBBHHH", 40000, 502, 0, 0, 0xF0, ACK, 0, 0, 0)),  # doff past end
    segment(read_holding(), v6=True)[:-1],                   # IPv6 payload length > packet
    ip6(b"\x06\x05" + bytes(6), nh=0),                       # hop-by-hop longer than packet
], ids=["empty", "short", "version", "ip4-length", "tcp-cut", "doff-4", "doff-long",
        "ip6-length", "ip6-ext-length"])
def test_unparseable_ip_is_refused_without_resets(packet: bytes) -> None:
    f = ModbusFilter(ANYTHING)
    assert f.check(packet, IN) == Verdict(False, "malformed", None)
    assert f.malformed == 1 and f.refused == 1


# --- several ADUs in one segment -------------------------------------------------------------

def test_several_adus_all_allowed() -> None:
    f = ModbusFilter(POLICY)
    payload = read_holding(0) + read_holding(100, 5) + write_coil(2)
    assert f.check(segment(payload), IN) == Verdict(True, "allowed", None)
    assert f.allowed_requests == 3


@pytest.mark.parametrize("position", [0, 1, 2])
def test_one_forbidden_adu_refuses_the_segment(position: int) -> None:
    adus = [read_holding(0), read_holding(100, 5)]
    adus.insert(position, write_coil(9))
    f = ModbusFilter(POLICY)
    v = f.check(segment(b"".join(adus)), IN)
    assert v.reason == "denied" and v.resets is not None
    assert f.allowed_requests == 0  # nothing of a dropped segment counts as let through


# --- IPv6 and fragments ----------------------------------------------------------------------

HOP_BY_HOP = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next header TCP, PadN


def frag6(next_header: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset << 3 | more, 0x1234)


def test_ipv6_requests() -> None:
    assert verdict(read_holding(), v6=True) == Verdict(True, "allowed", None)
    assert verdict(write_coil(9), v6=True).reason == "denied"


@pytest.mark.parametrize(("nh", "ext"), [
    (0, HOP_BY_HOP),
    (0, bytes([60, 0, 1, 4, 0, 0, 0, 0, 6, 1, 1, 12]) + bytes(12)),  # hop-by-hop, dst options
    (44, frag6(6, 0, False)),                                        # atomic fragment
    (51, bytes([6, 1]) + bytes(10)),                                 # AH: (1 + 2) * 4 bytes
], ids=["hop-by-hop", "hbh-dstopts", "atomic-fragment", "ah"])
def test_ipv6_extension_headers_cannot_hide_a_request(nh: int, ext: bytes) -> None:
    v = verdict(write_coil(9), v6=True, nh=nh, ext=ext)
    assert v.reason == "denied" and v.resets is not None
    assert decode(v.resets[0])["dst"] == CLIENT6
    assert verdict(read_holding(), v6=True, nh=nh, ext=ext).allowed


@pytest.mark.parametrize(("header", "expected"), [
    (frag6(6, 0, True), "fragment"),     # first fragment of a TCP packet
    (frag6(6, 8, False), "fragment"),    # last fragment: no ports in it
    (frag6(60, 8, True), "fragment"),    # extension header follows: may lead to TCP
    (frag6(17, 8, True), "pass"),        # UDP fragment
])
def test_ipv6_fragments(header: bytes, expected: str) -> None:
    f = ModbusFilter(POLICY)
    v = f.check(ip6(b"\0" * 24, nh=44, ext=header), IN)
    assert (v.reason, v.resets) == (expected, None)
    assert f.refused_by_reason["fragment"] == (expected == "fragment")


@pytest.mark.parametrize(("frag", "proto", "expected"), [
    (0x2000, 6, "fragment"),   # MF set
    (0x0010, 6, "fragment"),   # offset 128
    (0x6000, 6, "fragment"),   # DF and MF
    (0x2000, 17, "pass"),      # UDP fragment
    (0x4000, 6, "allowed"),    # DF only: a whole packet
])
def test_ipv4_fragments(frag: int, proto: int, expected: str) -> None:
    f = ModbusFilter(POLICY)
    tcp = segment(read_holding())[20:]
    v = f.check(ip4(tcp, proto=proto, frag=frag), IN)
    assert (v.reason, v.resets) == (expected, None)
    assert f.check(ip4(tcp, proto=proto, frag=frag), OUT).reason == "not-enforced"


# --- resets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_resets_end_both_sides(v6: bool) -> None:
    payload = write_coil(9)
    v = verdict(payload, v6=v6, sport=40001, seq=1000, ack=5000, flags=PSH | ACK)
    assert v.resets is not None
    client, server = (CLIENT6, SERVER6) if v6 else (CLIENT4, SERVER4)
    to_client, to_server = (decode(p) for p in v.resets)
    assert to_client == {"src": server, "dst": client, "sport": 502, "dport": 40001,
                         "seq": 5000, "ack": 1000 + len(payload), "flags": RST | ACK}
    assert to_server == {"src": client, "dst": server, "sport": 40001, "dport": 502,
                         "seq": 1000, "ack": 0, "flags": RST}
    assert len(v.resets[0]) == (60 if v6 else 40)


def test_resets_wrap_and_count_fin() -> None:
    payload = write_coil(9)
    v = verdict(payload, seq=0xFFFFFFF8, ack=7, flags=FIN | PSH | ACK)
    assert v.resets is not None
    to_client, to_server = (decode(p) for p in v.resets)
    assert to_client["ack"] == (0xFFFFFFF8 + len(payload) + 1) & 0xFFFFFFFF
    assert to_client["seq"] == 7 and to_server["seq"] == 0xFFFFFFF8


def test_resets_for_data_on_syn() -> None:
    """A SYN carrying data (TCP Fast Open) has no ACK: answer with seq 0 (RFC 9293 3.10.7.1)."""
    payload = write_coil(9)
    v = verdict(payload, seq=100, ack=0xDEAD, flags=SYN)
    assert v.resets is not None
    to_client = decode(v.resets[0])
    assert (to_client["seq"], to_client["ack"]) == (0, 100 + len(payload) + 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_checksum_matches_rfc1071(data: bytes) -> None:
    assert checksum(data) == rfc1071(data)


@pytest.mark.parametrize("data", [b"", b"\0\0", b"\xff\xff", b"\xff\xfe\x00\x01", b"\x01"])
def test_checksum_edge_cases(data: bytes) -> None:
    assert checksum(data) == rfc1071(data)


# --- counters and logs -----------------------------------------------------------------------

def test_counters() -> None:
    f = ModbusFilter(POLICY)
    f.check(segment(read_holding() + read_holding()), IN)
    f.check(segment(write_coil(1)), IN)
    f.check(segment(write_coil(9)), IN)
    f.check(segment(write_coil(9)), OUT)                    # not enforced: not counted
    f.check(segment(raw(b"\x03\x00\x00\x00\x00")), IN)
    f.check(segment(read_holding())[:-20], IN)               # cut-off IP packet
    f.check(ip4(segment(read_holding())[20:], frag=0x2000), IN)
    f.check(ip4(b"\0" * 100, proto=17), IN)
    assert f.allowed_requests == 3
    assert f.refused == 4 and f.malformed == 2
    assert f.refused_by_reason == {"denied": 1, "malformed": 2, "fragment": 1}
    assert f.stats() == {"allowed_requests": 3, "refused": 4, "malformed": 2,
                         "refused_denied": 1, "refused_malformed": 2, "refused_fragment": 1}


def test_refusal_is_logged_without_payload(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=modbus.__name__)
    f = ModbusFilter(POLICY)
    f.check(segment(read_holding()), IN)
    assert caplog.records == []
    f.check(segment(write_registers(110, 2)), IN)
    f.check(segment(raw(b"\x03\x00\x00\x00\x00", unit=4), v6=True), IN)
    denied, malformed = (r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert denied == ("modbus inbound: denied request 10.0.0.1:40000 -> 10.0.1.2:502 "
                      "unit 1 function 16: addresses 110..111")
    assert "beef" not in denied.lower() and str(0xBEEF) not in denied
    assert malformed.startswith("modbus inbound: malformed request [fd00::1]:40000 -> "
                                "[fd00:1::2]:502 unit 4 function 3: quantity 0")


# --- configuration ---------------------------------------------------------------------------

def docstring_example() -> str:
    doc = modbus.__doc__ or ""
    start = doc.index("    port: 502")
    return textwrap.dedent(doc[start:doc.index("\n\n", start)])


def test_docstring_example_loads_and_means_what_it_says(tmp_path: Path) -> None:
    path = tmp_path / "modbus.yaml"
    path.write_text(docstring_example())
    policy = load_model(path, ModbusPolicy)
    assert policy.port == 502 and policy.enforce_inbound and not policy.enforce_outbound
    f = ModbusFilter(policy)
    assert f.check(segment(read_holding(address=3000, count=100)), IN).allowed
    assert f.check(segment(adu(ReadCoilsRequest(address=9, count=8, dev_id=1))), IN).allowed
    assert f.check(segment(write_coil(3)), IN).allowed
    assert f.check(segment(write_coil(4)), IN).reason == "denied"
    assert f.check(segment(write_registers(0, 1)), IN).reason == "denied"
    assert f.check(segment(read_holding(unit=2)), IN).reason == "denied"


@pytest.mark.parametrize(("yaml_text", "field", "message"), [
    ("inbound:\n  - functions: [5]\n    rangse: [[0, 3]]\n", "inbound.0.rangse", "unknown field"),
    ("enforce_inbuond: false\n", "enforce_inbuond", "unknown field"),
    ("inbound:\n  - functions: [5]\n    ranges: [[4, 3]]\n", "inbound.0.ranges",
     "ends before it starts"),
    ("inbound:\n  - functions: [128]\n", "inbound.0.functions.0", "less than or equal to 127"),
    ("inbound:\n  - functions: []\n", "inbound.0.functions", "at least 1"),
    ("inbound:\n  - functions: [3]\n    units: [256]\n", "inbound.0.units.0", "255"),
    ("inbound:\n  - functions: [3]\n    ranges: [[0, 65536]]\n", "inbound.0.ranges.0.1",
     "65535"),
    ("port: 0\n", "port", "greater than or equal to 1"),
])
def test_bad_policy_names_file_and_field(tmp_path: Path, yaml_text: str, field: str,
                                         message: str) -> None:
    path = tmp_path / "modbus.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_model(path, ModbusPolicy)
    assert err.value.field == field and err.value.source == str(path)
    assert message in str(err.value)


# --- fuzzing ---------------------------------------------------------------------------------

ENFORCE_BOTH = ModbusPolicy(enforce_outbound=True, inbound=POLICY.inbound,
                            outbound=[ModbusRule(functions=[3], ranges=[(0, 9)])])


def assert_sound(v: Verdict) -> None:
    assert isinstance(v, Verdict)
    assert v.allowed == (v.reason in ("pass", "allowed", "not-enforced"))
    if v.resets is not None:
        assert not v.allowed
        for packet in v.resets:
            decode(packet)  # well-formed, checksums verified


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([IN, OUT]))
def test_fuzz_arbitrary_bytes(packet: bytes, direction: Direction) -> None:
    assert_sound(ModbusFilter(ENFORCE_BOTH).check(packet, direction))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.integers(0, 0xFF))
def test_fuzz_modbus_payloads(payload: bytes, v6: bool, flags: int) -> None:
    f = ModbusFilter(ENFORCE_BOTH)
    v = f.check(segment(payload, v6=v6, flags=flags), IN)
    assert_sound(v)
    assert (v.reason == "pass") == (payload == b"")
    if not v.allowed:
        assert v.resets is not None


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 255)), max_size=6),
       st.booleans())
def test_fuzz_mutated_requests(mutations: list[tuple[int, int]], v6: bool) -> None:
    packet = bytearray(segment(read_holding() + write_coil(1), v6=v6))
    for position, value in mutations:
        packet[position % len(packet)] = value
    assert_sound(ModbusFilter(ENFORCE_BOTH).check(bytes(packet), IN))
