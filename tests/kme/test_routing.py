"""Link-state routing: what adverts mean, which path a relay takes, when news is stale."""

from __future__ import annotations

import pytest

from kme.routing import MAX_AGE_S, Advert, LinkAd, LinkStateDb, NoPath


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ad(origin: str, seq: int, **links: tuple[bool, int]) -> dict[str, object]:
    return Advert(origin, seq, {p: LinkAd(up, bits) for p, (up, bits) in links.items()}).to_json()


def db_with(edges: dict[tuple[str, str], int], down: set[tuple[str, str]] = frozenset(),
            clock: Clock | None = None) -> LinkStateDb:
    """A view from A of undirected links with `bits` of key at both ends."""
    links: dict[str, dict[str, LinkAd]] = {}
    for (a, b), bits in edges.items():
        up = (a, b) not in down and (b, a) not in down
        links.setdefault(a, {})[b] = LinkAd(up, bits)
        links.setdefault(b, {})[a] = LinkAd(up, bits)
    db = LinkStateDb("A", clock or Clock())
    db.set_own(links.pop("A", {}))
    db.merge(Advert(o, 1, ls).to_json() for o, ls in links.items())
    return db


CHAIN_AND_DETOUR = {("A", "B"): 10_000, ("B", "C"): 10_000, ("C", "D"): 10_000,
                    ("A", "E"): 10_000, ("E", "F"): 10_000, ("F", "G"): 10_000,
                    ("G", "D"): 10_000}


def test_shortest_path_wins() -> None:
    assert db_with(CHAIN_AND_DETOUR).path("A", "D", 256) == ["A", "B", "C", "D"]


def test_a_link_down_at_either_end_reroutes() -> None:
    assert db_with(CHAIN_AND_DETOUR, down={("B", "C")}).path("A", "D", 256) == \
        ["A", "E", "F", "G", "D"]
    # Only one end says down: still unusable (both ends must agree it works).
    db = db_with(CHAIN_AND_DETOUR)
    db.merge([ad("C", 2, B=(False, 10_000), D=(True, 10_000))])
    assert db.path("A", "D", 256) == ["A", "E", "F", "G", "D"]


def test_links_without_enough_key_are_avoided() -> None:
    edges = dict(CHAIN_AND_DETOUR)
    edges[("C", "D")] = 100
    assert db_with(edges).path("A", "D", 256) == ["A", "E", "F", "G", "D"]
    assert db_with(edges).path("A", "D", 64) == ["A", "B", "C", "D"]


def test_among_equal_hops_the_better_stocked_path_wins() -> None:
    edges = {("A", "B"): 1_000, ("B", "D"): 1_000, ("A", "C"): 100_000, ("C", "D"): 100_000}
    assert db_with(edges).path("A", "D", 512) == ["A", "C", "D"]


def test_avoid_and_no_path() -> None:
    db = db_with(CHAIN_AND_DETOUR)
    assert db.path("A", "D", 256, frozenset({("C", "B")})) == ["A", "E", "F", "G", "D"]
    with pytest.raises(NoPath, match="from A to D"):
        db.path("A", "D", 256, frozenset({("B", "C"), ("G", "D")}))
    with pytest.raises(NoPath):
        db.path("A", "Z", 256)


def test_newer_adverts_win_and_state_changes_are_news() -> None:
    db = db_with({("A", "B"): 10, ("B", "C"): 10})
    assert not db.merge([ad("B", 1, A=(True, 10), C=(True, 10))])  # same seq: ignored
    assert not db.merge([ad("B", 2, A=(True, 99), C=(True, 99))])  # key level only: no news
    assert db.adverts["B"].links["C"].available_bits == 99
    assert db.merge([ad("B", 3, A=(True, 99), C=(False, 99))])  # a link went down: news
    assert not db.merge([ad("B", 2, A=(True, 1), C=(True, 1))])  # older: ignored
    assert db.adverts["B"].seq == 3
    assert not db.merge([ad("A", 10**20, B=(False, 0))])  # nobody speaks for this KME
    assert db.adverts["A"].links["B"].up


def test_malformed_adverts_are_ignored() -> None:
    db = db_with({("A", "B"): 10})
    before = {o: a.seq for o, a in db.adverts.items()}
    assert not db.merge([None, "x", {"origin": "Z"}, {"origin": "Z", "seq": "1", "links": {}},
                         {"origin": "Z", "seq": 1, "links": {"A": {"up": "yes"}}},
                         {"origin": "Z", "seq": 1, "links": {"A": {"up": True}}}])
    assert {o: a.seq for o, a in db.adverts.items()} == before


def test_silent_kmes_age_out() -> None:
    clock = Clock()
    db = db_with({("A", "B"): 10_000, ("B", "C"): 10_000}, clock=clock)
    assert db.path("A", "C", 8) == ["A", "B", "C"]
    clock.now += MAX_AGE_S + 1
    assert {a.origin for a in db.fresh()} == {"A"}  # our own advert never ages out
    with pytest.raises(NoPath):
        db.path("A", "C", 8)


def test_bottleneck() -> None:
    edges = {("A", "B"): 5_000, ("B", "C"): 700}
    db = db_with(edges)
    assert db.bottleneck_bits(["A", "B", "C"]) == 700
    assert db.bottleneck_bits(["A"]) == 0
