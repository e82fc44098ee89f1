"""Kernel ESP over XFRM netlink, inside the kernel-tier VM (Debian's kernel: ESP and GCM).

Collected only inside the VM, where the runner sets QGW_IN_VM=1; anywhere else every
test fails saying so rather than touching the host's SAs.

The iproute2 comparisons add the same SA (or policy) once with `ip xfrm` and once with
`Xfrm`, dump each with `Xfrm.dump_raw` and compare the kernel's messages byte for byte,
masking only (see tests/gateways/ipsec/test_xfrm.py):
  - netlink header seq and pid: chosen by the dump request, not part of the SA;
  - curlft.add_time (SAs and policies): the wall-clock second each was added;
  - userpolicy_info.index (policies): the kernel numbers each new policy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from gateways.ipsec.xfrm import (
    EspSa,
    EspUnsupported,
    Expire,
    Lifetime,
    Policy,
    Xfrm,
    XfrmError,
    XfrmMonitor,
)
from gateways.ipsec.xfrm_messages import XFRM_POLICY_DIRS
from tests.gateways.ipsec.test_xfrm import KEY, masked_policy, masked_sa, sa_spi

REQID = 0x7A5E_1001
OTHER_REQID = 0x7A5E_1002
FOREIGN_REQID = 0x7A5E_1003
ALL_REQIDS = {REQID, OTHER_REQID, FOREIGN_REQID}
AES128_KEY = bytes(range(200, 220))


@pytest.fixture(scope="module", autouse=True)
def esp_kernel() -> None:
    if os.environ.get("QGW_IN_VM") != "1":
        pytest.fail("tests/kernel/ runs only inside the kernel-tier VM (tests/"
                    "test_kernel_tier.py sets QGW_IN_VM=1): it adds and deletes real SAs")
    # Modules load on demand too; this only makes a missing one show up as early as possible.
    subprocess.run(["modprobe", "-a", "esp4", "esp6", "xfrm_user", "gcm", "dummy"],
                   check=False, capture_output=True)
    try:
        with Xfrm() as x:
            x.check_support()
    except EspUnsupported as exc:
        pytest.fail(f"the VM's kernel cannot run these tests: {exc}")


@pytest.fixture
def xfrm() -> Iterator[Xfrm]:
    with Xfrm() as x:
        x.flush_owned(ALL_REQIDS)
        try:
            yield x
        finally:
            x.flush_owned(ALL_REQIDS)


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True)


def ip_state_add(sa: EspSa, key: bytes) -> None:
    limits: list[str] = []
    for option, value in (("time-soft", sa.lifetime.soft_s), ("time-hard", sa.lifetime.hard_s),
                          ("byte-soft", sa.lifetime.soft_bytes),
                          ("byte-hard", sa.lifetime.hard_bytes)):
        if value is not None:
            limits += ["limit", option, str(value)]
    ip("xfrm", "state", "add", "src", sa.src, "dst", sa.dst, "proto", "esp",
       "spi", f"0x{sa.spi:08x}", "reqid", str(sa.reqid), "mode", "tunnel",
       "replay-window", str(sa.replay_window),
       "aead", "rfc4106(gcm(aes))", f"0x{key.hex()}", str(sa.icv_bits), *limits)


def raw_sa(x: Xfrm, spi: int) -> bytes:
    (raw,) = [m for m in x.dump_raw("sa") if sa_spi(m) == spi]
    return raw


SAS = {
    "ipv4-aes256-limits": EspSa("192.0.2.1", "192.0.2.2", 0x7A5E1001, REQID, KEY,
                                lifetime=Lifetime(soft_bytes=1_000_000, hard_bytes=2_000_000,
                                                  soft_s=3000, hard_s=3600)),
    "ipv6-aes128-wide-window": EspSa("2001:db8::1", "2001:db8::2", 0x7A5E1002, REQID,
                                     AES128_KEY, icv_bits=96, replay_window=128),
}


@pytest.mark.parametrize("name", SAS)
def test_sa_dump_matches_iproute2(xfrm: Xfrm, name: str) -> None:
    sa = SAS[name]
    assert isinstance(sa.key, bytes)
    ip_state_add(sa, sa.key)
    theirs = raw_sa(xfrm, sa.spi)
    ip("xfrm", "state", "delete", "src", sa.src, "dst", sa.dst, "proto", "esp",
       "spi", f"0x{sa.spi:08x}")
    xfrm.add_sa(sa)
    mine = raw_sa(xfrm, sa.spi)
    assert len(mine) == len(theirs)
    assert masked_sa(mine) == masked_sa(theirs)


def raw_policy(x: Xfrm, p: Policy) -> bytes:
    """The dump message with p's selector (daddr at 16, saddr at 32) and direction (176)."""
    def packed(cidr: str) -> bytes:
        return ipaddress.ip_network(cidr).network_address.packed.ljust(16, b"\0")

    (raw,) = [m for m in x.dump_raw("policy")
              if m[16:32] == packed(p.dst) and m[32:48] == packed(p.src)
              and m[176] == XFRM_POLICY_DIRS[p.direction]]
    return raw


POLICIES = {
    "ipv4": Policy("10.213.1.0/24", "10.213.2.0/24", "out", "192.0.2.1", "192.0.2.2",
                   REQID, 4242),
    "ipv6-in-ipv4": Policy("fd00:213:1::/48", "fd00:213:2::/64", "fwd", "192.0.2.1",
                           "192.0.2.2", REQID, 7),
    "ipv6": Policy("fd00:213:3::/64", "fd00:213:4::/64", "in", "2001:db8::2",
                   "2001:db8::1", REQID),
}


@pytest.mark.parametrize("name", POLICIES)
def test_policy_dump_matches_iproute2(xfrm: Xfrm, name: str) -> None:
    p = POLICIES[name]
    ip("xfrm", "policy", "add", "src", p.src, "dst", p.dst, "dir", p.direction,
       "priority", str(p.priority), "tmpl", "src", p.tmpl_src, "dst", p.tmpl_dst,
       "proto", "esp", "reqid", str(p.reqid), "mode", "tunnel", "level", "required")
    theirs = raw_policy(xfrm, p)
    ip("xfrm", "policy", "delete", "src", p.src, "dst", p.dst, "dir", p.direction)
    xfrm.add_policy(p)
    mine = raw_policy(xfrm, p)
    assert masked_policy(mine) == masked_policy(theirs)


def test_add_get_list_delete(xfrm: Xfrm) -> None:
    v4, v6 = SAS["ipv4-aes256-limits"], SAS["ipv6-aes128-wide-window"]
    before = int(time.time())
    xfrm.add_sa(v4)
    xfrm.add_sa(v6)

    info = xfrm.get_sa(v4.dst, v4.spi)
    assert info is not None
    assert (info.src, info.dst, info.spi, info.reqid) == (v4.src, v4.dst, v4.spi, REQID)
    assert (info.bytes, info.packets, info.replayed, info.integrity_failed) == (0, 0, 0, 0)
    assert (info.mode, info.algorithm, info.icv_bits) == ("tunnel", "rfc4106(gcm(aes))", 128)
    assert info.replay_window == 32 and info.lifetime == v4.lifetime
    assert before - 1 <= info.add_time <= time.time() + 1 and info.use_time == 0

    info6 = xfrm.get_sa(v6.dst, v6.spi)
    assert info6 is not None and info6.src == "2001:db8::1"
    assert (info6.replay_window, info6.icv_bits, info6.lifetime) == (128, 96, Lifetime())

    listed = {(s.dst, s.spi) for s in xfrm.list_sas()}
    assert {(v4.dst, v4.spi), (v6.dst, v6.spi)} <= listed

    assert xfrm.delete_sa(v4.dst, v4.spi) is True
    assert xfrm.get_sa(v4.dst, v4.spi) is None
    assert xfrm.delete_sa(v4.dst, v4.spi) is False
    assert xfrm.delete_sa(v6.dst, v6.spi) is True
    assert {(s.dst, s.spi) for s in xfrm.list_sas()}.isdisjoint({(v4.dst, v4.spi),
                                                                 (v6.dst, v6.spi)})


def test_adding_an_existing_sa_says_it_exists(xfrm: Xfrm) -> None:
    sa = SAS["ipv4-aes256-limits"]
    xfrm.add_sa(sa)
    with pytest.raises(XfrmError, match="already exists") as caught:
        xfrm.add_sa(sa)
    assert not isinstance(caught.value, EspUnsupported)
    assert KEY.hex() not in str(caught.value)


def test_flush_owned_removes_only_owned_sas_and_policies(xfrm: Xfrm) -> None:
    xfrm.add_sa(EspSa("192.0.2.1", "192.0.2.2", 0x7A5E1011, REQID, KEY))
    xfrm.add_sa(EspSa("192.0.2.2", "192.0.2.1", 0x7A5E1012, OTHER_REQID, KEY))
    xfrm.add_sa(EspSa("192.0.2.1", "192.0.2.2", 0x7A5E1013, FOREIGN_REQID, KEY))
    xfrm.add_policy(POLICIES["ipv4"])
    xfrm.add_policy(Policy("10.213.9.0/24", "10.213.10.0/24", "out", "192.0.2.1",
                           "192.0.2.2", FOREIGN_REQID))
    assert xfrm.flush_owned({REQID, OTHER_REQID}) == (2, 1)
    assert {s.spi for s in xfrm.list_sas() if s.reqid in ALL_REQIDS} == {0x7A5E1013}
    assert [p.reqids for p in xfrm.list_policies() if set(p.reqids) & ALL_REQIDS] == [
        (FOREIGN_REQID,)]


def test_check_support_leaves_nothing_behind(xfrm: Xfrm) -> None:
    xfrm.check_support()
    assert all(s.spi != 0xFFFF_FFFE for s in xfrm.list_sas())


def expires_for(monitor: XfrmMonitor, spi: int, timeout: float,
                poke: Callable[[], None] | None = None) -> list[Expire]:
    """Collect `spi`'s events until its hard expire (or `timeout`); call `poke` between
    reads (to send traffic)."""
    deadline = time.monotonic() + timeout
    seen: list[Expire] = []
    while time.monotonic() < deadline and not any(e.hard for e in seen):
        if poke is not None:
            poke()
        ready, _, _ = select.select([monitor], [], [], 0.2)  # fileno() works with select
        if ready:
            seen += [e for e in monitor.read(timeout=0) if e.spi == spi]
    return seen


def test_soft_and_hard_time_limits_arrive_as_expire_events(xfrm: Xfrm) -> None:
    sa = EspSa("192.0.2.1", "192.0.2.2", 0x7A5E1021, REQID, KEY,
               lifetime=Lifetime(soft_s=1, hard_s=3))
    with XfrmMonitor() as monitor:
        xfrm.add_sa(sa)
        events = expires_for(monitor, sa.spi, timeout=20)
    assert events == [Expire(sa.src, sa.dst, sa.spi, REQID, hard=False),
                      Expire(sa.src, sa.dst, sa.spi, REQID, hard=True)]
    assert xfrm.get_sa(sa.dst, sa.spi) is None  # the kernel deleted it at the hard limit


@pytest.fixture
def dummy_link() -> Iterator[None]:
    """A dummy device holding the inner (10.213.0.1) and outer (198.51.100.1) addresses:
    ESP packets are built, counted against the SA, and dropped by the device."""
    ip("link", "add", "qgwx0", "type", "dummy")
    try:
        ip("addr", "add", "10.213.0.1/24", "dev", "qgwx0")
        ip("addr", "add", "198.51.100.1/24", "dev", "qgwx0")
        ip("link", "set", "qgwx0", "up")
        yield
    finally:
        ip("link", "del", "qgwx0")


def test_soft_and_hard_byte_limits_arrive_as_expire_events(xfrm: Xfrm,
                                                            dummy_link: None) -> None:
    sa = EspSa("198.51.100.1", "198.51.100.2", 0x7A5E1031, REQID, KEY,
               lifetime=Lifetime(soft_bytes=300, hard_bytes=1500))
    xfrm.add_policy(Policy("10.213.0.1/32", "10.213.0.2/32", "out", sa.src, sa.dst, REQID))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("10.213.0.1", 0))

    def send() -> None:
        with contextlib.suppress(OSError):  # once the SA is gone the policy drops packets
            udp.sendto(bytes(200), ("10.213.0.2", 9))

    try:
        with XfrmMonitor() as monitor:
            xfrm.add_sa(sa)
            events = expires_for(monitor, sa.spi, timeout=20, poke=send)
    finally:
        udp.close()
    assert events == [Expire(sa.src, sa.dst, sa.spi, REQID, hard=False),
                      Expire(sa.src, sa.dst, sa.spi, REQID, hard=True)]
    assert xfrm.get_sa(sa.dst, sa.spi) is None
