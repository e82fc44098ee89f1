"""Proof of transit (draft-ietf-sfc-proof-of-transit), plain and ordered, over a 64-bit field.

The scheme (draft sections 3.2 "Solution Approach" and 3.3.2-3.3.3, the version with a
second polynomial; section numbers as in the draft's -0x revisions):

* Field: integers modulo PRIME = 2^64 - 59, the largest prime below 2^64, so every value
  fits the draft's 64-bit RND and CML fields (section 4, "Sizing the Data for Proof of
  Transit", allows 64-bit numbers).
* Setup (3.2.1): for a path of n nodes (ingress, service functions, egress) the controller
  draws POLY-1 of degree k = n - 1, secret, whose constant coefficient is SECRET, and
  POLY-2 of degree k whose coefficients are known to the nodes except its constant
  coefficient, which is each packet's RND. Node i gets a point x_i (distinct, non-zero),
  its share POLY-1(x_i), the value of POLY-2 at x_i without the constant ("pre-evaluated"
  POLY-2) and its Lagrange polynomial constant LPC_i = prod_{j != i} x_j / (x_j - x_i).
  Only the verifier (egress) gets SECRET. All of it comes from QKD-derived randomness
  (`Controller.make_profile`), deterministically.
* In transit (3.2.2): the ingress draws RND (uniform below PRIME) and starts CML = 0; every
  node, the ingress and the egress included, does
      CML = CML + LPC_i * (POLY-1(x_i) + POLY-2(x_i)) mod PRIME
  where POLY-2(x_i) = pre-evaluated POLY-2 + RND.
* Verification (3.2.3): after its own update the egress accepts iff CML == SECRET + RND
  mod PRIME: with all k + 1 shares the sum is the Lagrange interpolation of POLY-1 + POLY-2
  at 0. The comparison is constant time; every failure is one `InvalidProof`.
* Profiles (3.4 "Operational Aspects"): two profile indices, 0 and 1 (the P bit on the
  wire). The controller installs the next profile on every node under the other index, the
  ingress switches to it, and the old one is retired after packets in flight have left
  (`retire(index, after=...)`, on an injectable clock).
* Replay (8.3 "Anti-Replay"): the ingress numbers packets (64-bit sequence from 1, never
  repeated on a path; persist or time-base `first_seq` across restarts); the egress keeps
  an RFC 6479-style sliding window of 4096 sequence numbers behind the highest accepted
  one, checked before and updated only after a proof verified.

Plain PoT proves that every node added its share, not in which order: addition commutes,
so a packet that crossed SF2 before SF1 verifies (section 8.9.1 "Node Ordering"). Its
CML also reaches the egress as A + B * RND with A, B fixed per profile, so anyone who sees
two packets there can forge proofs for that profile, and its sequence number is not bound
to the proof. Ordered PoT (section 3.5 "Ordered POT (OPOT)", Aguado et al., JOCN 12(4),
2020) masks CML on every link with a per-packet mask from that link's QKD key
(`gateways.opot.masks`): each node unmasks with its upstream key, updates and re-masks
with its downstream key. A skipped or swapped node unmasks with the wrong key and the
egress sees noise; the masks are one-time pads, so CML on the wire reveals nothing; and
masks depend on the sequence number, which binds it to the proof.
"""

from __future__ import annotations

import hmac
import itertools
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

from gateways.opot.errors import InvalidProof, NotKeyed
from gateways.opot.masks import LinkKeys
from gateways.replay import ReplayWindow
from keyclient.kdf import hkdf
from qgw.secret import Secret

PRIME = 2**64 - 59           # 18446744073709551557, the largest prime below 2**64
SEQ_LIMIT = 2**64            # sequence numbers are 64-bit, from 1
MAX_NODES = 64
MIN_RANDOMNESS = 32          # bytes of QKD-derived randomness per profile
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")

Clock = Callable[[], float]
RndSource = Callable[[int], int]   # prime -> uniform value below it

# -- field arithmetic -------------------------------------------------------------------------


def inverse(a: int, prime: int = PRIME) -> int:
    return pow(a, -1, prime)


def poly_eval(coeffs: Sequence[int], x: int, prime: int = PRIME) -> int:
    """The polynomial with coefficients `coeffs` (constant first) at x, by Horner's rule."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % prime
    return acc


def lagrange_constants(xs: Sequence[int], prime: int = PRIME) -> tuple[int, ...]:
    """LPC_i = prod_{j != i} x_j / (x_j - x_i): the Lagrange basis polynomials at 0."""
    if len(set(x % prime for x in xs)) != len(xs) or any(x % prime == 0 for x in xs):
        raise ValueError("points must be distinct and non-zero")
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        out.append(num * inverse(den, prime) % prime)
    return tuple(out)


def reconstruct(xs: Sequence[int], ys: Sequence[int], prime: int = PRIME) -> int:
    """The value at 0 of the polynomial of degree < len(xs) through the points (Shamir)."""
    return sum(y * c for y, c in zip(ys, lagrange_constants(xs, prime), strict=True)) % prime


# -- profiles ---------------------------------------------------------------------------------


class Proof(NamedTuple):
    """The proof of transit one packet carries (the TLV of `gateways.opot.wire`).

    `profile` is the P bit, `seq` the ingress's packet number, `rnd` the per-packet RND,
    `cml` the cumulative value (masked on the wire when `ordered`), `phase` the key phase of
    the link the packet is on (ordered PoT only; 0 otherwise). A named tuple: a frozen
    dataclass costs microseconds per packet to build.
    """

    profile: int
    seq: int
    rnd: int
    cml: int
    ordered: bool = True
    phase: int = 0


# Builds a Proof from a 6-tuple without NamedTuple's Python-level __new__ (4x faster).
_new_proof = tuple.__new__


@dataclass(frozen=True, slots=True, repr=False)
class NodeProfile:
    """What one node holds of one profile. `share` is secret; nothing numeric is printed."""

    index: int
    node: str
    prime: int
    x: int
    share: int       # POLY-1(x)
    pre_eval: int    # POLY-2(x) without its constant coefficient (which is the packet's RND)
    lpc: int

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, node={self.node!r}, <SECRET>)"


@dataclass(frozen=True, slots=True, repr=False)
class VerifierProfile(NodeProfile):
    """The egress's profile: its own share plus SECRET (POLY-1 at 0)."""

    secret: int = 0


@dataclass(frozen=True, repr=False)
class Profile:
    """The controller's whole view of one profile; hand out `node()` and `verifier()`."""

    index: int
    path: str
    nodes: tuple[str, ...]
    prime: int
    xs: tuple[int, ...]
    shares: tuple[int, ...]       # POLY-1(x_i), secret
    poly2: tuple[int, ...]        # POLY-2's coefficients of x^1 .. x^k
    lpcs: tuple[int, ...]
    secret: int                   # POLY-1(0), the verifier's SECRET

    def __repr__(self) -> str:
        return f"Profile(index={self.index}, path={self.path!r}, nodes={self.nodes}, <SECRET>)"

    def pre_eval(self, i: int) -> int:
        return poly_eval((0, *self.poly2), self.xs[i], self.prime)

    def node(self, name: str) -> NodeProfile:
        i = self.nodes.index(name)
        if i == len(self.nodes) - 1:
            return self.verifier()
        return NodeProfile(self.index, name, self.prime, self.xs[i], self.shares[i],
                           self.pre_eval(i), self.lpcs[i])

    def verifier(self) -> VerifierProfile:
        i = len(self.nodes) - 1
        return VerifierProfile(self.index, self.nodes[i], self.prime, self.xs[i],
                               self.shares[i], self.pre_eval(i), self.lpcs[i], self.secret)


def hop(node: NodeProfile, rnd: int, cml: int) -> int:
    """One node's update of CML (draft 3.2.2), unmasked."""
    p = node.prime
    return (cml + node.lpc * (node.share + node.pre_eval + rnd)) % p


def verifies(verifier: VerifierProfile, rnd: int, cml: int) -> bool:
    """Whether CML, after the verifier's own `hop`, equals SECRET + RND (constant time)."""
    expected = (verifier.secret + rnd) % verifier.prime
    return hmac.compare_digest(cml.to_bytes(8, "big"), expected.to_bytes(8, "big"))


def _check_name(what: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what} {name!r}: use letters, digits and _ . : -")


def _field_elements(ikm: bytes, label: str, prime: int) -> Iterator[int]:
    """Uniform elements below `prime`, by rejection from HKDF output blocks."""
    size = (prime.bit_length() + 7) // 8
    shift = size * 8 - prime.bit_length()
    for block in itertools.count():
        out = hkdf(ikm, salt=None, label=f"{label}|block={block}", length=32 * size).expose()
        for off in range(0, len(out), size):
            v = int.from_bytes(out[off:off + size], "big") >> shift
            if v < prime:
                yield v


class Controller:
    """Derives and rotates a path's profiles from QKD-derived randomness.

    `rotate(randomness)` gives the next profile, alternating indices 0, 1, 0, ...; install
    it on every node, `Ingress.activate` it, and retire the previous index after the
    packets in flight under it have arrived.
    """

    def __init__(self, path: str, nodes: Sequence[str], *, prime: int = PRIME) -> None:
        self.path = path
        self.nodes = tuple(nodes)
        self.prime = prime
        self.next_index = 0

    def rotate(self, randomness: bytes | Secret) -> Profile:
        profile = self.make_profile(self.nodes, randomness, index=self.next_index,
                                    path=self.path, prime=self.prime)
        self.next_index ^= 1
        return profile

    def abandon(self, profile: Profile) -> None:
        """`profile` never went live (a node refused it or was unreachable): the next
        rotation reuses its index, so the live profile's index is never taken."""
        self.next_index = profile.index

    @staticmethod
    def make_profile(nodes: Sequence[str], randomness: bytes | Secret, *, index: int = 0,
                     path: str = "", prime: int = PRIME) -> Profile:
        """A profile for the path `nodes` (ingress first, egress last), deterministic in
        `randomness` (at least 32 bytes of QKD-derived key material), `index`, `path`.

        HKDF-SHA256 (label "opot/profile|path=..|index=..|nodes=a,b,..") expands the
        randomness; field elements are drawn by rejection in this order: the n points
        x_i (distinct, non-zero), POLY-1's n coefficients (constant = SECRET first),
        POLY-2's n - 1 non-constant coefficients.
        """
        nodes = tuple(nodes)
        if not 2 <= len(nodes) <= MAX_NODES or len(set(nodes)) != len(nodes):
            raise ValueError(f"a path has 2 to {MAX_NODES} distinct nodes")
        for name in nodes:
            _check_name("node", name)
        if path:
            _check_name("path", path)
        if index not in (0, 1):
            raise ValueError("the profile index is 0 or 1")
        if not len(nodes) < prime < 2**64:
            raise ValueError("the prime must fit 64 bits and exceed the number of nodes")
        ikm = randomness.expose() if isinstance(randomness, Secret) else bytes(randomness)
        if len(ikm) < MIN_RANDOMNESS:
            raise ValueError(f"a profile needs at least {MIN_RANDOMNESS} bytes of randomness")
        n = len(nodes)
        draw = _field_elements(ikm, f"opot/profile|path={path}|index={index}|"
                                    f"nodes={','.join(nodes)}", prime)
        xs: list[int] = []
        while len(xs) < n:
            x = next(draw)
            if x != 0 and x not in xs:
                xs.append(x)
        poly1 = [next(draw) for _ in range(n)]
        poly2 = tuple(next(draw) for _ in range(n - 1))
        return Profile(index=index, path=path, nodes=nodes, prime=prime, xs=tuple(xs),
                       shares=tuple(poly_eval(poly1, x, prime) for x in xs), poly2=poly2,
                       lpcs=lagrange_constants(xs, prime), secret=poly1[0])


# -- roles ------------------------------------------------------------------------------------

# What a role keeps per profile index, ready for per-packet use:
# (LPC_i * (share + pre_eval) mod p, LPC_i, p, SECRET or 0)
_Hop = tuple[int, int, int, int]


class _RandomPool:
    """RND source: os.urandom drawn 4 KiB at a time, rejection below the prime."""

    _WORDS = struct.Struct("!512Q")

    def __init__(self) -> None:
        self._vals: list[int] = []

    def __call__(self, prime: int) -> int:
        shift = 64 - prime.bit_length()
        vals = self._vals
        while True:
            if not vals:
                vals.extend(self._WORDS.unpack(os.urandom(self._WORDS.size)))
            v = vals.pop() >> shift
            if v < prime:
                return v


class _Role:
    def __init__(self, node: str, *, ordered: bool, clock: Clock) -> None:
        self.node = node
        self.ordered = ordered
        self._clock = clock
        self._hops: list[_Hop | None] = [None, None]
        self._until: list[float | None] = [None, None]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.node!r}, ordered={self.ordered}, "
                f"profiles={self.profiles})")

    @property
    def profiles(self) -> list[int]:
        return [i for i in (0, 1) if self._get(i) is not None]

    def install(self, profile: NodeProfile) -> None:
        """Accept packets under `profile` (its index must be free: retire the old one first)."""
        if profile.node != self.node:
            raise ValueError(f"profile for {profile.node!r} given to {self.node!r}")
        if self._get(profile.index) is not None:
            raise ValueError(f"{self.node}: profile index {profile.index} is in use; "
                             "retire it first")
        p = profile.prime
        secret = profile.secret if isinstance(profile, VerifierProfile) else 0
        self._hops[profile.index] = (profile.lpc * (profile.share + profile.pre_eval) % p,
                                     profile.lpc, p, secret)
        self._until[profile.index] = None

    def retire(self, index: int, after: float = 0.0) -> None:
        """Forget profile `index` now, or `after` seconds from now (on this role's clock)."""
        if after > 0:
            self._until[index] = self._clock() + after
        else:
            self._hops[index] = None
            self._until[index] = None

    def _get(self, index: int) -> _Hop | None:
        if index not in (0, 1):
            return None
        until = self._until[index]
        if until is not None and self._clock() >= until:
            self._hops[index] = None
            self._until[index] = None
        return self._hops[index]


def _need(keys: LinkKeys | None, ordered: bool, what: str) -> None:
    if ordered and keys is None:
        raise ValueError(f"ordered PoT needs the {what} link's keys")


class Ingress(_Role):
    """Classifies packets into the path: numbers them, draws RND and starts the proof."""

    def __init__(self, node: str, *, ordered: bool = True, downstream: LinkKeys | None = None,
                 first_seq: int = 1, rnd: RndSource | None = None,
                 clock: Clock = time.monotonic) -> None:
        super().__init__(node, ordered=ordered, clock=clock)
        _need(downstream, ordered, "downstream")
        if not 0 < first_seq < SEQ_LIMIT:
            raise ValueError("sequence numbers start at 1 or later")
        self.downstream = downstream
        self.next_seq = first_seq
        self._rnd: RndSource = rnd if rnd is not None else _RandomPool()
        self.active: int | None = None

    def activate(self, index: int) -> None:
        """Stamp new packets with profile `index` from now on."""
        if self._get(index) is None:
            raise ValueError(f"{self.node}: profile index {index} is not installed")
        self.active = index

    def start(self) -> Proof:
        """The proof for the next packet; NotKeyed when there is nothing to stamp it with."""
        index = self.active
        hop_ = None if index is None else self._get(index)
        if index is None or hop_ is None:
            raise NotKeyed(f"{self.node}: no active profile")
        seq = self.next_seq
        if seq >= SEQ_LIMIT:
            raise NotKeyed(f"{self.node}: sequence numbers exhausted")
        k, lpc, p, _ = hop_
        rnd = self._rnd(p)
        cml = (k + lpc * rnd) % p
        phase = 0
        if self.ordered:
            assert self.downstream is not None
            phase, key = self.downstream.sending()
            cml ^= key.mask(seq)
        self.next_seq = seq + 1
        return _new_proof(Proof, (index, seq, rnd, cml, self.ordered, phase))


class Transit(_Role):
    """A service function on the path: adds its share (unmasking and re-masking if ordered).

    It cannot tell a good proof from a bad one; it raises InvalidProof (drop) only for what
    it cannot process: an unknown profile or key phase, the wrong mode, RND out of range.
    """

    def __init__(self, node: str, *, ordered: bool = True, upstream: LinkKeys | None = None,
                 downstream: LinkKeys | None = None, clock: Clock = time.monotonic) -> None:
        super().__init__(node, ordered=ordered, clock=clock)
        _need(upstream, ordered, "upstream")
        _need(downstream, ordered, "downstream")
        self.upstream = upstream
        self.downstream = downstream

    def forward(self, proof: Proof) -> Proof:
        index, seq, rnd, cml, ordered, phase = proof
        hop_ = self._get(index)
        if hop_ is None or ordered != self.ordered:
            raise InvalidProof
        k, lpc, p, _ = hop_
        if rnd >= p:
            raise InvalidProof
        if ordered:
            assert self.upstream is not None and self.downstream is not None
            key = self.upstream.receiving(phase)
            if key is None:
                raise InvalidProof
            phase, out = self.downstream.sending()
            cml = (((cml ^ key.mask(seq)) + k + lpc * rnd) % p) ^ out.mask(seq)
        else:
            cml, phase = (cml + k + lpc * rnd) % p, 0
        return _new_proof(Proof, (index, seq, rnd, cml, ordered, phase))


class Egress(_Role):
    """The verifier: adds its own share, checks CML == SECRET + RND, refuses replays."""

    def __init__(self, node: str, *, ordered: bool = True, upstream: LinkKeys | None = None,
                 window: int = 4096, clock: Clock = time.monotonic) -> None:
        super().__init__(node, ordered=ordered, clock=clock)
        _need(upstream, ordered, "upstream")
        self.upstream = upstream
        self.window = ReplayWindow(window)
        self.verified = 0
        self.rejected: Counter[str] = Counter()   # by reason, for metrics only

    def install(self, profile: NodeProfile) -> None:
        if not isinstance(profile, VerifierProfile):
            raise ValueError(f"{self.node}: the egress needs the verifier's profile")
        super().install(profile)

    def verify(self, proof: Proof) -> None:
        """Return if the packet crossed the path (in order, if ordered); else InvalidProof."""
        index, seq, rnd, cml, ordered, phase = proof
        hop_ = self._get(index)
        if hop_ is None or ordered != self.ordered:
            self._reject("profile")
        k, lpc, p, secret = hop_
        if not self.window.check(seq):
            self._reject("replay")
        if ordered:
            assert self.upstream is not None
            key = self.upstream.receiving(phase)
            if key is None:
                self._reject("key")
            cml ^= key.mask(seq)
        cml = (cml + k + lpc * rnd) % p
        expected = (secret + rnd) % p
        if rnd >= p or not hmac.compare_digest(cml.to_bytes(8, "big"),
                                               expected.to_bytes(8, "big")):
            self._reject("proof")
        self.window.update(seq)
        self.verified += 1

    def _reject(self, reason: str) -> NoReturn:
        self.rejected[reason] += 1
        raise InvalidProof

    def stats(self) -> dict[str, object]:
        return {"verified": self.verified, "rejected": dict(self.rejected),
                "profiles": self.profiles}
