"""The kernel tier: everything in tests/kernel/, run inside one VM with Debian's kernel.

CI's kernel has no ESP, so tests/kernel/ runs under qemu (qgw.kernelvm), where one
boot costs 20-120 s without KVM (the more the host is busy). So the VM boots once
per session: a fixture runs all of tests/kernel/ in it and reads its JUnit report.
The inner tests are collected here on the host first (collecting runs nothing), and
each gets a test here reporting its outcome, so a failure names the inner test; one
more test checks the run as a whole. Nothing is skipped: a host that cannot boot
the VM fails.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qgw import kernelvm
from tests.conftest import needs_root

REPO = Path(__file__).resolve().parents[1]
KERNEL_TESTS = "tests/kernel"
VM_TIMEOUT_S = 2400
# Only pytest-timeout of the installed plugins: the others (schemathesis above all)
# take tens of seconds to import under emulation and no kernel test uses them.
INNER_ENV = {"QGW_IN_VM": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
INNER_OPTIONS = ["-p", "no:cacheprovider", "-p", "pytest_timeout"]
COLLECTION_FAILED = "collection-failed"

pytestmark = pytest.mark.timeout(VM_TIMEOUT_S + 300)


def _collect() -> tuple[list[str], str]:
    """The inner test IDs and, if collecting them failed, pytest's output."""
    # Collecting imports what the VM will import; letting it write .pyc files saves
    # compiling them again in the VM, where the root filesystem is read-only.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *INNER_OPTIONS, KERNEL_TESTS],
        cwd=REPO, env={**env, **INNER_ENV}, capture_output=True, text=True, timeout=600)
    ids = [line for line in result.stdout.splitlines()
           if line.startswith(f"{KERNEL_TESTS}/") and "::" in line]
    problem = "" if result.returncode == 0 else (result.stdout + result.stderr)[-4000:]
    return ids, problem


@functools.cache
def collected() -> tuple[list[str], str]:
    return _collect()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "inner_id" in metafunc.fixturenames:
        ids, problem = collected()
        params = ids + ([COLLECTION_FAILED] if problem or not ids else [])
        metafunc.parametrize("inner_id", params,
                             ids=[p.removeprefix(f"{KERNEL_TESTS}/") for p in params])


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) under which pytest's JUnit XML reports a test."""
    path, *names = nodeid.split("::")
    module = path.removesuffix(".py").replace("/", ".")
    return ".".join([module, *names[:-1]]), names[-1]


@dataclass(frozen=True)
class TierRun:
    vm: kernelvm.VmResult
    totals: dict[str, int]                   # tests, failures, errors, skipped
    problems: dict[tuple[str, str], str]     # junit key -> "" if it passed

    def tail(self) -> str:
        return f"--- the VM's output (tail) ---\n{self.vm.tail()}"


def read_junit(path: Path) -> tuple[dict[str, int], dict[tuple[str, str], str]]:
    root = ET.parse(path).getroot()  # noqa: S314 (our own pytest's report)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{path}: no <testsuite>"
    totals = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    problems: dict[tuple[str, str], str] = {}
    for case in suite.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        found = [f"{child.tag}: {child.get('message', '')}\n{child.text or ''}".strip()
                 for child in case if child.tag in ("failure", "error", "skipped")]
        problems[key] = "\n".join(filter(None, [problems.get(key, ""), *found]))
    return totals, problems


@pytest.fixture(scope="module")
def tier(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TierRun:
    needs_root()
    why = kernelvm.unavailable()
    if why is not None:
        pytest.fail(f"the kernel tier {why}")
    reports = tmp_path_factory.mktemp("kernel-tier")
    junit = reports / "junit.xml"
    command = [sys.executable, "-m", "pytest", KERNEL_TESTS, *INNER_OPTIONS, "-q", "-rfE",
               f"--junitxml={junit}",
               # /run is the guest's own tmpfs; /tmp is an overlay of the host's.
               "--basetemp=/run/qgw-kernel-tier",
               # Emulation slows everything ~10x; a test's own timeout mark still wins.
               "-o", "timeout=900", "--durations=5"]
    verbose = request.config.option.verbose > 0 or os.environ.get("QGW_VM_VERBOSE") == "1"
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def show(line: str) -> None:
        with capture.global_and_fixture_disabled():
            sys.stderr.write(f"[kernel vm] {line}\n")

    vm = kernelvm.run_in_vm(command, cwd=REPO, env=INNER_ENV, rwdirs=[reports],
                            timeout_s=VM_TIMEOUT_S, on_line=show if verbose else None)
    if not junit.exists():
        pytest.fail(f"the VM ran no tests (pytest exit status {vm.returncode})\n"
                    f"--- the VM's output (tail) ---\n{vm.tail()}")
    totals, problems = read_junit(junit)
    return TierRun(vm, totals, problems)


def test_kernel_tier_ran_every_test_without_a_failure_error_or_skip(
        tier: TierRun, record_property: Callable[[str, object], None]) -> None:
    record_property("vm_boot_s", tier.vm.boot_s)
    ids, problem = collected()
    ran, counts = set(tier.problems), tier.totals
    expected = {junit_key(i) for i in ids}
    assert tier.vm.boot_s is not None
    if problem or counts["tests"] == 0 or ran != expected:
        pytest.fail(f"collected on the host: {len(expected)}, ran in the VM: {counts['tests']}; "
                    f"not run: {sorted(expected - ran)}, not collected: {sorted(ran - expected)}"
                    f"\n{problem}\n{tier.tail()}")
    if counts["failures"] or counts["errors"] or counts["skipped"] or tier.vm.returncode:
        pytest.fail(f"in the VM: {counts}, pytest exit status {tier.vm.returncode}\n"
                    f"{tier.tail()}")


def test_in_vm(inner_id: str, tier: TierRun) -> None:
    if inner_id == COLLECTION_FAILED:
        pytest.fail(f"collecting {KERNEL_TESTS} on the host failed:\n{collected()[1]}")
    key = junit_key(inner_id)
    if key not in tier.problems:
        pytest.fail(f"{inner_id} did not run in the VM\n{tier.tail()}")
    if tier.problems[key]:
        pytest.fail(f"{inner_id}, in the VM:\n{tier.problems[key]}", pytrace=False)
