"""apps.sensors, the fleet simulator: its command line against a real Mosquitto, its REST
mode against the gateway's REST ingest, and its readings against the gateway's validator."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from apps import sensors
from gateways.ledger.ingest import DeviceRegistry, parse_reading, rest_app
from gateways.ledger.reading import Reading
from qgw.ports import free_ports
from tests.gateways.ledger.broker import Mosquitto
from tests.harness import Loop


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as b:
        yield b


class Recorder:
    """Subscribes to every reading topic and keeps (device, seq, arrival time)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.got: list[tuple[str, int, float]] = []
        self.topics: set[str] = set()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe("qkdgw/sensors/+/reading", qos=1)
        assert subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        self.topics.add(message.topic)
        self.got.append((body["device"], body["seq"], time.monotonic()))

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def seqs(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        for device, seq, _ in self.got:
            out[device].append(seq)
        return dict(out)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def recorder(broker: Mosquitto) -> Iterator[Recorder]:
    rec = Recorder(broker)
    try:
        yield rec
    finally:
        rec.close()


def test_help_works_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "apps.sensors", "--help"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    for option in ("--broker", "--devices", "--rate", "--interval", "--duration", "--count",
                   "--prefix", "--rest", "--state"):
        assert option in out


def test_defaults_are_the_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = sensors.parse_args([])
    assert (opts.devices, opts.rate, opts.broker) == (10, 1 / 60, ("127.0.0.1", 1883))
    assert sensors.parse_args(["--interval", "5"]).rate == 0.2
    assert sensors.parse_args(["--rate", "max"]).rate is None


@pytest.mark.parametrize("argv", [["--rate", "-1"], ["--broker", "nohost"],
                                  ["--rate", "1", "--interval", "2"], ["--devices", "0"]])
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        sensors.parse_args(argv)
    assert info.value.code == 2


def test_publishes_the_right_count(broker: Mosquitto, recorder: Recorder,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = sensors.main(["--broker", broker.address, "--devices", "3", "--rate", "max",
                         "--count", "30"])
    recorder.wait_for(30)
    assert code == 0
    assert recorder.seqs() == {f"sensor-{i:04d}": list(range(1, 11)) for i in (1, 2, 3)}
    assert recorder.topics == {f"qkdgw/sensors/sensor-{i:04d}/reading" for i in (1, 2, 3)}
    out = capsys.readouterr().out
    assert "sent 30 readings from 3 devices" in out
    assert "acknowledged 30, refused 0" in out


def test_paced_run_spreads_publishes_evenly(broker: Mosquitto, recorder: Recorder) -> None:
    # 4 devices, each every 0.4 s: one reading every 0.1 s, devices taking turns
    assert sensors.main(["--broker", broker.address, "--devices", "4", "--interval", "0.4",
                         "--duration", "0.8", "--prefix", "qkdgw/sensors"]) == 0
    recorder.wait_for(8)
    assert len(recorder.got) == 8
    assert [d for d, _, _ in recorder.got] == [f"sensor-{i:04d}" for i in (1, 2, 3, 4)] * 2
    gaps = [b[2] - a[2] for a, b in zip(recorder.got, recorder.got[1:], strict=False)]
    assert 0.03 < sum(gaps) / len(gaps) < 0.2, gaps


def test_state_file_resumes_sequence_numbers(broker: Mosquitto, recorder: Recorder,
                                             tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    argv = ["--broker", broker.address, "--devices", "2", "--rate", "max", "--count", "4",
            "--state", str(state)]
    assert sensors.main(argv) == 0
    assert sensors.main(argv) == 0
    recorder.wait_for(8)
    assert recorder.seqs() == {"sensor-0001": [1, 2, 3, 4], "sensor-0002": [1, 2, 3, 4]}
    assert json.loads(state.read_text()) == {"last_seq": {"sensor-0001": 4, "sensor-0002": 4}}


def test_unreachable_broker_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_ports(1)[0]
    assert sensors.main(["--broker", f"127.0.0.1:{port}", "--count", "1"]) == 1
    assert "cannot connect to the MQTT broker" in capsys.readouterr().err


def test_rest_mode_posts_to_the_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    got: list[Reading] = []
    app = rest_app(DeviceRegistry(count=3), got.append)
    loop = Loop()
    port = free_ports(1)[0]
    runner = web.AppRunner(app)

    async def serve() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    loop.run(serve())
    try:
        code = sensors.main(["--rest", f"http://127.0.0.1:{port}", "--devices", "4",
                             "--rate", "max", "--count", "8"])
    finally:
        loop.run(runner.cleanup())
        loop.close()
    assert code == 0
    assert sorted((r.device, r.seq) for r in got) == [
        (f"sensor-{i:04d}", s) for i in (1, 2, 3) for s in (1, 2)]
    out = capsys.readouterr().out
    assert "acknowledged 8, refused 2 (unknown_device 2)" in out


def test_simulated_values_are_plausible_and_pass_the_gateway() -> None:
    now = [1_790_000_000.0]
    fleet = sensors.Fleet(devices=5, broker=("127.0.0.1", 1), seed=7, clock=lambda: now[0])
    devices = DeviceRegistry(count=5)
    for _ in range(2000):  # 400 readings per device, one a minute: most of 7 hours
        now[0] += 60 / 5
        _, device, payload = fleet.next_reading()
        reading = parse_reading(payload, devices=devices, topic_device=device,
                                now_ms=int(now[0] * 1000))
        assert 10 < float(reading.values["temperature_c"]) < 32
        assert 0 <= float(reading.values["humidity_pct"]) <= 100
        assert 0 < float(reading.values["pm25"]) < 500
    assert fleet.last_seq == {f"sensor-{i:04d}": 400 for i in range(1, 6)}


def test_state_file_runs_ahead_while_running_so_a_killed_fleet_never_replays(
        broker: Mosquitto, tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    fleet = sensors.Fleet(devices=2, broker=(broker.host, broker.port), state=state).start()
    try:
        fleet.run(rate=1.0, count=2, progress_every=10)
        # what a fleet killed now would resume from: past the 10 s (x2) it may send
        assert json.loads(state.read_text())["last_seq"] == {"sensor-0001": 21,
                                                             "sensor-0002": 21}
    finally:
        fleet.stop()
    assert json.loads(state.read_text())["last_seq"] == {"sensor-0001": 1, "sensor-0002": 1}
