"""Simulated substation PLC: a Modbus/TCP server (the PLC end of trial use cases 02 and 16).

A secondary substation (230/400 V bus, three outgoing feeders with circuit
breakers) whose values drift smoothly with small noise, updated every
--tick seconds (default 0.1 s). An open breaker makes its feeder's current 0;
the breaker's position feedback (discrete input) follows a coil command after
an operating time of 50 ms. Every register is an unsigned 16-bit integer;
scaled values are value / scale.

    python -m apps.plc --host 0.0.0.0 --port 502 --unit 1 --name SUBSTATION-1

Register map (addresses are 0-based protocol addresses; `REGISTER_MAP` holds
the same table for code, and the HMI decodes with it):

| Table            | Addr | Name        | Scale | Unit  | Access | Meaning                        |
|------------------|------|-------------|-------|-------|--------|--------------------------------|
| input register   | 0    | V_L1        | 10    | V     | R      | bus voltage L1-N               |
| input register   | 1    | V_L2        | 10    | V     | R      | bus voltage L2-N               |
| input register   | 2    | V_L3        | 10    | V     | R      | bus voltage L3-N               |
| input register   | 3    | I_F1        | 10    | A     | R      | feeder 1 current (0 when open) |
| input register   | 4    | I_F2        | 10    | A     | R      | feeder 2 current (0 when open) |
| input register   | 5    | I_F3        | 10    | A     | R      | feeder 3 current (0 when open) |
| input register   | 6    | FREQ        | 100   | Hz    | R      | bus frequency                  |
| input register   | 7    | P_TOTAL     | 10    | kW    | R      | total active power (3 feeders) |
| input register   | 8    | T_TRAFO     | 10    | degC  | R      | transformer oil temperature    |
| input register   | 9    | HEARTBEAT   | 1     | tick  | R      | +1 every tick, wraps at 65536  |
| holding register | 0    | V_SETPOINT  | 10    | V     | R/W    | tap changer setpoint 210..250  |
| holding register | 1    | I_LIMIT     | 10    | A     | R/W    | over-current alarm 0..600      |
| coil             | 0    | CB1         | 1     | state | R/W    | breaker 1 command, 1 = closed  |
| coil             | 1    | CB2         | 1     | state | R/W    | breaker 2 command, 1 = closed  |
| coil             | 2    | CB3         | 1     | state | R/W    | breaker 3 command, 1 = closed  |
| discrete input   | 0    | CB1_POS     | 1     | state | R      | breaker 1 position, 1 = closed |
| discrete input   | 1    | CB2_POS     | 1     | state | R      | breaker 2 position, 1 = closed |
| discrete input   | 2    | CB3_POS     | 1     | state | R      | breaker 3 position, 1 = closed |
| discrete input   | 3    | OVERCURRENT | 1     | state | R      | a feeder is above I_LIMIT      |

Reads or writes outside these addresses get exception 0x02 (illegal address),
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
import signal
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

EXIT_OK = 0
EXIT_CANNOT_LISTEN = 1
EXIT_USAGE = 2

# ---- register map: the one source of truth (the HMI imports these) ----------------------

IR_V = 0             # V_L1..V_L3 at 0..2, 0.1 V
IR_I = 3             # I_F1..I_F3 at 3..5, 0.1 A
IR_FREQ = 6          # 0.01 Hz
IR_P_TOTAL = 7       # 0.1 kW
IR_T_TRAFO = 8       # 0.1 degC
IR_HEARTBEAT = 9
IR_COUNT = 10
HR_V_SETPOINT = 0    # 0.1 V
HR_I_LIMIT = 1       # 0.1 A
HR_COUNT = 2
CO_BREAKER = 0       # CB1..CB3 at 0..2, 1 = closed
DI_BREAKER_POS = 0   # CB1_POS..CB3_POS at 0..2, 1 = closed
DI_OVERCURRENT = 3
DI_COUNT = 4
BREAKERS = 3

SCALE_V = 10
SCALE_I = 10
SCALE_FREQ = 100
SCALE_P = 10
SCALE_T = 10

V_SETPOINT_RANGE = (2100, 2500)  # raw, 0.1 V
I_LIMIT_RANGE = (0, 6000)        # raw, 0.1 A

INPUT_REGISTER = "input register"
HOLDING_REGISTER = "holding register"
COIL = "coil"
DISCRETE_INPUT = "discrete input"


@dataclass(frozen=True)
class Point:
    """One row of the register map."""

    table: str
    address: int
    name: str
    scale: int
    unit: str
    writable: bool = False


REGISTER_MAP: tuple[Point, ...] = (
    Point(INPUT_REGISTER, IR_V + 0, "V_L1", SCALE_V, "V"),
    Point(INPUT_REGISTER, IR_V + 1, "V_L2", SCALE_V, "V"),
    Point(INPUT_REGISTER, IR_V + 2, "V_L3", SCALE_V, "V"),
    Point(INPUT_REGISTER, IR_I + 0, "I_F1", SCALE_I, "A"),
    Point(INPUT_REGISTER, IR_I + 1, "I_F2", SCALE_I, "A"),
    Point(INPUT_REGISTER, IR_I + 2, "I_F3", SCALE_I, "A"),
    Point(INPUT_REGISTER, IR_FREQ, "FREQ", SCALE_FREQ, "Hz"),
    Point(INPUT_REGISTER, IR_P_TOTAL, "P_TOTAL", SCALE_P, "kW"),
    Point(INPUT_REGISTER, IR_T_TRAFO, "T_TRAFO", SCALE_T, "degC"),
    Point(INPUT_REGISTER, IR_HEARTBEAT, "HEARTBEAT", 1, "tick"),
    Point(HOLDING_REGISTER, HR_V_SETPOINT, "V_SETPOINT", SCALE_V, "V", writable=True),
    Point(HOLDING_REGISTER, HR_I_LIMIT, "I_LIMIT", SCALE_I, "A", writable=True),
    *(Point(COIL, CO_BREAKER + i, f"CB{i + 1}", 1, "state", writable=True)
      for i in range(BREAKERS)),
    *(Point(DISCRETE_INPUT, DI_BREAKER_POS + i, f"CB{i + 1}_POS", 1, "state")
      for i in range(BREAKERS)),
    Point(DISCRETE_INPUT, DI_OVERCURRENT, "OVERCURRENT", 1, "state"),
)

WRITE_FUNCTION_CODES = frozenset({5, 6, 15, 16, 22, 23})
DUP_WINDOW = 32768  # transaction IDs remembered per connection; below any client's TID wrap


@dataclass(frozen=True)
class Measurements:
    """The input-register block (IR 0..9), decoded to engineering units."""

    voltages: tuple[float, float, float]
    currents: tuple[float, float, float]
    frequency: float
    power_kw: float
    trafo_temp: float
    heartbeat: int

    @classmethod
    def from_registers(cls, regs: Sequence[int]) -> Measurements:
        if len(regs) < IR_COUNT:
            raise ValueError(f"need {IR_COUNT} input registers, got {len(regs)}")
        v = tuple(regs[IR_V + i] / SCALE_V for i in range(3))
        i_ = tuple(regs[IR_I + i] / SCALE_I for i in range(3))
        return cls((v[0], v[1], v[2]), (i_[0], i_[1], i_[2]), regs[IR_FREQ] / SCALE_FREQ,
                   regs[IR_P_TOTAL] / SCALE_P, regs[IR_T_TRAFO] / SCALE_T,
                   regs[IR_HEARTBEAT])

    def to_registers(self) -> list[int]:
        regs = [0] * IR_COUNT
        for i in range(3):
            regs[IR_V + i] = _u16(self.voltages[i] * SCALE_V)
            regs[IR_I + i] = _u16(self.currents[i] * SCALE_I)
        regs[IR_FREQ] = _u16(self.frequency * SCALE_FREQ)
        regs[IR_P_TOTAL] = _u16(self.power_kw * SCALE_P)
        regs[IR_T_TRAFO] = _u16(self.trafo_temp * SCALE_T)
        regs[IR_HEARTBEAT] = self.heartbeat & 0xFFFF
        return regs


def _u16(value: float) -> int:
    return max(0, min(0xFFFF, round(value)))


# ---- the process model -------------------------------------------------------------------

FEEDER_BASE_A = (180.0, 120.0, 90.0)
PHASE_OFFSET_V = (0.4, -0.3, 0.1)
LOAD_PERIOD_S = 60.0
POWER_FACTOR = 0.95


class Substation:
    """The simulated process. Time is passed in (`step(now)`), so tests need not sleep."""

    def __init__(self, now: float, seed: int | None = None, operate_s: float = 0.05) -> None:
        self.rng = random.Random(seed)  # noqa: S311 (process noise, not a secret)
        self.operate_s = operate_s
        self.t = 0.0
        self._last = now
        self.v_setpoint = 2300    # raw 0.1 V
        self.i_limit = 2500       # raw 0.1 A
        self.command = [True] * BREAKERS
        self.position = [True] * BREAKERS
        self._commanded_at = [now] * BREAKERS
        self._walk = [0.0] * BREAKERS
        self._phase = [self.rng.uniform(0, 2 * math.pi) for _ in range(BREAKERS)]
        self._v_reg = self.v_setpoint / SCALE_V
        self._freq_dev = 0.0
        self.temp = 40.0
        self.heartbeat = 0
        self.measurements = self._measure()

    def command_breaker(self, index: int, closed: bool, now: float) -> None:
        if self.command[index] != closed:
            self.command[index] = closed
            self._commanded_at[index] = now

    def write_holding(self, address: int, value: int) -> bool:
        """Apply a setpoint write; False when the value is out of range."""
        if address == HR_V_SETPOINT and V_SETPOINT_RANGE[0] <= value <= V_SETPOINT_RANGE[1]:
            self.v_setpoint = value
        elif address == HR_I_LIMIT and I_LIMIT_RANGE[0] <= value <= I_LIMIT_RANGE[1]:
            self.i_limit = value
        else:
            return False
        return True

    def holding_registers(self) -> list[int]:
        return [self.v_setpoint, self.i_limit]

    def discrete_inputs(self) -> list[bool]:
        limit = self.i_limit / SCALE_I
        return [*self.position, any(i > limit for i in self.measurements.currents)]

    def step(self, now: float) -> None:
        dt = min(max(now - self._last, 0.0), 1.0)
        self._last = now
        self.t += dt
        for i in range(BREAKERS):
            if self.position[i] != self.command[i] and \
                    now - self._commanded_at[i] >= self.operate_s:
                self.position[i] = self.command[i]
            # Ornstein-Uhlenbeck load wander around a slow sinusoidal load curve
            self._walk[i] += -self._walk[i] * dt / 20.0 + 3.0 * math.sqrt(dt) * self.rng.gauss()
            self._walk[i] = max(-25.0, min(25.0, self._walk[i]))
        self._v_reg += (self.v_setpoint / SCALE_V - self._v_reg) * min(1.0, dt / 2.0)
        self._freq_dev += -self._freq_dev * dt / 10.0 + 0.01 * math.sqrt(dt) * self.rng.gauss()
        self._freq_dev = max(-0.08, min(0.08, self._freq_dev))
        self.heartbeat = (self.heartbeat + 1) & 0xFFFF
        self.measurements = self._measure()
        total = sum(self.measurements.currents)
        self.temp += (35.0 + 0.05 * total - self.temp) * min(1.0, dt / 60.0)

    def _measure(self) -> Measurements:
        rng = self.rng
        currents = []
        for i in range(BREAKERS):
            load = FEEDER_BASE_A[i] * (1 + 0.15 * math.sin(
                2 * math.pi * self.t / LOAD_PERIOD_S + self._phase[i]))
            amps = max(0.0, load + self._walk[i] + rng.gauss(0, 0.5))
            currents.append(amps if self.position[i] else 0.0)
        drop = 0.01 * sum(currents)
        volts = [self._v_reg - drop + PHASE_OFFSET_V[p] + rng.gauss(0, 0.2) for p in range(3)]
        v_avg = sum(volts) / 3
        power = sum(3 * v_avg * amps * POWER_FACTOR for amps in currents) / 1000
        return Measurements((volts[0], volts[1], volts[2]),
                            (currents[0], currents[1], currents[2]),
                            50.0 + self._freq_dev + rng.gauss(0, 0.002), power,
                            self.temp + rng.gauss(0, 0.05), self.heartbeat)


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
                    "(holding registers 0-1). The register map is in the module docstring "
                    "(python -c 'import apps.plc; help(apps.plc)').",
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
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    plc = Plc(host=opts.host, port=opts.port, unit=opts.unit, name=opts.name, seed=opts.seed,
              tick_s=opts.tick)
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
        for sig in installed:
            loop.remove_signal_handler(sig)


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
