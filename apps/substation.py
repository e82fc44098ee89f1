"""The simulated substation: its process model and its Modbus register map (apps.plc serves it).

A secondary substation (230/400 V bus, three outgoing feeders with circuit
breakers) whose values drift smoothly with small noise; `Substation.step(now)`
advances it (the PLC does so every --tick seconds, default 0.1 s). An open
breaker makes its feeder's current 0; the breaker's position feedback (discrete
input) follows a coil command after an operating time of 50 ms. Every register
is an unsigned 16-bit integer; scaled values are value / scale.

Register map (addresses are 0-based protocol addresses; `REGISTER_MAP` holds
the same table for code, the PLC serves it and the HMI decodes with it):

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
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

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
