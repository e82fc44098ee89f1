"""compose.yaml: its structure, its commands against the real CLI, and a real run.

There is no Docker engine here, so the deployment is run the way compose would
run it, with Linux network namespaces standing in for containers:

- each service gets a network namespace `qgw<random>-<service>`, with an `eth0`
  veth whose peer sits on a bridge `br0` in one more namespace `qgw<random>-net`
  (nothing is added to the host's own namespace), an address 10.77.0.x/24 and
  a hosts file /etc/netns/<ns>/hosts naming every service (compose's DNS);
  a service with `network_mode: "service:X"` gets none and runs in X's
  namespace (and starts after X, as compose makes it);
- networks: every service sits on the one bridge; a fixed `ipv4_address` on a
  compose network is added to the service's `eth0` (with the network's prefix
  length), so those addresses reach each other as on that network;
- volumes: the named volume `state` is a temporary folder, a bind mount
  (`./deploy/compose:/etc/qgw:ro`) is that repository folder;
- the command is the service's entrypoint (or the Dockerfile's ENTRYPOINT) plus
  its `command`, run as `ip netns exec <ns> <this python> -m qgw ...` (`qgw` ->
  `python -m qgw`, `python` -> this interpreter), from the repository root;
- container paths are rewritten to the mapped folders in two small places:
  arguments that start with a mount target (`/state/pki` -> `<tmp>/state/pki`),
  and for `qgw kme serve --config FILE` and `qgw gateway scada --config FILE`,
  every path in FILE that starts with a mount target, passed as a `QGW_KME__...`
  or `QGW_SCADA__...` environment override (the config files stay untouched and
  are the very ones the containers read);
- depends_on is honoured in order: `service_completed_successfully` waits for
  the exit code, `service_healthy` runs the service's healthcheck command in its
  namespace until it passes (polled faster than compose's interval, to keep the
  test short).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from apps import hmi, keysmoke, plc
from gateways.opot.config import OpotConfig
from gateways.scada.config import ScadaConfig
from gateways.scada.modbus import Direction, ModbusFilter
from qgw.config import load_model
from qgw.netlab import Lab
from qgw.pki import kme_dns_name

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
KMES = {"kme-a": "KME_A", "kme-b": "KME_B"}
# How a container's executable maps to this machine.
EXECUTABLES = {"qgw": [sys.executable, "-m", "qgw"], "python": [sys.executable]}
# The demo apps run as `python -m apps.<name>`.
APPS = {"apps.keysmoke": keysmoke, "apps.plc": plc, "apps.hmi": hmi}
# Commands that read a config file (--config), and the env prefix of its overrides.
CONFIG_ENV = {("qgw", "kme", "serve"): "QGW_KME", ("qgw", "gateway", "scada"): "QGW_SCADA"}


# -- reading compose.yaml and the Dockerfile -------------------------------------------

def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services_of(profile: str | None = None) -> dict[str, Any]:
    """What `docker compose [--profile P] up` starts: unprofiled services, plus P's."""
    return {name: svc for name, svc in load_compose()["services"].items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def image_entrypoint() -> list[str]:
    """ENTRYPOINT of the Dockerfile (exec form)."""
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "Dockerfile needs an exec-form ENTRYPOINT"
    entry = json.loads(match.group(1))
    assert isinstance(entry, list) and all(isinstance(a, str) for a in entry)
    return entry


def service_argv(svc: dict[str, Any]) -> list[str]:
    """The container's argv: its entrypoint (or the image's) plus its command."""
    entry = svc.get("entrypoint", image_entrypoint())
    command = svc.get("command", [])
    assert isinstance(entry, list) and isinstance(command, list), "use exec (list) form"
    return [*entry, *command]


def host_argv(argv: list[str]) -> list[str]:
    exe = EXECUTABLES.get(argv[0])
    assert exe is not None, f"no host equivalent for container executable {argv[0]!r}"
    return [*exe, *argv[1:]]


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def netns_owner(name: str, svc: dict[str, Any]) -> str:
    """The service whose network namespace `name` runs in (`network_mode: "service:X"`)."""
    mode = svc.get("network_mode")
    if mode is None:
        return name
    assert isinstance(mode, str) and mode.startswith("service:"), \
        f"{name}: unsupported network_mode {mode!r}"
    return mode.removeprefix("service:")


def fixed_addresses(svc: dict[str, Any]) -> dict[str, str]:
    """Compose network -> the service's `ipv4_address` on it, as ADDRESS/PREFIXLEN."""
    networks = svc.get("networks") or {}
    if isinstance(networks, list):
        return {}
    out = {}
    for net, spec in networks.items():
        address = (spec or {}).get("ipv4_address")
        if address is None:
            continue
        subnets = [ipaddress.ip_network(c["subnet"])
                   for c in load_compose()["networks"][net]["ipam"]["config"]]
        (subnet,) = [n for n in subnets if ipaddress.ip_address(address) in n]
        out[net] = f"{address}/{subnet.prefixlen}"
    return out


def needs(name: str, svc: dict[str, Any]) -> list[str]:
    """What a service waits for: its depends_on and, as compose adds, its network_mode's X."""
    owner = netns_owner(name, svc)
    return [*depends_on(svc), *([owner] if owner != name else [])]


def start_order(services: dict[str, Any], targets: list[str] | None = None) -> list[str]:
    """`targets` (default: all services) and what they need, dependencies first."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name in order:
            return
        for dep in needs(name, services[name]):
            visit(dep, (*path, name))
        order.append(name)

    for name in targets if targets is not None else services:
        visit(name, ())
    return order


def duration_s(text: str | None, default: float) -> float:
    if not text:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(text))
    assert match, f"unsupported duration {text!r}"
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


# -- mapping volumes and container paths to this machine ------------------------------

@dataclass
class Mounts:
    """Container path -> host path, for one service."""

    pairs: list[tuple[str, Path]]

    @classmethod
    def of(cls, svc: dict[str, Any], named: dict[str, Path]) -> Mounts:
        pairs = []
        for spec in svc.get("volumes", []):
            assert isinstance(spec, str), "use the short volume syntax"
            source, target = spec.split(":")[:2]
            if source.startswith((".", "/")):
                host = (REPO / source).resolve()
                assert host.is_dir(), f"bind mount source {source} is not a folder"
            else:
                host = named[source]
            pairs.append((target.rstrip("/"), host))
        return cls(sorted(pairs, key=lambda p: len(p[0]), reverse=True))

    def path(self, value: str) -> str:
        for target, host in self.pairs:
            if value == target or value.startswith(target + "/"):
                return str(host) + value[len(target):]
        return value

    def env_overrides(self, argv: list[str]) -> dict[str, str]:
        """For a command with a config file (CONFIG_ENV): PREFIX__... per container path in it."""
        prefix = CONFIG_ENV.get(tuple(argv[:3]))
        if prefix is None:
            return {}
        config = Path(self.path(argv[argv.index("--config") + 1]))
        out: dict[str, str] = {}

        def walk(node: dict[str, Any], keys: list[str]) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, [*keys, key])
                elif isinstance(value, str) and self.path(value) != value:
                    out[f"{prefix}__" + "__".join(k.upper() for k in [*keys, key])] = \
                        self.path(value)

        walk(yaml.safe_load(config.read_text()), [])
        return out


# -- structure ---------------------------------------------------------------------------

def test_compose_structure() -> None:
    compose = load_compose()
    services = services_of()
    assert {"pki", "kme-a", "kme-b", "keysmoke"} <= set(services)
    assert "state" in compose.get("volumes", {})
    for name, svc in services.items():
        assert svc.get("build") in (".", {"context": "."}), f"{name} builds the repo's image"
        assert svc.get("image") == services["pki"]["image"], "one image for every service"
        assert "state:/state" in svc.get("volumes", []), f"{name} mounts the state volume"

    assert service_argv(services["pki"]) == [
        "qgw", "pki", "init", "/state/pki", "--kme", "KME_A", "--kme", "KME_B",
        "--sae", "SAE_1@KME_A", "--sae", "SAE_2@KME_B"]

    for name, kme_id in KMES.items():
        svc = services[name]
        assert service_argv(svc) == ["qgw", "kme", "serve", "--config", f"/etc/qgw/{name}.yaml"]
        assert depends_on(svc) == {"pki": "service_completed_successfully"}
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and ":9443/health" in " ".join(test)
        mounts = Mounts.of(svc, {"state": Path("/nonexistent")})
        cfg = yaml.safe_load(Path(mounts.path(f"/etc/qgw/{name}.yaml")).read_text())
        assert cfg["kme_id"] == kme_id and kme_dns_name(kme_id) == name
        assert cfg["listen"] == {"host": "0.0.0.0", "port": 8443}
        assert cfg["metrics"] == {"host": "0.0.0.0", "port": 9443}
        assert cfg["store"].startswith("/state/")
        assert all(str(p).startswith("/state/pki/") for p in cfg["tls"].values())
        (link,) = cfg["links"]
        peer_service = kme_dns_name(link["peer"])
        assert peer_service in services and peer_service != name
        assert link["url"] == f"https://{peer_service}:8443"

    smoke = services["keysmoke"]
    assert depends_on(smoke) == {"kme-a": "service_healthy", "kme-b": "service_healthy"}
    assert service_argv(smoke)[:3] == ["python", "-m", "apps.keysmoke"]
    assert start_order(services).index("keysmoke") == len(services) - 1
    for svc in compose["services"].values():
        assert svc.get("image") == services["pki"]["image"], "one image for every service"

    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert image_entrypoint() == ["qgw"]
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image runs as non-root"


def _qgw_help(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qgw", *args, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_madrid_profile_runs_each_node_in_its_own_container() -> None:
    from kme.topology import load_topology

    madrid = load_topology("madrid")
    services = services_of("madrid")
    nodes = {kme_dns_name(k): k for k in madrid.nodes}
    assert set(services) == set(services_of()) | set(nodes) | {"madrid-prepare", "madrid-smoke"}
    assert service_argv(services["madrid-prepare"]) == [
        "qgw", "kme", "prepare", "--topology", "madrid", "--dns", "--state", "/state/madrid"]
    for name, kme in nodes.items():
        svc = services[name]
        assert service_argv(svc) == ["qgw", "kme", "up", "--topology", "madrid", "--node", kme,
                                     "--dns", "--state", "/state/madrid"]
        assert depends_on(svc) == {"madrid-prepare": "service_completed_successfully"}
        assert ":9443/health" in " ".join(svc["healthcheck"]["test"])
    assert depends_on(services["madrid-smoke"]) == dict.fromkeys(nodes, "service_healthy")


SCADA_KMES = {"kme-cc": "KME_CC", "kme-s1": "KME_S1", "kme-s2": "KME_S2"}
SCADA_GATEWAYS = {"scada-cc": "control-centre", "scada-sub1": "substation",
                  "scada-sub2": "substation"}
SCADA_BEHIND = {"plc1": "scada-sub1", "plc2": "scada-sub2", "hmi": "scada-cc"}
SCADA_TOPOLOGY = "/etc/qgw/topology.yaml"


def scada_config(name: str) -> ScadaConfig:
    """A SCADA gateway service's config file, validated by the real model (no env)."""
    svc = load_compose()["services"][name]
    argv = service_argv(svc)
    path = Mounts.of(svc, {"state": Path("/nonexistent")}).path(
        argv[argv.index("--config") + 1])
    return load_model(Path(path), ScadaConfig, env_prefix="QGW_SCADA", env={})


def modbus_packet(unit: int, pdu: bytes) -> bytes:
    """An IPv4/TCP segment from the control centre's HMI to a PLC carrying one request."""
    adu = struct.pack(">HHHB", 1, 0, len(pdu) + 1, unit) + pdu
    tcp = struct.pack(">HHIIBBHHH", 40000, 502, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40 + len(adu), 1, 0x4000, 64, 6, 0,
                     bytes([10, 99, 0, 1]), bytes([10, 99, 1, 1]))
    return ip + tcp + adu


def test_scada_profile_structure() -> None:
    from kme.topology import load_topology

    services = services_of("scada")
    assert set(services) == set(services_of()) | {"scada-prepare", *SCADA_KMES,
                                                  *SCADA_GATEWAYS, *SCADA_BEHIND}
    assert set(services_of("madrid")).isdisjoint({*SCADA_KMES, *SCADA_GATEWAYS})
    prepare = services["scada-prepare"]
    assert service_argv(prepare) == ["qgw", "kme", "prepare", "--topology", SCADA_TOPOLOGY,
                                     "--dns", "--state", "/state/scada"]
    mounts = Mounts.of(prepare, {"state": Path("/nonexistent")})
    topology = load_topology(mounts.path(SCADA_TOPOLOGY))
    assert {kme_dns_name(k): k for k in topology.nodes} == SCADA_KMES
    assert {frozenset((link.a, link.b)) for link in topology.links} == {
        frozenset(("KME_CC", "KME_S1")), frozenset(("KME_CC", "KME_S2"))}
    for name, kme in SCADA_KMES.items():
        svc = services[name]
        assert service_argv(svc) == ["qgw", "kme", "up", "--topology", SCADA_TOPOLOGY,
                                     "--node", kme, "--dns", "--state", "/state/scada"]
        assert depends_on(svc) == {"scada-prepare": "service_completed_successfully"}
        assert ":9443/health" in " ".join(svc["healthcheck"]["test"])

    configs = {name: scada_config(name) for name in SCADA_GATEWAYS}
    wan: dict[str, str] = {}
    for name, role in SCADA_GATEWAYS.items():
        svc, cfg = services[name], configs[name]
        assert service_argv(svc)[:5] == ["qgw", "gateway", "scada", "--config",
                                         f"/etc/qgw/{name}.yaml"]
        assert "NET_ADMIN" in svc.get("cap_add", []), f"{name} needs NET_ADMIN"
        assert "/dev/net/tun" in svc.get("devices", []), f"{name} needs /dev/net/tun"
        assert svc.get("user") in ("root", "0", "0:0"), "cap_add reaches root only"
        assert cfg.role == role and cfg.pki == Path("/state/scada/pki")
        kme = topology.saes[cfg.sae]             # the gateways are the topology's SAEs
        assert cfg.kme == f"https://{kme_dns_name(kme)}:8443"
        assert depends_on(svc) == {kme_dns_name(kme): "service_healthy"}
        assert cfg.metrics is not None
        assert f":{cfg.metrics.port}/metrics" in " ".join(svc["healthcheck"]["test"])
        (wan[name],) = [a.split("/")[0] for a in fixed_addresses(svc).values()]
    assert set(topology.saes) == {c.sae for c in configs.values()}

    # Every pair, seen from both ends: endpoints, control channel, routes, keys.
    cc = configs["scada-cc"]
    by_sae = {cfg.sae: name for name, cfg in configs.items()}
    assert sorted(by_sae[sub.sae] for sub in cc.substations) == ["scada-sub1", "scada-sub2"]
    for sub in cc.substations:
        name = by_sae[sub.sae]
        far = configs[name].control_centre
        assert far is not None and (far.pair, far.sae) == (sub.pair, cc.sae)
        assert sub.endpoint == f"{wan[name]}:{configs[name].listen.port}"
        assert far.endpoint == f"{wan['scada-cc']}:{cc.listen.port}"
        assert sub.control == f"{name}:{far.control_listen.port}"
        assert sub.routes == [configs[name].tun.address.network]
        assert far.routes == [cc.tun.address.network]
        assert configs[name].keys == cc.keys

    # PLCs and HMI: in their gateway's namespace, on its tunnel address.
    tunnel = {name: str(cfg.tun.address.ip) for name, cfg in configs.items()}
    for name, owner in SCADA_BEHIND.items():
        svc = services[name]
        assert netns_owner(name, svc) == owner
        assert owner in depends_on(svc)
        assert not svc.get("ports") and not svc.get("networks")
    for name in ("plc1", "plc2"):
        opts = plc.parse_args(service_argv(services[name])[3:])
        assert (opts.host, opts.port) == (tunnel[SCADA_BEHIND[name]], 502)
    opts_hmi = hmi.parse_args(service_argv(services["hmi"])[3:])
    assert (opts_hmi.host, opts_hmi.port) == (tunnel["scada-sub1"], 502)
    assert opts_hmi.duration is not None and opts_hmi.duration <= 30 and opts_hmi.quiet
    # `up hmi` brings up the whole SCADA network (and nothing else) before the HMI polls.
    assert depends_on(services["hmi"]) == {
        **dict.fromkeys(SCADA_GATEWAYS, "service_healthy"),
        "plc1": "service_started", "plc2": "service_started"}
    assert set(start_order(services, ["hmi"])) == {name for name, svc in services.items()
                                                   if "scada" in svc.get("profiles", [])}
    assert start_order(services)[-1] == "hmi"

    # Substation 1's Modbus policy does what its comments say.
    policy = configs["scada-sub1"].modbus
    assert policy is not None and policy.enforce_inbound and policy.port == 502
    check = ModbusFilter(policy).check
    allowed = {
        "read input registers 0..9": struct.pack(">BHH", 4, 0, 10),
        "read coils 0..2": struct.pack(">BHH", 1, 0, 3),
        "read discrete inputs 0..3": struct.pack(">BHH", 2, 0, 4),
        "read holding registers 0..1": struct.pack(">BHH", 3, 0, 2),
        "open CB3": struct.pack(">BHH", 5, 2, 0x0000),
        "close CB1..CB3": struct.pack(">BHHBB", 15, 0, 3, 1, 0b111),
    }
    refused = {
        "write coil 3": struct.pack(">BHH", 5, 3, 0xFF00),
        "write V_SETPOINT": struct.pack(">BHH", 6, 0, 2300),
        "write I_LIMIT (multiple)": struct.pack(">BHHBH", 16, 1, 1, 2, 2000),
        "diagnostics": struct.pack(">BHH", 8, 0, 0),
    }
    for what, pdu in allowed.items():
        assert check(modbus_packet(1, pdu), Direction.INBOUND).reason == "allowed", what
    for what, pdu in refused.items():
        assert check(modbus_packet(1, pdu), Direction.INBOUND).reason == "denied", what
    other_unit = modbus_packet(2, allowed["read coils 0..2"])
    assert check(other_unit, Direction.INBOUND).reason == "denied"
    assert configs["scada-sub2"].modbus is None


# -- OPoT (profile "opot") -------------------------------------------------------------
# Structure only. There is no namespace run of this profile: its data path needs
# point-to-point links between neighbours (one compose network per hop, each interface
# named by `interface_name`), which the namespace runner above does not model (every
# service gets one eth0 on one bridge). The same node commands and configs run in
# namespaces, on veth pairs, in tests/gateways/opot/test_opot_netns.py.
OPOT_NODES = {"opot-ingress": "INGRESS", "opot-sf1": "SF1", "opot-sf2": "SF2",
              "opot-egress": "EGRESS"}
OPOT_KMES = {"kme-opot-a": "KME_OPOT_A", "kme-opot-b": "KME_OPOT_B"}
OPOT_HOSTS = ["client", "server"]
OPOT_TOPOLOGY = "/etc/qgw/topology.yaml"


def opot_config(name: str) -> OpotConfig:
    """An OPoT node service's config file, validated by the real model (no env)."""
    svc = load_compose()["services"][name]
    argv = service_argv(svc)
    path = Mounts.of(svc, {"state": Path("/nonexistent")}).path(
        argv[argv.index("--config") + 1])
    return load_model(Path(path), OpotConfig, env_prefix="QGW_OPOT", env={})


def hop_networks(svc: dict[str, Any]) -> dict[str, str]:
    """The service's opot-hop networks -> the interface name compose gives each."""
    return {net: spec["interface_name"] for net, spec in (svc.get("networks") or {}).items()
            if net.startswith("opot-hop")}


def test_opot_profile_structure() -> None:
    from kme.topology import load_topology

    services = services_of("opot")
    assert set(services) == set(services_of()) | {"opot-prepare", *OPOT_KMES, *OPOT_NODES,
                                                  *OPOT_HOSTS}
    assert set(services_of("scada")).isdisjoint({*OPOT_KMES, *OPOT_NODES, *OPOT_HOSTS})
    prepare = services["opot-prepare"]
    assert service_argv(prepare) == ["qgw", "kme", "prepare", "--topology", OPOT_TOPOLOGY,
                                     "--dns", "--state", "/state/opot"]
    topology = load_topology(Mounts.of(prepare, {"state": Path("/nonexistent")})
                             .path(OPOT_TOPOLOGY))
    assert {kme_dns_name(k): k for k in topology.nodes} == OPOT_KMES
    assert [frozenset((link.a, link.b)) for link in topology.links] == [
        frozenset(OPOT_KMES.values())]
    for name, kme in OPOT_KMES.items():
        svc = services[name]
        assert service_argv(svc) == ["qgw", "kme", "up", "--topology", OPOT_TOPOLOGY,
                                     "--node", kme, "--dns", "--state", "/state/opot"]
        assert depends_on(svc) == {"opot-prepare": "service_completed_successfully"}

    configs = {name: opot_config(name) for name in OPOT_NODES}
    order = list(OPOT_NODES)
    path = [OPOT_NODES[n] for n in order]
    for where, (name, node) in enumerate(OPOT_NODES.items()):
        svc, cfg = services[name], configs[name]
        assert service_argv(svc)[:5] == ["qgw", "gateway", "opot", "--config",
                                         f"/etc/qgw/{name}.yaml"]
        assert {"NET_ADMIN", "NET_RAW"} <= set(svc.get("cap_add", [])), name
        assert svc.get("user") in ("root", "0", "0:0"), "cap_add reaches root only"
        assert cfg.node == node and cfg.path.nodes == path and cfg.sae == f"SAE_{node}"
        assert cfg.role == ("ingress" if where == 0 else "egress" if where == 3 else "transit")
        assert cfg.pki == Path("/state/opot/pki")
        kme = topology.saes[cfg.sae]             # the nodes are the topology's SAEs
        assert cfg.kme == f"https://{kme_dns_name(kme)}:8443"
        assert depends_on(svc) == {kme_dns_name(kme): "service_healthy"}
        assert "default" in svc["networks"], f"{name} reaches KMEs and peers on default"
        hops = hop_networks(svc)
        assert hops == {f"opot-hop{where}": cfg.interfaces.left,
                        f"opot-hop{where + 1}": cfg.interfaces.right}, name
        assert cfg.metrics is not None
        assert f":{cfg.metrics.port}/metrics" in " ".join(svc["healthcheck"]["test"])
    assert set(topology.saes) == {c.sae for c in configs.values()}

    # Neighbours share exactly one hop network, and only they: a line, not a bridge.
    chain = ["client", *order, "server"]
    members: dict[str, set[str]] = {}
    for name in chain:
        for net in hop_networks(services[name]):
            members.setdefault(net, set()).add(name)
    assert members == {f"opot-hop{i}": {chain[i], chain[i + 1]} for i in range(5)}
    for a, b in itertools.pairwise(chain):
        shared = set(hop_networks(services[a])) & set(hop_networks(services[b]))
        assert len(shared) == 1, (a, b, shared)
    networks = load_compose()["networks"]
    for i in range(1, 4):                        # NSH inside the chain: 54 bytes more
        assert int(networks[f"opot-hop{i}"]["driver_opts"]["com.docker.network.driver.mtu"]) \
            >= 1500 + 54

    # Links: each node's downstream is the next node's upstream, by service name.
    for a, b in itertools.pairwise(order):
        down, up = configs[a].downstream, configs[b].upstream
        assert down is not None and up is not None
        assert down.sae == configs[b].sae and up.sae == configs[a].sae
        assert down.connect == f"{b}:{up.listen.port}"
    # The egress's controller lists the other three nodes, their SAEs and profile listeners.
    egress = configs["opot-egress"]
    assert egress.controller is not None
    assert [(n.node, n.sae, n.address) for n in egress.controller.nodes] == [
        (cfg.node, cfg.sae, f"{name}:{cfg.profiles_listen.port}")
        for name, cfg in configs.items() if cfg.profiles_listen is not None]
    assert len(egress.controller.nodes) == 3
    assert all(cfg.controller_sae == egress.sae for name, cfg in configs.items()
               if name != "opot-egress")

    # The hosts: one data interface each, on the chain's ends; the client waits for the
    # whole chain and is the smoke check.
    for name in OPOT_HOSTS:
        svc = services[name]
        assert "NET_ADMIN" in svc.get("cap_add", []) and svc.get("user") == "root"
        assert list(svc["networks"]) == [f"opot-hop{0 if name == 'client' else 4}"]
        assert hop_networks(svc) == dict.fromkeys(svc["networks"], "data")
    assert depends_on(services["client"]) == {**dict.fromkeys(OPOT_NODES, "service_healthy"),
                                              "server": "service_started"}
    assert set(start_order(services, ["client"])) == {
        name for name, svc in services.items() if "opot" in svc.get("profiles", [])}


@pytest.mark.parametrize("service", ["pki", "kme-a", "kme-b", "keysmoke", "madrid-prepare",
                                     "kme-norte", "madrid-smoke", "scada-prepare", "kme-cc",
                                     "scada-cc", "scada-sub1", "scada-sub2", "plc1", "plc2",
                                     "hmi", "opot-prepare", "kme-opot-a", "kme-opot-b",
                                     "opot-ingress", "opot-sf1", "opot-sf2", "opot-egress",
                                     "client", "server"])
def test_service_command_parses(service: str) -> None:
    """Each service's argv is accepted by the real CLI (instead of `docker compose config`).

    `--help` is eager, so appending it checks subcommand and option names
    (click rejects an unknown option before showing help) without running anything.
    The demo apps' argparse parsers are called directly (they exit 2 on a bad argument).
    """
    argv = service_argv(load_compose()["services"][service])
    if argv[0] == "qgw":
        result = _qgw_help(argv[1:])
        assert result.returncode == 0, result.stderr
        words = [a for a in argv[1:3] if not a.startswith("-")]
        assert f"Usage: qgw {' '.join(words)}" in result.stdout
        return
    if argv[0] == "python" and argv[1].endswith(".py"):
        # A script from a bind mount (the OPoT profile's hosts): its argparse parser.
        svc = load_compose()["services"][service]
        script = Mounts.of(svc, {"state": Path("/nonexistent")}).path(argv[1])
        result = subprocess.run([sys.executable, script, *argv[2:], "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
        return
    assert argv[:2] == ["python", "-m"] and argv[2] in APPS, argv
    opts = APPS[argv[2]].parse_args(argv[3:])
    if argv[2] == "apps.keysmoke":
        assert (opts.master, opts.slave) in (("SAE_1", "SAE_2"), ("SAE_ALMAGRO", "SAE_UAM"))
    result = subprocess.run([sys.executable, "-m", argv[2], "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout


def test_command_check_rejects_a_bad_option() -> None:
    """The check above is not vacuous: a misspelt option fails even with --help."""
    assert _qgw_help(["kme", "serve", "--konfig", "/etc/qgw/kme-a.yaml"]).returncode == 2
    assert _qgw_help(["kme", "srve"]).returncode == 2


# -- namespaces ----------------------------------------------------------------------------

def wait_exit(lab: Lab, service: str, timeout_s: float) -> int:
    try:
        return lab.procs[service].wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{service} still running after {timeout_s:.0f} s:\n"
                             f"{lab.tail(service)}") from None


def wait_healthy(lab: Lab, service: str, svc: dict[str, Any], timeout_s: float) -> None:
    check = svc["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD", "healthcheck in exec form (CMD)"
    argv = host_argv(test[1:])
    per_try = duration_s(check.get("timeout"), 30.0)
    deadline = time.monotonic() + timeout_s
    while True:
        proc = lab.procs[service]
        if proc.poll() is not None:
            raise AssertionError(f"{service} exited with code {proc.returncode}:\n"
                                 f"{lab.tail(service)}")
        if lab.run(service, argv, per_try) == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{service} not healthy after {timeout_s:.0f} s:\n"
                                 f"{lab.tail(service)}")
        time.sleep(0.2)


def run_in_namespaces(lab: Lab, profile: str | None, smoke: str, *, only_smoke: bool = False,
                      smoke_timeout_s: float = 90) -> dict[str, Path]:
    """Start a profile's services in dependency order; wait for `smoke` to exit 0.

    With `only_smoke`, what `docker compose --profile P up SMOKE` starts: `smoke`
    and what it depends on.
    """
    services = services_of(profile)
    order = start_order(services, [smoke] if only_smoke else None)
    assert order[-1] == smoke
    named = {name: lab.tmp / "volumes" / name for name in load_compose().get("volumes", {})}
    for path in named.values():
        path.mkdir(parents=True)
    owners = {name: netns_owner(name, services[name]) for name in order}
    lab.setup([name for name in order if owners[name] == name])
    for name in order:
        for address in fixed_addresses(services[name]).values():
            subprocess.run(["ip", "-n", lab.namespaces[name], "addr", "add", address,
                            "dev", "eth0"], check=True, capture_output=True, timeout=10)

    for service in order:
        svc = services[service]
        for dep, condition in depends_on(svc).items():
            if condition == "service_completed_successfully":
                code = wait_exit(lab, dep, 30)
                assert code == 0, f"{dep} exited with code {code}:\n{lab.tail(dep)}"
            elif condition == "service_healthy":
                wait_healthy(lab, dep, services[dep], 60)
        mounts = Mounts.of(svc, named)
        argv = service_argv(svc)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QGW_")}
        env.update({k: mounts.path(str(v)) for k, v in svc.get("environment", {}).items()})
        env.update(mounts.env_overrides(argv))
        env["PYTHONUNBUFFERED"] = "1"
        lab.start(service, host_argv([mounts.path(a) for a in argv]), env,
                  ns_of=owners[service])

    code = wait_exit(lab, smoke, smoke_timeout_s)
    assert code == 0, f"{smoke} exited with code {code}:\n{lab.tail(smoke)}"
    return named


def assert_keys_matched(lab: Lab, smoke: str) -> None:
    """A keysmoke run's output: 8 keys fetched at both ends, all equal."""
    out = lab.tail(smoke)
    assert re.search(r"OK: 8/8 keys matched", out), out
    assert len(re.findall(r"key_ID [0-9a-f-]{36}", out)) == 8, out


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_compose_runs_in_namespaces(lab: Lab) -> None:
    started = time.monotonic()
    named = run_in_namespaces(lab, None, "keysmoke")
    assert_keys_matched(lab, "keysmoke")
    # The KMEs saw each other through the service names and stored into the volume.
    assert (named["state"] / "store" / "KME_A.sqlite").exists()
    assert (named["state"] / "pki" / "sae" / "SAE_2.pem").exists()
    for kme in KMES:
        assert lab.procs[kme].poll() is None, f"{kme} died:\n{lab.tail(kme)}"
    print(f"compose in namespaces: {time.monotonic() - started:.1f} s")


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_madrid_profile_runs_in_namespaces(lab: Lab) -> None:
    """13 KME containers of the Madrid network; keys relayed Almagro -> UAM over 5 hops."""
    named = run_in_namespaces(lab, "madrid", "madrid-smoke")
    assert_keys_matched(lab, "madrid-smoke")
    assert len(list((named["state"] / "madrid" / "store").glob("*.sqlite"))) == 13
    assert "link KME_ALMAGRO -> KME_UAM" in lab.tail("madrid-smoke")


def scrape(lab: Lab, service: str, port: int) -> str:
    """A service's Prometheus /metrics, fetched inside its namespace."""
    url = f"http://127.0.0.1:{port}/metrics"
    out = lab.output(service, [sys.executable, "-c", "import urllib.request as u; "
                               f"print(u.urlopen({url!r}, timeout=5).read().decode())"], 20)
    assert out.returncode == 0, out.stderr
    return out.stdout


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for match in re.finditer(rf"^{name}(?:{{(.*)}})? (\S+)$", text, re.MULTILINE):
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_scada_profile_runs_in_namespaces(lab: Lab) -> None:
    """Three KMEs, three SCADA gateways, two PLCs behind the tunnels, the HMI's smoke run."""
    started = time.monotonic()
    run_in_namespaces(lab, "scada", "hmi", only_smoke=True)
    took = time.monotonic() - started
    # The HMI polled plc1 through the tunnel (and substation 1's Modbus policy) for
    # --duration, and every poll of 3 requests came back once, in order.
    out = lab.tail("hmi")
    summary = re.search(r"summary: polls (\d+), ok (\d+), failed 0, requests (\d+), "
                        r"duplicate responses 0, out-of-order responses 0, reconnects 0", out)
    assert summary, out
    polls, ok, requests = map(int, summary.groups())
    assert ok == polls >= 100 and requests == 3 * polls, out
    for name in (*SCADA_GATEWAYS, "plc1", "plc2"):
        assert lab.procs[name].poll() is None, f"{name} died:\n{lab.tail(name)}"
    # Keys: every pair is protected by a QKD key; the cc rekeyed under the HMI's traffic.
    cc_log = lab.tail("scada-cc")
    for pair in (1, 2):
        epochs = [int(e) for e in re.findall(rf"pair {pair}: epoch (\d+) \(qkd\)", cc_log)]
        assert epochs, cc_log
    assert max(int(e) for e in re.findall(r"pair 1: epoch (\d+)", cc_log)) >= 2, cc_log
    for name in ("scada-sub1", "scada-sub2"):
        assert re.search(r"pair \d: epoch \d+ \(qkd\)", lab.tail(name)), lab.tail(name)
    sub1 = scrape(lab, "scada-sub1", 9600)
    assert metric(sub1, "qgw_scada_pair_protected") == 1
    assert metric(sub1, "qgw_scada_received_packets_total") >= requests
    assert metric(sub1, "qgw_scada_dropped_packets_total", reason="policy") == 0
    print(f"scada profile in namespaces: {took:.1f} s")
