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
  test short);
- the two third-party images of the ledger profile run the same programs installed
  here: `mosquitto` is Debian's /usr/sbin/mosquitto, `anvil` the one tools/package.json
  pins (the image's tag is that version). Mosquitto's own config file is not rewritten:
  it runs without its persistence folder (it cannot save its queue at exit, which the
  test does not need).
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
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from apps import hmi, keysmoke, plc, sensors, udpstream
from apps.videocall import server as videocall
from gateways.ipsec.config import IpsecConfig
from gateways.ipsec.config import load as load_ipsec_config
from gateways.ledger.config import LedgerConfig
from gateways.opot.config import OpotConfig
from gateways.scada.config import ScadaConfig
from gateways.scada.modbus import Direction, ModbusFilter
from gateways.webrtc.config import WebrtcConfig
from qgw.config import load_model
from qgw.netlab import Lab
from qgw.netlab import metric_value as metric
from qgw.pki import kme_dns_name
from tests.gateways.ledger.broker import mosquitto_binary
from tests.gateways.ledger.nodes import anvil_binary

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
KMES = {"kme-a": "KME_A", "kme-b": "KME_B"}
# How a container's executable maps to this machine.
EXECUTABLES = {"qgw": [sys.executable, "-m", "qgw"], "python": [sys.executable]}
# Services of third-party images (the ledger profile's broker and node): their image, by
# service, and where their executable is here (looked up when a service runs).
THIRD_PARTY_IMAGES = {"mosquitto": "eclipse-mosquitto", "anvil": "ghcr.io/foundry-rs/foundry"}
THIRD_PARTY_EXECUTABLES = {"mosquitto": mosquitto_binary, "anvil": anvil_binary}
# The demo apps run as `python -m apps.<name>`.
APPS = {"apps.keysmoke": keysmoke, "apps.plc": plc, "apps.hmi": hmi, "apps.sensors": sensors,
        "apps.videocall.server": videocall}
# Commands that read a config file (--config), and the env prefix of its overrides.
CONFIG_ENV = {("qgw", "kme", "serve"): "QGW_KME", ("qgw", "gateway", "scada"): "QGW_SCADA",
              ("qgw", "gateway", "ledger"): "QGW_LEDGER",
              ("qgw", "gateway", "webrtc"): "QGW_WEBRTC",
              ("qgw", "gateway", "opot"): "QGW_OPOT"}


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
    if exe is None and argv[0] in THIRD_PARTY_EXECUTABLES:
        exe = [str(THIRD_PARTY_EXECUTABLES[argv[0]]())]
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
    for name, svc in compose["services"].items():
        if name in THIRD_PARTY_IMAGES:      # checked with the ledger profile
            continue
        assert svc.get("image") == services["pki"]["image"], "one image for every service"
        assert svc.get("build") in (".", {"context": "."}), f"{name} builds the repo's image"

    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    # Every gateway is in the image, the ledger gateway's extra packages too.
    install = re.search(r'^RUN pip install "\.\[([\w,]+)\]"', dockerfile, re.MULTILINE)
    assert install and {"ledger", "webrtc"} <= set(install.group(1).split(","))
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
# Its data path is a line of point-to-point hop networks (each interface named by
# `interface_name`): the namespace runner makes each a veth pair (point_to_point).
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


# -- IoT to ledger (profile "ledger") ----------------------------------------------------
LEDGER_GATEWAYS = {"ledger-writer": "writer", "ledger-reader": "reader"}
LEDGER_OTHERS = ["mosquitto", "anvil", "ledger-account", "sensors", "ledger-smoke"]
LEDGER_DEPLOY = REPO / "deploy" / "ledger"


def ledger_config(name: str) -> LedgerConfig:
    """A ledger gateway service's config file, validated by the real model (no env)."""
    svc = load_compose()["services"][name]
    argv = service_argv(svc)
    path = Mounts.of(svc, {"state": Path("/nonexistent")}).path(
        argv[argv.index("--config") + 1])
    return load_model(Path(path), LedgerConfig, env_prefix="QGW_LEDGER", env={})


def mosquitto_settings(svc: dict[str, Any]) -> dict[str, str]:
    """The broker's config file (the one its command names), as {option: value}."""
    argv = service_argv(svc)
    mounts = Mounts.of(svc, {"mosquitto-data": Path("/nonexistent")})
    text = Path(mounts.path(argv[argv.index("-c") + 1])).read_text()
    return dict(line.split(None, 1) for line in text.splitlines()
                if line.strip() and not line.startswith("#") and " " in line)


def test_ledger_profile_structure() -> None:
    import runpy

    services = services_of("ledger")
    ledger = {*LEDGER_GATEWAYS, *LEDGER_OTHERS}
    assert set(services) == set(services_of()) | ledger
    for other in ("madrid", "scada", "opot"):
        assert set(services_of(other)).isdisjoint(ledger)
    volumes = load_compose()["volumes"]
    assert {"ledger-chain", "mosquitto-data"} <= set(volumes)

    # The broker and the node: official images, pinned; anvil the version the tests run.
    broker, node = services["mosquitto"], services["anvil"]
    assert broker["image"] == "eclipse-mosquitto:2" and "build" not in broker
    tools = json.loads((REPO / "tools" / "package.json").read_text())
    anvil_version = tools["devDependencies"]["@foundry-rs/anvil"]
    assert node["image"] == f"{THIRD_PARTY_IMAGES['anvil']}:v{anvil_version}"
    assert "build" not in node
    assert service_argv(broker) == ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
    assert "mosquitto-data:/mosquitto/data" in broker["volumes"]
    conf = mosquitto_settings(broker)
    assert conf["listener"] == "1883" and conf["persistence"] == "true"
    assert conf["persistence_location"].rstrip("/") == "/mosquitto/data"
    assert service_argv(node) == ["anvil", "--host", "0.0.0.0", "--state", "/data/state.json"]
    assert "ledger-chain:/data" in node["volumes"] and node.get("user") == "root"

    # Writer and reader: each other's SAE, each at its own KME, one chain, one contract.
    writer, reader = ledger_config("ledger-writer"), ledger_config("ledger-reader")
    for name, role in LEDGER_GATEWAYS.items():
        svc, cfg = services[name], ledger_config(name)
        assert service_argv(svc)[:5] == ["qgw", "gateway", "ledger", "--config",
                                         f"/etc/qgw/{role}.yaml"]
        assert cfg.role == role and cfg.pki == Path("/state/pki") and cfg.key_api == "004"
        assert cfg.ledger.url == "http://anvil:8545" and cfg.ledger.contract is None
        assert cfg.state.is_relative_to("/state")
        assert cfg.metrics is not None
        assert f"127.0.0.1:{cfg.metrics.port}/metrics" in " ".join(svc["healthcheck"]["test"])
        assert "qgw_ledger_up" in " ".join(svc["healthcheck"]["test"])
        assert svc.get("user") is None, "no privileges needed: the image's user"
    pki_argv = service_argv(services["pki"])
    attached = dict(pki_argv[i + 1].split("@") for i, a in enumerate(pki_argv) if a == "--sae")
    assert (writer.sae, reader.sae) == (reader.peer_sae, writer.peer_sae) == ("SAE_1", "SAE_2")
    assert writer.kme == f"https://{kme_dns_name(attached[writer.sae])}:8443"
    assert reader.kme == f"https://{kme_dns_name(attached[reader.sae])}:8443"
    assert writer.kme != reader.kme
    assert reader.ledger.contract_file == writer.contract_file
    assert reader.reader is not None and reader.reader.out.is_relative_to(reader.state)
    assert writer.writer is not None and writer.writer.mqtt is not None
    assert (writer.writer.mqtt.host, writer.writer.mqtt.port) == ("mosquitto",
                                                                   int(conf["listener"]))
    assert depends_on(services["ledger-writer"]) == {
        "kme-a": "service_healthy", "ledger-account": "service_completed_successfully",
        "mosquitto": "service_started", "anvil": "service_started"}
    assert depends_on(services["ledger-reader"]) == {"kme-b": "service_healthy",
                                                     "ledger-writer": "service_healthy"}
    assert "mqtt_subscribed" in " ".join(services["ledger-writer"]["healthcheck"]["test"])

    # The writer's account: the one dev_account.py writes, the one the reader accepts.
    account = services["ledger-account"]
    argv = service_argv(account)
    mounts = Mounts.of(account, {"state": Path("/nonexistent")})
    assert argv[:2] == ["python", "/etc/qgw/dev_account.py"]
    assert argv[2:] == [str(writer.account_file)]
    script = runpy.run_path(mounts.path(argv[1]))
    assert reader.reader.writers == [script["ANVIL_ACCOUNT_0"]]
    from eth_account import Account
    Account.enable_unaudited_hdwallet_features()
    assert Account.from_mnemonic(script["ANVIL_MNEMONIC"]).address == script["ANVIL_ACCOUNT_0"]

    # The fleet: the trial's, into the broker the writer reads, devices the writer knows.
    fleet_svc = services["sensors"]
    fleet = sensors.parse_args(service_argv(fleet_svc)[3:])
    assert fleet.broker == ("mosquitto", int(conf["listener"])) and fleet.rest is None
    assert fleet.devices == writer.writer.devices.count == 10 and fleet.first == 1
    assert fleet.rate == sensors.TRIAL_RATE and fleet.prefix == writer.writer.mqtt.prefix
    assert fleet.state is not None and fleet.state.is_relative_to("/state")
    assert depends_on(fleet_svc) == {"ledger-writer": "service_healthy",
                                     "mosquitto": "service_started"}

    # The smoke check reads both gateways' metrics listeners, by service name.
    smoke = service_argv(services["ledger-smoke"])
    assert smoke[:2] == ["python", "/etc/qgw/smoke.py"]
    assert writer.metrics is not None and reader.metrics is not None
    assert smoke[smoke.index("--writer") + 1] == f"ledger-writer:{writer.metrics.port}"
    assert smoke[smoke.index("--reader") + 1] == f"ledger-reader:{reader.metrics.port}"
    assert depends_on(services["ledger-smoke"]) == {"ledger-reader": "service_healthy",
                                                    "sensors": "service_started"}
    # `up ledger-smoke` starts the ledger profile and the KMEs it needs, nothing else.
    assert set(start_order(services, ["ledger-smoke"])) == ledger | {"pki", "kme-a", "kme-b"}


# -- WebRTC (profile "webrtc") ----------------------------------------------------------
WEBRTC_GATEWAYS = {"webrtc-camera": "camera", "webrtc-viewer": "viewer"}
WEBRTC_OTHERS = {"videocall", "webrtc-smoke"}


def webrtc_config(name: str) -> WebrtcConfig:
    svc = services_of("webrtc")[name]
    argv = service_argv(svc)
    mounts = Mounts.of(svc, {"state": Path("/nonexistent")})
    return load_model(Path(mounts.path(argv[argv.index("--config") + 1])), WebrtcConfig)


def test_webrtc_profile_structure() -> None:
    services = services_of("webrtc")
    webrtc = {*WEBRTC_GATEWAYS, *WEBRTC_OTHERS}
    assert set(services) == set(services_of()) | webrtc
    for other in ("madrid", "scada", "opot", "ledger", "ipsec"):
        assert set(services_of(other)).isdisjoint(webrtc)
    server = services["videocall"]
    opts = videocall.parse_args(service_argv(server)[3:])
    assert (opts.host, opts.port) == ("0.0.0.0", 8090)
    assert f"127.0.0.1:{opts.port}/healthz" in " ".join(server["healthcheck"]["test"])
    assert f"127.0.0.1:{opts.port}:{opts.port}" in server["ports"]

    camera, viewer = webrtc_config("webrtc-camera"), webrtc_config("webrtc-viewer")
    pki_argv = service_argv(services["pki"])
    attached = dict(pki_argv[i + 1].split("@") for i, a in enumerate(pki_argv) if a == "--sae")
    assert (camera.role, viewer.role) == ("master", "slave")
    assert (camera.sae, viewer.sae) == (viewer.peer.sae, camera.peer.sae) == ("SAE_1", "SAE_2")
    for name, cfg in (("webrtc-camera", camera), ("webrtc-viewer", viewer)):
        svc = services[name]
        assert service_argv(svc)[:5] == ["qgw", "gateway", "webrtc", "--config",
                                         f"/etc/qgw/{WEBRTC_GATEWAYS[name]}.yaml"]
        assert cfg.kme == f"https://{kme_dns_name(attached[cfg.sae])}:8443"
        assert cfg.pki == Path("/state/pki") and cfg.key_api == "004"
        assert cfg.media == "aiortc" and cfg.call.room == camera.call.room
        assert str(cfg.call.signal).rstrip("/") == f"http://videocall:{opts.port}"
        assert svc.get("user") is None, "no privileges needed: the image's user"
        assert depends_on(svc)[f"kme-{'a' if cfg.sae == 'SAE_1' else 'b'}"] == "service_healthy"
        assert depends_on(svc)["videocall"] == "service_healthy"
    assert camera.call.name != viewer.call.name
    assert camera.kme != viewer.kme
    assert viewer.control_listen is not None
    assert camera.control_connect == ("webrtc-viewer", viewer.control_listen.port)
    assert viewer.metrics is not None and camera.metrics is not None
    health = " ".join(services["webrtc-viewer"]["healthcheck"]["test"])
    assert f"127.0.0.1:{viewer.metrics.port}/metrics" in health and "qgw_webrtc_protected" in health

    smoke = service_argv(services["webrtc-smoke"])
    assert smoke[:2] == ["python", "/etc/qgw/smoke.py"]
    assert smoke[smoke.index("--camera") + 1] == f"webrtc-camera:{camera.metrics.port}"
    assert smoke[smoke.index("--viewer") + 1] == f"webrtc-viewer:{viewer.metrics.port}"
    # `up webrtc-smoke` starts the call and the KMEs it needs, nothing else.
    assert set(start_order(services, ["webrtc-smoke"])) == webrtc | {"pki", "kme-a", "kme-b"}


# -- IPsec (profile "ipsec") -----------------------------------------------------------
# Structure only: this profile cannot run here. Its gateways need ESP in the kernel, and
# this one has none (`qgw gateway ipsec` stops at start, naming CONFIG_INET_ESP), so the
# namespace run the other profiles get is not possible for this one; nor does the
# namespace runner above model its networks (every service there has one eth0 on one
# bridge; here the gateways sit on the transit network and on their site's internal LAN,
# each site host on its LAN only). The same gateway commands, in the same layout
# (gateways/ipsec/lab.py: the addresses, routes, reqid and ports used below), run for
# real with traffic in tests/kernel/test_ipsec_tunnel.py, inside a VM whose kernel has
# ESP.
IPSEC_KMES = {"kme-ipsec-a": "KME_IPSEC_A", "kme-ipsec-b": "KME_IPSEC_B"}
IPSEC_GATEWAYS = {"ipsec-a": "master", "ipsec-b": "slave"}
IPSEC_SITES = {"site-a": "ipsec-a", "site-b": "ipsec-b"}        # host -> its gateway
IPSEC_LANS = {"ipsec-a": "ipsec-lan-a", "ipsec-b": "ipsec-lan-b"}
IPSEC_TRANSIT = "ipsec-transit"
IPSEC_TOPOLOGY = "/etc/qgw/topology.yaml"
IPSEC_ROUTE = "/etc/qgw/route.py"


def ipsec_routed(name: str) -> tuple[Any, list[str]]:
    """A service behind deploy/ipsec/route.py: its parsed options and the command it execs.

    The script's own parser, loaded without running it (its main would add a route).
    """
    import runpy

    svc = load_compose()["services"][name]
    argv = service_argv(svc)
    assert argv[:2] == ["python", IPSEC_ROUTE], f"{name} runs behind {IPSEC_ROUTE}"
    script = Mounts.of(svc, {"state": Path("/nonexistent")}).path(IPSEC_ROUTE)
    opts = runpy.run_path(script, run_name="route")["parse_args"](argv[2:])
    return opts, opts.command


def ipsec_config(name: str) -> IpsecConfig:
    """An IPsec gateway service's config file, read by the loader `qgw gateway ipsec` uses
    (gateways.ipsec.config.load: the IpsecConfig model; the caller clears QGW_IPSEC_*)."""
    svc = load_compose()["services"][name]
    _, command = ipsec_routed(name)
    path = Mounts.of(svc, {"state": Path("/nonexistent")}).path(
        command[command.index("--config") + 1])
    return load_ipsec_config(Path(path))


def udpstream_call(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """What `python -m apps.udpstream ...` would do: its real parser, send/receive stubbed."""
    calls: list[tuple[str, Any]] = []

    def stub(what: str) -> Any:
        def record(*args: Any) -> dict[str, Any]:
            calls.append((what, args))
            return {}
        return record

    with monkeypatch.context() as m:
        m.setattr(udpstream, "send", stub("send"))
        m.setattr(udpstream, "receive", stub("receive"))
        assert argv[:3] == ["python", "-m", "apps.udpstream"]
        assert udpstream.main(argv[3:]) == 0
    (call,) = calls
    return call


def healthcheck_passes(svc: dict[str, Any], metrics: bytes,
                       monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a `python -c` healthcheck here, its /metrics fetch answered with `metrics`."""
    import io
    import urllib.request

    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    with monkeypatch.context() as m:
        m.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(metrics))
        try:
            exec(test[3], {})  # noqa: S102 (compose.yaml's own healthcheck program)
        except SystemExit as exc:
            return exc.code == 0
    raise AssertionError("the healthcheck did not exit")


def test_ipsec_profile_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import generate_latest

    from gateways.ipsec.gateway import IpsecGateway, _IpsecCollector
    from kme.topology import load_topology

    for var in [v for v in os.environ if v.startswith("QGW_IPSEC")]:
        monkeypatch.delenv(var)
    compose = load_compose()
    services = services_of("ipsec")
    ipsec = {"ipsec-prepare", *IPSEC_KMES, *IPSEC_GATEWAYS, *IPSEC_SITES}
    assert set(services) == set(services_of()) | ipsec
    for other in ("madrid", "scada", "opot", "ledger"):
        assert set(services_of(other)).isdisjoint(ipsec)

    # The QKD network: one KME per site, one link, the gateways its SAEs.
    prepare = services["ipsec-prepare"]
    assert service_argv(prepare) == ["qgw", "kme", "prepare", "--topology", IPSEC_TOPOLOGY,
                                     "--dns", "--state", "/state/ipsec"]
    topology = load_topology(Mounts.of(prepare, {"state": Path("/nonexistent")})
                             .path(IPSEC_TOPOLOGY))
    assert {kme_dns_name(k): k for k in topology.nodes} == IPSEC_KMES
    assert [frozenset((link.a, link.b)) for link in topology.links] == [
        frozenset(IPSEC_KMES.values())]
    for name, kme in IPSEC_KMES.items():
        svc = services[name]
        assert service_argv(svc) == ["qgw", "kme", "up", "--topology", IPSEC_TOPOLOGY,
                                     "--node", kme, "--dns", "--state", "/state/ipsec"]
        assert depends_on(svc) == {"ipsec-prepare": "service_completed_successfully"}
        assert ":9443/health" in " ".join(svc["healthcheck"]["test"])

    # The gateways: the real CLI and config model; privileges; KME; networks.
    networks = compose["networks"]

    def subnet(net: str) -> ipaddress.IPv4Network:
        (config,) = networks[net]["ipam"]["config"]
        return ipaddress.IPv4Network(config["subnet"])

    configs = {name: ipsec_config(name) for name in IPSEC_GATEWAYS}
    transit: dict[str, ipaddress.IPv4Address] = {}
    lan: dict[str, ipaddress.IPv4Address] = {}
    for name, role in IPSEC_GATEWAYS.items():
        svc, cfg = services[name], configs[name]
        route, command = ipsec_routed(name)
        assert command[:5] == ["qgw", "gateway", "ipsec", "--config", f"/etc/qgw/{name}.yaml"]
        result = _qgw_help(command[1:])
        assert result.returncode == 0 and "Usage: qgw gateway ipsec" in result.stdout, \
            result.stderr
        assert "NET_ADMIN" in svc.get("cap_add", []), f"{name} needs NET_ADMIN (XFRM)"
        assert svc.get("user") in ("root", "0", "0:0"), "cap_add reaches root only"
        assert route.user is None, f"{name} keeps root: the gateway needs NET_ADMIN"
        assert str(svc.get("sysctls", {}).get("net.ipv4.ip_forward")) == "1", name
        assert cfg.role == role and cfg.pki == Path("/state/ipsec/pki")
        kme = topology.saes[cfg.sae]             # the gateways are the topology's SAEs
        assert cfg.kme == f"https://{kme_dns_name(kme)}:8443"
        assert depends_on(svc) == {kme_dns_name(kme): "service_healthy"}
        assert set(svc["networks"]) == {"default", IPSEC_TRANSIT, IPSEC_LANS[name]}, \
            f"{name} reaches its KME on default, its peer on transit, its site on its LAN"
        fixed = {net: ipaddress.IPv4Interface(a) for net, a in fixed_addresses(svc).items()}
        assert set(fixed) == {IPSEC_TRANSIT, IPSEC_LANS[name]}
        transit[name], lan[name] = fixed[IPSEC_TRANSIT].ip, fixed[IPSEC_LANS[name]].ip
        assert cfg.local == transit[name], f"{name}'s local is its transit address"
        # The site behind it is its LAN's network, the gateway its first address.
        assert cfg.local_subnets == [subnet(IPSEC_LANS[name])]
        assert lan[name] == next(cfg.local_subnets[0].hosts())
        assert cfg.metrics is not None
        health = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{cfg.metrics.port}/metrics" in health
        assert "qgw_ipsec_protected" in health
    assert set(topology.saes) == {c.sae for c in configs.values()}
    a, b = configs["ipsec-a"], configs["ipsec-b"]
    assert topology.saes[a.sae] != topology.saes[b.sae], "one KME per site"

    # The pair, seen from both ends: addresses, subnets, SAEs, control channel, reqid.
    assert (a.peer.sae, b.peer.sae) == (b.sae, a.sae)
    assert (a.peer.address, b.peer.address) == (b.local, a.local)
    assert (a.peer.subnets, b.peer.subnets) == (b.local_subnets, a.local_subnets)
    assert b.control_listen is not None and b.peer.control is None
    assert a.control_connect == (str(transit["ipsec-b"]), b.control_listen.port)
    assert a.reqid == b.reqid
    assert a.keys == b.keys
    # Each gateway routes the far site's subnet to the peer over transit (lab.py's route).
    for name, cfg in configs.items():
        route, _ = ipsec_routed(name)
        (far,) = cfg.peer.subnets
        assert (route.to, route.via) == (far, cfg.peer.address)

    # The networks: the transit holds both gateways; the LANs are internal and apart;
    # Docker's own bridge address is none of the fixed ones.
    assert all(t in subnet(IPSEC_TRANSIT) for t in transit.values())
    nets = [subnet(IPSEC_TRANSIT), *(subnet(n) for n in IPSEC_LANS.values())]
    assert not any(x.overlaps(y) for x, y in itertools.combinations(nets, 2))
    fixed_everywhere = [ipaddress.ip_address(spec["ipv4_address"])
                        for svc in services.values()
                        for spec in (svc.get("networks") or {}).values()
                        if spec and "ipv4_address" in spec]
    assert len(fixed_everywhere) == len(set(fixed_everywhere)) == 6
    for net in (IPSEC_TRANSIT, *IPSEC_LANS.values()):
        (config,) = networks[net]["ipam"]["config"]
        bridge = ipaddress.ip_address(config.get("gateway") or next(subnet(net).hosts()))
        assert bridge in subnet(net) and bridge not in fixed_everywhere, net
    for net in IPSEC_LANS.values():
        assert networks[net].get("internal") is True, f"{net}: no way out but the gateway"

    # The healthcheck on the gateway's real /metrics: 0 before a key, 1 with one.
    gw = IpsecGateway(a)
    gw.registry.register(_IpsecCollector(gw))
    assert not healthcheck_passes(services["ipsec-a"], generate_latest(gw.registry),
                                  monkeypatch)
    gw.keys = SimpleNamespace(active_epoch=1)   # type: ignore[assignment]
    assert healthcheck_passes(services["ipsec-a"], generate_latest(gw.registry), monkeypatch)

    # The site hosts: on their LAN only, in its subnet; the stream goes from site A's
    # host to site B's, through both gateways once both protect the tunnel.
    host: dict[str, ipaddress.IPv4Address] = {}
    for name, gateway in IPSEC_SITES.items():
        svc = services[name]
        assert list(svc["networks"]) == [IPSEC_LANS[gateway]], f"{name}: its LAN only"
        (address,) = fixed_addresses(svc).values()
        host[name] = ipaddress.IPv4Interface(address).ip
        assert host[name] in configs[gateway].local_subnets[0]
        assert not svc.get("ports")
    route, sender = ipsec_routed("site-a")
    assert "NET_ADMIN" in services["site-a"].get("cap_add", [])
    assert services["site-a"].get("user") == "root" and route.user == "qgw"
    assert (route.to, route.via) == (b.local_subnets[0], lan["ipsec-a"])
    what, (to, count, rate, _size) = udpstream_call(sender, monkeypatch)
    assert what == "send" and (count, rate) == (3000, 100)
    what, (bind, _idle, _wait) = udpstream_call(service_argv(services["site-b"]), monkeypatch)
    assert what == "receive" and bind == to == (str(host["site-b"]), 9000)
    assert services["site-b"].get("user") is None and not services["site-b"].get("cap_add")
    assert depends_on(services["site-b"]) == dict.fromkeys(IPSEC_GATEWAYS, "service_healthy")
    assert depends_on(services["site-a"]) == {
        **dict.fromkeys(IPSEC_GATEWAYS, "service_healthy"), "site-b": "service_started"}
    # `up site-a` brings up the whole IPsec profile and nothing else.
    assert set(start_order(services, ["site-a"])) == ipsec
    assert start_order(services)[-1] == "site-a"
    # The profile's comment says what the host's kernel must provide.
    text = COMPOSE.read_text()
    assert all(word in text for word in ("CONFIG_INET_ESP", "esp4", "gcm", "per network"))


# Not here: the IPsec gateways and site hosts, which run behind deploy/ipsec/route.py
# (an appended --help would reach the command it execs, after adding the route, not the
# script); test_ipsec_profile_structure checks both parts.
@pytest.mark.parametrize("service", ["pki", "kme-a", "kme-b", "keysmoke", "madrid-prepare",
                                     "kme-norte", "madrid-smoke", "scada-prepare", "kme-cc",
                                     "scada-cc", "scada-sub1", "scada-sub2", "plc1", "plc2",
                                     "hmi", "opot-prepare", "kme-opot-a", "kme-opot-b",
                                     "opot-ingress", "opot-sf1", "opot-sf2", "opot-egress",
                                     "client", "server", "ledger-account", "ledger-writer",
                                     "ledger-reader", "sensors", "ledger-smoke",
                                     "ipsec-prepare", "kme-ipsec-a", "kme-ipsec-b",
                                     "videocall", "webrtc-camera", "webrtc-viewer",
                                     "webrtc-smoke"])
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
        for key, value in (services[name].get("sysctls") or {}).items():
            subprocess.run(["ip", "netns", "exec", lab.namespaces[owners[name]], "sysctl",
                            "-q", "-w", f"{key}={value}"], check=True, capture_output=True,
                           timeout=10)
    point_to_point(lab, {name: owners[name] for name in order}, services)

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


def point_to_point(lab: Lab, owners: dict[str, str], services: dict[str, Any]) -> None:
    """Compose networks whose members name their interface (`interface_name`): a veth pair
    between the two members' namespaces, each end named as compose would name it, with the
    network's MTU (`com.docker.network.driver.mtu`, else 1500)."""
    networks = load_compose().get("networks") or {}
    ends: dict[str, list[tuple[str, str]]] = {}
    for name, owner in owners.items():
        for net, spec in (services[name].get("networks") or {}).items():
            if isinstance(spec, dict) and spec.get("interface_name"):
                ends.setdefault(net, []).append((owner, spec["interface_name"]))
    for net, members in ends.items():
        assert len(members) == 2, f"{net}: only two-member networks are modelled: {members}"
        mtu = str(((networks.get(net) or {}).get("driver_opts") or {}).get(
            "com.docker.network.driver.mtu", 1500))
        (a, a_if), (b, b_if) = members
        ns_a, ns_b = lab.namespaces[a], lab.namespaces[b]
        subprocess.run(["ip", "-n", ns_a, "link", "add", a_if, "type", "veth", "peer",
                        "name", b_if, "netns", ns_b], check=True, capture_output=True,
                       timeout=10)
        for ns, ifname in ((ns_a, a_if), (ns_b, b_if)):
            subprocess.run(["ip", "-n", ns, "link", "set", ifname, "mtu", mtu, "up"],
                           check=True, capture_output=True, timeout=10)


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


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_opot_profile_runs_in_namespaces(lab: Lab) -> None:
    """Two KMEs, the four chain nodes on their hop links, the echo server, and the client's
    smoke run: 500 datagrams through the chain, each proven and verified, all echoed."""
    started = time.monotonic()
    run_in_namespaces(lab, "opot", "client", only_smoke=True)
    took = time.monotonic() - started
    assert "OK: 500/500 datagrams came back" in lab.tail("client"), lab.tail("client")
    for name in OPOT_NODES:
        assert lab.procs[name].poll() is None, f"{name} died:\n{lab.tail(name)}"
    egress = scrape(lab, "opot-egress", 9700)
    assert metric(egress, "qgw_opot_verified_total") >= 500
    assert metric(egress, "qgw_opot_rejected_total") == 0
    print(f"opot profile in namespaces: {took:.1f} s")


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_ledger_profile_runs_in_namespaces(lab: Lab) -> None:
    """Mosquitto, anvil, the KMEs, writer, reader and the trial's fleet; the smoke check
    waits for 3 readings decrypted at the reader."""
    started = time.monotonic()
    named = run_in_namespaces(lab, "ledger", "ledger-smoke", only_smoke=True,
                              smoke_timeout_s=150)
    took = time.monotonic() - started
    out = lab.tail("ledger-smoke")
    assert re.search(r"OK: writer: received \d+, refused 0, anchored \d+ in \d+ batches; "
                     r"reader: decrypted \d+, rejected 0", out), out
    for name in ("mosquitto", "anvil", *LEDGER_GATEWAYS, "sensors"):
        assert lab.procs[name].poll() is None, f"{name} died:\n{lab.tail(name)}"
    # The readings the reader wrote out, decrypted: the fleet's, each once.
    lines = [json.loads(x) for x in (named["state"] / "ledger-reader" / "readings.jsonl")
             .read_text().splitlines()]
    assert len(lines) >= 3 and len({(x["device"], x["seq"]) for x in lines}) == len(lines)
    assert all(x["device"].startswith("sensor-00") and "temperature_c" in x["values"]
               for x in lines)
    assert {x["writer"] for x in lines} == {"0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"}
    writer = scrape(lab, "ledger-writer", 9620)
    assert metric(writer, "qgw_ledger_records_anchored_total") >= len(lines)
    assert metric(writer, "qgw_ledger_keys_fetched_total") >= 1
    assert os.stat(named["state"] / "ledger-writer" / "account.key").st_mode & 0o077 == 0
    print(f"ledger profile in namespaces: {took:.1f} s")


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_webrtc_profile_runs_in_namespaces(lab: Lab) -> None:
    """The signalling server, the KMEs and both participants; the smoke check waits for
    60 verified pictures each way."""
    started = time.monotonic()
    run_in_namespaces(lab, "webrtc", "webrtc-smoke", only_smoke=True, smoke_timeout_s=150)
    took = time.monotonic() - started
    out = lab.tail("webrtc-smoke")
    assert re.search(r"OK: viewer shows \d+ camera pictures, camera shows \d+ viewer pictures; "
                     r"undecodable 0, dropped 0", out), out
    for name in ("videocall", *WEBRTC_GATEWAYS):
        assert lab.procs[name].poll() is None, f"{name} died:\n{lab.tail(name)}"
    camera = scrape(lab, "webrtc-camera", 9630)
    assert metric(camera, "qgw_webrtc_protected") == 1.0
    assert metric(camera, "qgw_webrtc_frames_total", direction="sealed") > 0
    print(f"webrtc profile in namespaces: {took:.1f} s")
