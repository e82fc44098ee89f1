"""compose.yaml: its structure, its commands against the real CLI, and a real run.

There is no Docker engine here, so the deployment is run the way compose would
run it, with Linux network namespaces standing in for containers:

- each service gets a network namespace `qgw<random>-<service>`, with an `eth0`
  veth whose peer sits on a bridge `br0` in one more namespace `qgw<random>-net`
  (nothing is added to the host's own namespace), an address 10.77.0.x/24 and
  a hosts file /etc/netns/<ns>/hosts naming every service (compose's DNS);
- volumes: the named volume `state` is a temporary folder, a bind mount
  (`./deploy/compose:/etc/qgw:ro`) is that repository folder;
- the command is the service's entrypoint (or the Dockerfile's ENTRYPOINT) plus
  its `command`, run as `ip netns exec <ns> <this python> -m qgw ...` (`qgw` ->
  `python -m qgw`, `python` -> this interpreter), from the repository root;
- container paths are rewritten to the mapped folders in two small places:
  arguments that start with a mount target (`/state/pki` -> `<tmp>/state/pki`),
  and for `qgw kme serve --config FILE`, every path in FILE that starts with a
  mount target, passed as a `QGW_KME__...` environment override (the config
  files stay untouched and are the very ones the containers read);
- depends_on is honoured in order: `service_completed_successfully` waits for
  the exit code, `service_healthy` runs the service's healthcheck command in its
  namespace until it passes (polled faster than compose's interval, to keep the
  test short).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from apps import keysmoke
from qgw.pki import kme_dns_name
from tests.netlab import Lab

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
KMES = {"kme-a": "KME_A", "kme-b": "KME_B"}
# How a container's executable maps to this machine.
EXECUTABLES = {"qgw": [sys.executable, "-m", "qgw"], "python": [sys.executable]}


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


def start_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name in order:
            return
        for dep in depends_on(services[name]):
            visit(dep, (*path, name))
        order.append(name)

    for name in services:
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
        """For `qgw kme serve --config FILE`: QGW_KME__... for each container path in FILE."""
        if argv[:3] != ["qgw", "kme", "serve"]:
            return {}
        config = Path(self.path(argv[argv.index("--config") + 1]))
        out: dict[str, str] = {}

        def walk(node: dict[str, Any], keys: list[str]) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, [*keys, key])
                elif isinstance(value, str) and self.path(value) != value:
                    out["QGW_KME__" + "__".join(k.upper() for k in [*keys, key])] = \
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


@pytest.mark.parametrize("service", ["pki", "kme-a", "kme-b", "keysmoke", "madrid-prepare",
                                     "kme-norte", "madrid-smoke"])
def test_service_command_parses(service: str) -> None:
    """Each service's argv is accepted by the real CLI (instead of `docker compose config`).

    `--help` is eager, so appending it checks subcommand and option names
    (click rejects an unknown option before showing help) without running anything.
    """
    argv = service_argv(load_compose()["services"][service])
    if argv[0] == "qgw":
        result = _qgw_help(argv[1:])
        assert result.returncode == 0, result.stderr
        words = [a for a in argv[1:3] if not a.startswith("-")]
        assert f"Usage: qgw {' '.join(words)}" in result.stdout
    else:
        assert argv[:3] == ["python", "-m", "apps.keysmoke"]
        opts = keysmoke.parse_args(argv[3:])  # argparse exits 2 on any bad argument
        assert (opts.master, opts.slave) in (("SAE_1", "SAE_2"), ("SAE_ALMAGRO", "SAE_UAM"))
        result = subprocess.run([sys.executable, "-m", "apps.keysmoke", "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "--master-kme" in result.stdout


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


def run_in_namespaces(lab: Lab, profile: str | None, smoke: str) -> dict[str, Path]:
    """Start a profile's services in dependency order; wait for `smoke` to exit 0."""
    services = services_of(profile)
    order = start_order(services)
    assert order[-1] == smoke
    named = {name: lab.tmp / "volumes" / name for name in load_compose().get("volumes", {})}
    for path in named.values():
        path.mkdir(parents=True)
    lab.setup(order)

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
        lab.start(service, host_argv([mounts.path(a) for a in argv]), env)

    code = wait_exit(lab, smoke, 90)
    out = lab.tail(smoke)
    assert code == 0, f"{smoke} exited with code {code}:\n{out}"
    assert re.search(r"OK: 8/8 keys matched", out), out
    assert len(re.findall(r"key_ID [0-9a-f-]{36}", out)) == 8, out
    return named


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_compose_runs_in_namespaces(lab: Lab) -> None:
    started = time.monotonic()
    named = run_in_namespaces(lab, None, "keysmoke")
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
    assert len(list((named["state"] / "madrid" / "store").glob("*.sqlite"))) == 13
    assert "link KME_ALMAGRO -> KME_UAM" in lab.tail("madrid-smoke")
