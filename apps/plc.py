"""Simulated substation PLC: a Modbus/TCP server (the PLC end of trial use cases 02 and 16).

It serves the simulated substation of `apps.substation` (process model and
register map; the map's table is in that module's docstring), stepping the model
every --tick seconds (default 0.1 s).

    python -m apps.plc --host 0.0.0.0 --port 502 --unit 1 --name SUBSTATION-1

Reads or writes outside the map's addresses get exception 0x02 (illegal address),
a setpoint outside its range exception 0x03 (illegal value), a request for
another unit ID exception 0x04 (pymodbus 3.16's behaviour).

Counting (to prove "no failed, no duplicated poll" through a tunnel): per client
connection the PLC counts requests, writes and exception responses, and
remembers the Modbus/TCP transaction IDs of the last `DUP_WINDOW` requests; a
request whose transaction ID is among them is a duplicate (the PLC still
answers it, as a real PLC would). Requests are counted per received frame:
pymodbus 3.16 answers only the first of several requests that arrive in one TCP
segment and drops the rest; those are counted too (`dropped`, and checked for
duplicates), so a glued-on replay does not go unseen. Counters are printed every
--status-every seconds, in a summary line on SIGTERM/SIGINT (exit 0), and are
available in process as `Plc.counters()` and `Plc.connections`.

Exit codes: 0 stopped by SIGTERM/SIGINT, 1 cannot listen, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import math
import random
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from apps._signals import stop_on_signals
from apps.substation import (
    BREAKERS,
    CO_BREAKER,
    DI_BREAKER_POS,
    DI_COUNT,
    HR_COUNT,
    HR_V_SETPOINT,
    IR_COUNT,
    IR_V,
    Substation,
)

EXIT_OK = 0
EXIT_CANNOT_LISTEN = 1
EXIT_USAGE = 2

WRITE_FUNCTION_CODES = frozenset({5, 6, 15, 16, 22, 23})
DUP_WINDOW = 32768  # transaction IDs remembered per connection; below any client's TID wrap

# ---- counters ----------------------------------------------------------------------------


@dataclass
class ClientConnection:
    """What the PLC served on one client connection."""

    number: int
    peer: str = "?"
    open: bool = True
    requests: int = 0
    duplicates: int = 0
    writes: int = 0
    exceptions: int = 0
    dropped: int = 0
    window: int = DUP_WINDOW
    per_frame: bool = False
    _recent: deque[int] = field(default_factory=deque, repr=False)
    _seen: set[int] = field(default_factory=set, repr=False)

    def record(self, tid: int, function_code: int) -> bool:
        """Count one request; True if its transaction ID was seen recently on this connection."""
        self.requests += 1
        if function_code in WRITE_FUNCTION_CODES:
            self.writes += 1
        if tid in self._seen:
            self.duplicates += 1
            return True
        self._seen.add(tid)
        self._recent.append(tid)
        if len(self._recent) > self.window:
            self._seen.discard(self._recent.popleft())
        return False


class AuditingFramer(FramerSocket):
    """The Modbus/TCP framer, reporting (transaction ID, function code) of every complete
    frame it consumes, including the ones pymodbus then skips without a trace_pdu call
    (a client skips responses whose transaction ID is not the request's)."""

    def __init__(self, decoder: DecodePDU, on_frame: Callable[[int, int], object]) -> None:
        super().__init__(decoder)
        self._on_frame = on_frame

    def decode(self, data: bytes) -> tuple[int, int, int, bytes]:
        length, dev_id, tid, frame = super().decode(data)
        if length and frame:
            self._on_frame(tid, frame[0])
        return length, dev_id, tid, frame


def mbap_frames(buffered: bytes) -> list[tuple[int, int]]:
    """(transaction ID, function code) of the complete Modbus/TCP frames in a byte buffer."""
    frames = []
    while len(buffered) >= 8:
        tid, _pid, length = struct.unpack(">HHH", buffered[:6])
        if len(buffered) < 6 + length or length < 2:
            break
        frames.append((tid, buffered[7]))
        buffered = buffered[6 + length:]
    return frames


@dataclass(frozen=True)
class PlcCounters:
    """A snapshot of what the PLC has served since it started (all connections)."""

    connections: int
    open_connections: int
    requests: int
    duplicates: int
    writes: int
    exceptions: int
    dropped: int


# ---- the server --------------------------------------------------------------------------


class PlcError(Exception):
    """The PLC cannot run (e.g. cannot listen); the message says why."""


def quiet_pymodbus_logging(debug: bool = False) -> None:
    """pymodbus logs through `logging`; the apps report errors themselves."""
    logger = logging.getLogger("pymodbus")
    if debug:
        logger.setLevel(logging.DEBUG)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
    else:
        logger.setLevel(logging.CRITICAL)


class _TrackingServer(ModbusTcpServer):
    """ModbusTcpServer whose per-connection handlers report to the Plc."""

    def __init__(self, plc: Plc, device: SimDevice, address: tuple[str, int]) -> None:
        super().__init__(device, address=address)
        self._plc = plc

    def callback_new_connection(self) -> Any:
        handler = super().callback_new_connection()
        conn = self._plc._new_connection()
        # pymodbus' trace hooks carry no connection identity; bind it here (pymodbus 3.16's
        # handler keeps them as attributes trace_pdu / trace_connect, and its framer as
        # .framer). Requests are counted per frame, so a request pymodbus never hands on
        # (see Plc._trace_pdu) is still counted and checked for duplicates.
        if isinstance(getattr(handler, "framer", None), FramerSocket):
            handler.framer = AuditingFramer(handler.framer.decoder, conn.record)
            conn.per_frame = True
        handler.trace_pdu = functools.partial(self._plc._trace_pdu, conn, handler)
        handler.trace_connect = functools.partial(self._plc._trace_connect, conn, handler)
        return handler


class Plc:
    """The substation PLC: Modbus/TCP server + process model + counters.

    `async with Plc(port=0) as plc:` listens (port 0 picks a free port, see `plc.port`).
    """

    def __init__(self, *, host: str = "0.0.0.0", port: int = 502, unit: int = 1,
                 name: str = "SUBSTATION-1", seed: int | None = None, tick_s: float = 0.1,
                 operate_s: float = 0.05, dup_window: int = DUP_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.port = port
        self.unit = unit
        self.name = name
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.tick_s = tick_s
        self.dup_window = dup_window
        self.clock = clock
        self.model = Substation(clock(), self.seed, operate_s)
        self.connections: list[ClientConnection] = []
        self.started_at = clock()
        self._server: _TrackingServer | None = None
        self._ticker: asyncio.Task[None] | None = None

    # lifecycle
    async def start(self) -> None:
        device = SimDevice(
            id=self.unit,
            simdata=(
                [SimData(CO_BREAKER, values=list(self.model.command), datatype=DataType.BITS)],
                [SimData(DI_BREAKER_POS, values=self.model.discrete_inputs(),
                         datatype=DataType.BITS)],
                [SimData(HR_V_SETPOINT, values=self.model.holding_registers(),
                         datatype=DataType.REGISTERS)],
                [SimData(IR_V, values=self.model.measurements.to_registers(),
                         datatype=DataType.REGISTERS, readonly=True)],
            ),
            action=self._action,
        )
        server = _TrackingServer(self, device, (self.host, self.port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError:
            await server.shutdown()
            raise PlcError(f"cannot listen on {self.host}:{self.port}: "
                           f"{_bind_error(self.host, self.port)}") from None
        self._server = server
        listener = server.transport
        with contextlib.suppress(AttributeError, IndexError):
            self.port = listener.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.started_at = self.clock()
        self._ticker = asyncio.create_task(self._tick_loop(), name=f"plc {self.name} ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()
            await asyncio.sleep(0)  # let the handlers see their connections close
        for conn in self.connections:
            conn.open = False

    async def __aenter__(self) -> Plc:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _tick_loop(self) -> None:
        next_t = self.clock()
        while True:
            next_t += self.tick_s
            await asyncio.sleep(max(0.0, next_t - self.clock()))
            self.model.step(self.clock())

    # counters
    def counters(self) -> PlcCounters:
        conns = self.connections
        return PlcCounters(len(conns), sum(c.open for c in conns),
                           sum(c.requests for c in conns), sum(c.duplicates for c in conns),
                           sum(c.writes for c in conns), sum(c.exceptions for c in conns),
                           sum(c.dropped for c in conns))

    def status_line(self) -> str:
        c = self.counters()
        breakers = "/".join("1" if p else "0" for p in self.model.position)
        return (f"up {self.clock() - self.started_at:.0f} s, clients {c.open_connections} "
                f"(connections {c.connections}), requests {c.requests}, "
                f"duplicates {c.duplicates}, writes {c.writes}, exceptions {c.exceptions}, "
                f"dropped {c.dropped}, "
                f"CB={breakers}")

    def _new_connection(self) -> ClientConnection:
        conn = ClientConnection(len(self.connections) + 1, window=self.dup_window)
        self.connections.append(conn)
        return conn

    def _trace_connect(self, conn: ClientConnection, handler: Any, connected: bool) -> None:
        if connected:
            with contextlib.suppress(AttributeError, TypeError, IndexError):
                host, port = handler.transport.get_extra_info("peername")[:2]
                conn.peer = f"{host}:{port}"
        else:
            conn.open = False

    def _trace_pdu(self, conn: ClientConnection, handler: Any, sending: bool,
                   pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            if not conn.per_frame:
                conn.record(pdu.transaction_id, pdu.function_code)
            return pdu
        if isinstance(pdu, ExceptionResponse):
            conn.exceptions += 1
        if conn.per_frame:
            # pymodbus 3.16 handles one request per received chunk and clears its receive
            # buffer when it answers: requests that arrived in the same TCP segment behind
            # the one being answered are dropped unanswered. Count and check them here.
            for tid, function_code in mbap_frames(getattr(handler, "recv_buffer", b"")):
                conn.record(tid, function_code)
                conn.dropped += 1
        return pdu

    # the datastore hook: registers are refreshed from the model on every access
    async def _action(self, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], set_values: list[int] | list[bool] | None,
                      ) -> ExcCodes | None:
        model = self.model
        if function_code in (1, 5, 15):
            if address + count > CO_BREAKER + BREAKERS or address < CO_BREAKER:
                return ExcCodes.ILLEGAL_ADDRESS
            if set_values is not None:
                now = self.clock()
                for offset, value in enumerate(set_values):
                    model.command_breaker(address - CO_BREAKER + offset, bool(value), now)
            _store_bits(registers, model.command)
        elif function_code == 2:
            if address + count > DI_COUNT:
                return ExcCodes.ILLEGAL_ADDRESS
            _store_bits(registers, model.discrete_inputs())
        elif function_code == 4:
            if address + count > IR_COUNT:
                return ExcCodes.ILLEGAL_ADDRESS
            registers[:IR_COUNT] = model.measurements.to_registers()
        else:  # holding registers: 3, 6, 16, 22, 23
            if address + count > HR_COUNT:
                return ExcCodes.ILLEGAL_ADDRESS
            if set_values is not None:
                values = [int(v) for v in set_values]
                if not all(model.write_holding(address + i, v) for i, v in enumerate(values)):
                    return ExcCodes.ILLEGAL_VALUE
            registers[:HR_COUNT] = model.holding_registers()
        return None


def _store_bits(registers: list[int], bits: Sequence[bool]) -> None:
    """Pack bits (bit 0 first) into the simulator's first 16-bit register (address 0..15)."""
    word = 0
    for i, bit in enumerate(bits):
        if bit:
            word |= 1 << i
    registers[0] = word


def _bind_error(host: str, port: int) -> str:
    """Why the listener failed (pymodbus only logs it): try the same bind ourselves."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return "pymodbus could not start the listener"


# ---- CLI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlcOptions:
    host: str = "0.0.0.0"
    port: int = 502
    unit: int = 1
    name: str = "SUBSTATION-1"
    seed: int | None = None
    status_every: float = 5.0
    tick: float = 0.1
    debug: bool = False


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, not {value}")
        return value
    return parse


def seconds(*, allow_zero: bool) -> Callable[[str], float]:
    """argparse type: a finite number of seconds, > 0 (or >= 0)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be {'>= 0' if allow_zero else '> 0'}, not {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.plc",
        description="Simulated substation PLC: a Modbus/TCP server with 3 feeders, breakers "
                    "(coils 0-2, position feedback on discrete inputs 0-2), bus voltages, "
                    "currents, frequency and power (input registers 0-9) and setpoints "
                    "(holding registers 0-1). The register map is in apps.substation's "
                    "docstring (python -c 'import apps.substation; help(apps.substation)').",
        epilog="Counts requests, writes and duplicated transaction IDs per connection; "
               "prints them every --status-every seconds and on SIGTERM/SIGINT. "
               "Exit codes: 0 stopped by a signal, 1 cannot listen, 2 bad usage.",
    )
    parser.add_argument("--host", default="0.0.0.0",
                        help="Address to listen on (default: %(default)s).")
    parser.add_argument("--port", type=int_in(0, 65535), default=502,
                        help="TCP port; 0 picks a free one (default: %(default)s).")
    parser.add_argument("--unit", type=int_in(1, 247), default=1,
                        help="Modbus unit (device) ID answered (default: %(default)s).")
    parser.add_argument("--name", default="SUBSTATION-1",
                        help="Name shown in status lines (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="Seed for the process noise (default: random, printed).")
    parser.add_argument("--status-every", type=seconds(allow_zero=True),
                        default=5.0, metavar="SECONDS",
                        help="Print a status line this often; 0 = never (default: %(default)s).")
    parser.add_argument("--tick", type=seconds(allow_zero=False),
                        default=0.1, metavar="SECONDS",
                        help="Process model update period (default: %(default)s).")
    parser.add_argument("--debug", action="store_true", help="Show pymodbus debug logs.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> PlcOptions:
    ns = build_parser().parse_args(argv)
    return PlcOptions(ns.host, ns.port, ns.unit, ns.name, ns.seed, ns.status_every, ns.tick,
                      ns.debug)


async def run_plc(opts: PlcOptions, *, stop: asyncio.Event | None = None,
                  write: Callable[[str], None] | None = None,
                  handle_signals: bool = False) -> PlcCounters:
    """Serve until `stop` is set (or SIGTERM/SIGINT with handle_signals); return the counters.

    Raises PlcError when it cannot listen.
    """
    say = write or _say
    stop = stop or asyncio.Event()
    with stop_on_signals(stop, enabled=handle_signals):
        plc = Plc(host=opts.host, port=opts.port, unit=opts.unit, name=opts.name,
                  seed=opts.seed, tick_s=opts.tick)
        try:
            await plc.start()
            say(f"{plc.name}: listening on {opts.host}:{plc.port}, unit {plc.unit}, "
                f"seed {plc.seed}")
            while not stop.is_set():
                timeout = opts.status_every or None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout)
                if not stop.is_set():
                    say(f"{plc.name}: {plc.status_line()}")
            await plc.stop()
            say(f"{plc.name}: stopped: {plc.status_line()}")
            return plc.counters()
        finally:
            await plc.stop()


def _say(text: str) -> None:
    print(f"plc {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    quiet_pymodbus_logging(opts.debug)
    try:
        asyncio.run(run_plc(opts, handle_signals=True))
    except PlcError as exc:
        print(f"plc: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_LISTEN
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
