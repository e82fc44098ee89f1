"""Ingest: sensor readings in over MQTT or REST, strictly validated, handed on in groups.

    sensor --MQTT {prefix}/{device}/reading--> broker --> MqttIngest --.
    sensor --POST /v1/readings-----------------------> RestIngest -----+--> on_readings(group)

Every message is judged on its own (`parse_reading`): one bad message is refused,
counted by reason and answered (MQTT: JSON {reason, message} on
`{prefix}/{device}/refused`; REST: an HTTP status), and the next one is handled
as if it had never been. Refusal reasons:

    malformed       not UTF-8 JSON, not an object, NaN/Infinity, duplicate keys
    oversized       more than `max_bytes` (MQTT, one REST reading) or a too large batch
    unknown_device  the device is not in the `DeviceRegistry`
    bad_field       a field is missing, extra, of the wrong type or out of range
    topic_mismatch  the device in the MQTT topic is not the device in the payload
    replayed        from `on_readings`: the (device, seq) was taken before
    no_key          from `on_readings`: no QKD key to seal it with; not taken, send it
                    again later (REST 503)

Group commit. The valid readings go to `on_readings` in groups, which stores them
all at once (one transaction, one fsync) and answers per reading: None (taken) or
the Refused (`replayed`, `no_key`). A group is what one MQTT network pass read (up
to `max_group`: at a high rate, what arrived while the last group was being
stored) or one REST request. Only then is each message acknowledged: MQTT PUBACKs
(paho's manual acknowledgement) and the HTTP answer follow the commit, never
precede it. If `on_readings` raises, none of the group was stored: REST answers
503 (send again); MQTT acknowledges none of it and reconnects, and the broker
delivers the group again (QoS 1, persistent session).

MQTT is at least once: a message whose PUBACK never left (lost, or the gateway
died after storing it) comes again, so `on_readings` must recognise (device, seq)
it has taken ("replayed"). A replay of a message the broker marks as sent before
(DUP) is that redelivery: acknowledged and counted as `redelivered`, not refused.
A replay without DUP is the sensor's own: refused and answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any, Literal, get_args

import paho.mqtt.client as mqtt
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import Field, ValidationError

from gateways.config import Strict
from gateways.ledger.reading import Reading, Value
from qgw.errors import ConfigError, QgwError
from qgw.tls import TlsFiles, client_context

log = logging.getLogger("qgw.gateway.ledger")

RefusalReason = Literal["malformed", "oversized", "unknown_device", "bad_field",
                        "topic_mismatch", "replayed", "no_key"]
REASONS: tuple[RefusalReason, ...] = get_args(RefusalReason)

DEFAULT_PREFIX = "qkdgw/sensors"
MAX_READING_BYTES = 4096
MAX_BATCH = 500                    # readings in one REST request
MAX_VALUES = 32
MAX_DEPTH = 8                      # JSON nesting: a batch of readings needs 3
MAX_STR_VALUE = 64
MAX_SEQ = 2**63 - 1                # fits the ledger's uint64 and signed 64-bit stores
MAX_INT_VALUE = 2**53              # beyond this a JSON number loses precision in most readers
EARLIEST_TS_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z: a clock before it was never set
MAX_AHEAD_MS = 5 * 60_000          # sensor clocks may run ahead of ours this much, not more

DEVICE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
VALUE_KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
FIELDS = frozenset({"device", "seq", "ts_ms", "values"})


class Refused(QgwError):
    """A reading the gateway will not take; `reason` is one of `REASONS`."""

    def __init__(self, reason: RefusalReason, message: str, device: str | None = None) -> None:
        self.reason = reason
        self.device = device
        self.message = f"{device}: {message}" if device else message
        super().__init__(self.message)

    def to_json(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


# ---- which devices may publish -----------------------------------------------------------


def device_name(index: int) -> str:
    """The fleet's naming: sensor-0001, sensor-0002, ... (wider past 9999)."""
    return f"sensor-{index:04d}"


class DevicesConfig(Strict):
    """The `devices` section of the ledger gateway's config."""

    names: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)  # fnmatch, case-sensitive: "sensor-*"
    count: int = Field(0, ge=0, le=1_000_000)  # sensor-0001 .. sensor-{count}


class DeviceRegistry:
    """The devices allowed to publish: explicit names, fnmatch patterns and/or the first
    `count` fleet names (`device_name`). A name that is not a valid device name never
    matches, whatever the patterns say."""

    def __init__(self, names: Iterable[str] = (), *, patterns: Iterable[str] = (),
                 count: int = 0) -> None:
        self.names = frozenset(names)
        self.patterns = tuple(patterns)
        self.count = count
        bad = sorted(n for n in self.names if not DEVICE_RE.fullmatch(n))
        if bad:
            raise ValueError(f"not valid device names: {', '.join(bad)}")
        self._pattern = (re.compile("|".join(translate(p) for p in self.patterns))
                         if self.patterns else None)

    @classmethod
    def from_config(cls, config: DevicesConfig | Mapping[str, Any], *,
                    source: str = "devices") -> DeviceRegistry:
        """From the config section; ConfigError (naming `source` and the field) if it is
        invalid or lets no device in at all."""
        try:
            cfg = config if isinstance(config, DevicesConfig) else DevicesConfig.model_validate(
                config)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise ConfigError(source, where, first["msg"]) from None
        if not (cfg.names or cfg.patterns or cfg.count):
            raise ConfigError(source, None, "no device may publish: give names, patterns "
                                            "or count")
        try:
            return cls(cfg.names, patterns=cfg.patterns, count=cfg.count)
        except ValueError as exc:
            raise ConfigError(source, "names", str(exc)) from None

    def __contains__(self, device: object) -> bool:
        if not isinstance(device, str) or not DEVICE_RE.fullmatch(device):
            return False
        if device in self.names:
            return True
        if self.count and device.startswith("sensor-") and device[7:].isdigit():
            index = int(device[7:])
            if 1 <= index <= self.count and device == device_name(index):
                return True
        return self._pattern is not None and self._pattern.match(device) is not None

    def __repr__(self) -> str:
        return (f"DeviceRegistry({len(self.names)} names, patterns={list(self.patterns)}, "
                f"count={self.count})")


# ---- validation --------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup[:40]!r}")
    return obj


# One decoder for all: json.loads with hooks would build a new one per message.
_DECODER = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_no_duplicate_keys)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def _too_deep(raw: bytes) -> bool:
    """Nested deeper than MAX_DEPTH, outside strings. The C decoder recurses per level and
    trusts the recursion limit, which py_ecc (under web3/eth-tester) raises to 100,000:
    a body of a few hundred kB of "[" would overflow the C stack and kill the gateway."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:  # the usual case: nothing to scan
        return False
    depth = 0
    for bracket in _BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
        depth += 1 if bracket.group() in (b"[", b"{") else -1
        if depth > MAX_DEPTH:
            return True
    return False


def decode_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys (which parsers resolve
    differently: the ledger must record what the gateway checked), at most MAX_DEPTH
    levels deep."""
    if _too_deep(raw):
        raise Refused("malformed", f"JSON nested more than {MAX_DEPTH} levels deep")
    try:
        return _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused("malformed", "not UTF-8") from None
    except RecursionError:
        raise Refused("malformed", "JSON nested too deep") from None
    except ValueError as exc:  # JSONDecodeError and the hooks' errors
        raise Refused("malformed", f"not valid JSON: {exc}") from None


def _int_field(obj: dict[str, Any], name: str, device: str, low: int, high: int) -> int:
    value = obj[name]
    if type(value) is not int:  # bool is an int subclass, and 1.0 is not a sequence number
        raise Refused("bad_field", f"{name} must be an integer, not {_kind(value)}", device)
    if not low <= value <= high:
        raise Refused("bad_field", f"{name} {value} is out of range [{low}, {high}]", device)
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _values(obj: object, device: str) -> dict[str, Value]:
    if not isinstance(obj, dict):
        raise Refused("bad_field", f"values must be an object, not {_kind(obj)}", device)
    if not 1 <= len(obj) <= MAX_VALUES:
        raise Refused("bad_field", f"values must hold 1 to {MAX_VALUES} entries, "
                                   f"not {len(obj)}", device)
    for key, value in obj.items():
        if not VALUE_KEY_RE.fullmatch(key):
            raise Refused("bad_field", f"values key {key[:40]!r} is not 1-32 of "
                                       "[A-Za-z0-9._-]", device)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if abs(value) > MAX_INT_VALUE:
                raise Refused("bad_field", f"values.{key} is beyond +-2**53", device)
        elif isinstance(value, float):
            if not math.isfinite(value):  # 1e999 parses as inf
                raise Refused("bad_field", f"values.{key} is not finite", device)
        elif isinstance(value, str):
            if len(value) > MAX_STR_VALUE or not value.isprintable():
                raise Refused("bad_field", f"values.{key} must be printable text of at most "
                                           f"{MAX_STR_VALUE} characters", device)
        else:
            raise Refused("bad_field", f"values.{key} must be a number, text or boolean, "
                                       f"not {_kind(value)}", device)
    return obj


def reading_from_json(obj: Any, *, devices: DeviceRegistry, topic_device: str | None = None,
                      now_ms: int | None = None) -> Reading:
    """A `Reading` from decoded JSON, or Refused. The device is checked first, so a device
    that may not publish learns nothing about the other fields' rules."""
    if not isinstance(obj, dict):
        raise Refused("malformed", f"a reading is a JSON object, not {_kind(obj)}")
    device = obj.get("device")
    if not isinstance(device, str) or not DEVICE_RE.fullmatch(device):
        shown = repr(device[:70]) if isinstance(device, str) else _kind(device)
        raise Refused("bad_field", f"device must be 1-64 of [A-Za-z0-9._-], not {shown}")
    if topic_device is not None and topic_device != device:
        raise Refused("topic_mismatch", f"published on the topic of {topic_device[:70]!r}",
                      device)
    if device not in devices:
        raise Refused("unknown_device", "not a registered device", device)
    if obj.keys() != FIELDS:
        missing, extra = sorted(FIELDS - obj.keys()), sorted(obj.keys() - FIELDS)
        what = "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                         + ([f"unexpected {', '.join(repr(k[:40]) for k in extra[:5])}"]
                            if extra else []))
        raise Refused("bad_field", f"a reading holds exactly device, seq, ts_ms, values: {what}",
                      device)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    seq = _int_field(obj, "seq", device, 1, MAX_SEQ)
    ts_ms = _int_field(obj, "ts_ms", device, EARLIEST_TS_MS, now + MAX_AHEAD_MS)
    return Reading(device, seq, ts_ms, _values(obj["values"], device))


def parse_reading(raw: bytes, *, devices: DeviceRegistry, max_bytes: int = MAX_READING_BYTES,
                  topic_device: str | None = None, now_ms: int | None = None) -> Reading:
    """One reading's JSON bytes -> `Reading`, or Refused naming the reason (see module doc).
    `topic_device`: the device named by the MQTT topic, which must be the payload's."""
    if len(raw) > max_bytes:
        raise Refused("oversized", f"{len(raw)} bytes, more than {max_bytes}", topic_device)
    return reading_from_json(decode_json(raw), devices=devices, topic_device=topic_device,
                             now_ms=now_ms)


# ---- counters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestStats:
    received: int = 0      # messages (MQTT: a redelivered one counts again) and REST readings
    accepted: int = 0      # readings taken (stored) by on_readings
    refused: dict[str, int] = field(default_factory=dict)  # by reason; every reason present
    failed: int = 0        # readings in groups on_readings could not store (MQTT: delivered
                           # again; REST: answered 503), or messages the ingest itself failed on
    connects: int = 0      # MQTT connections made: more than 1 means it reconnected
    redelivered: int = 0   # MQTT: taken before, delivered again (DUP): acknowledged silently
    groups: int = 0        # calls of on_readings: readings stored per transaction is
                           # accepted / groups

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def __add__(self, other: IngestStats) -> IngestStats:
        """Two inputs' counters as one (the writer's MQTT and REST ingest)."""
        refused = {r: self.refused.get(r, 0) + other.refused.get(r, 0)
                   for r in {*self.refused, *other.refused}}
        return IngestStats(self.received + other.received, self.accepted + other.accepted,
                           refused, self.failed + other.failed, self.connects + other.connects,
                           self.redelivered + other.redelivered, self.groups + other.groups)


class _Counters:
    """Written by one thread only (paho's network thread, or the event loop), so plain
    increments suffice; a snapshot taken elsewhere may lag by the group in hand."""

    def __init__(self) -> None:
        self.received = self.accepted = self.failed = self.connects = 0
        self.redelivered = self.groups = 0
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)

    def snapshot(self) -> IngestStats:
        return IngestStats(self.received, self.accepted, dict(self.refused), self.failed,
                           self.connects, self.redelivered, self.groups)


# What became of one reading of a group: None taken, else why not.
Outcome = Refused | None
OnReadings = Callable[[list[Reading]], list[Outcome]]
OnReading = Callable[[Reading], None]
OnRefused = Callable[[str | None, Refused], None]


def one_by_one(on_reading: OnReading) -> OnReadings:
    """A callback taking one reading at a time, as `on_readings`: each reading is handed on
    alone; a Refused it raises is that reading's outcome. Anything else it raises fails the
    group, the readings handed on before included: they come again (MQTT), so `on_reading`
    must recognise them (raise Refused("replayed"))."""

    def on_readings(readings: list[Reading]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for reading in readings:
            try:
                on_reading(reading)
            except Refused as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    return on_readings


def _callback(on_reading: OnReading | None, on_readings: OnReadings | None) -> OnReadings:
    if on_readings is not None:
        if on_reading is not None:
            raise TypeError("give on_reading or on_readings, not both")
        return on_readings
    if on_reading is None:
        raise TypeError("give on_reading or on_readings")
    return one_by_one(on_reading)


def _call(on_readings: OnReadings, readings: list[Reading]) -> list[Outcome] | None:
    """Hand a group on: its outcomes, or None if `on_readings` raised (nothing of the group
    is stored; logged: a gateway fault, not the sensors')."""
    try:
        outcomes = on_readings(readings)
        if len(outcomes) != len(readings):
            raise RuntimeError(f"on_readings answered {len(outcomes)} outcomes for "
                               f"{len(readings)} readings")
    except Exception as exc:
        log.error("could not store %d readings (%s: %s); they are not acknowledged",
                  len(readings), type(exc).__name__, exc)
        log.debug("on_readings failed", exc_info=True)
        return None
    return outcomes


def _count(counters: _Counters, readings: list[Reading],
           outcomes: list[Outcome] | None) -> list[Outcome] | None:
    counters.groups += 1
    if outcomes is None:
        counters.failed += len(readings)
    else:
        counters.accepted += outcomes.count(None)
    return outcomes


def _report(refused: Refused, device: str | None, on_refused: OnRefused | None,
            counters: _Counters) -> None:
    counters.refused[refused.reason] += 1
    log.debug("refused (%s): %s", refused.reason, refused.message)
    if on_refused is not None:
        try:
            on_refused(device, refused)
        except Exception:
            log.exception("on_refused failed")


# ---- MQTT --------------------------------------------------------------------------------

MAX_GROUP = 1000       # readings stored in one transaction at most
SETTLE_TIMEOUT_S = 2.0  # stopping: how long to wait for the broker to confirm the PUBACKs


@dataclass(slots=True)
class _Message:
    """A message read in this network pass, waiting for its group to be stored."""

    mid: int
    qos: int
    dup: bool                    # the broker sent it before (a redelivery)
    device: str | None           # from the topic, where a refusal is published
    judged: Reading | Refused | None   # None: the ingest failed on it (counted already)


class MqttIngest:
    """Subscribes to `{prefix}/+/reading` (QoS 1) and hands the valid readings to
    `on_readings` in groups, on its own network thread (`start()`/`stop()`).

    Acknowledgement is manual (paho `manual_ack`): the thread reads what the socket holds
    (one network pass, at most `max_group` readings), hands those readings to
    `on_readings` in one call, and only when that returns sends their PUBACKs (in the
    order they came) and publishes the refusals. If `on_readings` raises, nothing of the
    pass is acknowledged: the thread disconnects and connects again (backing off), and the
    broker delivers those messages again. At a low rate a group is one reading, stored at
    once; at a high rate it is what arrived while the previous group was being stored, so
    one fsync serves many readings. The broker bounds a group with the messages it sends
    unacknowledged (Mosquitto's `max_inflight_messages`, 20 unless set: for a high rate,
    raise it, e.g. to 1000).

    `on_reading` instead of `on_readings` takes one reading at a time (`one_by_one`).

    The session is persistent (clean_session false, fixed `client_id`): readings published
    while the gateway reconnects are queued by the broker. So two gateways must not share
    a `client_id`. Reconnects on its own if the broker goes away (backing off from
    `reconnect_delay[0]` to `[1]` seconds); re-subscribes each time.

    `share_group` subscribes as a member of an MQTT shared subscription
    (`$share/{group}/...`): the broker hands each reading to one member, so several
    gateway processes (each with its own `client_id`) can split a load beyond one core.
    Replays must then be caught where the members' readings meet (the ledger writer).

    The thread drives paho through its external-loop API (loop_read/loop_write/loop_misc)
    rather than loop_start, which is what lets it end a network pass where the socket
    runs dry and store that pass's readings before anything is acknowledged.
    """

    def __init__(self, host: str, port: int, *, devices: DeviceRegistry,
                 on_readings: OnReadings | None = None, on_reading: OnReading | None = None,
                 on_refused: OnRefused | None = None,
                 topic_prefix: str = DEFAULT_PREFIX, client_id: str = "qkdgw-ledger-ingest",
                 tls: TlsFiles | None = None, max_bytes: int = MAX_READING_BYTES,
                 max_group: int = MAX_GROUP,
                 keepalive: int = 30, reconnect_delay: tuple[float, float] = (0.5, 30.0),
                 share_group: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not topic_prefix or any(c in topic_prefix for c in "+#\0") or topic_prefix.endswith(
                "/"):
            raise ConfigError("MqttIngest", "topic_prefix",
                              f"{topic_prefix!r} must be a topic without wildcards or a "
                              "trailing /")
        if share_group is not None and not DEVICE_RE.fullmatch(share_group):
            raise ConfigError("MqttIngest", "share_group",
                              f"{share_group!r} must be 1-64 of [A-Za-z0-9._-]")
        if max_group < 1:
            raise ConfigError("MqttIngest", "max_group", f"{max_group} must be at least 1")
        self.host, self.port = host, port
        self.devices = devices
        self.on_readings = _callback(on_reading, on_readings)
        self.on_refused = on_refused
        self.prefix = topic_prefix
        self.topic = f"{topic_prefix}/+/reading"
        if share_group is not None:
            self.topic = f"$share/{share_group}/{self.topic}"
        self.max_bytes = max_bytes
        self.max_group = max_group
        self.keepalive = keepalive
        self.reconnect_delay = reconnect_delay
        self.clock = clock
        self._counters = _Counters()
        self._pass: list[_Message] = []    # read in this network pass, not acknowledged yet
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None  # stop() wakes the thread's select()
        self._wake_w: socket.socket | None = None
        self._delay = reconnect_delay[0]
        self._store_failures = 0           # groups not stored in a row: backs reconnects off
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=False, protocol=mqtt.MQTTv311,
                                   manual_ack=True)
        if tls is not None:
            self._client.tls_set_context(client_context(tls))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # lifecycle
    def start(self) -> None:
        """Connect in the background (retrying until the broker answers) and subscribe."""
        if self._thread is not None:
            raise RuntimeError("MqttIngest already started")
        self._stopping.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"mqtt-ingest {self.host}:{self.port}")
        self._thread.start()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once connected and subscribed (again, after a reconnect)."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        """Disconnect (the network thread sends DISCONNECT) and join the thread. A group
        being stored is stored and acknowledged first."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        assert self._wake_w is not None and self._wake_r is not None
        self._wake_w.send(b"x")
        thread.join(timeout=10)
        self._wake_w.close()
        self._wake_r.close()
        self._subscribed.clear()

    def __enter__(self) -> MqttIngest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> IngestStats:
        return self._counters.snapshot()

    # the network thread: all paho calls happen here (paho is not thread-safe this way)
    def _run(self) -> None:
        client = self._client
        while not self._stopping.is_set():
            try:
                client.connect(self.host, self.port, keepalive=self.keepalive)
                self._serve(client)
            except OSError as exc:  # includes TLS errors
                # str(exc): a record holding the exception would keep its traceback, and
                # with it the socket of a failed TLS handshake that paho does not close
                log.warning("cannot reach MQTT broker %s:%d (%s); retrying in %.1f s",
                            self.host, self.port, str(exc), self._delay)
            except Exception:  # the thread must survive whatever happens, and say so
                log.exception("MQTT ingest network loop failed; reconnecting")
            self._pass.clear()   # not acknowledged: the broker delivers them again
            if not self._stopping.is_set():
                self._backoff()
        if client.socket() is not None:
            self._settle(client)
            client.disconnect()
            client.loop_write()

    def _settle(self, client: mqtt.Client) -> None:
        """Before a clean disconnect, make sure the broker has processed every PUBACK sent.
        paho closes the socket the moment DISCONNECT is written; with anything unread in
        our receive buffer the close is a reset, and a busy broker then drops what it had
        not read yet: acknowledged readings would come again. The broker answers packets
        in order, so its UNSUBACK (of a filter nobody uses) means the PUBACKs are in.
        Readings read meanwhile are not acknowledged: they come again."""
        settled = threading.Event()
        client.on_unsubscribe = lambda *_: settled.set()
        client.unsubscribe(f"{self.prefix}/+/settled")
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not settled.is_set() and (sock := client.socket()) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("the MQTT broker did not confirm the acknowledgements in %g s: "
                            "the last readings may come again", SETTLE_TIMEOUT_S)
                break
            readable, _, _ = select.select([sock], [sock] if client.want_write() else [], [],
                                           0 if _buffered(sock) else left)
            rc = client.loop_read() if readable or _buffered(sock) else mqtt.MQTT_ERR_SUCCESS
            if rc == mqtt.MQTT_ERR_SUCCESS and client.want_write():
                rc = client.loop_write()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                break
        self._pass.clear()

    def _serve(self, client: mqtt.Client) -> None:
        """Until the connection drops, a group cannot be stored, or stop() is called."""
        ok = mqtt.MQTT_ERR_SUCCESS
        wake = self._wake_r
        assert wake is not None
        while (sock := client.socket()) is not None:
            readable, _, _ = select.select(
                [sock, wake], [sock] if client.want_write() else [], [],
                0 if _buffered(sock) else 1.0)
            if wake in readable:
                wake.recv(64)
            if self._stopping.is_set():
                return
            rc = ok
            if sock in readable or _buffered(sock):
                rc = self._read_pass(client, sock)
            if self._pass and not self._commit(client):
                client.disconnect()    # whatever happens, nothing of the group is acked
                client.loop_write()
                return
            if rc == ok and client.want_write():
                rc = client.loop_write()
            if rc == ok:
                rc = client.loop_misc()  # keepalive pings; gives up on a silent broker
            if rc != ok:
                return

    def _read_pass(self, client: mqtt.Client, sock: Any) -> mqtt.MQTTErrorCode:
        """Read packets while the socket has more at once, up to `max_group` messages: one
        group. (paho's loop_read handles one packet a call, whatever it is asked for.)"""
        ok = mqtt.MQTT_ERR_SUCCESS
        rc = client.loop_read()
        while rc == ok and len(self._pass) < self.max_group and (
                _buffered(sock) or select.select([sock], [], [], 0)[0]):
            rc = client.loop_read()
        return rc

    def _commit(self, client: mqtt.Client) -> bool:
        """Store the pass's readings (one on_readings call), then acknowledge every message
        of the pass in the order they came and publish the refusals. False: not stored,
        nothing acknowledged."""
        messages, self._pass = self._pass, []
        readings = [m.judged for m in messages if isinstance(m.judged, Reading)]
        outcomes = (_count(self._counters, readings, _call(self.on_readings, readings))
                    if readings else [])
        if outcomes is None:
            self._store_failures += 1
            return False
        self._store_failures = 0
        taken = iter(outcomes)
        with _corked(client.socket()):
            self._answer(client, messages, taken)
        return True

    def _answer(self, client: mqtt.Client, messages: list[_Message],
                taken: Iterator[Outcome]) -> None:
        """PUBACK every message of a stored group, in order; publish the refusals."""
        for m in messages:
            outcome = next(taken) if isinstance(m.judged, Reading) else m.judged
            if m.qos:
                client.ack(m.mid, m.qos)
            if outcome is None:
                continue
            if outcome.reason == "replayed" and m.dup:
                # Stored when the broker first sent it; its PUBACK never got there (the
                # gateway stopped or lost the connection in between). Not the sensor's doing.
                self._counters.redelivered += 1
                continue
            _report(outcome, m.device, self.on_refused, self._counters)
            if m.device is not None:
                client.publish(f"{self.prefix}/{m.device}/refused",
                               json.dumps(outcome.to_json()), qos=0)

    def _backoff(self) -> None:
        delay = self._delay
        if self._store_failures:
            # Connecting works, storing does not (a full disk): the broker would deliver the
            # same messages again at once, so wait as for an absent broker.
            delay = min(self.reconnect_delay[0] * 2 ** self._store_failures,
                        self.reconnect_delay[1])
        self._stopping.wait(delay)
        self._delay = min(self._delay * 2, self.reconnect_delay[1])

    # paho callbacks (network thread); none may raise, or the network thread dies
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: Any, properties: object) -> None:
        if reason.is_failure:
            log.error("MQTT broker %s:%d refused the connection: %s", self.host, self.port,
                      reason)
            return
        self._delay = self.reconnect_delay[0]
        self._counters.connects += 1
        log.info("connected to MQTT broker %s:%d, subscribing to %s", self.host, self.port,
                 self.topic)
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[Any], properties: object) -> None:
        if any(r.is_failure for r in reasons):
            log.error("MQTT broker refused the subscription to %s: %s", self.topic, reasons)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: Any, properties: object) -> None:
        self._subscribed.clear()
        if not self._stopping.is_set() and not self._store_failures:
            log.warning("lost the MQTT broker %s:%d (%s); reconnecting", self.host, self.port,
                        reason)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        """Judge the message now; it is handed on and acknowledged with its group."""
        self._counters.received += 1
        device: str | None = None
        judged: Reading | Refused | None
        try:
            device = self._topic_device(message.topic)
            judged = parse_reading(bytes(message.payload), devices=self.devices,
                                   max_bytes=self.max_bytes, topic_device=device,
                                   now_ms=int(self.clock() * 1000))
        except Refused as exc:
            judged = exc
        except Exception:  # never let one message stop the subscription
            self._counters.failed += 1
            log.exception("could not handle a message on the reading topic")
            judged = None  # acknowledged all the same: it would fail again each time
        self._pass.append(_Message(message.mid, message.qos, bool(message.dup), device,
                                   judged))

    def _topic_device(self, topic: str) -> str | None:
        """The device level of `{prefix}/{device}/reading`; None (and Refused) if it is not
        a device name, so a refusal is never published to a topic the sender made up."""
        device = topic[len(self.prefix) + 1:-len("/reading")]
        if not DEVICE_RE.fullmatch(device):
            raise Refused("bad_field", f"topic {topic[:120]!r} does not name a valid device")
        return device


@contextmanager
def _corked(sock: Any) -> Iterator[None]:
    """Hold back small writes (paho sends each PUBACK on its own) and let them go together:
    on loopback each send runs the peer's TCP stack too, so a group's acknowledgements cost
    more than its reading, one by one. Linux only (elsewhere: no change)."""
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None:
        yield
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except OSError:        # not TCP (a test's socket pair): nothing to hold back
        yield
        return
    try:
        yield
    finally:
        with suppress(OSError):       # the connection may be gone by now
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


def _buffered(sock: Any) -> bool:
    """Whether TLS holds decrypted bytes that select() cannot see."""
    return bool(sock.pending()) if hasattr(sock, "pending") else False


# ---- REST --------------------------------------------------------------------------------

RETRY_LATER = "the gateway could not take the reading now; send it again later"
STATUS = {"malformed": 400, "bad_field": 400, "topic_mismatch": 400, "oversized": 413,
          "unknown_device": 403, "replayed": 409, "no_key": 503}


class RestIngest:
    """POST /v1/readings: one reading (a JSON object) or up to `max_batch` (a JSON array).

    Readings of a batch are judged one by one: the good ones are taken even if others are
    refused (one broken sensor behind a concentrator does not block the rest). The good
    ones of a request go to `on_readings` as one group, in a worker thread (storing blocks;
    the event loop goes on with other requests), and the answer leaves when they are
    stored. It is 202 {"accepted": n, "refused": [{index, reason, message}...],
    "failed": [index...]} if any was taken; else 503 if the gateway could not take them
    (`on_readings` raised: every valid reading is in "failed"; or no QKD key: reason
    `no_key`), send again later; else the status of the first refusal, adding its
    "message" and "reason": 400 malformed or bad field, 403 unknown device, 409 replayed,
    413 oversized. A single reading (a JSON object) gets the same statuses, refusals with
    just {"message", "reason"}.
    """

    def __init__(self, devices: DeviceRegistry, on_reading: OnReading | None = None, *,
                 on_readings: OnReadings | None = None, on_refused: OnRefused | None = None,
                 max_bytes: int = MAX_READING_BYTES, max_batch: int = MAX_BATCH,
                 clock: Callable[[], float] = time.time) -> None:
        self.devices = devices
        self.on_readings = _callback(on_reading, on_readings)
        self.on_refused = on_refused
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.max_body = max_bytes * max_batch
        self.clock = clock
        self._counters = _Counters()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app[REST_INGEST] = self
        app.router.add_post("/v1/readings", self._post)
        app.router.add_get("/v1/health", self._health)
        return app

    def stats(self) -> IngestStats:
        return self._counters.snapshot()

    async def _post(self, request: web.Request) -> web.Response:
        length = request.content_length
        if length is not None and length > self.max_body:
            self._counters.received += 1
            return self._refuse(Refused("oversized", f"body of {length} bytes, more than "
                                                     f"{self.max_body}"))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._counters.received += 1
            return self._refuse(Refused("oversized", f"body more than {self.max_body} bytes"))
        if not body.lstrip().startswith(b"["):
            self._counters.received += 1
            try:
                reading = parse_reading(body, devices=self.devices, max_bytes=self.max_bytes,
                                        now_ms=self._now_ms())
            except Refused as exc:
                return self._refuse(exc)
            outcomes = await self._store([reading])
            if outcomes is None:
                return web.json_response({"message": RETRY_LATER}, status=503)
            if outcomes[0] is not None:
                return self._refuse(outcomes[0], reading.device)
            return web.json_response({"accepted": 1, "refused": [], "failed": []}, status=202)
        return await self._batch(body)

    async def _batch(self, body: bytes) -> web.Response:
        try:
            items = decode_json(body)
        except Refused as exc:
            self._counters.received += 1
            return self._refuse(exc)
        if not items or len(items) > self.max_batch:
            self._counters.received += 1
            reason: RefusalReason = "oversized" if items else "malformed"
            return self._refuse(Refused(reason, f"a batch holds 1 to {self.max_batch} "
                                                f"readings, not {len(items)}"))
        refusals: list[tuple[int, Refused]] = []
        valid: list[tuple[int, Reading]] = []
        now_ms = self._now_ms()
        for index, item in enumerate(items):
            self._counters.received += 1
            try:
                valid.append((index, reading_from_json(item, devices=self.devices,
                                                       now_ms=now_ms)))
            except Refused as exc:
                device = item.get("device") if isinstance(item, dict) else None
                self._report(exc, device if isinstance(device, str) else None)
                refusals.append((index, exc))
        outcomes = await self._store([r for _, r in valid]) if valid else []
        failed = [index for index, _ in valid] if outcomes is None else []
        for (index, reading), outcome in zip(valid, outcomes or [], strict=False):
            if outcome is not None:
                self._report(outcome, reading.device)
                refusals.append((index, outcome))
        refusals.sort(key=lambda pair: pair[0])
        accepted = len(valid) - len(failed) - sum(o is not None for o in outcomes or [])
        answer = {"accepted": accepted,
                  "refused": [{"index": i, **r.to_json()} for i, r in refusals],
                  "failed": failed}
        if accepted:
            return web.json_response(answer, status=202)
        retry = next((r for _, r in refusals if r.reason == "no_key"), None)
        if failed or retry is not None or not refusals:
            reason_of = retry.to_json() if retry is not None else {"message": RETRY_LATER}
            return web.json_response({**reason_of, **answer}, status=503)
        first = refusals[0][1]
        return web.json_response({**first.to_json(), **answer}, status=STATUS[first.reason])

    async def _store(self, readings: list[Reading]) -> list[Outcome] | None:
        """The request's valid readings stored as one group, in a worker thread (counted
        here, in the event loop's); None if they could not be."""
        outcomes = await asyncio.to_thread(_call, self.on_readings, readings)
        return _count(self._counters, readings, outcomes)

    def _report(self, refused: Refused, device: str | None) -> None:
        _report(refused, device, self.on_refused, self._counters)

    def _refuse(self, refused: Refused, device: str | None = None) -> web.Response:
        self._report(refused, device or refused.device)
        return web.json_response(refused.to_json(), status=STATUS[refused.reason])

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _health(self, request: web.Request) -> web.Response:
        st = self.stats()
        return web.json_response({"status": "ok", "received": st.received,
                                  "accepted": st.accepted, "refused": st.refused,
                                  "failed": st.failed})


REST_INGEST = web.AppKey("rest_ingest", RestIngest)


def rest_app(devices: DeviceRegistry, on_reading: OnReading | None = None, *,
             on_readings: OnReadings | None = None, on_refused: OnRefused | None = None,
             max_bytes: int = MAX_READING_BYTES, max_batch: int = MAX_BATCH,
             clock: Callable[[], float] = time.time) -> web.Application:
    """The REST ingest as an aiohttp application; `app[REST_INGEST].stats()` counts."""
    return RestIngest(devices, on_reading, on_readings=on_readings, on_refused=on_refused,
                      max_bytes=max_bytes, max_batch=max_batch, clock=clock).app()
