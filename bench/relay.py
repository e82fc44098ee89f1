"""Benchmark: trusted-node key relay across 1, 3 and 5 hops of the Madrid network.

Every KME of the shipped `madrid` topology runs as its own process (mutual TLS
on loopback). One key pair = master enc_keys + slave dec_keys of those keys.

- machine: link rates raised to 2 Mb/s so key supply is not the limit; p50/p99
  of the pair round trip and key pairs per second, 1 key and 8 keys per call, for
  Norte->Distrito (1 hop, direct: the baseline of the same run), Distrito->UCM
  (3 hops) and Almagro->UAM (5 hops).
- budget: what a relayed key costs in link key, and so how many keys per second
  each path can sustain at the rates the trial measured (UC33) or the fit gives.

Run: python -m bench.relay [--seconds 5] [--out bench/results/relay.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from keyclient import Etsi014Client
from kme.network import LinkSpec, LocalNetwork, prepare
from kme.relay import hop_cost_bytes
from kme.topology import load_topology
from qgw.pki import Pki

PATHS = {  # name: (master SAE, slave SAE, expected hops)
    "1 hop (direct)": ("SAE_NORTE", "SAE_DISTRITO", 1),
    "3 hops": ("SAE_DISTRITO", "SAE_UCM", 3),
    "5 hops": ("SAE_ALMAGRO", "SAE_UAM", 5),
}
KEY_BITS = 256


def _measure(a: Etsi014Client, b: Etsi014Client, slave: str, master: str, per_call: int,
             seconds: float) -> dict[str, float]:
    lat: list[float] = []
    keys = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        got = a.get_keys(slave, per_call, KEY_BITS)
        b.get_keys_with_ids(master, [k.key_id for k in got])
        lat.append(time.perf_counter() - t0)
        keys += len(got)
    lat.sort()
    return {"calls": len(lat), "key_pairs_per_s": keys / sum(lat),
            "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--base-port", type=int, default=28443)
    ap.add_argument("--out", type=Path, default=Path("bench/results/relay.json"))
    args = ap.parse_args()
    madrid = load_topology("madrid")
    spec = madrid.to_spec()
    real_rates = {frozenset((link.a, link.b)): link.rate_bps for link in madrid.links}
    spec.links = [LinkSpec(link.a, link.b, 2e6, link.loss_db) for link in spec.links]
    spec.limits = {"store_capacity_bits": 256 * 1024 * 1024}
    summary: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        eps = prepare(state, spec, base_port=args.base_port,
                      metrics_base_port=args.base_port + 100)
        with LocalNetwork(eps, state / "logs"):
            pki = Pki(state / "pki")
            time.sleep(3)  # let every link stock key and every KME hear the network
            for name, (master, slave, hops) in PATHS.items():
                a = Etsi014Client(eps[madrid.saes[master]].url, pki.sae_files(master),
                                  retries=20, backoff_s=0.05)
                b = Etsi014Client(eps[madrid.saes[slave]].url, pki.sae_files(slave))
                try:
                    status = a.status(slave)
                    ext = status.status_extension or {}
                    path = ext.get("qkdgw_relay", {}).get("path") or \
                        [madrid.saes[master], madrid.saes[slave]]
                    assert len(path) - 1 == hops, path
                    row: dict[str, object] = {"path": path}
                    for per_call in (1, 8):
                        row[f"{per_call}_per_call"] = _measure(a, b, slave, master, per_call,
                                                               args.seconds)
                    bottleneck = min(real_rates[frozenset(pair)]
                                     for pair in itertools.pairwise(path))
                    for per_call in (1, 8):
                        key_bytes = per_call * KEY_BITS // 8
                        hop_bits = (key_bytes if hops == 1 else hop_cost_bytes(key_bytes)) * 8
                        row[f"budget_{per_call}_per_call"] = {
                            "link_key_bits_per_key": hop_bits * hops / per_call,
                            "bottleneck_rate_bps": bottleneck,
                            "sustainable_keys_per_s": bottleneck / (hop_bits / per_call),
                        }
                    summary[name] = row
                finally:
                    a.close()
                    b.close()
    base = summary["1 hop (direct)"]
    assert isinstance(base, dict)
    for name, row in summary.items():
        assert isinstance(row, dict)
        for per_call in (1, 8):
            m, b0 = row[f"{per_call}_per_call"], base[f"{per_call}_per_call"]
            print(f"{name:15} {per_call} key/call: {m['key_pairs_per_s']:8.0f} pairs/s "
                  f"p50 {m['p50_ms']:6.2f} ms p99 {m['p99_ms']:6.2f} ms  "
                  f"({m['key_pairs_per_s'] / b0['key_pairs_per_s']:.2f}x of direct, "
                  f"latency {m['p50_ms'] / b0['p50_ms']:.2f}x)")
        for per_call in (1, 8):
            bud = row[f"budget_{per_call}_per_call"]
            print(f"{'':15} budget {per_call} key/call: {bud['link_key_bits_per_key']:.0f} "
                  f"link bits per key; bottleneck {bud['bottleneck_rate_bps']:.0f} b/s -> "
                  f"{bud['sustainable_keys_per_s']:.1f} keys/s sustained")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
