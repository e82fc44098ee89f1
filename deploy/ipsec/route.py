"""Add one route, then run a command in its place: the `ipsec` compose profile's wrapper.

    python /etc/qgw/route.py --to 10.2.0.0/24 --via 192.0.2.12 -- qgw gateway ipsec ...
    python /etc/qgw/route.py --to 10.2.0.0/24 --via 10.1.0.1 --user qgw -- python -m ...

The image has no `ip` binary, so this is pyroute2 (a product dependency). It is the
route gateways/ipsec/lab.py adds in its namespaces: a gateway sends the far site's
subnet over the transit network to the peer gateway (where its XFRM policies
encapsulate it), and a site host sends it to its gateway. On a gateway the route also
makes the far site's addresses route back through the transit interface, where the
decapsulated packets arrive, which strict reverse-path filtering checks.

`replace`, not `add`: a restarted container may still hold the route. Needs
CAP_NET_ADMIN; `--user NAME` then drops root before running the command (a site
host's traffic generator needs no privileges). The command replaces this process
(exec), so it receives the container's signals.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python /etc/qgw/route.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", type=ipaddress.ip_network, required=True,
                        help="destination network (CIDR)")
    parser.add_argument("--via", type=ipaddress.ip_address, required=True,
                        help="next hop: an address on a directly connected network")
    parser.add_argument("--user", help="drop root to this user before running the command")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run, after `--`")
    opts = parser.parse_args(argv)
    if opts.command[:1] == ["--"]:
        opts.command = opts.command[1:]
    if not opts.command:
        parser.error("no command given (after `--`)")
    if opts.to.version != opts.via.version:
        parser.error("--to and --via must be the same IP version")
    return opts


def add_route(to: ipaddress.IPv4Network | ipaddress.IPv6Network,
              via: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.route("replace", dst=str(to.network_address), dst_len=to.prefixlen,
                  gateway=str(via))


def drop_to(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    add_route(opts.to, opts.via)
    print(f"route {opts.to} via {opts.via}", flush=True)
    if opts.user:
        drop_to(opts.user)
    os.execvp(opts.command[0], opts.command)  # noqa: S606 (compose's argv, as given)
    return 1   # not reached


if __name__ == "__main__":
    sys.exit(main())
