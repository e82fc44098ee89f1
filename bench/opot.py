"""Benchmark: the OPoT service chain against the same chain forwarding without proofs.

The lab is `gateways.opot.lab.OpotLab`: client -> ingress -> SF1 -> SF2 -> egress ->
server, one network namespace each, joined in a line of veth pairs (MTU 1600 inside the
chain), two KMEs on a management bridge. Every phase runs in the same namespaces, on the
same interfaces, one after the other:

- forward:     every node runs `python -m gateways.opot.dataplane --role forward`, the data
               plane's test harness: the same `ChainNode` loop (AF_PACKET sockets, batches,
               poll) with the `forward` step, every frame passes unchanged. `qgw gateway
               opot` has no forward role (its config allows ingress, transit, egress), so
               this is the baseline. Run first and again last (drift check); ratios are
               against the mean of the two.
- static:      the same harness as ingress/transit/egress with ordered PoT, a static profile
               and static link keys: the proofs' cost alone, in the same kind of process
               as the baseline.
- ordered:     the real chain, `qgw gateway opot` on every node, path.ordered true: link
               masks keyed by KeySessions from the KMEs, profiles rotated by the egress's
               controller. What differs from `static`: the gateway process also runs the
               key sessions, the profile channel (mutual TLS), the metrics server and a
               status line per second, and profiles/link keys rotate during the run.
- plain:       the same gateways restarted with path.ordered false (plain PoT, no per-link
               masks; the key sessions still run).

Measured in each phase:

- throughput: iperf3 UDP client -> server for --seconds, 64-byte and 1000-byte payloads at
  --offered-pps (0 = as fast as iperf3 can send): packets per second delivered at the
  server (the bytes its iperf3 received), and per node the left-to-right frames it handled per
  second of the test and per CPU second of its process (what one core would do: the nodes,
  iperf3 and the kernel share this machine's CPUs), with the frames the kernel dropped
  because the node did not keep up (rx_dropped). Ratios against forward.
- latency: a UDP echo client -> server -> client, one 64-byte datagram in flight, p50/p99
  of the round trip, and what the phase adds over forward. The return path is plain
  forwarding in every phase (proof of transit covers one direction).
- key: QKD key per hop (one chain link, one KeySession) per hour, at link rekey intervals
  of 1, 10 and 60 s (one 256-bit key per rekey and link), plus one 256-bit key per profile
  rotation at the controller (--rotate-s and 60 s), next to the trial's measured link
  rates (UC33: Norte-Distrito 8.4 kbit/s, ...). Every hop of this lab's chain crosses the
  KME_A-KME_B link (nodes alternate KMEs), so the chain costs 3 hops plus the rotations.
  Also the keys the chain's sessions actually fetched (qgw_session_keys_fetched_total of
  each link's master, which fetches; the slave fetches the same keys by ID) and the
  rotations (qgw_opot_rotations_total) during the gateway phases, at --rekey-interval.
  The master prefetches a pool (pool_target 8), so fetched keys come in batches.

Others may load this machine: the load average before and after is printed and saved.
Needs root (namespaces) and iperf3 (`apt-get install iperf3`; not in CI, benchmarks do not
run there). Every namespace and process is removed at the end, also on failure or Ctrl-C.

Run: python -m bench.opot [--seconds 5] [--pings 2000] [--offered-pps 0]
                          [--rekey-interval 5] [--rotate-s 15] [--out bench/results/opot.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PY = sys.executable
ECHO_PORT = 9000
IPERF_PORT = 5201
SPI = 42
KEY_BITS = 256
SIZES = (64, 1000)
L2R = ("proved", "forwarded", "verified", "passed")   # left-to-right outcomes


# ---- helpers run inside the namespaces -----------------------------------------------------


def _echo(args: argparse.Namespace) -> None:
    """UDP echo server: every datagram goes back to its sender."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((args.host, args.port))
    print(json.dumps({"ready": True}), flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        s.sendto(data, peer)


def _ping(args: argparse.Namespace) -> None:
    """One datagram in flight: send, wait for its echo, note the round trip."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((args.host, args.port))
    s.settimeout(args.timeout)
    pad = bytes(max(0, args.size - 8))
    rtts: list[float] = []
    lost = 0
    for i in range(args.warmup + args.count):
        tag = i.to_bytes(8, "big")
        t0 = time.perf_counter()
        s.send(tag + pad)
        try:
            while s.recv(4096)[:8] != tag:     # a late echo of an earlier one
                pass
        except TimeoutError:
            lost += int(i >= args.warmup)
            continue
        if i >= args.warmup:
            rtts.append(time.perf_counter() - t0)
    print(json.dumps({"rtts": rtts, "lost": lost}))


# ---- small statistics ------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the chain in its phases --------------------------------------------------------------


class Bench:
    def __init__(self, lab: Any, olab: Any, tmp: Path) -> None:
        from gateways.opot.lab import NODES, SERVER_IP, ns_name

        self.lab, self.olab, self.tmp = lab, olab, tmp
        self.nodes, self.server_ip, self.ns_name = NODES, SERVER_IP, ns_name
        self.kind = ""                       # "harness" or "gateway"
        self.services: dict[str, str] = {}   # node -> lab service of its process
        self.gateway_started = False

    # -- the nodes ------------------------------------------------------------------------

    def start_harness(self, mode: str) -> None:
        """Every node runs the data plane harness: `forward`, or ordered PoT (static keys)."""
        argv0 = [PY, "-m", "gateways.opot.dataplane", "--left", "left", "--right", "right",
                 "--spi", str(SPI)]
        files: list[str] = []
        if mode == "static":
            profile = self.tmp / "profile.json"
            profile.write_text(json.dumps({"path": "chain1", "nodes": self.nodes,
                                           "randomness": os.urandom(32).hex(), "index": 0}))
            links = self.tmp / "links.json"
            links.write_text(json.dumps({f"{a}>{b}": os.urandom(32).hex()
                                         for a, b in itertools.pairwise(self.nodes)}))
            files = ["--profile-json", str(profile), "--links-json", str(links), "--ordered"]
        self.kind, self.services = "harness", {}
        for i, node in enumerate(self.nodes):
            role = "forward" if mode == "forward" else (
                "ingress" if i == 0 else "egress" if i == len(self.nodes) - 1 else "transit")
            svc = f"{mode}-{self.ns_name(node)}"
            argv = [*argv0, "--role", role] + (["--node", node, *files] if files else [])
            self.lab.start(svc, argv, env=None, ns_of=self.ns_name(node))
            self.services[node] = svc
        deadline = time.monotonic() + 30
        for svc in self.services.values():
            while '"ready"' not in self.lab.tail(svc):
                if time.monotonic() > deadline or self.lab.procs[svc].poll() is not None:
                    raise RuntimeError(f"{svc} did not start:\n{self.lab.tail(svc)}")
                time.sleep(0.1)
        self.wait_echo()

    def start_gateways(self, ordered: bool) -> float:
        o = self.olab
        if not self.gateway_started:
            o.start()                 # KMEs, the server's HTTP probe target, the nodes
            self.gateway_started = True
        else:
            for node in self.nodes:
                o.configs[node] = o.write_config(node, ordered)
            for node in reversed(self.nodes):
                o.start_node(node)
        self.kind = "gateway"
        self.services = {n: self.ns_name(n) for n in self.nodes}
        took: float = o.wait_ready(timeout_s=90)
        self.wait_echo()
        return took

    def stop_nodes(self) -> None:
        for svc in self.services.values():
            self.lab.kill(svc, signal.SIGTERM)
        self.services = {}

    def counters(self) -> dict[str, dict[str, float]]:
        """Every node's frame counters by outcome, and its process's CPU seconds."""
        out: dict[str, dict[str, float]] = {}
        for node, svc in self.services.items():
            pid = self.lab.procs[svc].pid
            cpu = _cpu_s(pid)
            if self.kind == "gateway":
                counts: dict[str, float] = {}
                for line in self.olab.metrics(node).splitlines():
                    if line.startswith("qgw_opot_packets_total{"):
                        outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                        counts[outcome] = float(line.rsplit(" ", 1)[1])
            else:
                counts = self._harness_counters(svc, pid)
            out[node] = counts | {"cpu_s": cpu}
        return out

    def _harness_counters(self, svc: str, pid: int) -> dict[str, float]:
        """SIGUSR1 makes the harness print its counters as one JSON line."""
        before = self.lab.logs(svc).read_text().count('"counters"')
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while (text := self.lab.logs(svc).read_text()).count('"counters"') <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{svc} did not report its counters")
            time.sleep(0.05)
        last = [line for line in text.splitlines() if '"counters"' in line][-1]
        counts: dict[str, float] = json.loads(last)["counters"]
        return counts

    def session_counters(self) -> dict[str, Any]:
        """Gateway phases: per hop (master session) rekeys and keys fetched; rotations."""
        from prometheus_client.parser import text_string_to_metric_families

        hops: dict[str, dict[str, float]] = {}
        fetched_by_node: dict[str, float] = {}
        rotations = 0.0
        for node in self.nodes:
            for family in text_string_to_metric_families(self.olab.metrics(node)):
                for s in family.samples:
                    if s.name == "qgw_session_keys_fetched_total":
                        fetched_by_node[node] = fetched_by_node.get(node, 0.0) + s.value
                    if s.name == "qgw_opot_rotations_total":
                        rotations = s.value
                    if s.labels.get("role") != "master":
                        continue
                    hop = f"{node}>{s.labels['peer_sae'].removeprefix('SAE_')}"
                    if s.name == "qgw_session_keys_fetched_total":
                        hops.setdefault(hop, {})["keys_fetched"] = s.value
                    elif s.name == "qgw_session_rekeys_total":
                        hops.setdefault(hop, {})["rekeys"] = s.value
        return {"t": time.monotonic(), "hops": hops, "fetched_by_node": fetched_by_node,
                "rotations": rotations}

    # -- traffic ----------------------------------------------------------------------------

    def wait_echo(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.olab.run("client", [PY, "-m", "bench.opot", "_ping", "--host",
                                           self.server_ip, "--count", "3", "--warmup", "0",
                                           "--timeout", "0.5"], 20)
            if out.returncode == 0 and json.loads(out.stdout)["lost"] == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("no echo through the chain")

    def latency(self, pings: int, warmup: int) -> dict[str, Any]:
        out = self.olab.run("client", [PY, "-m", "bench.opot", "_ping", "--host",
                                       self.server_ip, "--count", str(pings), "--warmup",
                                       str(warmup)], 60 + pings * 0.05)
        if out.returncode != 0:
            raise RuntimeError(f"echo client failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout)
        rtts = r["rtts"]
        return {"n": len(rtts), "lost": r["lost"], "p50_ms": _pct(rtts, 0.5) * 1e3,
                "p90_ms": _pct(rtts, 0.9) * 1e3, "p99_ms": _pct(rtts, 0.99) * 1e3,
                "p999_ms": _pct(rtts, 0.999) * 1e3, "max_ms": max(rtts) * 1e3,
                "mean_ms": statistics.fmean(rtts) * 1e3,
                "over_2_ms": sum(1 for v in rtts if v > 2e-3)}

    def flood(self, size: int, seconds: float, offered_pps: float) -> dict[str, Any]:
        rate = str(int(offered_pps * size * 8))       # iperf3 -b counts payload bits
        argv = ["iperf3", "-c", self.server_ip, "-p", str(IPERF_PORT), "-u", "-b", rate,
                "-l", str(size), "-t", str(seconds), "-J"]
        data: dict[str, Any] = {}
        for _ in range(10):          # the server may be busy with the previous test's end
            before = self.counters()
            out = self.olab.run("client", argv, seconds + 30)
            after = self.counters()
            try:
                data = json.loads(out.stdout)
            except ValueError:
                data = {"error": out.stderr.strip() or "no JSON"}
            if out.returncode == 0 and not data.get("error"):
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"iperf3 -u -l {size} failed: {data.get('error')}")
        end = data["end"]
        total = end["sum"]
        sent_s = end.get("sum_sent", total)["seconds"]
        # What the server got, from its byte count: iperf3's lost_packets counts only gaps
        # before the last number the server saw, not a lost tail.
        packets = total["packets"]
        delivered = end.get("sum_received", total)["bytes"] // size
        res: dict[str, Any] = {
            "payload_bytes": size, "seconds": sent_s, "sent_packets": packets,
            "sent_pps": packets / sent_s, "delivered_packets": delivered,
            "delivered_pps": delivered / sent_s,
            "lost_percent": 100 * (1 - delivered / packets) if packets else None,
            "nodes": {}}
        for node in self.nodes:
            d = {k: after[node].get(k, 0.0) - before[node].get(k, 0.0)
                 for k in set(after[node]) | set(before[node])}
            frames = sum(d.get(k, 0.0) for k in L2R)
            cpu = d.pop("cpu_s")
            res["nodes"][node] = {
                "frames": frames, "pps": frames / sent_s,
                "cpu_share": cpu / sent_s,
                "pps_per_cpu_s": (frames + d.get("return", 0.0)) / cpu if cpu else None,
                "rx_dropped": d.get("rx_dropped", 0.0),
                "drops": {k: v for k, v in d.items() if v and k not in (*L2R, "return")}}
        return res


def _phase(b: Bench, name: str, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"loadavg": os.getloadavg()}
    res["latency"] = lat = b.latency(args.pings, args.warmup)
    print(f"  {name:8} echo p50 {lat['p50_ms']:.3f} p90 {lat['p90_ms']:.3f} p99 "
          f"{lat['p99_ms']:.3f} max {lat['max_ms']:.3f} ms, {lat['over_2_ms']} over 2 ms "
          f"(lost {lat['lost']}); load average {res['loadavg'][0]:.2f}", flush=True)
    for size in SIZES:
        res[f"udp_{size}"] = r = b.flood(size, args.seconds, args.offered_pps)
        per_node = " ".join(f"{n} {v['pps'] / 1e3:.1f}k" for n, v in r["nodes"].items())
        print(f"  {name:8} udp {size:4} B: sent {r['sent_pps'] / 1e3:.1f} kpps, delivered "
              f"{r['delivered_pps'] / 1e3:.1f} kpps; nodes {per_node}", flush=True)
    return res


def _ratios(res: dict[str, Any]) -> None:
    base = [res["phases"][p] for p in ("forward", "forward_again") if p in res["phases"]]
    for ph in res["phases"].values():
        ratio: dict[str, Any] = {}
        for size in SIZES:
            k = f"udp_{size}"
            ref = statistics.fmean(bp[k]["delivered_pps"] for bp in base)
            ratio[f"{k}_delivered"] = ph[k]["delivered_pps"] / ref
            ratio[f"{k}_nodes_per_cpu_s"] = {
                n: (v["pps_per_cpu_s"] / statistics.fmean(bp[k]["nodes"][n]["pps_per_cpu_s"]
                                                          for bp in base)
                    if v["pps_per_cpu_s"] else None)
                for n, v in ph[k]["nodes"].items()}
        for q in ("p50_ms", "p99_ms"):
            ref = statistics.fmean(bp["latency"][q] for bp in base)
            ratio[f"latency_{q}_added"] = ph["latency"][q] - ref
            ratio[f"latency_{q}_ratio"] = ph["latency"][q] / ref
        ph["vs_forward"] = ratio


def _key_budget(rekey_intervals: list[float], rotations_s: list[float], hops: int,
                measured: dict[str, Any]) -> dict[str, Any]:
    from kme.topology import load_topology

    links = {f"{link.a.removeprefix('KME_').title()}-{link.b.removeprefix('KME_').title()}":
             link.rate_bps for link in load_topology("madrid").links
             if link.key_rate_bps is not None}
    rows: dict[str, Any] = {}
    for interval in rekey_intervals:
        bps = KEY_BITS / interval
        rows[f"hop, rekey {interval:g} s"] = {"key_bits_per_s": bps, "key_bits_per_h": bps * 3600}
    for rot in rotations_s:
        bps = KEY_BITS / rot
        rows[f"profiles, rotate {rot:g} s"] = {"key_bits_per_s": bps,
                                               "key_bits_per_h": bps * 3600}
    for interval in rekey_intervals:
        for rot in rotations_s:
            bps = hops * KEY_BITS / interval + KEY_BITS / rot
            rows[f"chain ({hops} hops), rekey {interval:g} s, rotate {rot:g} s"] = {
                "key_bits_per_s": bps, "key_bits_per_h": bps * 3600}
    for name, m in measured.items():
        rows[name] = {"key_bits_per_s": m, "key_bits_per_h": m * 3600}
    for row in rows.values():
        row["fraction_of_link"] = {n: row["key_bits_per_s"] / r for n, r in links.items()}
    return {"links_bps": links, "rows": rows}


def _keys_used(started: float, end: dict[str, Any]) -> dict[str, Any]:
    """Keys since the gateway processes started (their counters start at zero)."""
    return {"seconds": end["t"] - started, "hops": end["hops"],
            "fetched_by_node": end["fetched_by_node"], "rotations": end["rotations"]}


# ---- report ------------------------------------------------------------------------------


def report(res: dict[str, Any]) -> None:
    ph = res["phases"]
    offered = f"{res['args']['offered_pps']:g} pps" if res["args"]["offered_pps"] else \
        "unlimited"
    print(f"\nOPoT chain (4 nodes) vs forward-only, same namespaces; {res['cpus']} CPUs, load "
          f"average {res['loadavg_before'][0]:.2f} before, {res['loadavg_after'][0]:.2f} "
          f"after; iperf3 -u, offered {offered} for {res['args']['seconds']:g} s")
    print(f"{'phase':16}{'echo p50':>9}{'p99':>8}{'+p50':>8}{'+p99':>8}  (ms)"
          + "".join(f"{f'{s} B kpps':>12}{'ratio':>7}" for s in SIZES))
    for name, p in ph.items():
        r = p["vs_forward"]
        print(f"{name:16}{p['latency']['p50_ms']:9.3f}{p['latency']['p99_ms']:8.3f}"
              f"{r['latency_p50_ms_added']:8.3f}{r['latency_p99_ms_added']:8.3f}      "
              + "".join(f"{p[f'udp_{s}']['delivered_pps'] / 1e3:12.1f}"
                        f"{r[f'udp_{s}_delivered']:7.2f}" for s in SIZES))
    nodes = list(next(iter(ph.values()))["udp_64"]["nodes"])
    for size in SIZES:
        print(f"\nper node, {size} B: kpps handled / kpps per CPU second (ratio to forward) "
              f"/ kernel drops")
        print(f"{'phase':16}" + "".join(f"{n:>30}" for n in nodes))
        for name, p in ph.items():
            cells = []
            for n in nodes:
                v = p[f"udp_{size}"]["nodes"][n]
                rt = p["vs_forward"][f"udp_{size}_nodes_per_cpu_s"][n]
                per_cpu = "-" if v["pps_per_cpu_s"] is None else \
                    f"{v['pps_per_cpu_s'] / 1e3:.1f}"
                ratio = "-" if rt is None else f"{rt:.2f}"
                cells.append(f"{v['pps'] / 1e3:.1f} / {per_cpu} ({ratio}) / "
                             f"{v['rx_dropped']:.0f}")
            print(f"{name:16}" + "".join(f"{c:>30}" for c in cells))
    kb = res["key_budget"]
    links = kb["links_bps"]
    print(f"\nQKD key ({KEY_BITS}-bit keys); fraction of the trial's links")
    print(f"{'':46}{'kbit/h':>9}" + "".join(f"{n:>18}" for n in links))
    print(f"{'':55}" + "".join(f"{r / 1e3:>13.1f} kb/s" for r in links.values()))
    for name, row in kb["rows"].items():
        print(f"{name[:46]:46}{row['key_bits_per_h'] / 1e3:9.1f}" +
              "".join(f"{row['fraction_of_link'][n] * 100:>17.3f}%" for n in links))
    for name in ("ordered", "plain"):
        if f"keys_{name}" not in res:
            continue
        k = res[f"keys_{name}"]
        hops = ", ".join(f"{h} {c.get('rekeys', 0):.0f} rekeys/{c.get('keys_fetched', 0):.0f} "
                         f"keys fetched" for h, c in k["hops"].items())
        print(f"{name}: {k['seconds']:.0f} s of gateways at rekey "
              f"{res['args']['rekey_interval']:g} s, rotate {res['args']['rotate_s']:g} s: "
              f"{hops} (the master's counts; first key + pool of 8 at start); profile "
              f"rotations {k['rotations']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per UDP flood")
    ap.add_argument("--offered-pps", type=float, default=0.0,
                    help="offered packets per second (0: as fast as iperf3 sends)")
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rekey-interval", type=float, default=5.0,
                    help="link rekey interval of the gateway phases")
    ap.add_argument("--rotate-s", type=float, default=15.0,
                    help="profile rotation of the gateway phases")
    ap.add_argument("--no-static", action="store_true", help="skip the static harness phase")
    ap.add_argument("--out", type=Path, default=Path("bench/results/opot.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, AF_PACKET)")
    if shutil.which("iperf3") is None:
        raise SystemExit("iperf3 is not installed: apt-get install iperf3")

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)   # unwinds through the lab's cleanup

    signal.signal(signal.SIGTERM, terminated)
    from gateways.opot.lab import NODES, SERVER_IP, OpotLab
    from qgw.netlab import Lab

    res: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in vars(args).items()},
                           "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                           "phases": {}}
    with tempfile.TemporaryDirectory(prefix="qgw-bench-opot-") as tmp:
        lab = Lab(Path(tmp))
        try:
            olab = OpotLab(lab, Path(tmp), ordered=True,
                           keys={"rekey_interval_s": args.rekey_interval},
                           rotate_s=args.rotate_s)
            b = Bench(lab, olab, Path(tmp))
            lab.start("echo", [PY, "-m", "bench.opot", "_echo", "--host", SERVER_IP],
                      env=None, ns_of="server")
            lab.start("iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)], env=None,
                      ns_of="server")
            phases = [("forward", "harness forward"), ("static", "harness ordered PoT"),
                      ("ordered", "gateway ordered"), ("plain", "gateway plain"),
                      ("forward_again", "harness forward")]
            for name, what in phases:
                if name == "static" and args.no_static:
                    continue
                print(f"phase {name}: {what}", flush=True)
                if name in ("ordered", "plain"):
                    started = time.monotonic()
                    took = b.start_gateways(ordered=name == "ordered")
                    print(f"  chain up after {took:.1f} s", flush=True)
                    res["phases"][name] = _phase(b, name, args)
                    res[f"keys_{name}"] = _keys_used(started, b.session_counters())
                else:
                    b.start_harness("forward" if name.startswith("forward") else "static")
                    res["phases"][name] = _phase(b, name, args)
                b.stop_nodes()
        finally:
            errors = lab.cleanup()
            if errors:
                print("cleanup: " + "; ".join(errors), file=sys.stderr, flush=True)
    res["loadavg_after"] = os.getloadavg()
    _ratios(res)
    measured: dict[str, float] = {}
    for name in ("ordered", "plain"):
        k = res.get(f"keys_{name}")
        if k and k["seconds"] > 0:
            per_hop = [c.get("rekeys", 0.0) for c in k["hops"].values()]
            measured[f"measured {name}: hop (rekeys)"] = (
                statistics.fmean(per_hop) * KEY_BITS / k["seconds"] if per_hop else 0.0)
            measured[f"measured {name}: chain (rekeys+rot.)"] = (
                (sum(per_hop) + k["rotations"]) * KEY_BITS / k["seconds"])
            fetched = [c.get("keys_fetched", 0.0) for c in k["hops"].values()]
            measured[f"measured {name}: hop (fetched)"] = (
                statistics.fmean(fetched) * KEY_BITS / k["seconds"] if fetched else 0.0)
    res["key_budget"] = _key_budget(sorted({1.0, 10.0, 60.0, args.rekey_interval}),
                                    sorted({args.rotate_s, 60.0}),
                                    len(NODES) - 1, measured)
    report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwritten to {args.out}")


def _helper(argv: list[str]) -> None:
    """`python -m bench.opot _echo|_ping ...`: run inside a namespace by the benchmark."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.opot {argv[0]}")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=ECHO_PORT)
    if argv[0] == "_echo":
        _echo(ap.parse_args(argv[1:]))
        return
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1.0)
    _ping(ap.parse_args(argv[1:]))


if __name__ == "__main__":
    if sys.argv[1:2] in (["_echo"], ["_ping"]):
        _helper(sys.argv[1:])
    else:
        main()
