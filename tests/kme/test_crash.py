"""Crash safety with real KME processes: SIGKILL a KME in the middle of key traffic.

Each test runs both KMEs as `qgw kme serve` processes (kme.network.LocalNetwork)
and keeps masters asking for keys and slaves fetching them while one KME is
killed with SIGKILL at a random moment and restarted, twice. Requests in
flight then fail (KMEUnreachable, 503); that is expected. What must hold is
about the keys a master actually received:

- the slave can fetch each of them, once, with the same bytes;
- a second fetch is refused with 400;
- no key ID is delivered twice, no two key IDs carry the same bytes;
- key IDs the killed KME had promised but not delivered (its `pending`
  records at the moment of death) are released once it is back: the
  records disappear and the slave cannot fetch those IDs;
- once all is quiet, both KMEs' copies of the link stream are in step: the
  same blocks left, with the same number of bytes carved from each.

The last test replays, deterministically and in process, the one crash
window the random kills rarely hit: a release that the peer applied but whose
answer was lost, so that the restarted KME sends it again.
"""

from __future__ import annotations

import contextlib
import queue
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyclient import Etsi014Client
from keyclient.errors import KMEBadRequest, KMEError, KMEUnavailable
from kme.network import LinkSpec, LocalNetwork, default_network, prepare
from kme.store import Pending
from qgw.pki import Pki
from qgw.ports import free_ports
from qgw.tls import ROLE_KME, Identity
from tests.harness import KmePair

KME_OF = {"SAE_1": "KME_A", "SAE_2": "KME_B"}
MASTERS_PER_FLOW = 3
SLAVES_PER_FLOW = 2
KILLS = 2
FETCH_BATCH = 64
SIZES = (128, 256, 512)
WINDOW = 8  # bytes: two keys sharing any 8-byte run share stream bytes

# CPython before gh-113280 was fixed (3.11.7 here) leaks the new SSLSocket when a
# connection is reset between TCP connect and the TLS handshake (ssl.py,
# SSLSocket._create re-raises ECONNRESET without closing it); urllib3 cannot
# close it, the raw socket being detached. Killing a KME while clients connect
# does exactly that, so the client side may drop such a socket: not a leak of
# this project's code, and not what these tests are about.
pytestmark = [
    pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"),
]


def _free_port_pair() -> int:
    """A port p with p and p+1 both free (prepare() numbers ports consecutively)."""
    return free_ports(2)[0]


@dataclass
class Net:
    state: Path
    net: LocalNetwork
    pki: Pki
    clients: list[Etsi014Client] = field(default_factory=list)

    def client(self, sae: str, **kwargs: object) -> Etsi014Client:
        url = self.net.endpoints[KME_OF[sae]].url
        c = Etsi014Client(url, self.pki.sae_files(sae), **kwargs)  # type: ignore[arg-type]
        self.clients.append(c)
        return c

    def store(self, kme: str) -> Path:
        return self.state / "store" / f"{kme}.sqlite"

    def diagnose(self) -> str:
        """Process states and log tails, for a failure message."""
        out = []
        for kme in self.net.endpoints:
            proc = self.net.procs.get(kme)
            state = ("not running" if proc is None else
                     "alive" if proc.poll() is None else f"exited with {proc.returncode}")
            log = self.net.log_dir / f"{kme}.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            out.append(f"--- {kme}: {state}; log tail:\n{tail}")
        return "\n".join(out)


def stream_blocks(emitter_store: Path, receiver_store: Path,
                  ) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """Both copies of the A-B stream below what the emitter knows the receiver holds:
    block offset -> (length, bytes carved)."""
    def blocks(path: Path, peer: str, below: int) -> dict[int, tuple[int, int]]:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return {off: (length, consumed) for off, length, consumed in db.execute(
                "SELECT offset, length, consumed FROM block WHERE peer=? AND offset < ?",
                (peer, below))}
        finally:
            db.close()

    db = sqlite3.connect(f"file:{emitter_store}?mode=ro", uri=True, timeout=5)
    try:
        (confirmed_end,) = db.execute(
            "SELECT confirmed_end FROM link WHERE peer='KME_B'").fetchone()
    finally:
        db.close()
    return (blocks(emitter_store, "KME_B", confirmed_end),
            blocks(receiver_store, "KME_A", confirmed_end))


def assert_streams_in_step(emitter_store: Path, receiver_store: Path) -> None:
    a, b = stream_blocks(emitter_store, receiver_store)
    differ = {off: (a.get(off), b.get(off)) for off in set(a) | set(b) if a.get(off) != b.get(off)}
    assert not differ, ("the two copies of the stream are out of step "
                        f"(offset: (length, carved) at KME_A, at KME_B): {differ}")


def pending_ids(path: Path) -> set[str]:
    """The `pending` key IDs of a KME store, read without writing (the KME may be dead)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return {row[0] for row in db.execute("SELECT key_id FROM pending")}
    finally:
        db.close()


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Net]:
    spec = default_network()
    spec.links = [LinkSpec("KME_A", "KME_B", key_rate_bps=2e6)]
    assert spec.saes == KME_OF
    base, metrics = _free_port_pair(), _free_port_pair()
    while metrics in (base - 1, base, base + 1):
        metrics = _free_port_pair()
    endpoints = prepare(tmp_path / "net", spec, base_port=base, metrics_base_port=metrics)
    net = LocalNetwork(endpoints, tmp_path / "logs",
                       extra_env={"QGW_KME__PEER_TIMEOUT_S": "2", "QGW_KME__TICK_S": "0.02"})
    n = Net(tmp_path / "net", net, Pki(tmp_path / "net" / "pki"))
    try:
        net.start()
        yield n
    finally:
        for c in n.clients:
            c.close()
        net.stop()


def wait_for_stock(n: Net, keys: int = 2000, timeout_s: float = 20.0) -> None:
    a, b = n.client("SAE_1"), n.client("SAE_2")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(KMEUnavailable):
            if min(a.status("SAE_2").stored_key_count,
                   b.status("SAE_1").stored_key_count) >= keys:
                return
        time.sleep(0.05)
    raise AssertionError(f"the link did not deliver {keys} keys in {timeout_s} s\n"
                         f"{n.diagnose()}")


class Traffic:
    """Masters asking for keys and slaves fetching them, in threads, recording everything."""

    def __init__(self, n: Net, flows: list[tuple[str, str]]) -> None:
        self.n = n
        self.flows = flows
        self.lock = threading.Lock()
        self.stop_masters = threading.Event()
        self.stop_slaves = threading.Event()
        # key ID -> (master, slave, bytes, time received)
        self.received: dict[str, tuple[str, str, bytes, float]] = {}
        self.fetched: dict[str, bytes] = {}          # key ID -> bytes, for the slave
        self.fetch_count: Counter[str] = Counter()
        # slave fetches that got no answer: (flow, key IDs, error)
        self.in_doubt: list[tuple[tuple[str, str], list[str], str]] = []
        self.violations: list[str] = []
        self.master_errors: Counter[str] = Counter()
        self.slave_errors: Counter[str] = Counter()
        self.queues = {flow: queue.Queue[list[str]]() for flow in flows}
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for flow in self.flows:
            for i in range(MASTERS_PER_FLOW):
                self._spawn(self._master, flow, f"master-{flow[0]}-{i}")
            for i in range(SLAVES_PER_FLOW):
                self._spawn(self._slave, flow, f"slave-{flow[1]}-{i}")

    def _spawn(self, fn: object, flow: tuple[str, str], name: str) -> None:
        t = threading.Thread(target=fn, args=(flow,), name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def _master(self, flow: tuple[str, str]) -> None:
        master, slave = flow
        client = self.n.client(master, timeout_s=3.0, retries=0)
        rng = random.Random()
        while not self.stop_masters.is_set():
            number, size = rng.randint(1, 4), rng.choice(SIZES)
            try:
                keys = client.get_keys(slave, number, size)
            except KMEUnavailable as exc:
                with self.lock:
                    self.master_errors[type(exc).__name__] += 1
                time.sleep(0.02)
                continue
            except KMEError as exc:
                self.violation(f"{master} enc_keys for {slave}: unexpected {exc!r}")
                time.sleep(0.02)
                continue
            now = time.monotonic()
            with self.lock:
                for k in keys:
                    if k.key_id in self.received:
                        self.violations.append(f"key_ID {k.key_id} given to a master twice")
                    if k.bits != size:
                        self.violations.append(f"asked for {size} bits, got {k.bits}")
                    self.received[k.key_id] = (master, slave, k.secret.expose(), now)
            self.queues[flow].put([k.key_id for k in keys])

    def _slave(self, flow: tuple[str, str]) -> None:
        master, slave = flow
        client = self.n.client(slave, timeout_s=3.0, retries=0)
        q = self.queues[flow]
        while not self.stop_slaves.is_set():
            try:
                ids = q.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                keys = client.get_keys_with_ids(master, ids)
            except KMEUnavailable as exc:
                with self.lock:
                    self.slave_errors[type(exc).__name__] += 1
                if "connection refused" in exc.message:
                    q.put(ids)  # never reached the KME: try again later
                    time.sleep(0.02)
                else:
                    # Sent, but no answer: maybe taken just before the KME died.
                    with self.lock:
                        self.in_doubt.append((flow, ids, exc.message))
                continue
            except KMEError as exc:
                self.violation(f"{slave} dec_keys from {master} for keys its master "
                               f"received: {exc!r}")
                continue
            self.record_fetch(keys)

    def record_fetch(self, keys: list) -> None:  # type: ignore[type-arg]
        with self.lock:
            for k in keys:
                data = k.secret.expose()
                self.fetch_count[k.key_id] += 1
                if self.fetch_count[k.key_id] > 1:
                    self.violations.append(f"key_ID {k.key_id} delivered to its slave twice")
                got = self.received.get(k.key_id)
                if got is None:
                    self.violations.append(f"slave got key_ID {k.key_id} no master received")
                elif got[2] != data:
                    self.violations.append(f"key_ID {k.key_id}: slave bytes differ from master's")
                self.fetched[k.key_id] = data

    def stop(self) -> None:
        self.stop_masters.set()
        self.stop_slaves.set()
        for t in self.threads:
            t.join(timeout=15)
        assert not any(t.is_alive() for t in self.threads), "traffic threads hang"

    def received_since(self, t0: float, flow: tuple[str, str]) -> int:
        with self.lock:
            return sum(1 for m, s, _, t in self.received.values() if t > t0 and (m, s) == flow)


def wait_until(n: Net, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n"
                                 f"{n.diagnose()}")
        time.sleep(0.1)


FORWARD = ("SAE_1", "SAE_2")   # master at KME_A (the link's emitter), slave at KME_B
REVERSE = ("SAE_2", "SAE_1")   # master at KME_B (the receiver), slave at KME_A


@pytest.mark.parametrize(("victim", "flows"), [
    ("KME_A", [FORWARD]),
    ("KME_B", [FORWARD]),
    ("KME_A", [FORWARD, REVERSE]),
    ("KME_B", [REVERSE]),
], ids=["kill-master-kme", "kill-slave-kme", "kill-emitter-both-directions",
        "kill-master-kme-reverse"])
def test_sigkill_during_traffic_loses_no_delivered_key(
        network: Net, victim: str, flows: list[tuple[str, str]]) -> None:
    n = network
    wait_for_stock(n)
    master_at = {KME_OF[m]: m for m, _ in flows}
    traffic = Traffic(n, flows)
    traffic.start()
    promised_at_death: dict[str, set[str]] = {}   # key ID -> pending at a killed KME
    try:
        wait_until(n, lambda: all(traffic.received_since(0, f) > 20 for f in flows), 10,
                   "traffic to start")
        for _ in range(KILLS):
            time.sleep(random.uniform(0.2, 1.0))
            n.net.kill(victim, signal.SIGKILL)
            promised = pending_ids(n.store(victim))
            if victim in master_at:
                promised_at_death.setdefault(victim, set()).update(promised)
            else:
                # Only masters at the other KME make pending records; none lives here.
                assert not promised, f"{victim} holds pending records with no master"
            time.sleep(random.uniform(0.1, 0.5))
            n.net.start_kme(victim)
            restarted = time.monotonic()
            # The KME is back: the keys promised before the crash get released ...
            wait_until(n, lambda: not (promised & pending_ids(n.store(victim))),  # noqa: B023
                       15, f"{victim} to release the keys it had promised when killed")
            # ... and masters get keys again, in every direction.
            wait_until(n, lambda: all(traffic.received_since(restarted, f) > 5  # noqa: B023
                                   for f in flows),
                       15, f"key delivery to resume after {victim} restarted")
        time.sleep(0.5)
    finally:
        traffic.stop()

    assert not traffic.violations, "\n".join(traffic.violations[:20])
    assert traffic.master_errors or traffic.slave_errors, "the kills hit no request"

    # Once traffic has stopped, every pending record on both sides is released.
    wait_until(n, lambda: not pending_ids(n.store("KME_A")) and not pending_ids(n.store("KME_B")),
               15, "the pending tables to empty")

    assert_streams_in_step(n.store("KME_A"), n.store("KME_B"))

    slaves = {s: n.client(s, timeout_s=5.0, retries=0) for _, s in flows}
    received = traffic.received
    by_flow: dict[tuple[str, str], list[str]] = {}
    for kid, (m, s, _, _) in received.items():
        by_flow.setdefault((m, s), []).append(kid)

    # A promise a master never saw must not have reached it, nor be fetchable by the slave.
    for kid in (k for ids in promised_at_death.values() for k in ids):
        assert kid not in received, f"master received key_ID {kid} still pending at a crash"
    for kme, ids in promised_at_death.items():
        master = master_at[kme]
        slave = dict(flows)[master]
        for kid in ids:
            with pytest.raises(KMEBadRequest):
                slaves[slave].get_keys_with_ids(master, [kid])

    # A fetch that got no answer happens only when the slave's KME is the one killed;
    # it took all of its keys (the KME died before answering) or none.
    taken_in_crash = set()
    for (master, slave), ids, why in traffic.in_doubt:
        assert KME_OF[slave] == victim, f"{slave} fetch failed, its KME is up: {why}"
        try:
            traffic.record_fetch(slaves[slave].get_keys_with_ids(master, ids))
        except KMEBadRequest:
            for kid in ids:
                with pytest.raises(KMEBadRequest):
                    slaves[slave].get_keys_with_ids(master, [kid])
            taken_in_crash.update(ids)
    assert len(taken_in_crash) <= KILLS * SLAVES_PER_FLOW * len(flows) * 4, taken_in_crash

    # Every key a master received and its slave did not get yet: fetchable, once, same bytes.
    for (master, slave), ids in by_flow.items():
        left = [k for k in ids if k not in traffic.fetched and k not in taken_in_crash]
        for i in range(0, len(left), FETCH_BATCH):
            batch = left[i:i + FETCH_BATCH]
            traffic.record_fetch(slaves[slave].get_keys_with_ids(master, batch))
    assert not traffic.violations, "\n".join(traffic.violations[:20])
    assert set(traffic.fetched) | taken_in_crash == set(received)

    # A second fetch of any key is refused.
    fetched = list(traffic.fetched)
    sample = random.sample(fetched, min(300, len(fetched)))
    for kid in sample:
        master, slave, _, _ = received[kid]
        with pytest.raises(KMEBadRequest):
            slaves[slave].get_keys_with_ids(master, [kid])

    # No key ID was fetched twice; different key IDs never share bytes, not even a part.
    assert max(traffic.fetch_count.values()) == 1
    owners: dict[bytes, str] = {}
    for kid, (_, _, data, _) in received.items():
        for i in range(len(data) - WINDOW + 1):
            other = owners.setdefault(data[i:i + WINDOW], kid)
            assert other == kid, f"key_IDs {other} and {kid} share stream bytes"
    assert len(received) > 200, len(received)


@pytest.mark.parametrize("releaser", ["KME_A", "KME_B"],
                         ids=["emitter-releases", "receiver-releases"])
def test_release_resent_after_its_answer_was_lost_keeps_streams_in_step(
        tmp_path: Path, pki: Pki, releaser: str) -> None:
    """A KME dies after its peer applied a release and before it recorded the answer.

    The release is the one for a key whose reservation the peer made but whose
    answer never arrived (the master got no key). On restart the KME finds its
    pending record and sends the release again; the peer must treat the repeat
    as done, and both copies of the stream must stay in step: no range counted
    as carved twice (a block dropped before all its keys were carved, a later
    key then "out of step"), none never carved (key material kept for ever).
    """
    peer = "KME_B" if releaser == "KME_A" else "KME_A"
    master, slave = ("SAE_1", "SAE_2") if releaser == "KME_A" else ("SAE_2", "SAE_1")
    kmes = KmePair(tmp_path, pki, rate_bps=1e6)
    try:
        kmes.start()
        kmes.wait_for_keys(512)
        kid = str(uuid.uuid4())

        async def promise_reserve_release() -> None:
            # What enc_keys does up to the reservation, and the reservation at the peer ...
            mine, theirs = kmes.servers[releaser].kme, kmes.servers[peer].kme
            me = Identity(releaser, ROLE_KME)
            with mine.store.tx():
                offset = mine.store.allocate(peer, [32])[0] if releaser == "KME_A" else None
                mine.store.add_pending(peer, [Pending(kid, offset, 32)])
            key = {"key_ID": kid, "length": 32} | ({"offset": offset} if offset is not None
                                                   else {})
            answer = theirs.peer_reserve(me, {"groups": [
                {"master": master, "slaves": [slave], "keys": [key]}]})
            assert "error" not in answer["groups"][0], answer
            # ... whose answer is lost: the releaser releases the key, and the peer applies
            # the release, but that answer is lost too (the releaser dies now).
            theirs.peer_release(me, {"keys": [key]})

        kmes.loop.run(promise_reserve_release())
        kmes.stop(releaser)
        kmes.start(releaser)   # finds the pending record, releases the key again
        store = tmp_path / f"{releaser}.sqlite"
        deadline = time.monotonic() + 10
        while pending_ids(store):
            assert time.monotonic() < deadline, "the pending record was not released"
            time.sleep(0.05)

        # The slave cannot have the key; keys keep flowing through the rest of the block.
        with pytest.raises(KMEBadRequest):
            kmes.client(slave, retries=0).get_keys_with_ids(master, [kid])
        sae1 = kmes.client("SAE_1", retries=0)
        errors = []
        for _ in range(20):   # 20 kB: past the 8 kB block holding the released range
            try:
                sae1.get_keys("SAE_2", 32)
            except KMEError as exc:
                errors.append(exc.message)
        assert not errors, errors
        assert_streams_in_step(tmp_path / "KME_A.sqlite", tmp_path / "KME_B.sqlite")
    finally:
        kmes.close()
