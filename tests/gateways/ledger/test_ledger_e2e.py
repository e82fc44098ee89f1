"""The real path: a sensor fleet -> Mosquitto -> `qgw gateway ledger` writer -> anvil ->
`qgw gateway ledger` reader, keys from two KMEs over ETSI 004 (mutual TLS).

Everything that is a separate program in a deployment is one here: Mosquitto, anvil and
both gateways run as processes; the KMEs run in this process (tests/harness.py), on
real TLS sockets. The writer is SIGKILLed while readings stream in, and anvil is
restarted (with its state) while the writer anchors. At the end every reading the fleet
published is at the reader exactly once, with its values, and the contract holds each
record in one batch only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from apps.sensors import Fleet
from gateways.ledger.batch import decode_batch
from gateways.ledger.chain import Ledger
from gateways.ledger.ingest import DEFAULT_PREFIX
from gateways.ledger.state import Deployment, load_or_create_account
from qgw.netlab import prometheus_samples
from qgw.pki import Pki
from qgw.ports import free_ports
from tests.gateways.ledger.broker import Mosquitto
from tests.gateways.ledger.nodes import AnvilNode
from tests.harness import KmePair

REPO = Path(__file__).resolve().parents[3]
DEVICES = 10


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s: {what}"
        time.sleep(0.05)


class GatewayProcess:
    """`qgw gateway ledger --config FILE` as a process of its own, read through /metrics."""

    def __init__(self, name: str, config: Path, metrics_port: int, log_dir: Path) -> None:
        self.name = name
        self.config = config
        self.metrics_port = metrics_port
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qgw", "gateway", "ledger", "--config", str(self.config),
                 "--status-every", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def metrics(self) -> dict[str, float]:
        """Metric lines as {name{labels}: value}; {} while the process is not serving."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.tail()}")
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        return prometheus_samples(text)

    def metric(self, name: str) -> float:
        return self.metrics().get(name, -1.0)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class Monitor:
    """An MQTT client that sees what the fleet publishes and what the writer refuses."""

    def __init__(self, broker: Mosquitto, devices: set[str]) -> None:
        self.devices = devices
        self.sent: dict[tuple[str, int], dict[str, Any]] = {}
        self.refused: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="e2e-monitor",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(f"{DEFAULT_PREFIX}/+/reading", 1), (f"{DEFAULT_PREFIX}/+/refused", 1)])
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._ready.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        device = message.topic.split("/")[-2]
        with self._lock:
            if message.topic.endswith("/refused"):
                self.refused.append((device, json.loads(message.payload)["reason"]))
                return
            try:
                body = json.loads(message.payload)
            except ValueError:
                return          # the deliberately broken one
            if device in self.devices and set(body) == {"device", "seq", "ts_ms", "values"}:
                self.sent[(body["device"], body["seq"])] = body["values"]

    def publish(self, device: str, payload: bytes) -> None:
        info = self.client.publish(f"{DEFAULT_PREFIX}/{device}/reading", payload, qos=1)
        info.wait_for_publish(5)

    def count(self) -> int:
        with self._lock:
            return len(self.sent)

    def reasons(self) -> Counter[str]:
        with self._lock:
            return Counter(reason for _, reason in self.refused)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.timeout(120)
def test_fleet_to_reader_through_writer_crash_and_ledger_restart(
        tmp_path: Path, pki: Pki, kmes: KmePair) -> None:
    writer_port, reader_port = free_ports(2)
    chain_state = tmp_path / "anvil-state.json"
    with Mosquitto(tmp_path / "mqtt") as broker, AnvilNode(tmp_path) as anvil:
        anvil.start(state_file=chain_state)
        account = load_or_create_account(tmp_path / "writer" / "account.key")
        common = {"pki": str(pki.root), "ledger": {"url": anvil.url, "timeout_s": 2.0,
                                                   "receipt_timeout_s": 10.0}}
        writer_cfg = write_config(tmp_path / "writer.yaml", common | {
            "role": "writer", "sae": "SAE_1", "kme": kmes.url("KME_A"), "peer_sae": "SAE_2",
            "state": "writer", "metrics": {"host": "127.0.0.1", "port": writer_port},
            "ledger": common["ledger"] | {"fund_wei": 10**19},
            "writer": {"mqtt": {"host": broker.host, "port": broker.port},
                       "devices": {"count": DEVICES},
                       "batch": {"max_records": 200, "interval_s": 0.3},
                       "keys": {"records_per_key": 50}}})
        reader_cfg = write_config(tmp_path / "reader.yaml", common | {
            "role": "reader", "sae": "SAE_2", "kme": kmes.url("KME_B"), "peer_sae": "SAE_1",
            "state": "reader", "metrics": {"host": "127.0.0.1", "port": reader_port},
            "ledger": common["ledger"] | {"contract_file": "writer/contract.json"},
            "reader": {"writers": [account.address], "out": "reader/readings.jsonl",
                       "poll_s": 0.2}})
        writer = GatewayProcess("writer", writer_cfg, writer_port, tmp_path)
        reader = GatewayProcess("reader", reader_cfg, reader_port, tmp_path)
        fleet = Fleet(devices=DEVICES, broker=(broker.host, broker.port), seed=7)
        monitor = Monitor(broker, set(fleet.names))
        try:
            writer.start()
            reader.start()
            subscribed = "qgw_ledger_mqtt_subscribed"
            wait_for(lambda: writer.metric(subscribed) == 1, 40, "the writer subscribed")
            fleet.start()
            delivered = "qgw_ledger_readings_delivered_total"

            # 1. steady state: a burst, anchored on anvil and decrypted by the reader
            started = time.monotonic()
            fleet.burst(200)
            assert fleet.flush(10)
            wait_for(lambda: reader.metric(delivered) >= 200, 30, "the first 200 readings")
            burst_s = time.monotonic() - started
            key_wait_ms = writer.metric('qgw_ledger_key_wait_ms{quantile="0.5"}')
            print(f"anvil: 200 readings published -> decrypted at the reader in {burst_s:.2f} s "
                  f"({200 / burst_s:.0f}/s); writer key wait p50 {key_wait_ms:.3f} ms")
            assert 0 <= key_wait_ms < 10.0       # sealing found its keys ready

            # 2. the writer is SIGKILLed while readings stream in, and started again
            flow = threading.Thread(target=fleet.run, kwargs={"rate": 20, "duration": 2.0})
            flow.start()
            time.sleep(0.7)
            writer.kill()
            writer.start()
            flow.join()
            wait_for(lambda: writer.metric(subscribed) == 1, 40, "the writer back")

            # 3. anvil stops (dumping its state) and starts again while the writer anchors
            flow = threading.Thread(target=fleet.run, kwargs={"rate": 10, "duration": 1.5})
            flow.start()
            time.sleep(0.5)
            anvil.stop()
            time.sleep(0.5)
            anvil.start(state_file=chain_state)
            flow.join()

            # 4. bad input is refused, clearly, and the others go on
            monitor.publish("sensor-0001", b'{"device": "sensor-0001", "seq": ')
            monitor.publish("sensor-0002", json.dumps(
                {"device": "sensor-0002", "seq": 10**6, "ts_ms": int(time.time() * 1000),
                 "values": {"blob": "x" * 60}, "pad": "y" * 5000}).encode())
            monitor.publish("intruder-9", json.dumps(
                {"device": "intruder-9", "seq": 1, "ts_ms": int(time.time() * 1000),
                 "values": {"temperature_c": 1.0}}).encode())
            fleet.burst(50)
            assert fleet.flush(10)
            wait_for(lambda: {"malformed", "oversized", "unknown_device"} <= set(
                monitor.reasons()), 15, f"refusals, got {monitor.reasons()}")

            total = fleet.summary().sent
            assert total == 200 + 400 + 150 + 50
            wait_for(lambda: monitor.count() == total, 10, "the monitor to see every reading")
            wait_for(lambda: reader.metric(delivered) == total, 40,
                     f"all {total} readings at the reader")
            wait_for(lambda: writer.metric("qgw_ledger_batches_pending") == 0
                     and writer.metric("qgw_ledger_records_queued") == 0, 10, "outbox empty")
        finally:
            fleet.stop()
            monitor.close()
            writer_exit = writer.stop()
            reader_exit = reader.stop()
        assert writer_exit == 0 and reader_exit == 0, writer.tail() + reader.tail()
        # the command's last status line: how the run ended
        assert "stopped; [stopped] writer SAE_1 -> SAE_2: received" in writer.tail()
        assert f"stopped; [stopped] reader SAE_2 <- SAE_1: delivered {total} " in reader.tail()

        # Every reading exactly once, with the values the sensor sent.
        lines = [json.loads(x) for x in
                 (tmp_path / "reader" / "readings.jsonl").read_text().splitlines()]
        names = [(x["device"], x["seq"]) for x in lines]
        assert len(names) == len(set(names)) == total
        assert {n: x["values"] for n, x in zip(names, lines, strict=True)} == monitor.sent
        # The refusals named their reasons; the fleet's own readings were never refused
        # but as replays (MQTT redelivers what the killed writer had not acknowledged).
        reasons = monitor.reasons()
        assert reasons["malformed"] == reasons["oversized"] == reasons["unknown_device"] == 1
        assert set(reasons) <= {"malformed", "oversized", "unknown_device", "replayed"}

        # Nothing anchored twice: one event per root, each record in one batch only.
        deployment = Deployment.load(tmp_path / "writer" / "contract.json")
        ledger = Ledger.connect(anvil.url)
        try:
            ledger.use(deployment.address)
            anchored = ledger.batches(deployment.block)
        finally:
            ledger.close()
        assert [b.batch_id for b in anchored] == list(range(1, len(anchored) + 1))
        assert len({b.root for b in anchored}) == len(anchored)
        records = [(r.device, r.seq) for b in anchored for r in decode_batch(b.batch)]
        assert len(records) == len(set(records)) == total
        assert not any(b"temperature_c" in b.batch for b in anchored)   # values never in clear
        assert os.stat(tmp_path / "writer" / "account.key").st_mode & 0o077 == 0
