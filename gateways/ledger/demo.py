"""The ledger step of `qgw demo`: the IoT-to-ledger trial (OPENQKD use case 35), run here.

Nothing but this machine: two KME processes joined by the UC33 link (as the demo's first
step starts them), the embedded py-evm chain (eth-tester), and the writer and reader
gateways in this process. The simulated sensors publish over MQTT to a Mosquitto on
loopback when Mosquitto is installed, else they post to the writer's REST ingest. No
root, no namespaces.

    steady   10 devices, as in the trial, but one reading per device per second
    third    a third party with the ledger, the writer's address and an SAE at the
             reader's KME (SAE_3) reads the same batches: it gets no key, decrypts nothing
    burst    (optional) 1,000 more devices, a reading each, as fast as they go: scale

The writer's key fetches and the reader's fetches by key ID are the "time to get a QKD
key" that the trial measured at 21.75 s. Gateway logs go to logs/ledger.log in the
state folder, not to the console.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from apps.sensors import Fleet, FleetSummary
from gateways.ledger.chain import Ledger
from gateways.ledger.config import LedgerConfig
from gateways.ledger.gateway import LedgerGateway
from gateways.ledger.state import load_or_create_account
from keyclient import Etsi014Client
from kme.network import LocalNetwork, default_network, prepare
from qgw.config import validate
from qgw.errors import QgwError
from qgw.pki import Pki
from qgw.ports import free_ports

MOSQUITTO = "/usr/sbin/mosquitto"
THIRD_PARTY_SAE = "SAE_3"
TRIAL_DEVICES = 10              # D8.7, use case 35
TRIAL_RATE_PER_MIN = 1.0        # D8.7, use case 35: one measurement per device per minute
RECORDS_PER_KEY = 100           # records rooted in one QKD key (the writer's default)
LINK_KEYS = 8                   # stored at the KMEs before the gateways start
CLEAR_MARKER = b"temperature_c"  # a value name every reading carries: never in clear on chain

Transport = Literal["mqtt", "rest"]
Progress = Callable[[str], None]


@dataclass
class LedgerResult:
    transport: str                      # how the sensors reached the writer, for the table
    devices: int
    rate_per_device_s: float
    first_key_s: float = 0.0            # writer start (contract deployed) to a key ready
    steady_sent: int = 0
    burst_devices: int = 0
    burst_sent: int = 0
    burst_s: float = 0.0                # first burst reading sent to the last one decrypted
    sent: int = 0
    refused: int = 0
    sealed: int = 0
    anchored: int = 0
    batches: int = 0
    delivered: int = 0                  # readings the reader decrypted and wrote out
    delivered_as_sent: bool = False     # exactly the (device, seq) the fleet sent
    reader_rejected: int = 0
    keys_used: int = 0
    writer_key_p50_ms: float | None = None
    reader_key_p50_ms: float | None = None
    key_wait_p50_ms: float | None = None
    third_party_records: int = 0
    third_party_refused: int = 0        # rejected for want of a key
    third_party_decrypted: int = 0
    batches_with_clear_values: int = 0

    @property
    def burst_per_s(self) -> float:
        return self.burst_sent / self.burst_s if self.burst_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return (self.sent > 0 and self.refused == 0 and self.anchored == self.sent
                and self.delivered == self.sent and self.delivered_as_sent
                and self.reader_rejected == 0 and self.third_party_records > 0
                and self.third_party_decrypted == 0
                and self.third_party_refused == self.third_party_records
                and self.batches_with_clear_values == 0)


def default_transport() -> Transport:
    return "mqtt" if os.access(MOSQUITTO, os.X_OK) else "rest"


def run_ledger(state: Path, *, devices: int = TRIAL_DEVICES, rate: float = 1.0,
               seconds: float = 5.0, burst: int = 1000, transport: Transport | None = None,
               progress: Progress = lambda s: None) -> LedgerResult:
    """Run the step in `state` (the PKI is kept; KME stores and gateway folders start new).

    `burst` more devices send one reading each, as fast as they go (0: no burst)."""
    transport = transport or default_transport()
    result = LedgerResult(transport="MQTT" if transport == "mqtt" else "REST",
                          devices=devices, rate_per_device_s=rate, burst_devices=burst)
    spec = default_network()
    spec.saes[THIRD_PARTY_SAE] = "KME_B"    # the third party's SAE, at the reader's KME
    shutil.rmtree(state / "store", ignore_errors=True)
    work = state.resolve() / "ledger"
    shutil.rmtree(work, ignore_errors=True)
    eps = prepare(state, spec, base_port=free_ports(2)[0], metrics_base_port=free_ports(2)[0])
    site = _Site(work, Pki(state.resolve() / "pki"), eps["KME_A"].url, eps["KME_B"].url,
                 chain=f"eth-tester:qgw-demo-{uuid.uuid4().hex[:12]}")  # this run's own chain
    with contextlib.ExitStack() as stack:
        stack.enter_context(_logs_to(state / "logs" / "ledger.log"))
        progress("ledger: starting two KMEs (KME_A, KME_B) and their QKD link")
        stack.enter_context(LocalNetwork(eps, state / "logs"))
        _wait_for_link(site, progress)
        broker = stack.enter_context(_mosquitto(work / "mqtt")) if transport == "mqtt" else None
        progress("ledger: the writer deploys its anchor contract on the embedded chain and "
                 "opens its QKD key stream")
        started = time.monotonic()
        writer = _open(stack, site.writer_config(devices + burst, broker))
        _wait_ready(writer)
        result.first_key_s = time.monotonic() - started
        reader = _open(stack, site.reader_config("SAE_2", "reader"))

        def sensors(count: int, first: int) -> Fleet:
            if broker is not None:
                return Fleet(devices=count, first=first, broker=broker, seed=first)
            return Fleet(devices=count, first=first, seed=first,
                         rest=f"http://127.0.0.1:{writer.stats()['writer']['rest_port']}")

        progress(f"ledger: {devices} sensors, one reading each per second for {seconds:g} s "
                 f"({result.transport})")
        fleets = [sensors(devices, 1)]
        with fleets[0] as fleet:
            result.steady_sent = fleet.run(rate=rate, duration=seconds).sent
        _wait_delivered(reader, result.steady_sent, progress)
        _third_party(site, result, progress)
        if burst:
            progress(f"ledger: burst, {burst} more devices sending a reading each as fast "
                     "as they go")
            fleets.append(sensors(burst, devices + 1))
            t0 = time.perf_counter()
            with fleets[1] as fleet:
                result.burst_sent = fleet.burst(burst).sent
            _wait_delivered(reader, result.steady_sent + result.burst_sent, progress)
            result.burst_s = time.perf_counter() - t0
        _wait_anchored(writer)
        _collect(result, writer, reader, [f.summary() for f in fleets])
        result.delivered_as_sent = _delivered_names(reader) == _sent_names(fleets)
        result.batches_with_clear_values = _clear_batches(site.chain, writer.contract)
    return result


# -- the parts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Site:
    """Where the step's gateways live: their folders, the PKI, the two KMEs, the chain."""

    work: Path
    pki: Pki
    kme_a: str
    kme_b: str
    chain: str

    @property
    def account_file(self) -> Path:
        return self.work / "writer" / "account.key"

    def writer_config(self, devices: int, broker: tuple[str, int] | None) -> LedgerConfig:
        intake: dict[str, Any] = {"rest": {"host": "127.0.0.1", "port": 0}}
        if broker is not None:
            intake["mqtt"] = {"host": broker[0], "port": broker[1]}
        return validate("demo writer", {
            "role": "writer", "sae": "SAE_1", "pki": str(self.pki.root), "kme": self.kme_a,
            "peer_sae": "SAE_2", "state": str(self.work / "writer"),
            "account": str(self.account_file), "ledger": {"url": self.chain},
            "writer": intake | {"devices": {"count": devices},
                                "batch": {"max_records": 1000, "interval_s": 0.5},
                                "keys": {"records_per_key": RECORDS_PER_KEY}}}, LedgerConfig)

    def reader_config(self, sae: str, name: str) -> LedgerConfig:
        """The reader's, or a third party's that has all the reader has but its SAE."""
        writer = load_or_create_account(self.account_file).address
        return validate(f"demo {name}", {
            "role": "reader", "sae": sae, "pki": str(self.pki.root), "kme": self.kme_b,
            "peer_sae": "SAE_1", "state": str(self.work / name),
            "ledger": {"url": self.chain,
                       "contract_file": str(self.work / "writer" / "contract.json")},
            "reader": {"writers": [writer], "out": str(self.work / name / "readings.jsonl"),
                       "poll_s": 0.1}}, LedgerConfig)


def _open(stack: contextlib.ExitStack, cfg: LedgerConfig) -> LedgerGateway:
    gw = LedgerGateway(cfg)
    gw.open()
    stack.callback(gw.close)
    return gw


def _third_party(site: _Site, result: LedgerResult, progress: Progress) -> None:
    """A reader in all but its keys: SAE_3 asks the reader's KME for the records' keys."""
    progress("ledger: a third party with the ledger but no key reads the same batches")
    result.third_party_records = result.steady_sent
    spy = LedgerGateway(site.reader_config(THIRD_PARTY_SAE, "third-party"))
    spy.open()
    try:
        deadline = time.monotonic() + 30.0
        while True:
            stats = spy.stats()["reader"]
            handled = stats["delivered"] + sum(stats["rejected"].values())
            if handled >= result.third_party_records or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        spy.close()
    result.third_party_decrypted = stats["delivered"]
    result.third_party_refused = stats["rejected"].get("no_key", 0)


def _wait_for_link(site: _Site, progress: Progress, timeout_s: float = 30.0) -> None:
    """Until the link has delivered key (a stream opened before that would be refused)."""
    deadline = time.monotonic() + timeout_s
    with Etsi014Client(site.kme_a, site.pki.sae_files("SAE_1")) as client:
        while (stored := client.status("SAE_2").stored_key_count) < LINK_KEYS:
            if time.monotonic() > deadline:
                raise QgwError(f"the simulated QKD link did not store {LINK_KEYS} keys within "
                               f"{timeout_s:g} s; see the KME logs")
            progress(f"ledger: the QKD link is delivering key: {stored}/{LINK_KEYS} keys")
            time.sleep(0.1)


def _wait_ready(writer: LedgerGateway, timeout_s: float = 30.0) -> None:
    """Until the writer holds a QKD key and (with MQTT) is subscribed to the readings."""
    assert writer.keys is not None and writer.intake is not None
    deadline = time.monotonic() + timeout_s
    while not (writer.keys.ready() and writer.intake.wait_subscribed(0)):
        if time.monotonic() > deadline:
            raise QgwError(f"the ledger writer is not ready after {timeout_s:g} s: "
                           f"{writer.stats()}")
        time.sleep(0.01)


def _wait_delivered(reader: LedgerGateway, count: int, progress: Progress,
                    timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (delivered := reader.stats()["reader"]["delivered"]) < count:
        if time.monotonic() > deadline:
            raise QgwError(f"the ledger reader decrypted {delivered} of {count} readings in "
                           f"{timeout_s:g} s: {reader.stats()['reader']}")
        progress(f"ledger: reader decrypted {delivered}/{count} readings")
        time.sleep(0.05)


def _wait_anchored(writer: LedgerGateway, timeout_s: float = 10.0) -> None:
    """The last batch's receipt may come after the reader saw its event."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        w = writer.stats()["writer"]
        if w["queued"] == 0 and w["pending_batches"] == 0:
            return
        time.sleep(0.05)


def _collect(result: LedgerResult, writer: LedgerGateway, reader: LedgerGateway,
             fleets: list[FleetSummary]) -> None:
    ws, rs = writer.stats(), reader.stats()
    w, k, r = ws["writer"], ws["keys"], rs["reader"]
    result.sent = sum(f.sent for f in fleets)
    result.refused = sum(f.refused_total for f in fleets) + sum(w["refused"].values())
    result.sealed, result.anchored = w["sealed"], w["records_anchored"]
    result.batches = w["batches_anchored"]
    result.delivered, result.reader_rejected = r["delivered"], sum(r["rejected"].values())
    result.keys_used = k["used"]
    result.writer_key_p50_ms, result.key_wait_p50_ms = k["fetch_p50_ms"], k["key_wait_p50_ms"]
    result.reader_key_p50_ms = r["key_fetch_p50_ms"]


def _delivered_names(reader: LedgerGateway) -> set[tuple[str, int]] | None:
    """What the reader wrote out, by (device, seq); None if a reading came out twice."""
    rcfg = reader.cfg.reader
    assert rcfg is not None
    lines = rcfg.out.read_text().splitlines() if rcfg.out.exists() else []
    names = {(x["device"], x["seq"]) for x in map(json.loads, lines)}
    return names if len(names) == len(lines) else None


def _sent_names(fleets: list[Fleet]) -> set[tuple[str, int]]:
    return {(device, seq) for fleet in fleets for device, last in fleet.last_seq.items()
            for seq in range(1, last + 1)}


def _clear_batches(chain: str, contract: str | None) -> int:
    """Anchored batches in which a reading's value names appear in clear (expected: none)."""
    assert contract is not None
    ledger = Ledger.connect(chain)
    try:
        ledger.use(contract)
        return sum(CLEAR_MARKER in b.batch for b in ledger.batches(0))
    finally:
        ledger.close()


@contextlib.contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """The gateways' and KME clients' log lines to a file while the step runs: the console
    shows progress and the table (the third party's refusals alone are a line per record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("qgw")
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        handler.close()


@contextlib.contextmanager
def _mosquitto(workdir: Path, timeout_s: float = 5.0) -> Iterator[tuple[str, int]]:
    """A Mosquitto broker on a free loopback port for the step: (host, port)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0]
    config = workdir / "mosquitto.conf"
    # No queue limit: a burst must not be cut at Mosquitto's default 1000 queued messages.
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                      "max_queued_messages 0\nlog_dest stderr\n")
    with (workdir / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise QgwError(f"mosquitto did not start on 127.0.0.1:{port}; see "
                               f"{workdir / 'mosquitto.log'}")
            time.sleep(0.02)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
