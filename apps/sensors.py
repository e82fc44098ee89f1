"""Simulated IoT sensor fleet for the ledger gateway (trial use case 35: 10 devices, one
measurement per device per minute; the defaults reproduce it).

    python -m apps.sensors --broker 127.0.0.1:1883                 # 10 devices, 1/min each
    python -m apps.sensors --broker mqtt:1883 --devices 1000 --rate 1 --duration 60
    python -m apps.sensors --rest http://gw:8080 --devices 10 --interval 5 --count 100

Devices are sensor-0001, sensor-0002, ...; each publishes JSON readings
(gateways/ledger/reading.py) to `{prefix}/{device}/reading` with QoS 1, `seq`
counting up from 1 (or from where --state left off, so a restarted fleet does not
replay sequence numbers), `ts_ms` from the clock, and temperature_c / humidity_pct /
pm25 values that drift plausibly. Publishes are spread evenly over time: with N
devices at R readings per second each, one reading leaves every 1/(N*R) s, the
devices taking turns. Refusals the gateway publishes back on
`{prefix}/{device}/refused` (or answers over REST) are counted by reason.

With --rest the readings go to POST {URL}/v1/readings instead; readings that fall due
at the same moment go in one request (a batch).

--state is rewritten every --progress seconds with each device's seq *ahead* of the
truth by twice what it may send until the next rewrite, and exactly at a clean exit:
a killed fleet resumes past every seq it used. --first splits a large fleet over
processes (one Python process publishes a few thousand readings per second at most).
Publishing waits while MAX_UNACKED readings await the broker's PUBACK.

Exit codes: 0 done (refusals are reported, not failures), 1 cannot reach the broker
or gateway, or readings were not acknowledged, 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import requests
from paho.mqtt.enums import CallbackAPIVersion

from gateways.config import hostport
from gateways.ledger.ingest import DEFAULT_PREFIX, MAX_BATCH, device_name
from gateways.ledger.reading import Value

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

TRIAL_RATE = 1 / 60          # one measurement per device per minute
FLUSH_TIMEOUT_S = 10.0       # give up waiting for acknowledgements after this long without one
MAX_UNACKED = 5000           # readings in flight at most: beyond, publishing waits (backpressure)
REFUSAL_LINGER_S = 0.5       # refusals come from the gateway, after the broker's PUBACK
REST_BATCH = 100             # readings per request at most when several fall due together


class FleetError(Exception):
    """The fleet cannot publish (broker or gateway unreachable); the message says why."""


# ---- plausible values --------------------------------------------------------------------


class Drift:
    """One device's environment: mean-reverting random walks (Ornstein-Uhlenbeck) around a
    per-device indoor climate, humidity falling as temperature rises, fine dust with spikes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.temp_mean = rng.uniform(18.0, 24.0)
        self.hum_mean = rng.uniform(35.0, 55.0)
        self.temp = self.temp_mean + rng.gauss(0, 0.5)
        self.hum = self.hum_mean + rng.gauss(0, 2.0)
        self.log_pm = math.log(rng.uniform(4.0, 12.0))
        self.log_pm_mean = self.log_pm

    def _ou(self, x: float, mean: float, theta: float, sigma: float, dt: float) -> float:
        return x + theta * (mean - x) * dt + sigma * math.sqrt(dt) * self.rng.gauss(0, 1)

    def step(self, dt_s: float) -> dict[str, Value]:
        dt = min(max(dt_s, 0.0), 3600.0)
        self.temp = self._ou(self.temp, self.temp_mean, 1 / 1800, 0.02, dt)
        hum_mean = self.hum_mean - 2.0 * (self.temp - self.temp_mean)
        self.hum = min(100.0, max(0.0, self._ou(self.hum, hum_mean, 1 / 900, 0.1, dt)))
        self.log_pm = self._ou(self.log_pm, self.log_pm_mean, 1 / 600, 0.03, dt)
        if self.rng.random() < 0.0002 * dt:  # a window opened onto the street, now and then
            self.log_pm += self.rng.uniform(0.5, 1.5)
        return {"temperature_c": round(self.temp, 2), "humidity_pct": round(self.hum, 1),
                "pm25": round(math.exp(self.log_pm), 1)}


# ---- sequence numbers --------------------------------------------------------------------


def load_state(path: Path | None) -> dict[str, int]:
    """Last seq used per device, from a state file written by an earlier run."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data["last_seq"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FleetError(f"cannot read the state file {path}: {exc}") from None


def save_state(path: Path, last_seq: dict[str, int]) -> None:
    """Atomically: a crash mid-write must not reset the fleet's sequence numbers."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"last_seq": last_seq}, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---- counters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    sent: int
    acked: int                 # taken by the broker (PUBACK) or answered by the gateway (REST)
    refused: dict[str, int]    # refusals the gateway sent back, by reason
    failed: int                # publish errors, REST errors other than a refusal
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def line(self) -> str:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items())) or "none"
        return (f"sent {self.sent} readings from {self.devices} devices in "
                f"{self.elapsed_s:.1f} s ({self.rate:.1f}/s), acknowledged {self.acked}, "
                f"refused {self.refused_total} ({refused}), failed {self.failed}")


@dataclass
class _Counts:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    settled: threading.Condition = field(default_factory=threading.Condition)

    def add(self, *, sent: int = 0, acked: int = 0, failed: int = 0,
            refused: str | None = None) -> None:
        with self.settled:
            self.sent += sent
            self.acked += acked
            self.failed += failed
            if refused is not None:
                self.refused[refused] = self.refused.get(refused, 0) + 1
            self.settled.notify_all()

    def unsettled(self) -> int:
        """Sent but neither acknowledged nor failed yet (call holding `settled`)."""
        return self.sent - self.acked - self.failed


# ---- transports --------------------------------------------------------------------------


class _Mqtt:
    """`connections` MQTT clients the devices share round robin; the first also listens for
    refusals of the fleet's devices."""

    def __init__(self, host: str, port: int, prefix: str, connections: int, qos: int,
                 counts: _Counts, names: frozenset[str]) -> None:
        self.host, self.port, self.prefix, self.qos = host, port, prefix, qos
        self.counts = counts
        self.names = names
        self.subscribed = threading.Event()
        tag = f"qkdgw-sensors-{os.getpid()}-{random.getrandbits(24):06x}"
        self.clients = [mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{tag}-{i}",
                                    protocol=mqtt.MQTTv311) for i in range(connections)]
        for client in self.clients:
            client.max_inflight_messages_set(1000)  # loopback benches: don't stall on acks
            client.on_publish = self._on_publish
        self.clients[0].on_connect = self._on_connect
        self.clients[0].on_subscribe = lambda *_: self.subscribed.set()
        self.clients[0].on_message = self._on_refused

    def start(self) -> None:
        for client in self.clients:
            try:
                client.connect(self.host, self.port, keepalive=30)
            except OSError as exc:
                self.stop()
                raise FleetError(f"cannot connect to the MQTT broker {self.host}:{self.port}: "
                                 f"{exc}") from None
            client.loop_start()
        if not self.subscribed.wait(5.0):
            self.stop()
            raise FleetError(f"MQTT broker {self.host}:{self.port} did not confirm the "
                             "subscription to refusals")

    def stop(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()

    def send(self, index: int, device: str, payload: bytes) -> None:
        client = self.clients[index % len(self.clients)]
        info = client.publish(f"{self.prefix}/{device}/reading", payload, qos=self.qos)
        self.counts.add(sent=1, failed=int(info.rc != mqtt.MQTT_ERR_SUCCESS
                                            and info.rc != mqtt.MQTT_ERR_NO_CONN))

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any,
                    properties: object) -> None:
        if not reason.is_failure:
            client.subscribe(f"{self.prefix}/+/refused", qos=1)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: Any,
                    properties: object) -> None:
        self.counts.add(acked=1)

    def _on_refused(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        device = message.topic[len(self.prefix) + 1:-len("/refused")]
        if device not in self.names:
            return
        try:
            reason = str(json.loads(message.payload)["reason"])
        except (ValueError, KeyError, TypeError):
            reason = "unreadable"
        self.counts.add(refused=reason)


class _Rest:
    """POST {url}/v1/readings over one keep-alive session."""

    def __init__(self, url: str, counts: _Counts, timeout_s: float = 10.0) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/v1/readings") else f"{url}/v1/readings"
        self.counts = counts
        self.timeout_s = timeout_s
        self.session = requests.Session()

    def start(self) -> None:
        health = self.url.removesuffix("/readings") + "/health"
        try:
            self.session.get(health, timeout=self.timeout_s).raise_for_status()
        except requests.RequestException as exc:
            self.session.close()
            raise FleetError(f"gateway REST ingest {health} does not answer: {exc}") from None

    def stop(self) -> None:
        self.session.close()

    def send_batch(self, payloads: list[bytes]) -> None:
        body = payloads[0] if len(payloads) == 1 else b"[" + b",".join(payloads) + b"]"
        self.counts.add(sent=len(payloads))
        try:
            resp = self.session.post(self.url, data=body, timeout=self.timeout_s,
                                     headers={"Content-Type": "application/json"})
            answer = resp.json()
        except (requests.RequestException, ValueError):
            answer = None
        if not isinstance(answer, dict):
            self.counts.add(failed=len(payloads))
            return
        refusals = answer.get("refused") or []
        if not refusals and resp.status_code != 202 and "reason" in answer:
            refusals = [answer]
        for refusal in refusals:
            self.counts.add(refused=str(refusal.get("reason")))
        failed = len(answer.get("failed") or [])
        if resp.status_code >= 500 and not failed:  # the gateway could not take them
            failed = len(payloads) - len(refusals)
        self.counts.add(acked=len(payloads) - failed, failed=failed)


# ---- the fleet ---------------------------------------------------------------------------


class Fleet:
    """`devices` simulated sensors publishing to an MQTT broker (`broker=(host, port)`) or a
    REST ingest (`rest=URL`).

        with Fleet(devices=10, broker=("127.0.0.1", 1883)) as fleet:
            fleet.burst(1000)                 # as fast as possible, devices taking turns
            fleet.run(rate=1.0, duration=5)   # 1 reading per device per second, for 5 s
            fleet.flush()                     # wait for the acknowledgements
    """

    def __init__(self, *, devices: int = 10, first: int = 1,
                 broker: tuple[str, int] | None = None, rest: str | None = None,
                 prefix: str = DEFAULT_PREFIX, qos: int = 1,
                 connections: int = 1, state: Path | None = None, seed: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if (broker is None) == (rest is None):
            raise ValueError("give exactly one of broker and rest")
        self.names = [device_name(i) for i in range(first, first + devices)]
        self.state = state
        self.clock = clock
        self.last_seq = {name: 0 for name in self.names}
        self.last_seq.update({k: v for k, v in load_state(state).items() if k in self.last_seq})
        rng = random.Random(seed)  # noqa: S311 (simulated sensor noise, not a secret)
        self._drift = [Drift(rng) for _ in self.names]
        self._last_ts = [clock()] * devices
        self._turn = 0
        self._halt = threading.Event()
        self.counts = _Counts()
        self._started = time.monotonic()
        self._mqtt = (_Mqtt(broker[0], broker[1], prefix, connections, qos, self.counts,
                            frozenset(self.names)) if broker is not None else None)
        self._rest = _Rest(rest, self.counts) if rest is not None else None

    def start(self) -> Fleet:
        if self._mqtt is not None:
            self._mqtt.start()
        elif self._rest is not None:
            self._rest.start()
        self._started = time.monotonic()
        return self

    def stop(self, flush_timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait for outstanding acknowledgements (paho would drop what it still queues),
        keep the sequence numbers, disconnect."""
        self.save()
        if self._mqtt is not None:
            self.flush(flush_timeout)
            self._mqtt.stop()
        if self._rest is not None:
            self._rest.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def save(self, ahead: int = 0) -> None:
        """Keep each device's last seq in the state file (if any), `ahead` beyond the truth:
        a fleet killed before its next save then resumes past every seq it used (a gap in
        seqs is harmless; a repeated seq would be refused as a replay)."""
        if self.state is not None:
            save_state(self.state, {d: seq + ahead for d, seq in self.last_seq.items()})

    # readings
    def next_reading(self) -> tuple[int, str, bytes]:
        """The next device's next reading: (device index, device, JSON bytes)."""
        index = self._turn % len(self.names)
        self._turn += 1
        device = self.names[index]
        now = self.clock()
        values = self._drift[index].step(now - self._last_ts[index])
        self._last_ts[index] = now
        seq = self.last_seq[device] = self.last_seq[device] + 1
        payload = json.dumps({"device": device, "seq": seq, "ts_ms": int(now * 1000),
                              "values": values}, separators=(",", ":")).encode()
        return index, device, payload

    def publish(self, count: int) -> None:
        """Send the next `count` readings now."""
        if self._mqtt is not None:
            for _ in range(count):
                self._wait_window()
                self._mqtt.send(*self.next_reading())
            return
        assert self._rest is not None
        while count > 0:
            batch = [self.next_reading()[2] for _ in range(min(count, REST_BATCH, MAX_BATCH))]
            self._rest.send_batch(batch)
            count -= len(batch)

    def _wait_window(self) -> None:
        """Backpressure: paho queues without limit, so a fleet publishing faster than the
        broker takes readings would only pile them up in memory."""
        counts = self.counts
        with counts.settled:
            while counts.unsettled() >= MAX_UNACKED and not self._halt.is_set():
                counts.settled.wait(0.5)

    def burst(self, count: int) -> FleetSummary:
        """`count` readings as fast as possible (not waiting for acknowledgements)."""
        self.publish(count)
        return self.summary()

    def run(self, *, rate: float | None, count: int | None = None,
            duration: float | None = None, stop: threading.Event | None = None,
            progress: Callable[[FleetSummary], None] | None = None,
            progress_every: float = 10.0) -> FleetSummary:
        """Publish at `rate` readings per device per second (None: as fast as possible) until
        `count` readings, `duration` seconds, or `stop` is set, whichever comes first."""
        stop = self._halt = stop or threading.Event()
        total_rate = rate * len(self.names) if rate else None
        t0 = time.monotonic()
        end = t0 + duration if duration is not None else math.inf
        # the k-th reading (k from 0) leaves at t0 + k / total_rate, if that is before `end`
        last = (math.ceil(duration * total_rate) if duration is not None and total_rate
                else math.inf)
        done = 0
        next_progress = t0 + progress_every
        lease = self._lease(rate, progress_every, 0)
        self.save(lease)
        while not stop.is_set() and (count is None or done < count):
            now = time.monotonic()
            if total_rate is None:
                due = 1000 if now < end else 0
            else:
                due = int(min(math.floor((now - t0) * total_rate) + 1, last)) - done
            if count is not None:
                due = min(due, count - done)
            if due > 0:
                self.publish(due)
                done += due
            if now >= end:
                break
            if now >= next_progress:
                lease = self._lease(rate, progress_every, done)
                self.save(lease)
                if progress is not None:
                    progress(self.summary())
                next_progress = now + progress_every
            if total_rate is not None and due <= 0:
                wake = min(t0 + done / total_rate, next_progress, end)
                stop.wait(max(0.0, wake - time.monotonic()))
        return self.summary()

    def _lease(self, rate: float | None, interval: float, done: int) -> int:
        """Readings one device may send before the next save, twice over."""
        if rate:
            per_device = math.ceil(rate * interval)
        else:  # as fast as possible: twice what went so far, at least 1000
            per_device = max(1000, math.ceil(done / len(self.names)))
        return 2 * per_device + 1

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every reading sent is acknowledged or failed; False if `timeout`
        seconds pass without any progress."""
        counts = self.counts
        with counts.settled:
            while counts.unsettled() > 0:
                settled = counts.acked + counts.failed
                if not counts.settled.wait_for(
                        lambda: counts.acked + counts.failed > settled, timeout):  # noqa: B023
                    return False
        return True

    def summary(self) -> FleetSummary:
        c = self.counts
        with c.settled:
            return FleetSummary(len(self.names), c.sent, c.acked, dict(c.refused), c.failed,
                                time.monotonic() - self._started)


# ---- the command line --------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _rate(text: str) -> float | None:
    return None if text == "max" else _positive_float(text)


def _broker(text: str) -> tuple[str, int]:
    try:
        return hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.sensors",
        description="Simulate a fleet of IoT sensors (sensor-0001, ...) publishing readings "
                    "to the ledger gateway over MQTT (default) or REST.",
        epilog="Exit codes: 0 done, 1 broker/gateway unreachable or readings unacknowledged, "
               "2 bad usage.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--broker", type=_broker, default=None, metavar="HOST:PORT",
                       help="MQTT broker (default: 127.0.0.1:1883).")
    where.add_argument("--rest", metavar="URL",
                       help="Post to the gateway's REST ingest instead, e.g. http://gw:8080.")
    parser.add_argument("--devices", type=_positive_int, default=10, metavar="N",
                        help="Number of devices (default: %(default)s, as the trial).")
    parser.add_argument("--first", type=_positive_int, default=1, metavar="K",
                        help="Number of the first device, to split a large fleet over "
                             "processes: --devices 5000 --first 5001 runs sensor-5001.. "
                             "(default: %(default)s).")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=_rate, default=TRIAL_RATE, metavar="R",
                      help="Readings per device per second, or 'max' for as fast as possible "
                           "(default: 1/60, the trial's one per minute).")
    pace.add_argument("--interval", type=_positive_float, default=None, metavar="SECONDS",
                      help="Seconds between one device's readings (the inverse of --rate).")
    parser.add_argument("--duration", type=_positive_float, default=None, metavar="SECONDS",
                        help="Stop after this long (default: until --count or Ctrl-C).")
    parser.add_argument("--count", type=_positive_int, default=None, metavar="N",
                        help="Stop after N readings in all (the devices take turns).")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="TOPIC",
                        help="MQTT topic prefix: publishes to PREFIX/DEVICE/reading "
                             "(default: %(default)s).")
    parser.add_argument("--connections", type=_positive_int, default=1, metavar="K",
                        help="MQTT connections the devices share (default: %(default)s).")
    parser.add_argument("--state", type=Path, default=None, metavar="FILE",
                        help="Resume each device's seq from this file and keep it there, so a "
                             "restarted fleet does not replay sequence numbers.")
    parser.add_argument("--seed", type=int, default=None,
                        help="Seed for the simulated values (default: random).")
    parser.add_argument("--progress", type=_positive_float, default=10.0, metavar="SECONDS",
                        help="Print progress this often (default: %(default)s).")
    return parser


@dataclass(frozen=True)
class Options:
    broker: tuple[str, int] | None
    rest: str | None
    devices: int
    first: int
    rate: float | None
    duration: float | None
    count: int | None
    prefix: str
    connections: int
    state: Path | None
    seed: int | None
    progress: float


def parse_args(argv: Sequence[str] | None = None) -> Options:
    ns = build_parser().parse_args(argv)
    rate: float | None = 1 / ns.interval if ns.interval is not None else ns.rate
    broker = ns.broker if ns.broker or ns.rest else ("127.0.0.1", 1883)
    return Options(broker, ns.rest, ns.devices, ns.first, rate, ns.duration, ns.count, ns.prefix,
                   ns.connections, ns.state, ns.seed, ns.progress)


def say(text: str, *, err: bool = False) -> None:
    print(f"sensors: {text}", file=sys.stderr if err else sys.stdout, flush=True)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT end the run cleanly (the summary is still printed); only where
    signals can be handled (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    target = opts.rest or (f"mqtt://{opts.broker[0]}:{opts.broker[1]}" if opts.broker else "")
    pace = "as fast as possible" if opts.rate is None else (
        f"{opts.rate:g}/s per device (every {1 / opts.rate:g} s)")
    stop = threading.Event()
    try:
        fleet = Fleet(devices=opts.devices, first=opts.first, broker=opts.broker, rest=opts.rest,
                      prefix=opts.prefix, connections=opts.connections, state=opts.state,
                      seed=opts.seed).start()
    except FleetError as exc:
        say(f"error: {exc}", err=True)
        return EXIT_FAILED
    say(f"{opts.devices} devices ({fleet.names[0]}..{fleet.names[-1]}) -> {target}, {pace}")
    try:
        with _stop_on_signals(stop):
            sending = fleet.run(rate=opts.rate, count=opts.count, duration=opts.duration,
                                stop=stop, progress=lambda s: say(s.line()),
                                progress_every=opts.progress)
            settled = fleet.flush()
            time.sleep(REFUSAL_LINGER_S if opts.broker else 0)
    finally:
        fleet.stop()
    summary = dataclasses.replace(fleet.summary(), elapsed_s=sending.elapsed_s)
    say(f"done: {summary.line()}")
    if not settled:
        say(f"error: {summary.sent - summary.acked - summary.failed} readings were not "
            f"acknowledged (none for {FLUSH_TIMEOUT_S:g} s)", err=True)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
