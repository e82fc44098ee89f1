"""Kernel tier: these tests run inside the VM that tests/test_kernel_tier.py boots.

The VM runs Debian's kernel (ESP, XFRM, GCM as modules) with the host's root
filesystem read-only; /tmp, /run and /etc are the guest's own. Anywhere else every
test here fails saying so: they add SAs, load modules and make namespaces as root.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from qgw.kernelvm import KERNEL_MODULES

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The basics first: when the VM itself is broken, that shows before the slow tests.
    items.sort(key=lambda item: item.path.name != "test_vm_basics.py")


@pytest.fixture(scope="session", autouse=True)
def _inside_the_esp_vm() -> None:
    if os.environ.get("QGW_IN_VM") != "1":
        pytest.fail("tests/kernel/ runs only inside the kernel-tier VM: run "
                    "tests/test_kernel_tier.py, which boots it and sets QGW_IN_VM=1")
    probe = subprocess.run(["modprobe", "esp4"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.fail(f"kernel {platform.release()} cannot load ESP (modprobe esp4: "
                    f"{probe.stderr.strip()}); the kernel tier needs Debian's linux-image")


@pytest.fixture(scope="session")
def kernel_modules() -> tuple[str, ...]:
    """KERNEL_MODULES, loaded (the VM's prelude loads them; this says which one failed)."""
    failed = [name for name in KERNEL_MODULES
              if subprocess.run(["modprobe", name], capture_output=True,
                                timeout=120).returncode != 0]
    if failed:
        pytest.fail(f"modules that do not load in kernel {platform.release()}: {failed}")
    return KERNEL_MODULES


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def _entered(netns: str) -> Iterator[None]:
    # setns moves only the calling thread; sockets keep the namespace they were made in.
    with open("/proc/thread-self/ns/net") as home, open(Path("/run/netns") / netns) as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


@pytest.fixture
def in_netns() -> Callable[[str], AbstractContextManager[None]]:
    """`with in_netns(name):` this thread is in network namespace `name`, then back.

    Sockets made inside stay in that namespace, so one process can talk across
    namespaces without starting an interpreter per namespace (seconds each in the VM).
    """
    return _entered
