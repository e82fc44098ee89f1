"""Which KMEs a relayed key travels through: a link-state view of the network.

Every KME advertises its own links (up or not, link key available) to its
neighbours once a second and whenever a link changes, and passes on what it
heard, so each KME holds every KME's latest advertisement (sequence numbers
from the wall clock, so a restarted KME's news wins). Advertisements not
renewed for `MAX_AGE_S` are dropped: a KME that vanished takes its links
with it.

A path is the cheapest one whose every link is up at both ends and holds the
key the relay needs. A hop costs 1 plus the share of that link's stored key
the relay would use, so among equally short paths the better-stocked one
wins, and a nearly empty link is avoided when a detour is only a little
longer.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_AGE_S = 10.0


@dataclass(frozen=True)
class LinkAd:
    up: bool
    available_bits: int
    rate_bps: float | None = None


@dataclass
class Advert:
    origin: str
    seq: int
    links: dict[str, LinkAd]
    received: float = field(default=0.0, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "seq": self.seq,
                "links": {p: {"up": a.up, "available_bits": a.available_bits,
                              "rate_bps": a.rate_bps} for p, a in self.links.items()}}

    @classmethod
    def from_json(cls, data: Any, now: float) -> Advert | None:
        """None for anything malformed: a bad advert is ignored, not fatal."""
        if not isinstance(data, dict):
            return None
        origin, seq, links = data.get("origin"), data.get("seq"), data.get("links")
        if not isinstance(origin, str) or not isinstance(seq, int) or not isinstance(links, dict):
            return None
        parsed = {}
        for peer, ad in links.items():
            if not (isinstance(peer, str) and isinstance(ad, dict)
                    and isinstance(ad.get("up"), bool)
                    and isinstance(ad.get("available_bits"), int)):
                return None
            rate = ad.get("rate_bps")
            parsed[peer] = LinkAd(ad["up"], max(0, ad["available_bits"]),
                                  float(rate) if isinstance(rate, int | float) else None)
        return cls(origin, seq, parsed, now)


def _states(ad: Advert) -> dict[str, bool]:
    return {peer: link.up for peer, link in ad.links.items()}


class NoPath(Exception):
    """No chain of working links with enough key joins the two KMEs."""


class LinkStateDb:
    def __init__(self, own_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.own_id = own_id
        self.clock = clock
        self.adverts: dict[str, Advert] = {}

    def set_own(self, links: dict[str, LinkAd]) -> Advert:
        seq = max(time.time_ns(), self.adverts[self.own_id].seq + 1
                  if self.own_id in self.adverts else 0)
        ad = Advert(self.own_id, seq, dict(links), self.clock())
        self.adverts[self.own_id] = ad
        return ad

    def merge(self, items: Iterable[Any]) -> bool:
        """Take newer adverts from a neighbour; True if a link came, went, or changed state.

        Key levels change all the time and travel with the periodic adverts;
        only these changes are worth passing on at once.
        """
        now = self.clock()
        changed = False
        for item in items:
            ad = Advert.from_json(item, now)
            if ad is None or ad.origin == self.own_id:
                continue
            known = self.adverts.get(ad.origin)
            if known is None or ad.seq > known.seq:
                self.adverts[ad.origin] = ad
                changed = changed or known is None or _states(known) != _states(ad)
        return changed

    def fresh(self) -> list[Advert]:
        now = self.clock()
        for origin in [o for o, a in self.adverts.items()
                       if o != self.own_id and now - a.received > MAX_AGE_S]:
            del self.adverts[origin]
        return list(self.adverts.values())

    def edges(self) -> dict[tuple[str, str], int]:
        """Usable links as (a, b) -> available bits, for both directions.

        Both ends must advertise the link as up; the available key is the
        lower of their two counts (each end counts its own copy).
        """
        ads = {a.origin: a for a in self.fresh()}
        out: dict[tuple[str, str], int] = {}
        for a, ad in ads.items():
            for b, link in ad.links.items():
                back = ads.get(b, Advert(b, 0, {})).links.get(a)
                if link.up and back is not None and back.up:
                    out[(a, b)] = min(link.available_bits, back.available_bits)
        return out

    def path(self, src: str, dst: str, need_bits: int,
             avoid: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
        """The KMEs from `src` to `dst` inclusive; raises NoPath."""
        edges = self.edges()
        graph: dict[str, list[tuple[str, int]]] = {}
        for (a, b), bits in edges.items():
            if bits >= need_bits and (a, b) not in avoid and (b, a) not in avoid:
                graph.setdefault(a, []).append((b, bits))
        best: dict[str, float] = {src: 0.0}
        prev: dict[str, str] = {}
        heap: list[tuple[float, str]] = [(0.0, src)]
        while heap:
            cost, node = heapq.heappop(heap)
            if node == dst:
                break
            if cost > best.get(node, float("inf")):
                continue
            for nxt, bits in graph.get(node, []):
                c = cost + 1.0 + need_bits / max(bits, 1)
                if c < best.get(nxt, float("inf")):
                    best[nxt] = c
                    prev[nxt] = node
                    heapq.heappush(heap, (c, nxt))
        if dst not in best:
            raise NoPath(f"no path of working QKD links with {need_bits} bits of key "
                         f"from {src} to {dst}")
        hops = [dst]
        while hops[-1] != src:
            hops.append(prev[hops[-1]])
        return hops[::-1]

    def rate_bps(self, a: str, b: str) -> float | None:
        """Modelled key rate of link a-b as either end advertises it."""
        for x, y in ((a, b), (b, a)):
            ad = self.adverts.get(x)
            link = ad.links.get(y) if ad is not None else None
            if link is not None and link.rate_bps is not None:
                return link.rate_bps
        return None

    def bottleneck_bits(self, path: list[str]) -> int:
        edges = self.edges()
        return min((edges.get((a, b), 0) for a, b in itertools.pairwise(path)),
                   default=0)
