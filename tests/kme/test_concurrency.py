"""Many masters asking for keys at the same moment never receive the same key.

KME_A and KME_B run in this process (tests.harness.KmePair: real TLS, real
SQLite stores); 24 to 32 client threads start together behind a barrier and
ask for keys of mixed numbers and sizes: masters SAE_1 and SAE_4 at KME_A
for slaves at KME_B and, in the other direction, SAE_2 and SAE_3 at KME_B for
slaves at KME_A, some keys for two slaves at once. Both directions draw on
the one stream of the A-B link (KME_A, its emitter, allocates every range).

Then: every key ID is unique, no two keys share stream bytes (not even an
overlapping part of a range), and every slave fetches each of its keys
exactly once, with racing fetchers for the same keys, getting the master's
bytes; any later fetch is refused with 400.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyclient.errors import KMEBadRequest, KMEError, KMEUnavailable
from qgw.pki import Pki
from tests.harness import SAES, KmePair

REQUESTS_PER_THREAD = 25
SIZES = (128, 256, 512)
RACERS = 3
CHUNK = 16
WINDOW = 8  # bytes: two keys sharing any 8-byte run share stream bytes
NO_KEY = "not enough key material"


@dataclass(frozen=True)
class Plan:
    master: str
    slaves: tuple[str, ...]


@dataclass(frozen=True)
class Got:
    master: str
    slaves: tuple[str, ...]
    data: bytes


@pytest.fixture
def pair(tmp_path: Path, pki: Pki) -> Iterator[KmePair]:
    kmes = KmePair(tmp_path, pki, rate_bps=4e6)
    try:
        kmes.start()
        kmes.wait_for_keys(3000, timeout_s=20)
        yield kmes
    finally:
        kmes.close()


def run_masters(kmes: KmePair, plans: list[Plan], *, scarce: bool = False) -> dict[str, Got]:
    """All plans at once, one thread each; returns every key the masters received.

    With `scarce`, the link cannot keep up and "no key" (503) answers are expected.
    """
    barrier = threading.Barrier(len(plans))
    lock = threading.Lock()
    got: dict[str, Got] = {}
    dup: list[str] = []
    errors: list[str] = []
    refused = Counter[str]()
    clients = [kmes.client(p.master, timeout_s=20.0, retries=0, pool_size=1) for p in plans]

    def master(plan: Plan, client: object) -> None:
        rng = random.Random()
        barrier.wait(timeout=30)
        for _ in range(REQUESTS_PER_THREAD):
            number, size = rng.randint(1, 4), rng.choice(SIZES)
            try:
                keys = client.get_keys(plan.slaves[0], number, size,  # type: ignore[attr-defined]
                                       additional_slave_sae_ids=plan.slaves[1:])
            except KMEUnavailable as exc:
                with lock:
                    if scarce and exc.status == 503 and exc.message.startswith(NO_KEY):
                        refused[SAES[plan.master]] += 1
                    else:
                        errors.append(f"{plan}: {exc!r}")
                continue
            except KMEError as exc:
                with lock:
                    errors.append(f"{plan}: {exc!r}")
                continue
            with lock:
                for k in keys:
                    if k.key_id in got:
                        dup.append(k.key_id)
                    if k.bits != size:
                        errors.append(f"{plan}: asked for {size} bits, got {k.bits}")
                    got[k.key_id] = Got(plan.master, plan.slaves, k.secret.expose())

    threads = [threading.Thread(target=master, args=(p, c), daemon=True)
               for p, c in zip(plans, clients, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "master threads hang"
    assert not dup, f"key_IDs handed to masters twice: {dup[:5]}"
    assert not errors, "\n".join(errors[:10])
    if scarce:
        assert len(got) >= 100, len(got)
        assert refused, "the link kept up with every request: nothing was scarce"
    else:
        assert len(got) >= len(plans) * REQUESTS_PER_THREAD, len(got)
    return got


def assert_disjoint(got: dict[str, Got]) -> None:
    """No two keys hold the same bytes, nor any overlapping run of the stream."""
    seen: dict[bytes, str] = {}
    for kid, g in got.items():
        for i in range(len(g.data) - WINDOW + 1):
            other = seen.setdefault(g.data[i:i + WINDOW], kid)
            assert other == kid, f"key_IDs {other} and {kid} share stream bytes"


def fetch_all_once(kmes: KmePair, got: dict[str, Got]) -> None:
    """Every slave takes each of its keys: racing fetchers, exactly one wins each chunk."""
    chunks: list[tuple[str, str, list[str]]] = []
    by_pair: dict[tuple[str, str], list[str]] = defaultdict(list)
    for kid, g in got.items():
        for slave in g.slaves:
            by_pair[(slave, g.master)].append(kid)
    for (slave, master), ids in by_pair.items():
        chunks += [(slave, master, ids[i:i + CHUNK]) for i in range(0, len(ids), CHUNK)]

    lock = threading.Lock()
    wins: Counter[int] = Counter()
    fetched: dict[tuple[str, str], bytes] = {}
    errors: list[str] = []
    slaves = sorted({c[0] for c in chunks})
    clients = {(r, s): kmes.client(s, timeout_s=20.0, retries=0, pool_size=1)
               for r in range(RACERS) for s in slaves}
    barrier = threading.Barrier(RACERS)

    def racer(r: int) -> None:
        order = list(range(len(chunks)))
        random.Random(r).shuffle(order)
        barrier.wait(timeout=30)
        for i in order:
            slave, master, ids = chunks[i]
            try:
                keys = clients[(r, slave)].get_keys_with_ids(master, ids)
            except KMEBadRequest:
                continue  # another racer was first
            except KMEError as exc:
                with lock:
                    errors.append(f"{slave} fetching from {master}: {exc!r}")
                continue
            with lock:
                wins[i] += 1
                for k in keys:
                    fetched[(slave, k.key_id)] = k.secret.expose()

    threads = [threading.Thread(target=racer, args=(r,), daemon=True) for r in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "fetching threads hang"
    assert not errors, "\n".join(errors[:10])
    assert sorted(wins) == list(range(len(chunks))), "a chunk of keys nobody could fetch"
    assert set(wins.values()) == {1}, "a chunk of keys was fetched twice"
    for kid, g in got.items():
        for slave in g.slaves:
            assert fetched[(slave, kid)] == g.data, f"{slave} got other bytes for {kid}"

    # Taken is taken: a later fetch, alone, is refused.
    sample = random.sample(sorted(fetched), min(150, len(fetched)))
    for slave, kid in sample:
        with pytest.raises(KMEBadRequest):
            clients[(0, slave)].get_keys_with_ids(got[kid].master, [kid])


def check(kmes: KmePair, got: dict[str, Got], plans: list[Plan]) -> None:
    assert {(g.master, g.slaves) for g in got.values()} == {(p.master, p.slaves) for p in plans}
    assert_disjoint(got)
    fetch_all_once(kmes, got)


def test_masters_at_one_kme_never_share_a_key(pair: KmePair) -> None:
    plans = [Plan(m, (s,)) for m in ("SAE_1", "SAE_4") for s in ("SAE_2", "SAE_3")] * 6
    got = run_masters(pair, plans)
    check(pair, got, plans)


def test_both_directions_compete_for_one_link_stream(pair: KmePair) -> None:
    plans = ([Plan("SAE_1", ("SAE_2",)), Plan("SAE_4", ("SAE_3",)),
              Plan("SAE_2", ("SAE_1",)), Plan("SAE_3", ("SAE_4",))] * 7
             + [Plan("SAE_1", ("SAE_2", "SAE_3")), Plan("SAE_2", ("SAE_1", "SAE_4"))] * 2)
    assert len(plans) == 32
    assert {SAES[p.master] for p in plans} == {"KME_A", "KME_B"}
    got = run_masters(pair, plans)
    check(pair, got, plans)


def test_both_directions_compete_for_a_scarce_link_stream(tmp_path: Path, pki: Pki) -> None:
    """A slow link with a small store: many requests are refused (503), none shares a key."""
    kmes = KmePair(tmp_path, pki, rate_bps=1e5, limits={"store_capacity_bits": 8 * 4096})
    try:
        kmes.start()
        kmes.wait_for_keys(64, timeout_s=20)
        plans = [Plan("SAE_1", ("SAE_2",)), Plan("SAE_4", ("SAE_3",)),
                 Plan("SAE_2", ("SAE_1",)), Plan("SAE_3", ("SAE_4",))] * 6
        got = run_masters(kmes, plans, scarce=True)
        assert {SAES[g.master] for g in got.values()} == {"KME_A", "KME_B"}
        assert_disjoint(got)
        fetch_all_once(kmes, got)
        # Keys promised to masters that were then refused are all released.
        deadline = time.monotonic() + 10
        while pending(tmp_path / "KME_A.sqlite") or pending(tmp_path / "KME_B.sqlite"):
            assert time.monotonic() < deadline, "pending records left after refusals"
            time.sleep(0.05)
    finally:
        kmes.close()


def pending(store: Path) -> int:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT count(*) FROM pending").fetchone()[0])
    finally:
        db.close()
