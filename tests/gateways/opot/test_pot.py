"""Proof of transit: field math, profiles, masks, and the four-node chain in both modes."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from gateways.opot.errors import InvalidProof, NotKeyed
from gateways.opot.masks import LinkKeys, MaskKey
from gateways.opot.pot import (
    PRIME,
    Controller,
    Egress,
    Ingress,
    Profile,
    Proof,
    Transit,
    hop,
    lagrange_constants,
    poly_eval,
    reconstruct,
    verifies,
)
from keyclient.installer import KeyInstaller, SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret

VECTORS = json.loads((Path(__file__).parent / "vectors.json").read_text())
NODES = ("ingress", "sf1", "sf2", "egress")
PATH = "uc15"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def session_key(epoch: int, raw: bytes | None = None) -> SessionKey:
    return SessionKey(epoch, KeySource.QKD, f"kid-{epoch}", Secret(raw or os.urandom(32)))


@dataclass
class Link:
    """Both ends of one link's mask keys, fed the same QKD key (as a KeySession would)."""

    tx: LinkKeys     # at the upstream node
    rx: LinkKeys     # at the downstream node

    def install(self, epoch: int, key: SessionKey | None = None) -> None:
        key = key or session_key(epoch)
        self.rx.install(epoch, key)
        self.tx.install(epoch, key)

    def activate(self, epoch: int) -> None:
        self.tx.activate(epoch)
        self.rx.activate(epoch)

    def retire(self, epoch: int) -> None:
        self.tx.retire(epoch)
        self.rx.retire(epoch)


class Chain:
    """ingress -> sf1 -> sf2 -> egress, every node and link keyed."""

    def __init__(self, *, ordered: bool, clock: FakeClock | None = None,
                 rnd: list[int] | None = None) -> None:
        self.clock = clock or FakeClock()
        self.links = [Link(LinkKeys(PATH, a, b), LinkKeys(PATH, a, b))
                      for a, b in itertools.pairwise(NODES)]
        for link in self.links:
            link.install(1)
            link.activate(1)
        source = None
        if rnd is not None:
            values = iter(rnd)
            source = lambda p: next(values)  # noqa: E731
        self.ingress = Ingress("ingress", ordered=ordered, downstream=self.links[0].tx,
                               rnd=source, clock=self.clock)
        self.sf1 = Transit("sf1", ordered=ordered, upstream=self.links[0].rx,
                           downstream=self.links[1].tx, clock=self.clock)
        self.sf2 = Transit("sf2", ordered=ordered, upstream=self.links[1].rx,
                           downstream=self.links[2].tx, clock=self.clock)
        self.egress = Egress("egress", ordered=ordered, upstream=self.links[2].rx,
                             clock=self.clock)
        self.controller = Controller(PATH, NODES)
        self.install(self.controller.rotate(os.urandom(32)))
        self.ingress.activate(0)

    def install(self, profile: Profile) -> None:
        self.ingress.install(profile.node("ingress"))
        self.sf1.install(profile.node("sf1"))
        self.sf2.install(profile.node("sf2"))
        self.egress.install(profile.verifier())

    def retire(self, index: int, after: float = 0.0) -> None:
        for role in (self.ingress, self.sf1, self.sf2, self.egress):
            role.retire(index, after)

    def through(self, proof: Proof) -> Proof:
        return self.sf2.forward(self.sf1.forward(proof))

    def send(self) -> None:
        self.egress.verify(self.through(self.ingress.start()))

    def accepts(self, proof: Proof) -> bool:
        try:
            self.egress.verify(proof)
        except InvalidProof:
            return False
        return True


# -- field math ------------------------------------------------------------------------------

def is_prime(n: int) -> bool:
    """Miller-Rabin with the first 12 prime bases: deterministic below 3.3e24."""
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n < 2:
        return False
    for b in bases:
        if n % b == 0:
            return n == b
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for b in bases:
        x = pow(b, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_prime_is_the_largest_below_2_to_64() -> None:
    assert PRIME == 2**64 - 59 == 18446744073709551557
    assert is_prime(PRIME)
    assert not any(is_prime(n) for n in range(PRIME + 1, 2**64))


small_primes = st.sampled_from([65537, 2**31 - 1, 2**61 - 1, PRIME])


@settings(max_examples=200)
@given(small_primes, st.integers(0, 10), st.data())
def test_lagrange_reconstructs_any_degree_k_polynomial_from_k_plus_1_shares(
        prime: int, k: int, data: st.DataObject) -> None:
    coeffs = data.draw(st.lists(st.integers(0, prime - 1), min_size=k + 1, max_size=k + 1))
    xs = data.draw(st.lists(st.integers(1, prime - 1), min_size=k + 1, max_size=k + 1,
                            unique=True))
    ys = [poly_eval(coeffs, x, prime) for x in xs]
    assert reconstruct(xs, ys, prime) == coeffs[0]
    # the LPCs are the Lagrange basis at 0: they sum to 1 (interpolating the constant 1)
    assert sum(lagrange_constants(xs, prime)) % prime == 1


@settings(max_examples=100)
@given(st.integers(1, 8), st.data())
def test_any_k_plus_1_of_more_shares_reconstruct(k: int, data: st.DataObject) -> None:
    coeffs = data.draw(st.lists(st.integers(0, PRIME - 1), min_size=k + 1, max_size=k + 1))
    xs = data.draw(st.lists(st.integers(1, PRIME - 1), min_size=k + 3, max_size=k + 3,
                            unique=True))
    picked = data.draw(st.permutations(range(k + 3)))[:k + 1]
    sub = [xs[i] for i in picked]
    assert reconstruct(sub, [poly_eval(coeffs, x) for x in sub]) == coeffs[0]


@settings(max_examples=100)
@given(st.binary(min_size=32, max_size=64), st.integers(2, 9), st.integers(0, PRIME - 1))
def test_all_hops_in_any_order_give_secret_plus_rnd(randomness: bytes, n: int,
                                                     rnd: int) -> None:
    nodes = [f"n{i}" for i in range(n)]
    profile = Controller.make_profile(nodes, randomness)
    assert reconstruct(profile.xs, profile.shares) == profile.secret
    cml = 0
    for name in reversed(nodes):          # plain PoT: the order does not matter
        cml = hop(profile.node(name), rnd, cml)
    assert cml == (profile.secret + rnd) % PRIME
    assert verifies(profile.verifier(), rnd, cml)
    assert not verifies(profile.verifier(), (rnd + 1) % PRIME, cml)


def test_lagrange_refuses_repeated_or_zero_points() -> None:
    with pytest.raises(ValueError):
        lagrange_constants([3, 3])
    with pytest.raises(ValueError):
        lagrange_constants([0, 5])


# -- profiles and masks: known answers -------------------------------------------------------

def test_profile_known_answer() -> None:
    v = VECTORS["profile"]
    profile = Controller.make_profile(v["nodes"], bytes.fromhex(v["randomness"]),
                                      index=v["index"], path=v["path"])
    assert VECTORS["prime"] == profile.prime == PRIME
    assert list(profile.xs) == v["xs"]
    assert list(profile.shares) == v["shares"]
    assert list(profile.poly2) == v["poly2"]
    assert [profile.pre_eval(i) for i in range(4)] == v["pre_evals"]
    assert list(profile.lpcs) == v["lpcs"]
    assert profile.secret == v["secret"]
    # the vector is consistent in itself, not only a snapshot
    assert reconstruct(v["xs"], v["shares"]) == v["secret"]
    assert list(lagrange_constants(v["xs"])) == v["lpcs"]
    assert [poly_eval([0, *v["poly2"]], x) for x in v["xs"]] == v["pre_evals"]


def test_packets_known_answer() -> None:
    v = VECTORS["profile"]
    profile = Controller.make_profile(v["nodes"], bytes.fromhex(v["randomness"]),
                                      path=v["path"])
    masks = [MaskKey(Secret(bytes.fromhex(link["mask_key"]))) for link in VECTORS["links"]]
    for pkt in VECTORS["packets"]:
        cml, plain = 0, []
        for name in NODES:
            cml = hop(profile.node(name), pkt["rnd"], cml)
            plain.append(cml)
        assert plain == pkt["plain_cml"]
        assert plain[-1] == (v["secret"] + pkt["rnd"]) % PRIME
        assert [c ^ m.mask(pkt["seq"]) for c, m in zip(plain, masks, strict=False)] \
            == pkt["ordered_wire_cml"]


def test_masks_known_answer_and_definition() -> None:
    for link in VECTORS["links"]:
        lk = LinkKeys(PATH, link["upstream"], link["downstream"])
        assert lk.label == link["label"]
        mask_key = session_key(link["epoch"], bytes.fromhex(link["qkd_key"])).derive(lk.label)
        assert mask_key.expose().hex() == link["mask_key"]
        lk.install(link["epoch"], session_key(link["epoch"], bytes.fromhex(link["qkd_key"])))
        key = lk.receiving(link["epoch"] & 1)
        assert key is not None
        for seq, want in link["masks"].items():
            s = int(seq)
            assert key.mask(s) == want
            # the definition: word s of the AES-256-CTR keystream, counter block from 0
            block = s // 2
            enc = Cipher(algorithms.AES(mask_key.expose()),
                         modes.CTR(block.to_bytes(16, "big"))).encryptor()
            stream = enc.update(bytes(16))
            assert int.from_bytes(stream[(s % 2) * 8:(s % 2) * 8 + 8], "big") == want


def test_profiles_are_deterministic_and_bound_to_index_and_path() -> None:
    r = os.urandom(32)
    a = Controller.make_profile(NODES, r, path=PATH)
    assert Controller.make_profile(NODES, Secret(r), path=PATH).shares == a.shares
    assert Controller.make_profile(NODES, r, index=1, path=PATH).shares != a.shares
    assert Controller.make_profile(NODES, r, path="other").shares != a.shares
    c = Controller(PATH, NODES)
    assert [c.rotate(r).index for _ in range(3)] == [0, 1, 0]


@pytest.mark.parametrize("nodes, randomness", [
    (["a"], bytes(32)), (["a", "a"], bytes(32)), (["a", "b|c"], bytes(32)),
    (["a", "b"], bytes(31)),
])
def test_make_profile_refuses(nodes: list[str], randomness: bytes) -> None:
    with pytest.raises(ValueError):
        Controller.make_profile(nodes, randomness)


def test_reprs_hide_secrets() -> None:
    profile = Controller.make_profile(NODES, os.urandom(32))
    key = MaskKey(Secret(os.urandom(32)))
    texts = [repr(profile), str(profile), repr(profile.node("sf1")), repr(profile.verifier()),
             repr(key), repr(LinkKeys(PATH, "a", "b"))]
    numbers = [profile.secret, *profile.shares, *profile.lpcs, key.mask(1)]
    for text in texts:
        for n in numbers:
            assert str(n) not in text and hex(n)[2:] not in text


# -- the chain -------------------------------------------------------------------------------

@pytest.mark.parametrize("ordered", [True, False])
def test_full_chain_verifies_many_packets(ordered: bool) -> None:
    chain = Chain(ordered=ordered)
    for _ in range(2000):
        chain.send()
    assert chain.egress.verified == 2000
    assert not chain.egress.rejected


def test_chain_matches_the_known_answers() -> None:
    v = VECTORS["profile"]
    pkts = VECTORS["packets"]
    chain = Chain(ordered=True, rnd=[p["rnd"] for p in pkts])
    for role in (chain.ingress, chain.sf1, chain.sf2, chain.egress):
        role.retire(0)
    chain.install(Controller.make_profile(v["nodes"], bytes.fromhex(v["randomness"]),
                                          path=v["path"]))
    for i, link in enumerate(VECTORS["links"]):
        chain.links[i].retire(1)
        chain.links[i].install(1, session_key(1, bytes.fromhex(link["qkd_key"])))
        chain.links[i].activate(1)
    for pkt in pkts:
        p0 = chain.ingress.start()
        p1 = chain.sf1.forward(p0)
        p2 = chain.sf2.forward(p1)
        assert [p0.cml, p1.cml, p2.cml] == pkt["ordered_wire_cml"]
        assert (p0.seq, p0.rnd) == (pkt["seq"], pkt["rnd"])
        chain.egress.verify(p2)


@pytest.mark.parametrize("ordered", [True, False])
def test_a_packet_that_bypasses_sf1_fails(ordered: bool) -> None:
    chain = Chain(ordered=ordered)
    chain.send()
    with pytest.raises(InvalidProof):
        chain.egress.verify(chain.sf2.forward(chain.ingress.start()))
    with pytest.raises(InvalidProof):       # nor does one that skips both functions
        chain.egress.verify(chain.ingress.start())
    chain.send()                            # the refusals did not disturb good traffic


def test_swapped_service_functions_fail_ordered_but_pass_plain_pot() -> None:
    ordered, plain = Chain(ordered=True), Chain(ordered=False)
    for chain in (ordered, plain):
        chain.send()
    # ingress -> sf2 -> sf1 -> egress
    swapped_plain = plain.sf1.forward(plain.sf2.forward(plain.ingress.start()))
    plain.egress.verify(swapped_plain)      # plain PoT cannot see the order: accepted
    swapped = ordered.sf1.forward(ordered.sf2.forward(ordered.ingress.start()))
    with pytest.raises(InvalidProof):
        ordered.egress.verify(swapped)
    assert ordered.egress.rejected == {"proof": 1}
    ordered.send()


@pytest.mark.parametrize("ordered", [True, False])
def test_forged_cml_or_rnd_fails(ordered: bool) -> None:
    chain = Chain(ordered=ordered)
    for change in ({"cml": 1}, {"rnd": 1}, {"rnd": PRIME}, {"profile": 1}, {"profile": 2}):
        good = chain.through(chain.ingress.start())
        forged = good._replace(**{k: (getattr(good, k) ^ v if k == "cml" else
                                      (getattr(good, k) + v)) for k, v in change.items()})
        assert not chain.accepts(forged), change
        assert chain.accepts(good)           # the forgery did not burn the sequence number
    if ordered:                              # the key phase and sequence are bound, too
        good = chain.through(chain.ingress.start())
        assert not chain.accepts(good._replace(phase=good.phase ^ 1))
        assert not chain.accepts(good._replace(seq=good.seq + 1000))
        assert not chain.accepts(good._replace(ordered=False))
        assert chain.accepts(good)
    assert chain.egress.rejected["proof"] + chain.egress.rejected["profile"] >= 5


def test_errors_are_opaque() -> None:
    chain = Chain(ordered=True)
    good = chain.through(chain.ingress.start())
    messages = set()
    for bad in (good._replace(cml=good.cml ^ 1), good._replace(profile=1),
                good._replace(phase=good.phase ^ 1)):
        with pytest.raises(InvalidProof) as exc:
            chain.egress.verify(bad)
        messages.add(str(exc.value))
    chain.egress.verify(good)
    with pytest.raises(InvalidProof) as exc:
        chain.egress.verify(good)
    messages.add(str(exc.value))
    assert messages == {"invalid proof of transit"}
    assert chain.egress.rejected == {"proof": 1, "profile": 1, "key": 1, "replay": 1}


@pytest.mark.parametrize("ordered", [True, False])
def test_replayed_proof_is_rejected(ordered: bool) -> None:
    chain = Chain(ordered=ordered)
    proofs = [chain.through(chain.ingress.start()) for _ in range(10)]
    for p in reversed(proofs):                # reordering within the window is fine
        chain.egress.verify(p)
    for p in proofs:
        assert not chain.accepts(p)
    for _ in range(5000):                     # the window moves on: 4096 sequence numbers
        chain.send()
    late = chain.through(chain.ingress.start())
    for _ in range(4100):
        chain.send()
    assert not chain.accepts(late)            # too old for the window
    assert chain.egress.rejected["replay"] == 11


def test_a_forged_proof_does_not_move_the_replay_window() -> None:
    chain = Chain(ordered=True)
    chain.send()
    ahead = chain.through(chain.ingress.start())
    forged = ahead._replace(seq=10**9)        # far ahead: would push seq 2.. out of the window
    assert not chain.accepts(forged)
    assert chain.accepts(ahead)


def test_plain_pot_limits_that_ordered_pot_closes() -> None:
    """Documented weaknesses of plain PoT (draft 8.3, 8.9.1), shown against ordered PoT."""
    ordered, plain = Chain(ordered=True), Chain(ordered=False)
    # 1. the sequence number is not bound to a plain proof: a replay under a new one passes
    for chain, passes in ((plain, True), (ordered, False)):
        seen = chain.through(chain.ingress.start())
        chain.egress.verify(seen)
        assert chain.accepts(seen._replace(seq=seen.seq + 100)) is passes
    # 2. a plain CML before the egress is A + B * RND for the whole profile: two observed
    #    packets give A and B, and a valid proof for any RND follows
    for chain, passes in ((plain, True), (ordered, False)):
        p1, p2 = (chain.through(chain.ingress.start()) for _ in range(2))
        b = (p2.cml - p1.cml) * pow(p2.rnd - p1.rnd, -1, PRIME) % PRIME
        a = (p1.cml - b * p1.rnd) % PRIME
        rnd = 424242
        forged = p2._replace(seq=p2.seq + 1, rnd=rnd, cml=(a + b * rnd) % PRIME)
        assert chain.accepts(forged) is passes


# -- profile rotation and rekeying -----------------------------------------------------------

def test_profile_rotation_keeps_packets_in_flight_and_refuses_a_retired_profile() -> None:
    chain = Chain(ordered=True)
    chain.send()
    in_flight = [chain.through(chain.ingress.start()) for _ in range(5)]   # profile 0
    stamped = [chain.ingress.start() for _ in range(4)]      # still before sf1, profile 0
    chain.install(chain.controller.rotate(os.urandom(32)))   # profile 1 everywhere
    with pytest.raises(ValueError):                          # index 0 is still in use
        chain.sf1.install(Controller.make_profile(NODES, os.urandom(32), path=PATH)
                          .node("sf1"))
    chain.ingress.activate(1)
    chain.retire(0, after=5.0)                               # overlap: 5 s on the clock
    new = [chain.through(chain.ingress.start()) for _ in range(5)]
    assert {p.profile for p in new} == {1} and {p.profile for p in in_flight} == {0}
    for p in [*new, *in_flight, *(chain.through(s) for s in stamped[:2])]:
        chain.egress.verify(p)                               # no false rejection
    at_sf2 = chain.sf1.forward(stamped[2])
    chain.clock.t += 5.0                                     # the overlap is over
    assert chain.egress.profiles == chain.sf1.profiles == [1]
    with pytest.raises(InvalidProof):
        chain.sf1.forward(stamped[3])                        # a transit drops it
    with pytest.raises(InvalidProof):
        chain.sf2.forward(at_sf2)
    before_egress = chain.through(chain.ingress.start())._replace(profile=0)
    assert not chain.accepts(before_egress)                  # and so does the egress
    assert chain.egress.rejected == {"profile": 1}
    chain.send()
    # the next rotation reuses index 0
    chain.install(chain.controller.rotate(os.urandom(32)))
    chain.ingress.activate(0)
    chain.retire(1)
    for _ in range(10):
        chain.send()
    assert chain.egress.rejected == {"profile": 1}


def test_rekeying_a_link_causes_no_false_rejection() -> None:
    chain = Chain(ordered=True)
    link = chain.links[1]                                   # sf1 -> sf2
    epoch = 1

    def traffic() -> Iterator[Proof]:
        while True:
            yield chain.sf1.forward(chain.ingress.start())   # in flight between sf1 and sf2

    gen = traffic()
    sent = []
    for _ in range(3):                                      # three rekeys, one per epoch
        sent += [next(gen) for _ in range(20)]
        key = session_key(epoch + 1)
        link.rx.install(epoch + 1, key)                     # the receiver first
        sent += [next(gen) for _ in range(20)]
        link.tx.install(epoch + 1, key)
        link.tx.activate(epoch + 1)                                 # sender switches
        link.rx.activate(epoch + 1)
        sent += [next(gen) for _ in range(20)]
        for p in sent:                                      # old and new phase both arrive
            chain.egress.verify(chain.sf2.forward(p))
        sent = []
        link.retire(epoch)                                  # after the overlap
        epoch += 1
        assert link.rx.epochs == [epoch]
    assert {p.phase for p in [next(gen) for _ in range(3)]} == {epoch & 1}
    assert chain.egress.verified == 3 * 60 and not chain.egress.rejected
    # a packet still masked under a retired epoch is dropped
    stale = next(gen)
    link.install(epoch + 1)
    link.activate(epoch + 1)
    link.retire(epoch)
    with pytest.raises(InvalidProof):
        chain.sf2.forward(stale)


def test_link_keys_are_a_key_installer_and_fail_closed() -> None:
    keys: KeyInstaller = LinkKeys(PATH, "ingress", "sf1")
    assert isinstance(keys, LinkKeys)
    with pytest.raises(NotKeyed):
        keys.sending()
    keys.install(1, session_key(1))
    with pytest.raises(ValueError):
        keys.activate(2)
    keys.activate(1)
    assert keys.sending()[0] == 1 and keys.active_epoch == 1
    keys.invalidate("KME unreachable")
    assert keys.epochs == [] and keys.closed_reason == "KME unreachable"
    with pytest.raises(NotKeyed):
        keys.sending()


def test_installing_over_an_active_epoch_is_refused() -> None:
    keys = LinkKeys(PATH, "ingress", "sf1")
    keys.install(1, session_key(1))
    keys.activate(1)
    keys.install(2, session_key(2))
    with pytest.raises(ValueError):
        keys.install(3, session_key(3))           # phase 1 is the active epoch 1
    keys.activate(2)
    keys.install(3, session_key(3))               # epoch 1 superseded, not active any more
    assert keys.epochs == [2, 3]
    with pytest.raises(ValueError):
        keys.install(1, session_key(1))           # older than what holds the phase


def test_unkeyed_nodes_fail_closed() -> None:
    chain = Chain(ordered=True)
    chain.send()
    chain.links[0].tx.invalidate("KME down")
    with pytest.raises(NotKeyed):
        chain.ingress.start()
    chain.links[0].rx.invalidate("KME down")
    with pytest.raises(InvalidProof):
        chain.sf1.forward(Proof(0, 99, 1, 1, True, 1))
    fresh = Ingress("ingress", ordered=False)
    with pytest.raises(NotKeyed):
        fresh.start()
    with pytest.raises(ValueError):
        Ingress("ingress", ordered=True)              # ordered needs its downstream link
    with pytest.raises(ValueError):
        chain.egress.install(Controller.make_profile(NODES, os.urandom(32)).node("sf1"))
    chain.links[2].retire(1)
    assert not chain.accepts(Proof(0, 10**6, 1, 1, True, 1))


def test_modes_do_not_mix() -> None:
    ordered, plain = Chain(ordered=True), Chain(ordered=False)
    with pytest.raises(InvalidProof):
        ordered.sf1.forward(plain.ingress.start())
    assert not plain.accepts(ordered.through(ordered.ingress.start()))
