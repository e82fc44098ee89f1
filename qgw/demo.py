"""The main job, `qgw demo`: a simulated QKD network, a gateway pair agreeing keys, KPIs.

Steps: start the embedded network (two KME processes, the UC33 Norte-Distrito
link), measure ETSI 014 key delivery, run a master and a slave KeySession over
their mutual-TLS control channel through several rekeys, and compare the KPIs
with the OPENQKD field trials. Later gateways add one step each.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keyclient import Etsi014Client, KMEUnavailable
from keyclient.control import TlsControlChannel
from keyclient.installer import SessionKey
from keyclient.policy import SessionPolicy, SupplyMode
from keyclient.session import KeySession, SessionState
from kme.network import LocalNetwork, default_network, prepare
from qgw.errors import QgwError
from qgw.pki import Pki
from qgw.ports import free_ports

UC35_TIME_TO_KEY_S = 21.7537   # D8.7, use case 35, KPI_3
UC31_REKEY_INTERVAL_S = 60.0   # D8.7, use case 31: encryptors rekeyed once a minute
KEY_SAMPLES = 30
BURST_PAIRS = 60


class RecordingInstaller:
    """The demo's data plane: it only remembers which key each epoch has."""

    def __init__(self) -> None:
        self.keys: dict[int, SessionKey] = {}
        self.fingerprints: dict[int, bytes] = {}  # a derived check value, never the key
        self.active: int | None = None
        self.invalidated: list[str] = []
        self.lock = threading.Lock()

    def install(self, epoch: int, key: SessionKey) -> None:
        with self.lock:
            self.keys[epoch] = key
            self.fingerprints[epoch] = key.derive("demo/compare").expose()

    def activate(self, epoch: int) -> None:
        self.active = epoch

    def retire(self, epoch: int) -> None:
        with self.lock:
            key = self.keys.pop(epoch, None)
        if key is not None:
            key.secret.wipe()

    def invalidate(self, reason: str) -> None:
        self.active = None
        self.invalidated.append(reason)


@dataclass
class DemoResult:
    link_rate_bps: float
    key_latencies_s: list[float] = field(default_factory=list)
    burst_pairs_per_s: float = 0.0
    rekeys: int = 0
    rekey_failures: int = 0
    rekey_latencies_s: list[float] = field(default_factory=list)
    session_time_to_key_s: list[float] = field(default_factory=list)
    pool_level: int = 0
    stored_keys: int = 0
    epochs_compared: int = 0
    epochs_matching: int = 0
    rekey_interval_s: float = 1.0
    mode: str = "qkd"
    source: str = "-"  # of the last key

    @property
    def ok(self) -> bool:
        return (self.rekeys > 0 and self.epochs_compared > 0
                and self.epochs_matching == self.epochs_compared)


Progress = Callable[[str], None]


def _wait_for_keys(client: Etsi014Client, slave: str, wanted: int, progress: Progress,
                   timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = client.status(slave)
        if st.stored_key_count >= wanted:
            return st.stored_key_count
        progress(f"the QKD link is delivering key: {st.stored_key_count}/{wanted} keys stored")
        time.sleep(0.2)
    raise QgwError(f"the simulated QKD link did not store {wanted} keys within "
                   f"{timeout_s:.0f} s; see the KME logs")


def run_demo(state: Path, *, rekeys: int = 10, interval_s: float = 1.0,
             mode: SupplyMode = SupplyMode.QKD, progress: Progress = lambda s: None) -> DemoResult:
    spec = default_network()
    link_rate = spec.links[0].key_rate_bps or 0.0
    # Each demo starts its KMEs with empty stores (the PKI is kept), so runs compare.
    shutil.rmtree(state / "store", ignore_errors=True)
    count = len(spec.kmes)
    eps = prepare(state, spec, base_port=free_ports(count)[0],
                  metrics_base_port=free_ports(count)[0])
    pki = Pki(state.resolve() / "pki")
    result = DemoResult(link_rate_bps=link_rate, rekey_interval_s=interval_s, mode=mode.value)
    progress("starting two KMEs (KME_A, KME_B) and their QKD link")
    with LocalNetwork(eps, state / "logs"), \
            Etsi014Client(eps["KME_A"].url, pki.sae_files("SAE_1")) as master_kme, \
            Etsi014Client(eps["KME_B"].url, pki.sae_files("SAE_2")) as slave_kme:
        # Enough stored key that the measurements below never wait for the link.
        _wait_for_keys(master_kme, "SAE_2", KEY_SAMPLES + BURST_PAIRS + 10, progress)
        progress("measuring time to get a key (enc_keys at KME_A + dec_keys at KME_B)")
        for _ in range(KEY_SAMPLES):
            t0 = time.perf_counter()
            try:
                (key,) = master_kme.get_keys("SAE_2")
            except KMEUnavailable:
                time.sleep(0.05)
                continue
            (peer,) = slave_kme.get_keys_with_ids("SAE_1", [key.key_id])
            result.key_latencies_s.append(time.perf_counter() - t0)
            if peer.secret != key.secret:
                raise QgwError(f"key {key.key_id} differs between the two KMEs")
        progress("burst: key pairs from the stored key, back to back")
        stored = master_kme.status("SAE_2").stored_key_count
        n = max(1, min(stored - 10, BURST_PAIRS))
        t0 = time.perf_counter()
        done = 0
        for _ in range(n):
            try:
                (key,) = master_kme.get_keys("SAE_2")
            except KMEUnavailable:
                break
            slave_kme.get_keys_with_ids("SAE_1", [key.key_id])
            done += 1
        result.burst_pairs_per_s = done / (time.perf_counter() - t0)
        _run_sessions(pki, master_kme, slave_kme, result, rekeys, interval_s, mode, progress)
        result.stored_keys = master_kme.status("SAE_2").stored_key_count
    return result


def _run_sessions(pki: Pki, master_kme: Etsi014Client, slave_kme: Etsi014Client,
                  result: DemoResult, rekeys: int, interval_s: float, mode: SupplyMode,
                  progress: Progress) -> None:
    policy = SessionPolicy(mode=mode, rekey_interval_s=interval_s, overlap_s=interval_s / 2,
                           pool_target=8, pool_low=3)
    listen = TlsControlChannel(pki.sae_files("SAE_2"), "SAE_1", listen=("127.0.0.1", 0))
    installers = RecordingInstaller(), RecordingInstaller()
    slave = KeySession("slave", kme=slave_kme, local_sae="SAE_2", peer_sae="SAE_1",
                       channel=listen, installer=installers[1], policy=policy)
    slave.start()
    assert listen.port is not None
    connect = TlsControlChannel(pki.sae_files("SAE_1"), "SAE_2",
                                connect=("127.0.0.1", listen.port))
    master = KeySession("master", kme=master_kme, local_sae="SAE_1", peer_sae="SAE_2",
                        channel=connect, installer=installers[0], policy=policy)
    master.start()
    try:
        deadline = time.monotonic() + rekeys * interval_s + 20
        last = 0
        while time.monotonic() < deadline:
            st = master.status()
            if st.rekeys != last:
                last = st.rekeys
                if st.last_rekey_s is not None:
                    result.rekey_latencies_s.append(st.last_rekey_s)
                if st.last_time_to_key_s is not None:
                    result.session_time_to_key_s.append(st.last_time_to_key_s)
            progress(f"key session: epoch {st.epoch or '-'}, {st.state.value}, "
                     f"{st.rekeys}/{rekeys} rekeys, pool {st.pool_level}")
            if st.rekeys >= rekeys and slave.status().epoch == st.epoch:
                break
            time.sleep(0.05)
        st = master.status()
        result.rekeys = st.rekeys
        result.rekey_failures = st.rekey_failures
        result.pool_level = st.pool_level
        result.source = st.source.value if st.source else "-"
        if st.state is not SessionState.PROTECTED:
            raise QgwError(f"key session ended {st.state.value}: {st.last_error}")
    finally:
        master.stop()
        slave.stop()
    master_fp, slave_fp = installers[0].fingerprints, installers[1].fingerprints
    for epoch in sorted(set(master_fp) & set(slave_fp)):
        result.epochs_compared += 1
        result.epochs_matching += master_fp[epoch] == slave_fp[epoch]


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
