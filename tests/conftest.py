from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from qgw.netlab import Lab
from qgw.pki import Pki
from tests.harness import KmePair, make_pki

# tests/kernel needs a kernel with ESP: it runs inside the VM that
# tests/test_kernel_tier.py boots (and sets QGW_IN_VM in), never directly on the host.
if os.environ.get("QGW_IN_VM") != "1":
    collect_ignore = ["kernel"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA issuing certificates with the very same names."""
    return make_pki(tmp_path_factory.mktemp("foreign-pki"))


@pytest.fixture
def kmes(tmp_path: Path, pki: Pki) -> Iterator[KmePair]:
    pair = KmePair(tmp_path, pki).start()
    try:
        pair.wait_for_keys()
        yield pair
    finally:
        pair.close()


def needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("this test needs root and iproute2 (CI provides both: .ci/run)")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    needs_root()
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        errors = lab.cleanup()
        leftover = [ns for ns in (*lab.namespaces.values(), lab.bridge_ns)
                    if ns and (Path("/run/netns") / ns).exists()]
        assert not errors and not leftover, f"cleanup: {errors} {leftover}"


