"""Modbus/TCP policy of the SCADA gateway: which requests may reach a PLC.

The tunnel calls `ModbusFilter.check(packet, direction)` on every raw IP
packet (IPv4 or IPv6, as read from a TUN device without packet-info header).
TCP segments to the policy's port carry Modbus/TCP requests; each one must be
allowed by a rule of its direction, or the segment is refused (default deny).
A refused segment is dropped, and the verdict carries two TCP resets (RST) so
both ends learn at once that the connection is gone instead of retransmitting
a segment that will never arrive.

Policy (YAML; in the SCADA gateway's config it sits under `modbus:`). An HMI at
the control centre may read everything on unit 1 and write coils 0..3 only:

    port: 502
    enforce_inbound: true          # requests from the tunnel to the PLCs here
    inbound:
      - functions: [1, 2, 3, 4]    # read coils, inputs, holding and input registers
        units: [1]
      - functions: [5, 15]         # write single / multiple coils ...
        units: [1]
        ranges: [[0, 3]]           # ... 0..3 only
    enforce_outbound: false        # requests from local HMIs into the tunnel

Semantics:
- `inbound` rules judge requests arriving from the tunnel for local devices;
  `outbound` rules judge requests leaving the site into the tunnel. A direction
  that is not enforced lets every packet through without looking at it.
- A request is allowed if some rule of its direction lists its function code,
  lists its unit ID (or has `units` unset), and covers every data address it
  touches (or has `ranges` unset). A rule's ranges are inclusive and united:
  `[[0, 3], [4, 7]]` covers a write of coils 2..5. The four Modbus tables
  (coils, discrete inputs, input and holding registers) are told apart by the
  function codes a rule lists, so give each table its own rule.
- Addresses are known for functions 1-6, 15, 16, 22 (mask write register, one
  address) and 23 (read/write multiple registers: touches both its read and its
  write range). Any other function is allowed only by a rule that lists it and
  has no `ranges`.
- Fail closed: anything malformed is refused with reason "malformed" (MBAP
  protocol ID not 0, MBAP length out of 2..254 or disagreeing with the PDU,
  quantities outside the spec's limits, byte counts that do not match, an
  address range running past 65535, a coil value other than 0x0000/0xFF00,
  function code 0 or >= 128, an ADU cut off at the end of a segment).

Limitations (documented choices):
- Each TCP segment is judged on its own; no stream reassembly. A segment may
  carry several ADUs back to back (all must be allowed), but an ADU split across
  segments is refused as malformed. pymodbus and real HMIs send each request in
  one segment, and a request is at most 260 bytes.
- In an enforced direction every fragmented IPv4 or IPv6 TCP packet is refused
  ("fragment"): a later fragment carries no ports and could smuggle Modbus
  bytes. TCP stacks set DF, so TCP is not fragmented in practice.
- IPv6 extension headers (hop-by-hop, routing, destination options, AH) are
  walked to find TCP, so they cannot hide a request; packets whose next header
  is anything else (UDP, ICMPv6, ESP, IP-in-IP, ...) are not inspected.
- Only Modbus/TCP is judged. Modbus over UDP (which a few PLCs accept on port
  502/udp) passes like any UDP; block it in the site firewall if PLCs speak it.
- Packets that cannot be parsed as IP at all (bad version, truncated header)
  are refused as "malformed" in an enforced direction, without resets.

Verdict reasons: allowed with "pass" (not a Modbus request: not TCP, not to
the port, no payload), "not-enforced" or "allowed"; refused with "denied",
"malformed" or "fragment". Refusals are logged at INFO with direction,
addresses, unit, function and address ranges, never payload bytes.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

FunctionCode = Annotated[int, Field(ge=1, le=127)]
UnitId = Annotated[int, Field(ge=0, le=255)]
DataAddress = Annotated[int, Field(ge=0, le=65535)]


class ModbusRule(BaseModel):
    """Requests with one of `functions`, to one of `units`, inside `ranges`, are allowed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    functions: Annotated[list[FunctionCode], Field(min_length=1)]
    units: Annotated[list[UnitId], Field(min_length=1)] | None = None  # None: any unit
    ranges: Annotated[list[tuple[DataAddress, DataAddress]], Field(min_length=1)] | None = None

    @field_validator("ranges")
    @classmethod
    def _ordered(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        for start, end in v or ():
            if start > end:
                raise ValueError(f"range [{start}, {end}] ends before it starts")
        return v


class ModbusPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    port: Annotated[int, Field(ge=1, le=65535)] = 502
    inbound: list[ModbusRule] = Field(default_factory=list)
    outbound: list[ModbusRule] = Field(default_factory=list)
    enforce_inbound: bool = True
    enforce_outbound: bool = False


class Direction(StrEnum):
    INBOUND = "inbound"    # from the tunnel to local devices
    OUTBOUND = "outbound"  # from the local site into the tunnel


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one packet.

    On refusal `resets` is `(rst_to_client, rst_to_server)` when the packet was
    a parseable TCP segment: complete IP packets to send back towards the
    refused packet's sender and on towards its destination, respectively.
    """

    allowed: bool
    reason: str
    resets: tuple[bytes, bytes] | None = None


PASS = Verdict(True, "pass")
NOT_ENFORCED = Verdict(True, "not-enforced")
ALLOWED = Verdict(True, "allowed")
_BAD_IP = Verdict(False, "malformed")
_FRAGMENT = Verdict(False, "fragment")

REFUSAL_REASONS = ("denied", "malformed", "fragment")

# TCP flags
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
# IPv6: hop-by-hop, routing, destination options (length in 8-byte units), AH, fragment.
_AH, _FRAG, _TCP = 51, 44, 6
_EXT = frozenset({0, 43, 60, _AH, _FRAG})  # extension headers walked to find TCP

_Extents = tuple[tuple[int, int], ...]
_Rule = tuple[frozenset[int] | None, _Extents | None]  # (units, merged ranges)


class _Malformed(Exception):
    """A request that breaks the Modbus spec; its message says how (never payload bytes)."""


def _span(start: int, qty: int) -> tuple[int, int]:
    end = start + qty - 1
    if end > 0xFFFF:
        raise _Malformed(f"address range {start}+{qty} runs past 65535")
    return start, end


# Quantity limits of Modbus Application Protocol Specification V1.1b3.
_READ_MAX = (0, 2000, 2000, 125, 125)  # by function code 1..4


def _extents(fc: int, b: bytes, o: int, n: int) -> _Extents | None:
    """Data addresses one request touches; None for functions without known addresses.

    `b[o:o+n]` is the PDU after the function code. Raises _Malformed.
    """
    if 1 <= fc <= 4:  # read coils / discrete inputs / holding / input registers
        if n != 4:
            raise _Malformed(f"PDU of {n + 1} bytes, expected 5")
        start, qty = _HH.unpack_from(b, o)
        if not 1 <= qty <= _READ_MAX[fc]:
            raise _Malformed(f"quantity {qty} outside 1..{_READ_MAX[fc]}")
        return (_span(start, qty),)
    if fc == 5 or fc == 6:  # write single coil / register
        if n != 4:
            raise _Malformed(f"PDU of {n + 1} bytes, expected 5")
        if fc == 5 and (b[o + 2] not in (0, 0xFF) or b[o + 3]):
            raise _Malformed("coil value is neither 0x0000 nor 0xFF00")
        a = b[o] << 8 | b[o + 1]
        return ((a, a),)
    if fc == 15 or fc == 16:  # write multiple coils / registers
        if n < 5:
            raise _Malformed(f"PDU of {n + 1} bytes, too short")
        qty, count = b[o + 2] << 8 | b[o + 3], b[o + 4]
        limit, need = (1968, (qty + 7) >> 3) if fc == 15 else (123, 2 * qty)
        if not 1 <= qty <= limit:
            raise _Malformed(f"quantity {qty} outside 1..{limit}")
        if count != need or n != 5 + count:
            raise _Malformed(f"byte count {count}, quantity needs {need}, PDU carries {n - 5}")
        return (_span(b[o] << 8 | b[o + 1], qty),)
    if fc == 22:  # mask write register
        if n != 6:
            raise _Malformed(f"PDU of {n + 1} bytes, expected 7")
        a = b[o] << 8 | b[o + 1]
        return ((a, a),)
    if fc == 23:  # read/write multiple registers
        if n < 9:
            raise _Malformed(f"PDU of {n + 1} bytes, too short")
        rqty, wqty, count = b[o + 2] << 8 | b[o + 3], b[o + 6] << 8 | b[o + 7], b[o + 8]
        if not 1 <= rqty <= 125:
            raise _Malformed(f"read quantity {rqty} outside 1..125")
        if not 1 <= wqty <= 121:
            raise _Malformed(f"write quantity {wqty} outside 1..121")
        if count != 2 * wqty or n != 9 + count:
            raise _Malformed(f"byte count {count}, quantity needs {2 * wqty}, PDU carries {n - 9}")
        return (_span(b[o] << 8 | b[o + 1], rqty), _span(b[o + 4] << 8 | b[o + 5], wqty))
    if fc == 0 or fc >= 0x80:
        raise _Malformed(f"function code {fc} is not a request")
    return None


def _permits(rules: tuple[_Rule, ...], unit: int, ext: _Extents | None) -> bool:
    for units, ranges in rules:
        if units is not None and unit not in units:
            continue
        if ranges is None:
            return True
        if ext is None:
            continue
        for lo, hi in ext:
            for a, z in ranges:
                if a <= lo and hi <= z:
                    break
            else:
                break  # this extent is not covered: try the next rule
        else:
            return True
    return False


def _merge(ranges: Sequence[tuple[int, int]]) -> _Extents:
    """Sorted, disjoint, non-adjacent ranges covering the same addresses."""
    out: list[tuple[int, int]] = []
    for a, z in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], z))
        else:
            out.append((a, z))
    return tuple(out)


def _compile(rules: list[ModbusRule]) -> tuple[tuple[_Rule, ...], ...]:
    """Rules by function code 0..255, so a request only meets the rules that list it."""
    table: list[list[_Rule]] = [[] for _ in range(256)]
    for rule in rules:
        entry = (None if rule.units is None else frozenset(rule.units),
                 None if rule.ranges is None else _merge(rule.ranges))
        for fc in set(rule.functions):
            table[fc].append(entry)
    return tuple(tuple(t) for t in table)


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum (ones' complement of the ones' complement sum).

    Since 2**16 == 1 (mod 0xFFFF), the sum of the 16-bit words is congruent to
    the whole buffer read as one big-endian integer, so one `int.from_bytes` and
    one `%` replace the word loop.
    """
    if len(data) & 1:
        data += b"\0"
    s = int.from_bytes(data, "big") % 0xFFFF
    if s == 0:  # the ones' complement sum is 0xFFFF, or 0 for an all-zero buffer
        return 0 if any(data) else 0xFFFF
    return 0xFFFF ^ s


_MBAP = struct.Struct("!2xHHBB")  # (transaction id), protocol id, length, unit, function
_HH = struct.Struct("!HH")
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_IP4_HDR = struct.Struct("!BBHHHBBH4s4s")


def _tcp_packet(v6: bool, src: bytes, dst: bytes, sport: int, dport: int,
                seq: int, ack: int, flags: int) -> bytes:
    """A 20-byte TCP segment without payload, with its IP header and checksums."""
    tcp = _TCP_HDR.pack(sport, dport, seq, ack, 0x50, flags, 0, 0, 0)
    if v6:
        pseudo = src + dst + b"\0\0\0\x14\0\0\0\x06"
        head = b"\x60\0\0\0\0\x14\x06\x40" + src + dst  # payload 20, next TCP, hop limit 64
    else:
        pseudo = src + dst + b"\0\x06\0\x14"
        h = _IP4_HDR.pack(0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst)  # DF, TTL 64
        head = h[:10] + checksum(h).to_bytes(2, "big") + h[12:]
    return head + tcp[:16] + checksum(pseudo + tcp).to_bytes(2, "big") + tcp[18:]


def _resets(packet: bytes, v6: bool, t: int, p: int, total: int) -> tuple[bytes, bytes]:
    src, dst = (packet[8:24], packet[24:40]) if v6 else (packet[12:16], packet[16:20])
    sport, dport, seq, ack, _, flags = struct.unpack_from("!HHIIBB", packet, t)
    seg_len = total - p + bool(flags & _SYN) + bool(flags & _FIN)
    to_client = _tcp_packet(v6, dst, src, dport, sport, ack if flags & _ACK else 0,
                            (seq + seg_len) & 0xFFFFFFFF, _RST | _ACK)
    to_server = _tcp_packet(v6, src, dst, sport, dport, seq, 0, _RST)
    return to_client, to_server


def _endpoints(packet: bytes, v6: bool, t: int) -> str:
    if v6:
        src, dst = (socket.inet_ntop(socket.AF_INET6, packet[a:a + 16]) for a in (8, 24))
        src, dst = f"[{src}]", f"[{dst}]"
    else:
        src, dst = (socket.inet_ntop(socket.AF_INET, packet[a:a + 4]) for a in (12, 16))
    sport, dport = struct.unpack_from("!HH", packet, t)
    return f"{src}:{sport} -> {dst}:{dport}"


def _ranges_text(ext: _Extents | None) -> str:
    return "-" if ext is None else ",".join(f"{a}..{z}" for a, z in ext)


class ModbusFilter:
    """Per-packet Modbus/TCP policy; counters for the gateway's stats and metrics."""

    def __init__(self, policy: ModbusPolicy) -> None:
        self.policy = policy
        self._port = policy.port
        self._tables = {
            Direction.INBOUND: _compile(policy.inbound) if policy.enforce_inbound else None,
            Direction.OUTBOUND: _compile(policy.outbound) if policy.enforce_outbound else None,
        }
        self.allowed_requests = 0  # Modbus requests let through by a rule
        self.refused = 0           # packets refused (any reason)
        self.malformed = 0         # of which malformed
        self.refused_by_reason: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)

    def stats(self) -> dict[str, int]:
        return {"allowed_requests": self.allowed_requests, "refused": self.refused,
                "malformed": self.malformed,
                **{f"refused_{k}": v for k, v in self.refused_by_reason.items()}}

    def check(self, packet: bytes, direction: Direction) -> Verdict:
        """Judge one raw IP packet travelling in `direction`; never raises on any bytes.

        On refusal the caller drops `packet` and, when `resets` is set, sends
        `resets[0]` back towards the packet's sender and `resets[1]` on towards
        its destination (for INBOUND: into the tunnel and onto the TUN device).
        """
        table = self._tables[direction]
        if table is None:
            return NOT_ENFORCED
        n = len(packet)
        if n < 20:
            return self._drop(_BAD_IP, direction)
        version = packet[0] >> 4
        if version == 4:
            if packet[9] != _TCP:
                return PASS
            t = (packet[0] & 15) << 2
            total = packet[2] << 8 | packet[3]
            if t < 20 or total < t + 20 or total > n:
                return self._drop(_BAD_IP, direction)
            if packet[6] & 0x3F or packet[7]:  # MF flag or fragment offset
                return self._drop(_FRAGMENT, direction)
            v6 = False
        elif version == 6:
            if n < 40:
                return self._drop(_BAD_IP, direction)
            total = 40 + (packet[4] << 8 | packet[5])
            if total > n:
                return self._drop(_BAD_IP, direction)
            t = 40
            nh = packet[6]
            while nh != _TCP:  # each step moves t forward by 8 bytes or more
                if nh not in _EXT:
                    return PASS
                if t + 8 > total:
                    return self._drop(_BAD_IP, direction)
                if nh == _FRAG:
                    if (packet[t + 2] << 8 | packet[t + 3]) & 0xFFF9:  # offset or M flag
                        nxt = packet[t]
                        if nxt == _TCP or nxt in _EXT:
                            return self._drop(_FRAGMENT, direction)
                        return PASS
                    nh, t = packet[t], t + 8  # atomic fragment: the whole packet
                elif nh == _AH:
                    nh, t = packet[t], t + ((packet[t + 1] + 2) << 2)
                else:
                    nh, t = packet[t], t + ((packet[t + 1] + 1) << 3)
            if t + 20 > total:
                return self._drop(_BAD_IP, direction)
            v6 = True
        else:
            return self._drop(_BAD_IP, direction)
        if (packet[t + 2] << 8 | packet[t + 3]) != self._port:
            return PASS  # includes responses from the Modbus port
        doff = (packet[t + 12] >> 4) << 2
        p = t + doff
        if doff < 20 or p > total:
            return self._drop(_BAD_IP, direction)
        if p == total:
            return PASS  # SYN, ACK, FIN without payload
        count = 0
        off = p
        unit: int | None = None
        fc: int | None = None
        try:
            while off < total:
                if total - off < 8:
                    unit = fc = None
                    raise _Malformed(f"{total - off} bytes left, no room for an MBAP header")
                pid, length, unit, fc = _MBAP.unpack_from(packet, off)
                if pid:
                    raise _Malformed("MBAP protocol id is not 0")
                if not 2 <= length <= 254:
                    raise _Malformed(f"MBAP length {length} outside 2..254")
                end = off + 6 + length
                if end > total:
                    raise _Malformed(f"MBAP length {length} runs past the segment")
                ext = _extents(fc, packet, off + 8, length - 2)
                if not _permits(table[fc], unit, ext):
                    self._log("denied", direction, packet, v6, t, unit, fc,
                              "addresses " + _ranges_text(ext))
                    return self._refuse(
                        Verdict(False, "denied", _resets(packet, v6, t, p, total)))
                count += 1
                off = end
        except _Malformed as exc:
            self._log("malformed", direction, packet, v6, t, unit, fc, str(exc))
            return self._refuse(Verdict(False, "malformed", _resets(packet, v6, t, p, total)))
        self.allowed_requests += count
        return ALLOWED

    def _refuse(self, verdict: Verdict) -> Verdict:
        self.refused += 1
        self.refused_by_reason[verdict.reason] += 1
        if verdict.reason == "malformed":
            self.malformed += 1
        return verdict

    def _drop(self, verdict: Verdict, direction: Direction) -> Verdict:
        """Refuse a packet that is not a parseable TCP segment (no resets possible)."""
        log.info("modbus %s: refused %s IP packet", direction, verdict.reason)
        return self._refuse(verdict)

    @staticmethod
    def _log(reason: str, direction: Direction, packet: bytes, v6: bool, t: int,
             unit: int | None, fc: int | None, what: str) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        log.info("modbus %s: %s request %s unit %s function %s: %s", direction, reason,
                 _endpoints(packet, v6, t), "-" if unit is None else unit,
                 "-" if fc is None else fc, what)
