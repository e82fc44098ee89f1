"""Merkle trees of RFC 6962 (Certificate Transparency, section 2.1; RFC 9162 section 2.1).

    leaf hash  = SHA-256(0x00 || leaf data)
    node hash  = SHA-256(0x01 || left || right)
    MTH({})    = SHA-256("")
    MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two below n

The tree is built level by level: each level pairs its nodes left to right, and a
last node without a partner moves up unchanged. That gives exactly the RFC's split
at the largest power of two (the left subtree is always full), in one pass over
SHA-256 calls, without recursion. The distinct 0x00/0x01 prefixes keep a leaf from
passing for an inner node (second-preimage attacks on the tree).

An audit path (`MerkleTree.proof`) lists the sibling hashes from the leaf upwards,
as the RFC's PATH(m, D[n]); `verify_inclusion` is RFC 9162's verification
algorithm (2.1.3.2), which also rejects a proof of the wrong length for the size.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

HASH_LEN = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaf hashes first, the root's one-element level last."""
    level = [_sha256(b"\x00" + d).digest() for d in leaves]
    levels = [level]
    while len(level) > 1:
        up = [_sha256(b"\x01" + level[i] + level[i + 1]).digest()
              for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])        # no partner: moves up unchanged (RFC 6962 split)
        levels.append(up)
        level = up
    return levels


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle tree head of the leaf data `leaves` (SHA-256 of nothing for no leaves)."""
    if not leaves:
        return EMPTY_ROOT
    return _levels(leaves)[-1][0]


def level_sizes(size: int) -> list[int]:
    """How many nodes each level of a tree of `size` leaves has, leaf level first."""
    sizes = [size] if size else []
    while sizes and sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def path_positions(index: int, size: int) -> list[int]:
    """Where leaf `index`'s audit path lies in `MerkleTree.nodes()`, as node numbers.

    Lets a store that kept `nodes()` read one proof (a few 32-byte pieces) without
    loading or rebuilding the tree.
    """
    if not 0 <= index < size:
        raise IndexError(f"leaf {index} is not in a tree of {size} leaves")
    positions = []
    start = 0
    for n in level_sizes(size)[:-1]:
        if index ^ 1 < n:
            positions.append(start + (index ^ 1))
        start += n
        index >>= 1
    return positions


class MerkleTree:
    """A tree over `leaves` (leaf data, hashed here), kept whole so every proof is cheap."""

    __slots__ = ("_levels", "size")

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.size = len(leaves)
        self._levels = _levels(leaves) if leaves else []

    @property
    def root(self) -> bytes:
        return self._levels[-1][0] if self._levels else EMPTY_ROOT

    def nodes(self) -> bytes:
        """Every node hash, level by level from the leaves up (see `path_positions`)."""
        return b"".join(h for level in self._levels for h in level)

    def proof(self, index: int) -> list[bytes]:
        """The audit path of leaf `index`: sibling hashes from the leaf level upwards."""
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} is not in a tree of {self.size} leaves")
        path = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index >>= 1
        return path

    def proofs(self) -> list[list[bytes]]:
        """Every leaf's audit path, in leaf order: `proof(i)` for all i, in one sweep.

        Built from the top down: a node's path is its sibling followed by its
        parent's path, so each level costs one short list per node.
        """
        if not self._levels:
            return []
        paths: list[list[bytes]] = [[]]                    # the root's: empty
        for level in reversed(self._levels[:-1]):
            n = len(level)
            paths = [[level[i ^ 1], *paths[i >> 1]] if i ^ 1 < n else paths[i >> 1]
                     for i in range(n)]
        return paths


def verify_inclusion(leaf_data: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> bool:
    """Whether `proof` shows `leaf_data` at `index` in the tree of `size` leaves with `root`.

    False, never an exception, for anything that does not check out: an index outside
    the tree, hashes of the wrong length, a path too short or too long.
    """
    if not (isinstance(index, int) and isinstance(size, int) and 0 <= index < size):
        return False
    if len(root) != HASH_LEN or any(len(p) != HASH_LEN for p in proof):
        return False
    fn, sn = index, size - 1
    r = leaf_hash(leaf_data)
    for p in proof:
        if sn == 0:
            return False                # path longer than the tree is high
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                # fn is the last node of its level and moved up unchanged: skip the
                # levels it has no sibling on.
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(r, root)
