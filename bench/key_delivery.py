"""Benchmark: ETSI 014 key delivery over mutual TLS on loopback.

One key pair = master enc_keys (1 key, 256 bits) + slave dec_keys of that key,
each KME its own process, the link fast enough not to be the bottleneck.
Reports p50/p99 of the pair round trip and key pairs per second for 1, 8 and
64 concurrent clients (threads, each with its own master and slave client,
spread over worker processes), next to two baselines measured in the same run:

- naive:  the same pair with a new TLS connection per request (what a client
          without connection reuse pays);
- floor:  one status call per pair slot (TLS request round trip with no key work).

and the pooled pattern KeySession uses (enc_keys number=8, one dec_keys for
the 8 IDs), counted per key pair.

The load generator shares the 2 cores with the KMEs, so it must cost less than
they do or it caps the rate: by default each client thread speaks HTTP/1.1
over its own kept-alive mutual-TLS socket with prebuilt requests (`RawClient`:
status line, Content-Length and JSON body parsed, every key checked equal at
master and slave). `--client keyclient` runs the same loop on
keyclient.Etsi014Client (urllib3) instead. Every row reports the KME processes'
CPU per pair (the figure load on the machine does not distort) next to the
load generator's, and the load average the row ran under.

Run: python -m bench.key_delivery [--seconds 5] [--out bench/results/key_delivery.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

from keyclient import Etsi014Client, KMEUnavailable
from kme.network import LocalNetwork, NetworkSpec, default_network, prepare
from qgw.pki import Pki
from qgw.tls import TlsFiles, client_context

UC35_TIME_TO_KEY_S = 21.7537
POOLED = 8  # keys per enc_keys call when a KeySession refills its pool


def _spec() -> NetworkSpec:
    spec = default_network()
    spec.links = [type(spec.links[0])("KME_A", "KME_B", key_rate_bps=2e6)]
    spec.limits = {"store_capacity_bits": 512 * 1024 * 1024}
    return spec


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawClient:
    """A minimal ETSI 014 client for the load generator: one kept-alive mutual-TLS
    socket, HTTP/1.1 requests built by hand, answers parsed by Content-Length.

    Same requests on the wire as keyclient (POST with a JSON body); it only
    spends less of the shared CPU on the client side.
    """

    def __init__(self, url: str, tls: TlsFiles, retries: int = 0) -> None:
        host_port = url.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.ctx = client_context(tls)
        self.retries = retries
        self.sock: ssl.SSLSocket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.ctx.wrap_socket(raw, server_hostname=self.host)
        self.buf = b""
        return self.sock

    def post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        payload = json.dumps(body).encode()
        req = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
               ).encode() + payload
        sock = self.sock or self._connect()
        sock.sendall(req)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("KME closed the connection")
            buf += chunk
        head = buf[:end].split(b"\r\n")
        status = int(head[0].split(b" ", 2)[1])
        length = next(int(h.split(b":", 1)[1]) for h in head[1:]
                      if h[:15].lower() == b"content-length:")
        need = end + 4 + length
        while len(buf) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("KME closed the connection")
            buf += chunk
        self.buf = buf[need:]
        data = json.loads(buf[end + 4:need])
        return status, data

    def get_keys(self, slave: str, number: int) -> list[tuple[str, str]]:
        for attempt in range(self.retries + 1):
            status, data = self.post(f"/api/v1/keys/{slave}/enc_keys", {"number": number})
            if status == 200:
                keys = [(k["key_ID"], k["key"]) for k in data["keys"]]  # type: ignore[union-attr]
                assert len(keys) == number
                return keys
            if status != 503 or attempt == self.retries:
                raise KMEUnavailable(status, str(data.get("message")), self.host)
            time.sleep(0.01)
        raise AssertionError("unreachable")

    def get_keys_with_ids(self, master: str, ids: list[str]) -> list[tuple[str, str]]:
        status, data = self.post(f"/api/v1/keys/{master}/dec_keys",
                                 {"key_IDs": [{"key_ID": k} for k in ids]})
        if status != 200:
            raise RuntimeError(f"dec_keys answered {status}: {data}")
        return [(k["key_ID"], k["key"]) for k in data["keys"]]  # type: ignore[union-attr]

    def status(self, slave: str) -> None:
        sock = self.sock or self._connect()
        sock.sendall(f"GET /api/v1/keys/{slave}/status HTTP/1.1\r\n"
                     f"Host: {self.host}:{self.port}\r\n\r\n".encode())
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += sock.recv(65536)
        head = buf[:end].split(b"\r\n")
        length = next(int(h.split(b":", 1)[1]) for h in head[1:]
                      if h[:15].lower() == b"content-length:")
        while len(buf) < end + 4 + length:
            buf += sock.recv(65536)
        self.buf = buf[end + 4 + length:]
        json.loads(buf[end + 4:end + 4 + length])


class _KeyclientAdapter:
    """keyclient.Etsi014Client behind RawClient's interface (--client keyclient)."""

    def __init__(self, url: str, tls: TlsFiles, retries: int = 0) -> None:
        self.c = Etsi014Client(url, tls, retries=retries, backoff_s=0.01)

    def close(self) -> None:
        self.c.close()

    def get_keys(self, slave: str, number: int) -> list[tuple[str, str]]:
        return [(k.key_id, k.secret.expose().hex()) for k in self.c.get_keys(slave, number)]

    def get_keys_with_ids(self, master: str, ids: list[str]) -> list[tuple[str, str]]:
        return [(k.key_id, k.secret.expose().hex())
                for k in self.c.get_keys_with_ids(master, ids)]

    def status(self, slave: str) -> None:
        self.c.status(slave)


def _worker(args: tuple[str, str, str, int, float, str, float, str]) -> tuple[list[float], float]:
    url_a, url_b, pki_dir, threads, seconds, mode, start_at, kind = args
    pki = Pki(Path(pki_dir))
    out: list[float] = []
    lock = threading.Lock()
    client = RawClient if kind == "raw" else _KeyclientAdapter

    def run() -> None:
        lat: list[float] = []
        a = client(url_a, pki.sae_files("SAE_1"), retries=50)
        b = client(url_b, pki.sae_files("SAE_2"))
        if mode != "naive":  # TLS handshakes before the clock starts: rows measure steady state
            a.status("SAE_2")
            b.status("SAE_1")
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        while time.time() < end:
            if mode == "naive":
                a.close()
                b.close()
                a = client(url_a, pki.sae_files("SAE_1"), retries=50)
                b = client(url_b, pki.sae_files("SAE_2"))
            t0 = time.perf_counter()
            if mode == "floor":
                a.status("SAE_2")
                lat.append(time.perf_counter() - t0)
                continue
            number = POOLED if mode == "pooled" else 1
            try:
                keys = a.get_keys("SAE_2", number)
            except KMEUnavailable:
                continue
            got = b.get_keys_with_ids("SAE_1", [kid for kid, _ in keys])
            if got != keys:
                raise AssertionError("the slave got other keys than the master")
            lat.extend([time.perf_counter() - t0] * number)
        a.close()
        b.close()
        with lock:
            out.extend(lat)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    cpu0 = time.process_time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out, time.process_time() - cpu0


def measure(urls: tuple[str, str], pki_dir: Path, clients: int, seconds: float,
            mode: str, kme_pids: list[int], kind: str = "raw") -> dict[str, float]:
    procs = min(clients, 2)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.5 + clients * 0.02
    with mp.get_context("spawn").Pool(procs) as pool:
        pending = pool.map_async(_worker, [(urls[0], urls[1], str(pki_dir), n, seconds, mode,
                                            start_at, kind) for n in per])
        while time.time() < start_at:
            time.sleep(0.001)
        kme_cpu0 = [_cpu_s(p) for p in kme_pids]
        results = pending.get()
        kme_cpu = [_cpu_s(p) - c for p, c in zip(kme_pids, kme_cpu0, strict=True)]
    lat = sorted(x for r, _ in results for x in r)
    client_cpu = sum(c for _, c in results)
    if not lat:
        return {"clients": clients, "pairs_per_s": 0.0, "p50_ms": float("nan"),
                "p99_ms": float("nan"), "n": 0}
    return {
        "clients": clients,
        "n": len(lat),
        "pairs_per_s": len(lat) / seconds,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        "cpu_ms_per_pair_kmes": sum(kme_cpu) / len(lat) * 1e3,
        "cpu_ms_per_pair_client": client_cpu / len(lat) * 1e3,
        "kme_cpu_s": sum(kme_cpu),
        "load_avg_1m": os.getloadavg()[0],
        "client": kind,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--out", type=Path, default=Path("bench/results/key_delivery.json"))
    ap.add_argument("--base-port", type=int, default=18443)
    ap.add_argument("--client", choices=("raw", "keyclient"), default="raw",
                    help="load generator: hand-built HTTP/1.1 (default) or keyclient")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        eps = prepare(state, _spec(), base_port=args.base_port,
                      metrics_base_port=args.base_port + 100)
        with LocalNetwork(eps, state / "logs") as net:
            pids = [p.pid for p in net.procs.values()]
            urls = (eps["KME_A"].url, eps["KME_B"].url)
            time.sleep(1.0)  # let the link fill the stores
            rows = []
            for c in args.clients:
                for mode in ("keys", "pooled", "naive", "floor"):
                    if mode in ("naive", "floor") and c not in (1, max(args.clients)):
                        continue
                    r = measure(urls, state / "pki", c, args.seconds, mode, pids,
                                args.client) | {"mode": mode}
                    rows.append(r)
                    print(f"{mode:6} clients={c:3} pairs/s={r['pairs_per_s']:8.0f} "
                          f"p50={r['p50_ms']:7.2f} ms p99={r['p99_ms']:7.2f} ms n={r['n']} "
                          f"cpu/pair: KMEs {r.get('cpu_ms_per_pair_kmes', 0):.2f} ms, "
                          f"client {r.get('cpu_ms_per_pair_client', 0):.2f} ms; "
                          f"load {r.get('load_avg_1m', 0):.1f}",
                          flush=True)
    keys1 = next(r for r in rows if r["mode"] == "keys" and r["clients"] == 1)
    summary = {
        "rows": rows,
        "uc35_time_to_key_s": UC35_TIME_TO_KEY_S,
        "speedup_vs_uc35_p50": UC35_TIME_TO_KEY_S / (keys1["p50_ms"] / 1e3),
    }
    for r in rows:
        if r["mode"] == "keys":
            naive = next((x for x in rows if x["mode"] == "naive"
                          and x["clients"] == r["clients"]), None)
            if naive:
                r["p50_ratio_naive_over_keys"] = naive["p50_ms"] / r["p50_ms"]
                r["rate_ratio_keys_over_naive"] = r["pairs_per_s"] / max(naive["pairs_per_s"], 1e-9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"UC35 time to key 21.75 s; ours p50 {keys1['p50_ms']:.2f} ms: "
          f"{summary['speedup_vs_uc35_p50']:.0f}x faster. Results in {args.out}")


if __name__ == "__main__":
    main()
