"""Control-centre HMI: polls the substation PLC (apps.plc) over Modbus/TCP and operates breakers.

    python -m apps.hmi --plc 10.0.2.2:502 --rate 100 --duration 30 --quiet
    python -m apps.hmi --plc plc.local --operate CB2=open --count 5

One poll is a fixed set of POLL_REQUESTS = 3 requests, sent one after the other
on one connection (the register map is `apps.substation`'s):

1. read input registers 0..9 (FC 4): voltages, currents, frequency, power,
   transformer temperature, heartbeat;
2. read coils 0..2 (FC 1): breaker commands;
3. read discrete inputs 0..3 (FC 2): breaker positions, over-current alarm.

A poll is ok when all three get a normal response; it fails on a timeout
(--timeout per request, no retries, so a poll is never silently re-sent), a
lost or refused connection, an exception response, or a response with the
wrong transaction ID. Every response's transaction ID is checked against the
request in flight: a repeat of one already answered counts as a duplicate
response, any other mismatch (late or unknown) as an out-of-order response.
After a lost connection the HMI counts failed polls, reconnects (at most every
--reconnect seconds) and continues.

`--operate CB2=open` writes the breaker's coil after the first poll and waits
until its position feedback (discrete input) follows, up to --operate-timeout.

Output: a line per poll at rates up to 5/s, a progress line every second above
that, only the final summary with --quiet; --json prints the same as JSON lines.

Exit codes: 0 every poll and operation ok, 1 some failed (or duplicate /
out-of-order responses), 2 bad usage, 3 PLC unreachable at start.

In process: `await run_hmi(HmiOptions(host, port, rate=100, duration=3))`
returns a `PollStats`; `Poller(host, port)` gives `connect()`, `poll_once()`
(the latency in seconds) and `operate()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerSocket
from pymodbus.pdu import ModbusPDU

from apps._signals import stop_on_signals
from apps.plc import AuditingFramer, int_in, mbap_frames, quiet_pymodbus_logging, seconds
from apps.substation import (
    BREAKERS,
    CO_BREAKER,
    DI_BREAKER_POS,
    DI_COUNT,
    DI_OVERCURRENT,
    IR_COUNT,
    IR_V,
    Measurements,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

POLL_REQUESTS = 3
LINE_PER_POLL_MAX_RATE = 5.0
CATCH_UP_S = 0.25      # how far behind its schedule the poll loop still catches up
MAX_RATE = 1000.0


class PollError(Exception):
    """One poll (or operation) failed; the message is the reason, short and countable."""


class PlcUnreachable(Exception):
    """The PLC could not be reached at start; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    """What one poll saw."""

    measurements: Measurements
    breakers: tuple[bool, ...]     # coil commands, True = closed
    positions: tuple[bool, ...]    # position feedback, True = closed
    overcurrent: bool


@dataclass
class PollStats:
    """Counters of one HMI run. Invariant: sent == ok + failed."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    requests: int = 0
    duplicate_responses: int = 0
    out_of_order_responses: int = 0
    disconnects: int = 0
    reconnects: int = 0
    operations_ok: int = 0
    operations_failed: int = 0
    elapsed_s: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list, repr=False)

    def percentile(self, q: float) -> float | None:
        """Latency of ok polls at quantile q (0..1, nearest rank), None without ok polls."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]

    @property
    def all_ok(self) -> bool:
        return not (self.failed or self.operations_failed or self.duplicate_responses
                    or self.out_of_order_responses)

    def as_dict(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        return {
            "sent": self.sent, "ok": self.ok, "failed": self.failed,
            "requests": self.requests, "duplicate_responses": self.duplicate_responses,
            "out_of_order_responses": self.out_of_order_responses,
            "disconnects": self.disconnects, "reconnects": self.reconnects,
            "operations_ok": self.operations_ok, "operations_failed": self.operations_failed,
            "latency_p50_ms": None if p50 is None else round(p50 * 1e3, 3),
            "latency_p99_ms": None if p99 is None else round(p99 * 1e3, 3),
            "latency_max_ms": round(max(self.latencies_s) * 1e3, 3) if self.latencies_s
            else None,
            "elapsed_s": round(self.elapsed_s, 3), "failures": dict(self.failures),
        }

    def summary_line(self) -> str:
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        text = (f"polls {self.sent}, ok {self.ok}, failed {self.failed}, "
                f"requests {self.requests}, duplicate responses {self.duplicate_responses}, "
                f"out-of-order responses {self.out_of_order_responses}, "
                f"reconnects {self.reconnects}, latency p50 {_ms(self.percentile(0.5))} "
                f"p99 {_ms(self.percentile(0.99))}, {self.elapsed_s:.2f} s ({rate:.1f} polls/s)")
        if self.operations_ok or self.operations_failed:
            text += f", operations ok {self.operations_ok} failed {self.operations_failed}"
        if self.failures:
            text += "; failures: " + ", ".join(f"{why} x{n}"
                                               for why, n in self.failures.most_common())
        return text


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


class Poller:
    """One Modbus/TCP connection to the PLC, polled one request at a time."""

    def __init__(self, host: str, port: int = 502, *, unit: int = 1, timeout: float = 1.0,
                 reconnect_s: float = 0.5, stats: PollStats | None = None,
                 on_event: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.host = host
        self.port = port
        self.unit = unit
        self.timeout = timeout
        self.reconnect_s = reconnect_s
        self.stats = stats if stats is not None else PollStats()
        self.on_event = on_event or (lambda _text: None)
        self.clock = clock
        self.last: Snapshot | None = None
        self._lost = asyncio.Event()
        self._closing = False
        self._next_connect_at = 0.0
        self._disconnected_at: float | None = None
        self._in_flight: int | None = None
        self._answered: deque[int] = deque(maxlen=256)
        # retries=0: a timed-out request is a failed poll, never re-sent with the same
        # transaction ID (pymodbus' default of 3 retries would look like duplicates at the PLC).
        # reconnect_delay=0: no background reconnect; poll_once() reconnects, paced.
        self.client = AsyncModbusTcpClient(
            host, port=port, timeout=timeout, retries=0, reconnect_delay=0,
            trace_pdu=self._trace_pdu, trace_connect=self._trace_connect)
        # Audit every response frame (pymodbus 3.16 keeps the framer at client.ctx.framer);
        # if that ever moves, fall back to auditing the PDUs trace_pdu is given.
        ctx = getattr(self.client, "ctx", None)
        framer = getattr(ctx, "framer", None)
        self.audits_frames = isinstance(framer, FramerSocket)
        if isinstance(framer, FramerSocket):
            setattr(ctx, "framer",  # noqa: B010 (an attribute of pymodbus' internals)
                    AuditingFramer(framer.decoder, lambda tid, _fc: self._audit(tid)))
        self._ctx = ctx

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def connect(self, wait_s: float = 0.0) -> None:
        """Connect, retrying for up to wait_s seconds; PlcUnreachable if that fails."""
        deadline = self.clock() + wait_s
        while True:
            self._closing = False
            if await self.client.connect():
                self._lost = asyncio.Event()
                return
            if self.clock() >= deadline:
                why = await _connect_error(self.host, self.port, self.timeout)
                raise PlcUnreachable(f"PLC {_hostport(self.host, self.port)} unreachable: {why}")
            await asyncio.sleep(min(self.reconnect_s, max(0.0, deadline - self.clock())))

    def close(self) -> None:
        self._closing = True
        self.client.close()

    async def poll_once(self) -> float:
        """One poll (POLL_REQUESTS requests). Returns its latency in seconds; PollError if not ok.

        Either way the result is counted in `stats`; `last` holds what an ok poll saw.
        """
        stats = self.stats
        stats.sent += 1
        try:
            await self._ensure_connected()
            t0 = self.clock()
            ir = await self._request(lambda: self.client.read_input_registers(
                IR_V, count=IR_COUNT, device_id=self.unit))
            co = await self._request(lambda: self.client.read_coils(
                CO_BREAKER, count=BREAKERS, device_id=self.unit))
            di = await self._request(lambda: self.client.read_discrete_inputs(
                DI_BREAKER_POS, count=DI_COUNT, device_id=self.unit))
            latency = self.clock() - t0
            snapshot = Snapshot(Measurements.from_registers(ir.registers),
                                tuple(co.bits[:BREAKERS]),
                                tuple(di.bits[DI_BREAKER_POS:DI_BREAKER_POS + BREAKERS]),
                                bool(di.bits[DI_OVERCURRENT]))
        except PollError as exc:
            stats.failed += 1
            stats.failures[str(exc)] += 1
            raise
        except (ValueError, IndexError, AttributeError) as exc:
            stats.failed += 1
            stats.failures["malformed response"] += 1
            raise PollError(f"malformed response: {exc}") from None
        stats.ok += 1
        stats.latencies_s.append(latency)
        self.last = snapshot
        return latency

    async def operate(self, breaker: int, close: bool, timeout: float = 2.0) -> float:
        """Command breaker CB<breaker> (1-based) and wait for its position feedback.

        Returns the seconds from the write until the feedback matched; PollError otherwise.
        """
        if not 1 <= breaker <= BREAKERS:
            raise ValueError(f"breaker must be 1..{BREAKERS}, not {breaker}")
        started = self.clock()
        try:
            await self._ensure_connected()
            await self._request(lambda: self.client.write_coil(
                CO_BREAKER + breaker - 1, close, device_id=self.unit))
            while True:
                di = await self._request(lambda: self.client.read_discrete_inputs(
                    DI_BREAKER_POS + breaker - 1, count=1, device_id=self.unit))
                if bool(di.bits[0]) == close:
                    break
                if self.clock() - started > timeout:
                    raise PollError(f"CB{breaker} feedback still {_state(not close)} after "
                                    f"{timeout:g} s")
                await asyncio.sleep(0.02)
        except PollError:
            self.stats.operations_failed += 1
            raise
        self.stats.operations_ok += 1
        return self.clock() - started

    # --- internals
    async def _ensure_connected(self) -> None:
        if self.client.connected:
            return
        now = self.clock()
        if now < self._next_connect_at:
            raise PollError("not connected")
        self._closing = False
        if not await self.client.connect():
            self._next_connect_at = self.clock() + self.reconnect_s
            raise PollError("not connected")
        self._lost = asyncio.Event()
        self.stats.reconnects += 1
        down = "" if self._disconnected_at is None else \
            f" after {self.clock() - self._disconnected_at:.2f} s"
        self.on_event(f"reconnected to PLC {_hostport(self.host, self.port)}{down}")
        self._disconnected_at = None

    async def _request(self, send: Callable[[], Awaitable[ModbusPDU]]) -> Any:
        """Send one request and wait for its answer, or for the connection to drop."""
        if not self.client.connected or self._lost.is_set():
            raise PollError("not connected")
        self._audit_leftover()
        self.stats.requests += 1
        try:
            request = asyncio.ensure_future(send())
        except ConnectionException:
            raise PollError("not connected") from None
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({request, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not request.done():
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError, ModbusException):
                await request
            raise PollError("connection lost")
        try:
            pdu = request.result()
        except ConnectionException:
            raise PollError("connection lost") from None
        except ModbusException as exc:
            text = str(exc)
            if "transaction id" in text:
                raise PollError("response with wrong transaction ID") from None
            if "No response" in text:
                raise PollError("timeout") from None
            raise PollError(f"I/O error: {text}") from None
        except (TimeoutError, OSError) as exc:
            raise PollError(f"I/O error: {exc}") from None
        if pdu.isError():
            raise PollError(f"exception response 0x{pdu.exception_code:02x}")
        return pdu

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending:
            self._in_flight = pdu.transaction_id
        elif not self.audits_frames:
            self._audit(pdu.transaction_id)
        return pdu

    def _audit(self, tid: int) -> None:
        """Check one response's transaction ID against the request in flight."""
        if tid == self._in_flight:
            self._in_flight = None
            self._answered.append(tid)
        elif tid in self._answered:
            self.stats.duplicate_responses += 1
        else:
            self.stats.out_of_order_responses += 1

    def _audit_leftover(self) -> None:
        """Audit frames still buffered behind the last response: pymodbus drops them unseen
        when it sends the next request (it clears its receive buffer)."""
        if not self.audits_frames:
            return
        for tid, _function_code in mbap_frames(getattr(self._ctx, "recv_buffer", b"")):
            self._audit(tid)

    def _trace_connect(self, connected: bool) -> None:
        if connected:
            self._in_flight = None
            self._answered.clear()
            return
        self._lost.set()
        if not self._closing:
            self.stats.disconnects += 1
            self._disconnected_at = self.clock()
            self.on_event(f"connection to PLC {_hostport(self.host, self.port)} lost, "
                          f"reconnecting")


async def _connect_error(host: str, port: int, timeout: float) -> str:
    """Why a connection fails (pymodbus only logs it): one plain TCP attempt."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as exc:  # asyncio's message names the address, not the reason
        return os.strerror(exc.errno).lower() if exc.errno else str(exc)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "the Modbus client could not connect (a plain TCP connection could)"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _state(closed: bool) -> str:
    return "closed" if closed else "open"


# ---- the HMI run -------------------------------------------------------------------------


@dataclass(frozen=True)
class HmiOptions:
    host: str
    port: int = 502
    unit: int = 1
    rate: float = 2.0
    count: int | None = None
    duration: float | None = None
    operate: tuple[tuple[int, bool], ...] = ()   # (breaker 1..3, close?)
    quiet: bool = False
    json: bool = False
    timeout: float = 1.0
    wait: float = 0.0
    operate_timeout: float = 2.0
    reconnect: float = 0.5
    debug: bool = False


class _Output:
    def __init__(self, opts: HmiOptions, write: Callable[[str], None]) -> None:
        self.opts = opts
        self.write = write

    def event(self, kind: str, text: str, **data: Any) -> None:
        if self.opts.quiet and kind != "summary":
            return
        if self.opts.json:
            self.write(json.dumps({"event": kind, **data} if data else
                                  {"event": kind, "message": text}))
        else:
            self.write(f"hmi: {text}")


def describe(s: Snapshot) -> str:
    m = s.measurements
    return (f"V {m.voltages[0]:.1f}/{m.voltages[1]:.1f}/{m.voltages[2]:.1f} V, "
            f"I {m.currents[0]:.1f}/{m.currents[1]:.1f}/{m.currents[2]:.1f} A, "
            f"f {m.frequency:.2f} Hz, P {m.power_kw:.1f} kW, T {m.trafo_temp:.1f} degC, "
            f"CB {''.join('1' if b else '0' for b in s.breakers)} "
            f"pos {''.join('1' if b else '0' for b in s.positions)}"
            f"{', OVERCURRENT' if s.overcurrent else ''}")


def _snapshot_dict(s: Snapshot) -> dict[str, Any]:
    m = s.measurements
    return {"voltages": list(m.voltages), "currents": list(m.currents),
            "frequency": m.frequency, "power_kw": m.power_kw, "trafo_temp": m.trafo_temp,
            "heartbeat": m.heartbeat, "breakers": list(s.breakers),
            "positions": list(s.positions), "overcurrent": s.overcurrent}


async def run_hmi(opts: HmiOptions, *, stop: asyncio.Event | None = None,
                  write: Callable[[str], None] | None = None,
                  handle_signals: bool = False) -> PollStats:
    """Poll until --count/--duration is reached or `stop` is set; return the stats.

    Raises PlcUnreachable when the first connection fails (after --wait).
    """
    out = _Output(opts, write or (lambda line: print(line, flush=True)))
    stop = stop or asyncio.Event()
    stats = PollStats()
    poller = Poller(opts.host, opts.port, unit=opts.unit, timeout=opts.timeout,
                    reconnect_s=opts.reconnect, stats=stats,
                    on_event=lambda text: out.event("connection", text))
    with stop_on_signals(stop, enabled=handle_signals):
        try:
            await poller.connect(opts.wait)
            out.event("connection", f"connected to PLC {_hostport(opts.host, opts.port)} unit "
                      f"{opts.unit}, polling {opts.rate:g}/s ({POLL_REQUESTS} requests a poll)")
            await _poll_loop(opts, poller, stats, out, stop)
        finally:
            poller.close()
    out.event("summary", f"summary: {stats.summary_line()}", **stats.as_dict())
    return stats


async def _poll_loop(opts: HmiOptions, poller: Poller, stats: PollStats, out: _Output,
                     stop: asyncio.Event) -> None:
    clock = time.perf_counter
    period = 1.0 / opts.rate
    per_poll = opts.rate <= LINE_PER_POLL_MAX_RATE
    start = next_t = clock()
    end = start + opts.duration if opts.duration is not None else math.inf
    next_progress = start + 1.0
    last_error = ""
    operations = list(opts.operate)
    while not stop.is_set() and (opts.count is None or stats.sent < opts.count) \
            and clock() < end:
        number = stats.sent + 1
        try:
            latency = await poller.poll_once()
            last_error = ""
            if per_poll and poller.last is not None:
                out.event("poll", f"poll {number} ok {_ms(latency)}: {describe(poller.last)}",
                          poll=number, ok=True, latency_ms=round(latency * 1e3, 3),
                          **_snapshot_dict(poller.last))
        except PollError as exc:
            if per_poll or str(exc) != last_error:
                out.event("poll", f"poll {number} FAILED: {exc}", poll=number, ok=False,
                          error=str(exc))
            last_error = str(exc)
        while operations and not stop.is_set():
            breaker, close = operations.pop(0)
            await _operate(opts, poller, out, breaker, close)
        stats.elapsed_s = clock() - start
        now = clock()
        if not per_poll and now >= next_progress:
            next_progress = max(next_progress + 1.0, now)
            last = f"; {describe(poller.last)}" if poller.last else ""
            out.event("progress", f"t {now - start:.0f} s: polls {stats.sent}, ok {stats.ok}, "
                      f"failed {stats.failed}, p50 {_ms(stats.percentile(0.5))}{last}",
                      t=round(now - start, 3), sent=stats.sent, ok=stats.ok,
                      failed=stats.failed)
        next_t += period
        # A poll slower than its slot is made up at once, so the rate holds through
        # the odd slow answer; after a longer stall (slow PLC, reconnect) the missed
        # slots are dropped instead of sent as a burst.
        if next_t < now - CATCH_UP_S:
            next_t = now
        delay = min(next_t, end) - now
        if delay > 0 and (opts.count is None or stats.sent < opts.count):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    stats.elapsed_s = clock() - start


async def _operate(opts: HmiOptions, poller: Poller, out: _Output, breaker: int,
                   close: bool) -> None:
    verb = "close" if close else "open"
    try:
        took = await poller.operate(breaker, close, opts.operate_timeout)
    except PollError as exc:
        out.event("operate", f"CB{breaker} {verb} FAILED: {exc}", breaker=breaker,
                  command=verb, ok=False, error=str(exc))
        return
    out.event("operate", f"CB{breaker} {verb}: position feedback {_state(close)} after "
              f"{took:.2f} s", breaker=breaker, command=verb, ok=True,
              seconds=round(took, 3))


# ---- CLI ---------------------------------------------------------------------------------


def parse_plc(text: str) -> tuple[str, int]:
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT -> (host, port); default port 502."""
    host, port = text, "502"
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"bad address {text!r}: use [IPV6]:PORT")
        host, port = inside, rest[1:] or "502"
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise argparse.ArgumentTypeError(f"no host in {text!r}")
    return host, int_in(1, 65535)(port)


def parse_operation(text: str) -> tuple[int, bool]:
    """BREAKER=open|close, BREAKER being CB1..CB3 or 1..3 -> (breaker, close?)."""
    name, sep, action = text.partition("=")
    number = name.strip().upper().removeprefix("CB")
    action = action.strip().lower()
    if not sep or not number.isdigit() or not 1 <= int(number) <= BREAKERS \
            or action not in ("open", "close"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected BREAKER=open|close with BREAKER CB1..CB{BREAKERS}")
    return int(number), action == "close"


def _rate(text: str) -> float:
    value = seconds(allow_zero=False)(text)
    if value > MAX_RATE:
        raise argparse.ArgumentTypeError(f"at most {MAX_RATE:g} polls/s, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.hmi",
        description="Control-centre HMI: poll the substation PLC (python -m apps.plc) over "
                    f"Modbus/TCP. One poll = {POLL_REQUESTS} requests: input registers 0-9 "
                    "(measurements), coils 0-2 (breaker commands), discrete inputs 0-3 "
                    "(breaker positions, over-current alarm). Counts ok / failed polls, "
                    "duplicate and out-of-order responses, latency (p50/p99).",
        epilog="Without --count or --duration it polls until SIGINT/SIGTERM, then prints the "
               "summary. Exit codes: 0 all polls and operations ok, 1 some failed, "
               "2 bad usage, 3 PLC unreachable at start.",
    )
    parser.add_argument("--plc", required=True, type=parse_plc, metavar="HOST[:PORT]",
                        help="The PLC's address (port 502 unless given; IPv6 as [ADDR]:PORT).")
    parser.add_argument("--unit", type=int_in(0, 255), default=1,
                        help="Modbus unit ID of the PLC (default: %(default)s).")
    parser.add_argument("--rate", type=_rate, default=2.0, metavar="POLLS_PER_S",
                        help="Polls per second (default: %(default)s; a line per poll up to "
                             f"{LINE_PER_POLL_MAX_RATE:g}/s, a line per second above).")
    parser.add_argument("--count", type=int_in(1, 2**31), default=None, metavar="N",
                        help="Stop after N polls.")
    parser.add_argument("--duration", type=seconds(allow_zero=False), default=None,
                        metavar="SECONDS", help="Stop after this long.")
    parser.add_argument("--operate", type=parse_operation, action="append", default=[],
                        metavar="BREAKER=open|close",
                        help="After the first poll, open or close a breaker (CB1..CB3) and "
                             "check its position feedback follows. Repeatable.")
    parser.add_argument("--quiet", action="store_true", help="Print only the final summary.")
    parser.add_argument("--json", action="store_true",
                        help="Print JSON lines (one object per event; the summary last).")
    parser.add_argument("--timeout", type=seconds(allow_zero=False), default=1.0,
                        metavar="SECONDS",
                        help="Connect and per-request timeout (default: %(default)s).")
    parser.add_argument("--wait", type=seconds(allow_zero=True), default=0.0, metavar="SECONDS",
                        help="Keep trying to reach the PLC at start for this long before "
                             "exiting with 3 (default: %(default)s, one attempt).")
    parser.add_argument("--operate-timeout", type=seconds(allow_zero=False), default=2.0,
                        metavar="SECONDS",
                        help="How long a breaker's feedback may take (default: %(default)s).")
    parser.add_argument("--reconnect", type=seconds(allow_zero=False), default=0.5,
                        metavar="SECONDS",
                        help="Least time between reconnect attempts (default: %(default)s).")
    parser.add_argument("--debug", action="store_true", help="Show pymodbus debug logs.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> HmiOptions:
    ns = build_parser().parse_args(argv)
    host, port = ns.plc
    return HmiOptions(host=host, port=port, unit=ns.unit, rate=ns.rate, count=ns.count,
                      duration=ns.duration, operate=tuple(ns.operate), quiet=ns.quiet,
                      json=ns.json, timeout=ns.timeout, wait=ns.wait,
                      operate_timeout=ns.operate_timeout, reconnect=ns.reconnect,
                      debug=ns.debug)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    quiet_pymodbus_logging(opts.debug)
    try:
        stats = asyncio.run(run_hmi(opts, handle_signals=True))
    except PlcUnreachable as exc:
        print(f"hmi: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:  # before the signal handlers were installed
        print("hmi: interrupted", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK if stats.all_ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
