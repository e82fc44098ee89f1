"""Sites as Linux network namespaces, joined by a bridge in a namespace of its own.

Used by `qgw demo` (sites of a gateway's step), the benchmarks and the
namespace tests, so a site runs real processes on a real network stack.

Each service gets a namespace `qgw<random>-<service>` with an `eth0` veth whose
peer sits on a bridge `br0` in one more namespace `qgw<random>-net` (nothing is
added to the host's own namespace), an address 10.77.0.x/24, and a hosts file
/etc/netns/<ns>/hosts naming every service (as compose's DNS would). The
`cleanup()` removes every namespace and process and returns what it could not remove.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    return None
SUBNET = "10.77.0"
NETNS_ETC = Path("/etc/netns")


def metric_value(text: str, name: str, /, **labels: str) -> float:
    """The sum of a /metrics page's samples called `name` whose labels include `labels`
    (0 when there is none), read with Prometheus's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def prometheus_samples(text: str) -> dict[str, float]:
    """A /metrics page as `name{labels}` -> value (what the labs and tests read)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Lab:
    """Network namespaces joined by a bridge, and the processes started in them."""

    tmp: Path
    prefix: str = field(default_factory=lambda: f"qgw{secrets.token_hex(3)}")
    namespaces: dict[str, str] = field(default_factory=dict)   # service -> netns
    addresses: dict[str, str] = field(default_factory=dict)    # service -> IP
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)             # in the bridge netns
    made_netns_etc: bool = False
    bridge_ns: str = ""

    def logs(self, service: str) -> Path:
        return self.tmp / "logs" / f"{service}.log"

    def setup(self, services: list[str]) -> None:
        _ip("netns", "add", f"{self.prefix}-net")
        self.bridge_ns = f"{self.prefix}-net"
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self.links.append("br0")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, service in enumerate(services):
            ns = f"{self.prefix}-{service}"
            _ip("netns", "add", ns)
            self.namespaces[service] = ns
            self.addresses[service] = f"{SUBNET}.{10 + i}"
            _ip("-n", self.bridge_ns, "link", "add", f"v{i}", "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            self.links.insert(0, f"v{i}")
            _ip("-n", self.bridge_ns, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[service]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{ip} {service}\n" for service, ip in self.addresses.items())
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir()
            self.made_netns_etc = True
        for ns in self.namespaces.values():
            (NETNS_ETC / ns).mkdir()
            (NETNS_ETC / ns / "hosts").write_text(hosts)

    def start(self, service: str, argv: list[str], env: dict[str, str] | None,
              ns_of: str | None = None) -> None:
        """Start a process named `service` in its namespace (or in `ns_of`'s)."""
        self.logs(service).parent.mkdir(parents=True, exist_ok=True)
        with self.logs(service).open("ab") as log:
            self.procs[service] = subprocess.Popen(
                ["ip", "netns", "exec", self.namespaces[ns_of or service], *argv], cwd=REPO,
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(service)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=10)

    def run(self, service: str, argv: list[str], timeout_s: float) -> int:
        try:
            return subprocess.run(["ip", "netns", "exec", self.namespaces[service], *argv],
                                  cwd=REPO, capture_output=True, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return -1

    def output(self, service: str, argv: list[str], timeout_s: float,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in a service's namespace and capture what it prints."""
        return subprocess.run(["ip", "netns", "exec", self.namespaces[service], *argv],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                              env=env)

    def tail(self, service: str) -> str:
        path = self.logs(service)
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def cleanup(self) -> list[str]:
        errors: list[str] = []
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for service, proc in self.procs.items():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"{service} ignored SIGTERM; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        steps: list[tuple[str, ...]] = []
        # Veths first (deleting one end deletes its eth0 peer), then the bridge,
        # then the namespaces (which would take any leftover interface with them).
        steps += [("-n", self.bridge_ns, "link", "del", link) for link in self.links]
        steps += [("netns", "del", ns) for ns in self.namespaces.values()]
        if self.bridge_ns:
            steps.append(("netns", "del", self.bridge_ns))
        for step in steps:
            try:
                _ip(*step)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
        for ns in self.namespaces.values():
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        if self.made_netns_etc:
            with contextlib.suppress(OSError):  # unless someone else uses it meanwhile
                NETNS_ETC.rmdir()
        return errors


@contextlib.contextmanager
def temporary_lab(prefix: str, purpose: str) -> Iterator[tuple[Lab, Path]]:
    """A lab in a temporary folder for one run; every namespace and process goes after.

    Refuses with a clear error where namespaces cannot be made (`purpose` says who
    needs them) and raises if cleaning up left something behind.
    """
    from qgw.errors import QgwError

    why = unavailable()
    if why is not None:
        raise QgwError(f"{purpose} needs network namespaces: {why}")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        lab = Lab(Path(tmp))
        try:
            yield lab, Path(tmp)
        finally:
            errors = lab.cleanup()
            if errors:
                raise QgwError(f"could not clean up the namespaces of {purpose}: "
                               + "; ".join(errors))
