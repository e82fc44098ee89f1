"""The gateway's TUN device: created with the kernel's tun driver, configured over netlink.

Errors name what is missing (the device node, the capability) instead of an errno.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import struct
from pathlib import Path

from qgw.errors import QgwError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class TunError(QgwError):
    pass


def open_tun(name: str) -> tuple[int, str]:
    """A non-blocking file descriptor for TUN device `name` (created if missing)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError("/dev/net/tun does not exist: load the tun module, or give the "
                       "container the device (--device /dev/net/tun)") from None
    except PermissionError:
        raise TunError("cannot open /dev/net/tun: the gateway needs CAP_NET_ADMIN "
                       "(run as root or with cap_add: [NET_ADMIN])") from None
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise TunError(f"cannot create TUN device {name}: the gateway needs "
                           f"CAP_NET_ADMIN") from None
        if exc.errno == errno.EBUSY:
            raise TunError(f"TUN device {name} is in use by another process") from None
        raise TunError(f"cannot create TUN device {name}: {exc.strerror}") from None
    return fd, ifr[:16].rstrip(b"\0").decode()


def configure(name: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, mtu: int,
              routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    """Address, MTU, up, and routes through the tunnel for device `name`."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if address.version == 4:
        _no_ipv6(name)
    try:
        with IPRoute() as ip:
            (index,) = ip.link_lookup(ifname=name)
            ip.link("set", index=index, mtu=mtu, state="up")
            try:
                ip.addr("add", index=index, address=str(address.ip),
                        prefixlen=address.network.prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            for route in routes:
                ip.route("replace", dst=str(route), oif=index)
    except NetlinkError as exc:
        raise TunError(f"configuring {name}: {os.strerror(exc.code)}") from None


def _no_ipv6(name: str) -> None:
    """An IPv4 tunnel carries no IPv6: without this the kernel sends router solicitations
    and MLD reports into it, which have nowhere to go. Best effort: a container may
    have /proc/sys read-only, and then they are only dropped and counted."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
