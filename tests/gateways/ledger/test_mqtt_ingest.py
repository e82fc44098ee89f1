"""MqttIngest against a real Mosquitto on loopback, fed by the fleet simulator (apps.sensors)
and by a raw paho client for the messages a fleet would never send."""

from __future__ import annotations

import gc
import json
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from apps.sensors import Fleet
from gateways.ledger.ingest import DeviceRegistry, MqttIngest, Refused
from gateways.ledger.reading import Reading
from qgw.pki import Pki
from qgw.ports import free_ports
from tests.gateways.ledger.broker import Mosquitto

PREFIX = "qkdgw/sensors"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as b:
        yield b


class Sink:
    """What the gateway saw: readings in arrival order, refusals, and a way to wait."""

    def __init__(self, *, replays: bool = False) -> None:
        self.readings: list[Reading] = []
        self.refused: list[tuple[str | None, str]] = []
        self.replays = replays
        self._cond = threading.Condition()

    def on_reading(self, reading: Reading) -> None:
        if self.replays and any((r.device, r.seq) == (reading.device, reading.seq)
                                for r in self.readings):
            raise Refused("replayed", f"seq {reading.seq} already taken", reading.device)
        with self._cond:
            self.readings.append(reading)
            self._cond.notify_all()

    def on_refused(self, device: str | None, exc: Refused) -> None:
        with self._cond:
            self.refused.append((device, exc.reason))
            self._cond.notify_all()

    def wait(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(check, timeout), (
                f"timed out: {len(self.readings)} readings, refused {self.refused}")


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def ingest(broker: Mosquitto, sink: Sink) -> Iterator[MqttIngest]:
    ing = MqttIngest(broker.host, broker.port, devices=DeviceRegistry(count=10),
                     on_reading=sink.on_reading, on_refused=sink.on_refused,
                     client_id=f"test-ingest-{broker.port}", reconnect_delay=(0.1, 1.0))
    ing.start()
    try:
        assert ing.wait_subscribed(5), "ingest did not subscribe"
        yield ing
    finally:
        ing.stop()


class Listener:
    """A raw client: publishes anything, and collects what arrives on `{prefix}/+/refused`."""

    def __init__(self, broker: Mosquitto) -> None:
        self.refusals: list[tuple[str, dict[str, str]]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{PREFIX}/+/refused", qos=1)
        assert subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        self.refusals.append((message.topic, json.loads(message.payload)))

    def publish(self, device: str, payload: bytes) -> None:
        self.client.publish(f"{PREFIX}/{device}/reading", payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listener(broker: Mosquitto) -> Iterator[Listener]:
    lst = Listener(broker)
    try:
        yield lst
    finally:
        lst.close()


def seqs_by_device(readings: list[Reading]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = defaultdict(list)
    for r in readings:
        seen[r.device].append(r.seq)
    return dict(seen)


def valid(device: str, seq: int) -> bytes:
    return json.dumps({"device": device, "seq": seq, "ts_ms": int(time.time() * 1000),
                       "values": {"temperature_c": 20.5}}).encode()


def test_fleet_of_ten_arrives_exactly_once_in_order(broker: Mosquitto, ingest: MqttIngest,
                                                     sink: Sink) -> None:
    with Fleet(devices=10, broker=(broker.host, broker.port), seed=1) as fleet:
        fleet.burst(300)
        assert fleet.flush(10)
    sink.wait(lambda: len(sink.readings) >= 300)
    time.sleep(0.2)  # a duplicate would arrive now
    assert seqs_by_device(sink.readings) == {f"sensor-{i:04d}": list(range(1, 31))
                                             for i in range(1, 11)}
    stats = ingest.stats()
    assert (stats.received, stats.accepted, stats.refused_total, stats.failed) == (300, 300, 0, 0)


def test_bad_messages_are_refused_back_and_the_others_continue(
        broker: Mosquitto, ingest: MqttIngest, sink: Sink, listener: Listener) -> None:
    with Fleet(devices=3, broker=(broker.host, broker.port), seed=2) as fleet:
        fleet.burst(3)
        listener.publish("sensor-0001", b"{not json")
        listener.publish("sensor-0002", b"{" + b" " * 5000 + b"}")
        listener.publish("sensor-0099", valid("sensor-0099", 1))
        listener.publish("sensor-0003", valid("sensor-0002", 1))
        listener.publish("sensor-0003", json.dumps({"device": "sensor-0003"}).encode())
        fleet.burst(3)
        assert fleet.flush(10)
        sink.wait(lambda: len(sink.readings) == 6 and len(sink.refused) == 5)
        deadline = time.monotonic() + 5
        while len(listener.refusals) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        fleet_saw = fleet.summary().refused
    assert seqs_by_device(sink.readings) == {"sensor-0001": [1, 2], "sensor-0002": [1, 2],
                                             "sensor-0003": [1, 2]}
    assert sink.refused == [("sensor-0001", "malformed"), ("sensor-0002", "oversized"),
                            ("sensor-0099", "unknown_device"),
                            ("sensor-0003", "topic_mismatch"), ("sensor-0003", "bad_field")]
    got = [(topic, answer["reason"]) for topic, answer in listener.refusals]
    assert got == [(f"{PREFIX}/sensor-0001/refused", "malformed"),
                   (f"{PREFIX}/sensor-0002/refused", "oversized"),
                   (f"{PREFIX}/sensor-0099/refused", "unknown_device"),
                   (f"{PREFIX}/sensor-0003/refused", "topic_mismatch"),
                   (f"{PREFIX}/sensor-0003/refused", "bad_field")]
    messages = {reason: answer["message"] for (_, answer), (_, reason)
                in zip(listener.refusals, got, strict=True)}
    assert messages["unknown_device"] == "sensor-0099: not a registered device"
    assert messages["oversized"].startswith("sensor-0002: 50")
    assert "missing seq, ts_ms, values" in messages["bad_field"]
    # the fleet's own devices saw their refusals (the 0099 one is not theirs)
    assert fleet_saw == {"malformed": 1, "oversized": 1, "topic_mismatch": 1, "bad_field": 1}
    stats = ingest.stats()
    assert stats.received == 11 and stats.accepted == 6
    assert {k: v for k, v in stats.refused.items() if v} == {
        "malformed": 1, "oversized": 1, "unknown_device": 1, "topic_mismatch": 1,
        "bad_field": 1}


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {check}"
        time.sleep(0.02)


def test_a_sensors_replay_is_refused_and_answered(broker: Mosquitto,
                                                 listener: Listener) -> None:
    sink = Sink(replays=True)
    with MqttIngest(broker.host, broker.port, devices=DeviceRegistry(count=1),
                    on_reading=sink.on_reading, on_refused=sink.on_refused,
                    client_id="test-replays") as ing:
        assert ing.wait_subscribed(5)
        for seq in (1, 2, 1, 3):
            listener.publish("sensor-0001", valid("sensor-0001", seq))
        sink.wait(lambda: len(sink.readings) == 3 and len(sink.refused) == 1)
        stats = ing.stats()
    assert [r.seq for r in sink.readings] == [1, 2, 3]
    assert sink.refused == [("sensor-0001", "replayed")]
    assert (stats.accepted, stats.failed, stats.refused["replayed"], stats.redelivered) == (
        3, 0, 1, 0)
    wait_until(lambda: bool(listener.refusals))
    assert listener.refusals[0][1]["reason"] == "replayed"


def test_a_group_not_stored_is_not_acknowledged_and_comes_again(
        broker: Mosquitto, listener: Listener) -> None:
    """The writer fails once (a full disk, say): nothing of that group is acknowledged, the
    ingest reconnects, the broker delivers the group again (DUP), and every reading is taken
    once. One the failed group had handed on before the failure comes again as a replay:
    a redelivery, acknowledged silently, not refused back to the sensor."""
    sink = Sink(replays=True)
    calls = 0

    def on_reading(reading: Reading) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("ledger writer crashed")
        sink.on_reading(reading)

    with MqttIngest(broker.host, broker.port, devices=DeviceRegistry(count=1),
                    on_reading=on_reading, on_refused=sink.on_refused,
                    client_id="test-store-fails", reconnect_delay=(0.1, 0.5),
                    max_group=2) as ing:
        assert ing.wait_subscribed(5)
        for seq in (1, 2, 3):
            listener.publish("sensor-0001", valid("sensor-0001", seq))
        sink.wait(lambda: len(sink.readings) == 3)
        wait_until(lambda: ing.stats().redelivered == 1)
        stats = ing.stats()
    assert [r.seq for r in sink.readings] == [1, 2, 3]
    assert sink.refused == [] and listener.refusals == []
    # seq 1 and 2 failed as a group (max_group 2), seq 1 already taken by on_reading; both
    # came again: seq 1 as a redelivery, seq 2 accepted, then seq 3
    assert (stats.accepted, stats.failed, stats.redelivered, stats.connects) == (2, 2, 1, 2)
    assert stats.refused_total == 0


def test_max_group_bounds_what_one_call_gets(broker: Mosquitto) -> None:
    groups: list[int] = []
    got = threading.Event()

    def on_readings(readings: list[Reading]) -> list[Refused | None]:
        groups.append(len(readings))
        time.sleep(0.05)            # a slow store: the next readings pile up meanwhile
        if sum(groups) >= 200:
            got.set()
        return [None] * len(readings)

    with MqttIngest(broker.host, broker.port, devices=DeviceRegistry(count=10),
                    on_readings=on_readings, client_id="test-max-group", max_group=7) as ing:
        assert ing.wait_subscribed(5)
        with Fleet(devices=10, broker=(broker.host, broker.port)) as fleet:
            fleet.burst(200)
            assert got.wait(20), groups
    assert sum(groups) == 200 and max(groups) == 7, groups
    assert ing.stats().groups == len(groups)


def test_broker_restart_ingest_reconnects_and_later_readings_arrive(
        broker: Mosquitto, ingest: MqttIngest, sink: Sink) -> None:
    with Fleet(devices=10, broker=(broker.host, broker.port), seed=3) as fleet:
        fleet.burst(20)
        assert fleet.flush(10)
        sink.wait(lambda: len(sink.readings) == 20)
        broker.restart()
        assert ingest.wait_subscribed(10), "ingest did not come back after the restart"
        fleet.burst(20)  # the fleet's paho reconnects on its own and sends its queue
        assert fleet.flush(15)
    sink.wait(lambda: len(sink.readings) >= 40)
    assert seqs_by_device(sink.readings) == {f"sensor-{i:04d}": [1, 2, 3, 4]
                                             for i in range(1, 11)}
    assert ingest.stats().connects == 2


def test_ingest_started_before_the_broker_connects_when_it_comes(tmp_path: Path,
                                                                sink: Sink) -> None:
    broker = Mosquitto(tmp_path / "late")
    with MqttIngest(broker.host, broker.port, devices=DeviceRegistry(count=1),
                    on_reading=sink.on_reading, client_id="test-late",
                    reconnect_delay=(0.1, 0.2)) as ing:
        assert not ing.wait_subscribed(0.3)
        with broker:
            assert ing.wait_subscribed(5)
            with Fleet(devices=1, broker=(broker.host, broker.port)) as fleet:
                fleet.burst(1)
            sink.wait(lambda: len(sink.readings) == 1)


def test_shared_subscription_splits_the_load_without_duplicates(broker: Mosquitto) -> None:
    sink = Sink()
    members = [MqttIngest(broker.host, broker.port, devices=DeviceRegistry(count=10),
                          on_reading=sink.on_reading, client_id=f"test-share-{i}",
                          share_group="ledger") for i in (1, 2)]
    try:
        for member in members:
            member.start()
            assert member.wait_subscribed(5)
        with Fleet(devices=10, broker=(broker.host, broker.port)) as fleet:
            fleet.burst(200)
        sink.wait(lambda: len(sink.readings) >= 200)
        time.sleep(0.2)
        shares = [m.stats().accepted for m in members]
    finally:
        for member in members:
            member.stop()
    assert sorted((r.device, r.seq) for r in sink.readings) == sorted(
        (f"sensor-{i:04d}", s) for i in range(1, 11) for s in range(1, 21))
    assert sum(shares) == 200 and min(shares) > 0, shares


def test_mqtts_with_mutual_tls(tmp_path: Path, pki: Pki, foreign_pki: Pki) -> None:
    """The broker's certificate (a KME's: it names localhost and 127.0.0.1) is verified,
    and the gateway shows its SAE certificate; the fleet uses the plain listener."""
    tls_port = free_ports(1)[0]
    server = pki.kme_files("KME_A")
    broker = Mosquitto(tmp_path / "tls", extra_config=(
        f"listener {tls_port} 127.0.0.1", f"cafile {pki.ca_cert}", f"certfile {server.cert}",
        f"keyfile {server.key}", "require_certificate true", "tls_version tlsv1.2"))
    sink = Sink()
    with broker, MqttIngest("localhost", tls_port, devices=DeviceRegistry(count=2),
                            on_reading=sink.on_reading, client_id="test-tls",
                            tls=pki.sae_files("SAE_1")) as ing:
        assert ing.wait_subscribed(5), broker.log_text()
        with Fleet(devices=2, broker=(broker.host, broker.port)) as fleet:
            fleet.burst(4)
        sink.wait(lambda: len(sink.readings) == 4)
        # a gateway whose CA does not know the broker (nor the broker its certificate).
        # paho 2.2 leaves the socket of a failed handshake to the garbage collector, which
        # closes it with a ResourceWarning: expected here, so not an error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            with MqttIngest("localhost", tls_port, devices=DeviceRegistry(count=2),
                            on_reading=sink.on_reading, client_id="test-tls-foreign",
                            tls=foreign_pki.sae_files("SAE_1")) as stranger:
                assert not stranger.wait_subscribed(0.5)
            gc.collect()


def test_topic_prefix_must_be_a_plain_topic() -> None:
    for bad in ("", "a/#", "a/+/b", "a/"):
        with pytest.raises(Exception, match="topic_prefix"):
            MqttIngest("127.0.0.1", 1, devices=DeviceRegistry(count=1),
                       on_reading=lambda r: None, topic_prefix=bad)
    with pytest.raises(Exception, match="share_group"):
        MqttIngest("127.0.0.1", 1, devices=DeviceRegistry(count=1), on_reading=lambda r: None,
                   share_group="a/b")
    with pytest.raises(Exception, match="max_group"):
        MqttIngest("127.0.0.1", 1, devices=DeviceRegistry(count=1), on_reading=lambda r: None,
                   max_group=0)
    with pytest.raises(TypeError, match="on_reading"):
        MqttIngest("127.0.0.1", 1, devices=DeviceRegistry(count=1))
