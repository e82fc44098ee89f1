"""Link outages under load: no key served twice, no stored key lost, keys again after."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from keyclient import Key, KMEUnavailable
from qgw.pki import Pki
from tests.harness import KmePair


def test_outage_and_recovery_under_load(tmp_path: Path, pki: Pki) -> None:
    # 64 kb/s: 250 keys of 256 bits a second, so the outage drains the pool.
    pair = KmePair(tmp_path, pki, rate_bps=64_000,
                   limits={"store_capacity_bits": 64_000}).start()
    try:
        pair.wait_for_keys(64)
        master, slave = pair.client("SAE_1", retries=0), pair.client("SAE_2")
        waiting = master.get_keys("SAE_2", 8)  # stored at KME_B before the outage
        got: list[Key] = []
        refused: list[str] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    got.extend(master.get_keys("SAE_2", 4))
                except KMEUnavailable as exc:
                    refused.append(exc.message)
                    time.sleep(0.01)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            time.sleep(0.5)
            kme_a = pair.servers["KME_A"].kme
            pair.loop.run(kme_a.set_link("KME_B", False))
            deadline = time.monotonic() + 10
            while not refused and time.monotonic() < deadline:
                time.sleep(0.05)  # the stored pool runs dry; no new key accrues
            assert refused, "keys kept coming on a link that is down"
            pool = kme_a.links["KME_B"].available_bytes()
            time.sleep(0.5)
            assert kme_a.links["KME_B"].available_bytes() <= pool
            pair.loop.run(kme_a.set_link("KME_B", True))
            recovered = len(got)
            deadline = time.monotonic() + 10
            while len(got) < recovered + 40 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            worker.join(10)
        assert len(got) >= recovered + 40, "no keys after the link came back"
        assert all("not enough key material" in m or "no path" in m for m in refused), refused
        # Every key the master got is distinct and reaches the slave exactly once, bytes equal.
        everything = waiting + got
        assert len({k.key_id for k in everything}) == len(everything)
        assert len({k.secret.expose() for k in everything}) == len(everything)
        for i in range(0, len(everything), 64):
            batch = everything[i:i + 64]
            fetched = slave.get_keys_with_ids("SAE_1", [k.key_id for k in batch])
            assert [k.secret for k in fetched] == [k.secret for k in batch]
        assert pair.servers["KME_B"].kme.store.reserved_key_count() == 0
    finally:
        pair.close()
