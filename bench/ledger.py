"""Benchmark: the IoT-to-ledger gateway (OPENQKD use case 35) for 10, 1,000 and 10,000 devices.

Everything a deployment runs as a program runs as one here, on this machine: Mosquitto,
the two KMEs (`qgw kme serve` processes joined by one link, by default the trial's:
8.4 kbit/s, kme.network.default_network), the writer and reader gateways, a fleet of
simulated sensors (`python -m apps.sensors` processes), and for the anvil runs the
node. The gateways are the product's LedgerGateway with its documented defaults
(ETSI 004 keys, records_per_key 100, prefetch 4, batches of up to 1,000 records at
least every 1 s, reader polling every 1 s), started by this module's `_gateways` helper,
which is `qgw gateway ledger` plus a stats dump every 0.25 s. The embedded chain
(eth-tester) lives in a process: there the writer and the reader share one (as they must
to share the chain); on anvil each is a process of its own.

Measured for each chain (eth-tester, anvil) and fleet size:

- paced (10 and 1,000 devices): each device publishes one reading per second for
  --seconds. Offered readings/s (what the fleet sent); records anchored per second,
  sustained (the slope of the writer's anchored count while the fleet sends, after 3 s);
  end to end latency p50/p99, the sensor's publish time (its reading's ts_ms) to the line
  the reader wrote, decrypted (the file is tailed every 20 ms); whether the pipeline
  kept up.
- burst (10,000 devices): one Python fleet publishes about 1,500 readings/s here and the
  writer takes a few thousand, so 10,000 devices at one reading per second each cannot be
  offered on this machine. Instead the broker is given a backlog first: the writer's
  persistent session is opened, two fleet processes (--first partitioning, 5,000 devices
  each) publish --burst-readings readings per device (2: two seconds of a 10,000-device
  fleet), and then the gateways start and drain it. Reported: readings sealed, anchored
  and decrypted per second from the writer's first sealed reading (0.25 s resolution),
  i.e. the rate the pipeline sustains when it never waits for input. Latency there is
  the backlog's age, so it is not reported.
- keys, every run: the writer's wait for a ready QKD key when it changes keys (p50/p99;
  the trial waited 21.75 s for a key), the background KME fetch (ETSI 004 chunk plus
  vault write, p50/p99) and the reader's fetch by ID; QKD key bits per record, set
  (key bits / records_per_key) and measured (keys fetched, and keys used, times key
  bits, per record sealed); key bits per second the run consumed, as a share of the
  trial's link.
- ledger gas per record anchored (the writer's anchoring transactions' receipts), and
  the writer process's CPU per record (on eth-tester: writer, reader and chain together).

Baselines, measured in the same run:

- ingest alone: MqttIngest (same code, same group commit) storing the readings in clear
  into an SQLite table with the outbox's durability (WAL, synchronous=FULL, one
  transaction per group); no sealing, no keys, no anchoring, in this process. Drains the
  same kind of backlog as the burst, first and again last (drift check: others load this
  machine); the burst's writer is compared with the mean of the two, by rate and by CPU
  per reading (the steadier of the two here).
- anchoring alone: on each chain, pre-sealed records of the fleet's shape anchored
  directly (outbox batch, signature, transaction, mined) in batches of 10, 100 and 1,000
  records, three of each: records anchored per second and gas per record. Paced runs'
  anchoring is compared with it.

Mosquitto runs with max_inflight_messages 1000 (see MqttIngest: the broker bounds a
group). Others may load this machine: the load average before and after is printed and
saved. Every process is stopped at the end, also on failure or Ctrl-C.

Run: python -m bench.ledger [--seconds 20] [--sizes 10 1000 10000] [--burst-readings 2]
                            [--chains eth-tester anvil] [--link-bps 8400]
                            [--records-per-key 100] [--prefetch 4]
                            [--out bench/results/ledger.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
UC35 = {"devices": 10, "readings_per_device_per_s": 1 / 60, "time_to_key_s": 21.7537,
        "link_bps": 8400.0}
STATS_EVERY_S = 0.25
TAIL_EVERY_S = 0.02
ANCHOR_SIZES = (10, 100, 1000)
KEPT_UP_S = 4.0         # paced: all delivered this soon after the fleet stopped
ANCHOR_REPEATS = 3


# ---- small helpers ---------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over t: a count's rate, robust to batch steps."""
    if len(points) < 3:
        return None
    tm = sum(t for t, _ in points) / len(points)
    ym = sum(y for _, y in points) / len(points)
    var = sum((t - tm) ** 2 for t, _ in points)
    return sum((t - tm) * (y - ym) for t, y in points) / var if var else None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s: {what}")
        time.sleep(0.05)


def _say(text: str) -> None:
    print(text, flush=True)


# ---- the processes ----------------------------------------------------------------------------


class Gateways:
    """One `_gateways` helper process running the given gateway configs, and its stats."""

    def __init__(self, name: str, configs: list[Path], workdir: Path) -> None:
        self.name = name
        self.stats_file = workdir / f"{name}.stats.json"
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "bench.ledger", "_gateways", "--stats", str(self.stats_file),
                 *map(str, configs)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def stats(self) -> dict[str, Any]:
        if self.proc.poll() is not None and self.proc.returncode != 0:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        try:
            data: dict[str, Any] = json.loads(self.stats_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def cpu_s(self) -> float:
        return _cpu_s(self.proc.pid)

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the helper writes its last stats and closes the gateways); the last stats."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            return dict(json.loads(self.stats_file.read_text()))
        except (OSError, ValueError):
            return {}


class StatsPoller:
    """Samples a helper's stats file: (time, writer stats) for rates over time."""

    def __init__(self, gateways: Gateways) -> None:
        self.gateways = gateways
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = None
        while not self._stop.wait(STATS_EVERY_S / 2):
            data = self.gateways.stats()
            if data and data.get("t") != seen and "writer" in data:
                seen = data["t"]
                self.samples.append((data["t"], data["writer"]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def first(self, check: Callable[[dict[str, Any]], bool]) -> float | None:
        return next((t for t, s in self.samples if check(s)), None)


class Tail:
    """Tails the reader's output: (arrival time, ts_ms) of each reading delivered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.path.exists():
            if self._stop.wait(TAIL_EVERY_S):
                return
        with self.path.open("rb") as f:
            partial = b""
            while True:
                chunk = f.read()
                now = time.time()
                if chunk:
                    *whole, partial = (partial + chunk).split(b"\n")
                    self.lines.extend((now, json.loads(line)["ts_ms"]) for line in whole)
                elif self._stop.wait(TAIL_EVERY_S):
                    return

    @property
    def count(self) -> int:
        return len(self.lines)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


_SUMMARY = re.compile(r"sent (\d+) readings .* in ([\d.]+) s .*acknowledged (\d+), "
                      r"refused (\d+).*failed (\d+)")


def fleet(broker: tuple[str, int], devices: int, first: int, *, rate: str,
          duration: float | None = None, count: int | None = None,
          seed: int = 1) -> subprocess.Popen[str]:
    argv = [PY, "-m", "apps.sensors", "--broker", f"{broker[0]}:{broker[1]}", "--devices",
            str(devices), "--first", str(first), "--rate", rate, "--seed", str(seed),
            "--progress", "3600"]
    if duration is not None:
        argv += ["--duration", str(duration)]
    if count is not None:
        argv += ["--count", str(count)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def fleet_done(procs: list[subprocess.Popen[str]]) -> dict[str, float]:
    """Wait for fleet processes; their sent/acknowledged/refused counts added up."""
    total = {"sent": 0.0, "acked": 0.0, "refused": 0.0, "failed": 0.0, "elapsed_s": 0.0}
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        found = _SUMMARY.search(out or "")
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"fleet exited with {proc.returncode}:\n{out[-2000:]}")
        sent, elapsed, acked, refused, failed = found.groups()
        total["sent"] += int(sent)
        total["acked"] += int(acked)
        total["refused"] += int(refused)
        total["failed"] += int(failed)
        total["elapsed_s"] = max(total["elapsed_s"], float(elapsed))
    return total


def prime_session(broker: tuple[str, int], client_id: str, prefix: str) -> None:
    """Open the writer's persistent MQTT session (as its ingest will) and leave: the broker
    then queues the readings published meanwhile for it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=False, protocol=mqtt.MQTTv311)
    client.on_subscribe = lambda *_: done.set()
    client.connect(*broker)
    client.loop_start()
    client.subscribe(f"{prefix}/+/reading", qos=1)
    if not done.wait(10):
        raise RuntimeError("the broker did not confirm the subscription")
    client.disconnect()
    client.loop_stop()


def backlog(broker: tuple[str, int], devices: int, per_device: int) -> dict[str, float]:
    """`per_device` readings from each of `devices` devices, queued at the broker by two
    fleet processes (half the devices each)."""
    half = devices // 2
    parts = [(1, half), (half + 1, devices - half)]
    procs = [fleet(broker, n, first, rate="max", count=n * per_device, seed=first)
             for first, n in parts if n]
    return fleet_done(procs)


# ---- one run of the pipeline -------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    broker: tuple[str, int]
    pki: Path
    kme_a: str
    kme_b: str
    key_bits: int
    tmp: Path
    records_per_key: int = 100     # the product's defaults
    prefetch: int = 4
    prefix: str = "qkdgw/sensors"


def configs(setup: Setup, run: Path, chain: str, client_id: str) -> tuple[Path, Path, str]:
    """Writer and reader configs for `run`; the writer's account address."""
    from gateways.ledger.state import load_or_create_account

    account = load_or_create_account(run / "writer" / "account.key")
    ledger: dict[str, Any] = {"url": chain, "receipt_timeout_s": 60.0}
    writer = {
        "role": "writer", "sae": "SAE_1", "pki": str(setup.pki), "kme": setup.kme_a,
        "peer_sae": "SAE_2", "state": str(run / "writer"),
        "ledger": ledger | ({} if chain.startswith("eth-tester") else {"fund_wei": 10**19}),
        "writer": {"mqtt": {"host": setup.broker[0], "port": setup.broker[1],
                            "prefix": setup.prefix, "client_id": client_id},
                   "devices": {"count": 10_000},
                   "batch": {"max_records": 1000, "interval_s": 1.0},
                   "keys": {"records_per_key": setup.records_per_key,
                            "prefetch": setup.prefetch}}}
    reader = {
        "role": "reader", "sae": "SAE_2", "pki": str(setup.pki), "kme": setup.kme_b,
        "peer_sae": "SAE_1", "state": str(run / "reader"),
        "ledger": ledger | {"contract_file": str(run / "writer" / "contract.json")},
        "reader": {"writers": [account.address], "out": str(run / "reader" / "readings.jsonl"),
                   "poll_s": 1.0}}
    paths = []
    for name, cfg in (("writer", writer), ("reader", reader)):
        path = run / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(path)
    return paths[0], paths[1], account.address


@contextmanager
def pipeline(setup: Setup, run: Path, chain: str, client_id: str) -> Iterator[list[Gateways]]:
    """The writer and reader gateways: one process on eth-tester, two on a node."""
    writer_cfg, reader_cfg, _ = configs(setup, run, chain, client_id)
    procs: list[Gateways] = []
    try:
        if chain.startswith("eth-tester"):
            procs.append(Gateways("pair", [writer_cfg, reader_cfg], run))
        else:
            procs.append(Gateways("writer", [writer_cfg], run))
            procs.append(Gateways("reader", [reader_cfg], run))
        yield procs
    finally:
        for p in procs:
            p.stop()


def _ready(procs: list[Gateways], prefetch: int) -> bool:
    stats = {k: v for p in procs for k, v in p.stats().items()}
    w, r = stats.get("writer"), stats.get("reader")
    return bool(w and r and w["writer"]["mqtt_subscribed"] and w["keys"]["ready"] >= prefetch
                and r["state"] == "running")


def _key_row(w: dict[str, Any], r: dict[str, Any] | None, setup: Setup, seconds: float,
             ) -> dict[str, Any]:
    key_bits = setup.key_bits
    keys, sealed = w["keys"], max(w["writer"]["sealed"], 1)
    return {
        "key_wait_p50_ms": keys["key_wait_p50_ms"], "key_wait_p99_ms": keys["key_wait_p99_ms"],
        "kme_fetch_p50_ms": keys["fetch_p50_ms"], "kme_fetch_p99_ms": w.get("fetch_p99_ms"),
        "reader_fetch_p50_ms": (r or {}).get("reader", {}).get("key_fetch_p50_ms"),
        "reader_fetch_p99_ms": (r or {}).get("fetch_p99_ms"),
        "keys_fetched": keys["fetched"], "keys_used": keys["used"], "key_bits": key_bits,
        "records_per_key": setup.records_per_key, "prefetch": setup.prefetch,
        "key_bits_per_record_set": key_bits / setup.records_per_key,
        "key_bits_per_record_used": keys["used"] * key_bits / sealed,
        "key_bits_per_record_fetched": keys["fetched"] * key_bits / sealed,
        "key_bps": keys["fetched"] * key_bits / seconds if seconds > 0 else None,
        "key_share_of_trial_link": (keys["fetched"] * key_bits / seconds / UC35["link_bps"]
                                    if seconds > 0 else None),
    }


def _ledger_row(w: dict[str, Any], cpu_s: float) -> dict[str, Any]:
    anchored = w["writer"]["records_anchored"]
    return {"records_anchored": anchored, "batches_anchored": w["writer"]["batches_anchored"],
            "gas_per_record": w["gas_used"] / anchored if anchored else None,
            "records_per_batch": anchored / max(w["writer"]["batches_anchored"], 1),
            "cpu_ms_per_record": cpu_s / anchored * 1e3 if anchored else None,
            "readings_per_transaction": (w["ingest"]["accepted"] / w["ingest"]["groups"]
                                         if w["ingest"]["groups"] else None),
            "refused": {k: v for k, v in w["writer"]["refused"].items() if v},
            "redelivered": w["ingest"]["redelivered"]}


def paced(setup: Setup, name: str, chain: str, devices: int, seconds: float
          ) -> dict[str, Any]:
    run = setup.tmp / f"{name}-{devices}"
    run.mkdir()
    client_id = f"bench-writer-{uuid.uuid4().hex[:8]}"
    with pipeline(setup, run, chain, client_id) as procs:
        _wait(lambda: _ready(procs, setup.prefetch), 120, "the gateways up, keys ready")
        poller, tail = StatsPoller(procs[0]), Tail(run / "reader" / "readings.jsonl")
        cpu0 = procs[0].cpu_s()
        t0 = time.time()
        sent = fleet_done([fleet(setup.broker, devices, 1, rate="1", duration=seconds)])
        t_sent = time.time()
        _wait(lambda: tail.count >= sent["acked"] - sent["refused"], 120 + seconds,
              "every reading at the reader")
        t_done = time.time()
        cpu = procs[0].cpu_s() - cpu0
        poller.stop()
        tail.stop()
        final = {k: v for p in procs for k, v in p.stop().items() if k != "t"}
    w, r = final["writer"], final.get("reader")
    cpu_share = cpu / (t_done - t0)
    window = [(t, s["writer"]["records_anchored"]) for t, s in poller.samples
              if t0 + 3 <= t <= t_sent]
    steady = _slope(window)
    latencies = [arrival - ts / 1000 for arrival, ts in tail.lines]
    row = {"mode": "paced", "chain": name, "devices": devices,
           "seconds": seconds, "offered_per_s": sent["sent"] / sent["elapsed_s"],
           "sent": sent["sent"], "delivered": tail.count,
           "anchored_per_s": steady, "drain_after_fleet_s": t_done - t_sent,
           "e2e_p50_s": _pct(latencies, 0.5), "e2e_p99_s": _pct(latencies, 0.99),
           "e2e_max_s": max(latencies) if latencies else None,
           # no backlog: the last readings took no longer than the first (batch interval
           # plus reader poll, 1 s each, plus the work)
           "kept_up": t_done - t_sent < KEPT_UP_S}
    row |= _key_row(w, r, setup, t_done - t0) | _ledger_row(w, cpu)
    row["writer_cpu_share"] = cpu_share      # of one core
    return row


def burst(setup: Setup, name: str, chain: str, devices: int, per_device: int
          ) -> dict[str, Any]:
    run = setup.tmp / f"{name}-{devices}-burst"
    run.mkdir()
    client_id = f"bench-writer-{uuid.uuid4().hex[:8]}"
    prime_session(setup.broker, client_id, setup.prefix)
    queued = backlog(setup.broker, devices, per_device)
    total = int(queued["acked"])
    with pipeline(setup, run, chain, client_id) as procs:
        poller, tail = StatsPoller(procs[0]), Tail(run / "reader" / "readings.jsonl")
        t_start = time.time()
        # the writer's CPU from its first reading on (not its start: imports, deployment)
        _wait(lambda: poller.first(lambda s: s["writer"]["sealed"] > 0) is not None, 120,
              "the writer taking readings")
        cpu0 = procs[0].cpu_s()
        _wait(lambda: tail.count >= total, 300, f"{total} readings at the reader")
        t_done = time.time()
        cpu = procs[0].cpu_s() - cpu0
        poller.stop()
        tail.stop()
        final = {k: v for p in procs for k, v in p.stop().items() if k != "t"}
    w, r = final["writer"], final.get("reader")
    t_first = poller.first(lambda s: s["writer"]["sealed"] > 0) or t_start
    t_sealed = poller.first(lambda s: s["writer"]["sealed"] >= total) or t_done
    t_anchored = poller.first(lambda s: s["writer"]["records_anchored"] >= total) or t_done
    first_line = tail.lines[0][0] if tail.lines else t_done
    row = {"mode": "burst", "chain": name, "devices": devices,
           "per_device": per_device, "sent": queued["sent"], "delivered": tail.count,
           "sealed_per_s": total / max(t_sealed - t_first, STATS_EVERY_S),
           "anchored_per_s": total / max(t_anchored - t_first, STATS_EVERY_S),
           "decrypted_per_s": total / max(t_done - t_first, STATS_EVERY_S),
           "first_decrypted_after_s": first_line - t_first,
           "all_decrypted_after_s": t_done - t_first,
           "gateways_start_s": t_first - t_start}
    row |= _key_row(w, r, setup, t_done - t_first) | _ledger_row(w, cpu)
    return row


# ---- baselines ---------------------------------------------------------------------------------


class ClearOutbox:
    """The outbox's durability (WAL, synchronous=FULL, one transaction per group) with the
    readings as they came: no sealing, no keys."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE record (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "device TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, "
                        "UNIQUE (device, seq))")
        self.stored = 0
        self.first_at: float | None = None     # when the first group came

    def take(self, readings: list[Any]) -> list[Any]:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        rows = [(r.device, r.seq, json.dumps({"ts_ms": r.ts_ms, "values": r.values}).encode())
                for r in readings]
        self.db.execute("BEGIN IMMEDIATE")
        added = [self.db.execute("INSERT OR IGNORE INTO record(device, seq, data) "
                                 "VALUES (?, ?, ?)", row).rowcount == 1 for row in rows]
        self.db.execute("COMMIT")
        self.stored += sum(added)
        return [None] * len(readings)


def ingest_alone(setup: Setup, devices: int, per_device: int) -> dict[str, Any]:
    from gateways.ledger.ingest import DeviceRegistry, MqttIngest

    client_id = f"bench-clear-{uuid.uuid4().hex[:8]}"
    prime_session(setup.broker, client_id, setup.prefix)
    queued = backlog(setup.broker, devices, per_device)
    total = int(queued["acked"])
    store = ClearOutbox(setup.tmp / f"{client_id}.sqlite")
    ingest = MqttIngest(*setup.broker, devices=DeviceRegistry(count=devices),
                        on_readings=store.take, client_id=client_id)
    cpu0 = time.process_time()
    ingest.start()
    try:
        _wait(lambda: store.stored >= total, 300, f"{total} readings stored in clear")
        assert store.first_at is not None
        took = time.perf_counter() - store.first_at    # as the burst: from the first reading
        cpu = time.process_time() - cpu0
        stats = ingest.stats()
    finally:
        ingest.stop()
        store.db.close()
    return {"mode": "ingest alone (clear)", "devices": devices, "per_device": per_device,
            "readings": total, "stored_per_s": total / took, "seconds": took,
            "cpu_ms_per_record": cpu / total * 1e3,
            "readings_per_transaction": stats.accepted / max(stats.groups, 1)}


def anchoring_alone(chain: str) -> dict[str, Any]:
    """Pre-sealed records anchored directly: the ledger's part alone, per batch size."""
    from eth_account import Account

    from apps.sensors import Fleet
    from gateways.ledger.chain import Ledger
    from gateways.ledger.ingest import DEFAULT_PREFIX, DeviceRegistry, parse_reading
    from gateways.ledger.outbox import Outbox
    from gateways.ledger.records import seal
    from gateways.ledger.signing import sign_root
    from qgw.secret import Secret

    account = Account.create()
    ledger = Ledger.connect(chain, receipt_timeout=120)
    rows: dict[str, Any] = {}
    try:
        ledger.fund(account.address, 10**19)
        contract = ledger.deploy(account)
        # Readings as the fleet makes them (its payloads, through the ingest's parser).
        sim = Fleet(devices=1000, broker=("127.0.0.1", 1), prefix=DEFAULT_PREFIX, seed=3)
        registry = DeviceRegistry(count=1000)
        key = Secret(os.urandom(32))
        with tempfile.TemporaryDirectory() as tmp, Outbox(Path(tmp) / "o.sqlite") as box:
            for size in ANCHOR_SIZES:
                took, gas = 0.0, 0
                for _ in range(ANCHOR_REPEATS):
                    readings = [parse_reading(sim.next_reading()[2], devices=registry)
                                for _ in range(size)]
                    box.add_many([seal(r, key, f"{uuid.uuid4()}:0") for r in readings])
                    batch = box.take_batch(size)
                    assert batch is not None and batch.size == size
                    started = time.perf_counter()
                    signature = sign_root(account, batch.root, chain_id=ledger.chain_id,
                                          contract=contract)
                    receipt = ledger.anchor(account, batch.root, batch.size, batch.encoded,
                                            signature)
                    took += time.perf_counter() - started
                    gas += receipt.gas_used
                rows[str(size)] = {"records_per_s": size * ANCHOR_REPEATS / took,
                                   "ms_per_batch": took / ANCHOR_REPEATS * 1e3,
                                   "gas_per_record": gas / (size * ANCHOR_REPEATS),
                                   "bytes_per_record": len(batch.encoded) / size}
    finally:
        ledger.close()
    return rows


# ---- the run -----------------------------------------------------------------------------------


def _ratios(res: dict[str, Any]) -> None:
    clear = res["baselines"]["ingest_alone"]
    for row in res["runs"]:
        alone = res["baselines"]["anchoring_alone"][row["chain"]]
        size = min(ANCHOR_SIZES, key=lambda s: abs(s - row["records_per_batch"]))
        ratio: dict[str, Any] = {
            "gas_per_record_vs_anchoring_alone": (
                row["gas_per_record"] / alone[str(size)]["gas_per_record"]
                if row["gas_per_record"] else None),
            "anchoring_alone_batch_size": size,
            "key_wait_p99_vs_trial_time_to_key": (
                UC35["time_to_key_s"] * 1e3 / row["key_wait_p99_ms"]
                if row["key_wait_p99_ms"] else None),
        }
        if row["mode"] == "burst":
            ratio["sealed_vs_ingest_alone"] = row["sealed_per_s"] / clear["stored_per_s"]
            ratio["cpu_per_record_vs_ingest_alone"] = (row["cpu_ms_per_record"]
                                                       / clear["cpu_ms_per_record"])
            ratio["anchored_vs_anchoring_alone"] = (row["anchored_per_s"]
                                                    / alone["1000"]["records_per_s"])
            ratio["anchored_vs_10k_devices_at_1_per_s"] = row["anchored_per_s"] / 10_000
        else:
            ratio["anchored_share_of_anchoring_alone"] = (
                row["anchored_per_s"] / alone["1000"]["records_per_s"]
                if row["anchored_per_s"] else None)
            ratio["readings_per_s_vs_trial"] = row["offered_per_s"] / (
                UC35["devices"] * UC35["readings_per_device_per_s"])
        row["ratios"] = ratio


def _fmt(value: Any, spec: str) -> str:
    width = int(re.sub(r"\D", "", spec.split(".")[0]) or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def report(res: dict[str, Any]) -> None:
    print(f"\nLedger gateway, {res['cpus']} CPUs, load average {res['loadavg_before'][0]:.2f} "
          f"before, {res['loadavg_after'][0]:.2f} after; QKD link {res['args']['link_bps']:g} "
          f"bit/s, keys of {res['key_bits']} bits, records_per_key "
          f"{res['args']['records_per_key']}, prefetch {res['args']['prefetch']}; paced "
          f"runs {res['args']['seconds']:g} s at 1 reading/s per device")
    head = (f"{'chain':10}{'devices':>8}{'mode':>7}{'offer/s':>9}{'anch/s':>9}{'kept':>5}"
            f"{'e2e p50':>8}"
            f"{'p99 s':>7}{'wait p50':>9}{'p99 ms':>7}{'KME p50':>8}{'p99 ms':>7}"
            f"{'bits/rec':>9}{'gas/rec':>8}{'cpu ms':>7}{'rd/tx':>6}")
    print(head)
    for r in res["runs"]:
        offer = r.get("offered_per_s")
        e2e50, e2e99 = r.get("e2e_p50_s"), r.get("e2e_p99_s")
        kept = {True: "yes", False: "no", None: "-"}[r.get("kept_up")]
        print(f"{r['chain']:10}{r['devices']:8}{r['mode']:>7}{_fmt(offer, '9.0f')}"
              f"{_fmt(r['anchored_per_s'], '9.0f')}{kept:>5}"
              f"{_fmt(e2e50, '8.2f')}{_fmt(e2e99, '7.2f')}"
              f"{_fmt(r['key_wait_p50_ms'], '9.3f')}{_fmt(r['key_wait_p99_ms'], '7.2f')}"
              f"{_fmt(r['kme_fetch_p50_ms'], '8.1f')}{_fmt(r['kme_fetch_p99_ms'], '7.1f')}"
              f"{r['key_bits_per_record_fetched']:9.2f}{_fmt(r['gas_per_record'], '8.0f')}"
              f"{_fmt(r['cpu_ms_per_record'], '7.2f')}"
              f"{_fmt(r['readings_per_transaction'], '6.0f')}")
    for r in res["runs"]:
        if r["mode"] == "burst":
            print(f"{r['chain']} burst: {r['sent']:.0f} queued readings from {r['devices']} "
                  f"devices; sealed {r['sealed_per_s']:.0f}/s, anchored "
                  f"{r['anchored_per_s']:.0f}/s, decrypted {r['decrypted_per_s']:.0f}/s "
                  f"(all {r['all_decrypted_after_s']:.1f} s after the first sealed): "
                  f"{r['ratios']['anchored_vs_10k_devices_at_1_per_s']:.2f} of 10,000/s; "
                  f"sealed {r['ratios']['sealed_vs_ingest_alone']:.2f}x ingest alone's rate, "
                  f"{r['ratios']['cpu_per_record_vs_ingest_alone']:.2f}x its CPU per reading "
                  f"(on eth-tester with the reader's and the chain's)")
    b = res["baselines"]
    c = b["ingest_alone"]
    print(f"\nbaseline ingest alone (clear, same group commit): {c['stored_per_s']:.0f} "
          f"readings/s (first {c['first']['stored_per_s']:.0f}, last "
          f"{c['last']['stored_per_s']:.0f}), {c['cpu_ms_per_record']:.3f} ms CPU each, "
          f"{c['readings_per_transaction']:.0f} per transaction")
    print("baseline anchoring alone, records/s (gas per record), by records per batch:")
    print(f"{'':12}" + "".join(f"{f'{s} records':>20}" for s in ANCHOR_SIZES))
    for chain, rows in b["anchoring_alone"].items():
        print(f"{chain:12}" + "".join(
            f"{rows[str(s)]['records_per_s']:.0f}/s ({rows[str(s)]['gas_per_record']:.0f})"
            .rjust(20) for s in ANCHOR_SIZES))
    print("\nratios (gas: against anchoring alone at the nearest batch size; anchoring: share "
          "of anchoring alone's 1,000-record batches)")
    for r in res["runs"]:
        q = r["ratios"]
        share = q.get("anchored_share_of_anchoring_alone", q.get("anchored_vs_anchoring_alone"))
        print(f"{r['chain']:10}{r['devices']:>6} {r['mode']:6} gas x"
              f"{_fmt(q['gas_per_record_vs_anchoring_alone'], '.2f')} (batches of "
              f"{r['records_per_batch']:.0f}), anchoring {_fmt(share, '.3f')}, key wait p99 "
              f"{_fmt(q['key_wait_p99_vs_trial_time_to_key'], ',.0f')}x shorter than the trial's")
    print("\nagainst the trial (UC35: 10 devices, 1 reading/min, 21.75 s to a QKD key)")
    print(f"{'':40}{'trial':>10}" + "".join(f"{r['chain'][:3]} {r['devices']:>6}"
                                             .rjust(12) for r in res["runs"]))
    print(f"{'readings/s (paced: sent, burst: sealed)':40}{10 / 60:10.3f}" + "".join(
        _fmt(r.get("offered_per_s", r.get("sealed_per_s")), '12.0f') for r in res["runs"]))
    print(f"{'time to a QKD key, p99 (ms)':40}{UC35['time_to_key_s'] * 1e3:10.0f}" + "".join(
        _fmt(r["key_wait_p99_ms"], '12.3f') for r in res["runs"]))
    print(f"{'QKD key bits/s fetched (share of link)':40}{'':>10}" + "".join(
        f"{r['key_bps']:6.0f} ({r['key_share_of_trial_link'] * 100:3.0f}%)".rjust(12)
        for r in res["runs"]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from keyclient import Etsi014Client
    from kme.network import LinkSpec, LocalNetwork, default_network, prepare
    from qgw.pki import Pki
    from tests.gateways.ledger.broker import Mosquitto
    from tests.gateways.ledger.nodes import AnvilNode

    res: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in vars(args).items()},
                           "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                           "trial": UC35, "runs": [], "baselines": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qgw-bench-ledger-") as tmp_name, \
            ExitStack() as stack:
        tmp = Path(tmp_name)
        spec = default_network()
        spec.links = [LinkSpec(spec.links[0].a, spec.links[0].b, key_rate_bps=args.link_bps,
                               loss_db=spec.links[0].loss_db)]
        eps = prepare(tmp / "kme", spec, base_port=args.base_port,
                      metrics_base_port=args.base_port + 100)
        stack.enter_context(LocalNetwork(eps, tmp / "kme" / "logs"))
        broker = stack.enter_context(Mosquitto(tmp / "mqtt", extra_config=(
            "max_inflight_messages 1000",)))
        pki = Pki(tmp / "kme" / "pki")
        with Etsi014Client(eps["KME_A"].url, pki.sae_files("SAE_1")) as probe:
            key_bits = probe.status("SAE_2").key_size
        res["key_bits"] = key_bits
        setup = Setup((broker.host, broker.port), pki.root, eps["KME_A"].url,
                      eps["KME_B"].url, key_bits, tmp, args.records_per_key, args.prefetch)
        burst_devices = max(args.sizes)
        _say(f"baseline: ingest alone, {burst_devices} devices x {args.burst_readings}")
        clear = [ingest_alone(setup, burst_devices, args.burst_readings)]
        res["baselines"]["anchoring_alone"] = {}
        for chain_name in args.chains:
            with ExitStack() as chain_stack:
                if chain_name == "anvil":
                    node = chain_stack.enter_context(AnvilNode(tmp)).start()
                    chain = node.url
                else:
                    chain = f"eth-tester:{uuid.uuid4().hex[:8]}"
                _say(f"{chain_name}: anchoring alone")
                res["baselines"]["anchoring_alone"][chain_name] = anchoring_alone(
                    chain if chain_name == "anvil" else f"eth-tester:{uuid.uuid4().hex[:8]}")
                for devices in args.sizes:
                    mode = "burst" if devices >= args.burst_at else "paced"
                    _say(f"{chain_name}: {devices} devices, {mode} "
                         f"({time.monotonic() - started:.0f} s into the run)")
                    row = (burst(setup, chain_name, chain, devices, args.burst_readings)
                           if mode == "burst" else
                           paced(setup, chain_name, chain, devices, args.seconds))
                    res["runs"].append(row)
                    _say(f"  {json.dumps({k: v for k, v in row.items() if 'ratio' not in k})}")
        _say("baseline: ingest alone, again")
        clear.append(ingest_alone(setup, burst_devices, args.burst_readings))
        res["baselines"]["ingest_alone"] = {
            "first": clear[0], "last": clear[-1],
            "stored_per_s": statistics.fmean(c["stored_per_s"] for c in clear),
            "cpu_ms_per_record": statistics.fmean(c["cpu_ms_per_record"] for c in clear),
            "readings_per_transaction": statistics.fmean(c["readings_per_transaction"]
                                                         for c in clear)}
    res["loadavg_after"] = os.getloadavg()
    res["seconds"] = time.monotonic() - started
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="paced runs: how long the fleet publishes")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10_000])
    ap.add_argument("--burst-at", type=int, default=10_000,
                    help="fleets this large run in burst mode (see above)")
    ap.add_argument("--burst-readings", type=int, default=2,
                    help="burst mode: readings queued per device")
    ap.add_argument("--chains", nargs="+", default=["eth-tester", "anvil"],
                    choices=["eth-tester", "anvil"])
    ap.add_argument("--link-bps", type=float, default=UC35["link_bps"],
                    help="QKD key rate of the KME link (default: the trial's link)")
    ap.add_argument("--records-per-key", type=int, default=100,
                    help="writer keys.records_per_key (default: the product's)")
    ap.add_argument("--prefetch", type=int, default=4,
                    help="writer keys.prefetch (default: the product's)")
    ap.add_argument("--base-port", type=int, default=18643, help="KME ports from here")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ledger.json"))
    args = ap.parse_args()

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)   # unwinds through every process's cleanup

    signal.signal(signal.SIGTERM, terminated)
    res = run(args)
    _ratios(res)
    report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwritten to {args.out} ({res['seconds']:.0f} s)")


# ---- the gateway helper process ----------------------------------------------------------------


def _gateways(argv: list[str]) -> None:
    """`python -m bench.ledger _gateways --stats FILE CONFIG...`: the gateways of the given
    configs in this process (as `qgw gateway ledger` runs one), their stats written to FILE
    every STATS_EVERY_S, and once more when SIGTERM stops them."""
    import logging

    from gateways.ledger.config import load
    from gateways.ledger.gateway import LedgerGateway

    ap = argparse.ArgumentParser(prog="python -m bench.ledger _gateways")
    ap.add_argument("--stats", type=Path, required=True)
    ap.add_argument("configs", type=Path, nargs="+")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    gws: list[LedgerGateway] = []
    try:
        for path in args.configs:
            gw = LedgerGateway(load(path))
            gw.open()
            gws.append(gw)
        while not stop.wait(STATS_EVERY_S):
            _dump(gws, args.stats)
        _dump(gws, args.stats)
    finally:
        for gw in gws:
            gw.close()


def _dump(gws: list[Any], path: Path) -> None:
    out: dict[str, Any] = {"t": time.time()}
    for gw in gws:
        stats = gw.stats()
        if gw.writer is not None:
            stats["ingest"] = dataclasses.asdict(gw.intake.stats())
            stats["gas_used"] = gw.writer.stats().gas_used
            stats["fetch_p99_ms"] = gw.keys.fetch_time.percentile_ms(99)
        if gw.reader_keys is not None:
            stats["fetch_p99_ms"] = gw.reader_keys.fetch_time.percentile_ms(99)
        out[gw.cfg.role] = stats
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_gateways"]:
        _gateways(sys.argv[2:])
    else:
        main()
