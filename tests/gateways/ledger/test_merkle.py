"""RFC 6962 Merkle trees: Certificate Transparency's known answers, properties, speed."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateways.ledger.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    level_sizes,
    node_hash,
    path_positions,
    root,
    verify_inclusion,
)

VECTORS = json.loads((Path(__file__).parent / "rfc6962_vectors.json").read_text())
LEAVES = [bytes.fromhex(x) for x in VECTORS["leaves"]]


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 2.1: split at the largest power of two below n."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << (len(leaves) - 1).bit_length() - 1
    return hashlib.sha256(b"\x01" + reference_root(leaves[:k])
                          + reference_root(leaves[k:])).digest()


def reference_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 2.1.1."""
    if len(leaves) <= 1:
        return []
    k = 1 << (len(leaves) - 1).bit_length() - 1
    if m < k:
        return [*reference_path(m, leaves[:k]), reference_root(leaves[k:])]
    return [*reference_path(m - k, leaves[k:]), reference_root(leaves[:k])]


def sides(m: int, n: int) -> list[bool]:
    """For each hash of PATH(m, D[n]): whether it is the left sibling (the path's shape)."""
    if n <= 1:
        return []
    k = 1 << (n - 1).bit_length() - 1
    return [*sides(m, k), False] if m < k else [*sides(m - k, n - k), True]


def test_size_is_pinned_by_the_batch_not_by_the_root() -> None:
    """Leaf 0 of 3 has the shape of leaf 0 of 4: the proof checks for either size.

    No false leaf gets in that way, but a verifier takes the size from the batch (its
    record count), never from whoever hands it the proof.
    """
    tree = MerkleTree(LEAVES[:3])
    assert sides(0, 3) == sides(0, 4)
    assert verify_inclusion(LEAVES[0], 0, 4, tree.proof(0), tree.root)
    assert not verify_inclusion(LEAVES[2], 2, 4, tree.proof(2), tree.root)


def test_hasher_known_answers() -> None:
    assert EMPTY_ROOT.hex() == VECTORS["roots"][0]
    assert leaf_hash(b"L123456").hex() == VECTORS["hasher"]["leaf_L123456"]
    assert node_hash(b"N123", b"N456").hex() == VECTORS["hasher"]["node_N123_N456"]
    assert [leaf_hash(d).hex() for d in LEAVES] == VECTORS["leaf_hashes"]
    assert leaf_hash(b"") != EMPTY_ROOT          # an empty leaf is not an empty tree


def test_roots_known_answers() -> None:
    for size, want in enumerate(VECTORS["roots"]):
        assert root(LEAVES[:size]).hex() == want
        assert MerkleTree(LEAVES[:size]).root.hex() == want


def test_inclusion_proofs_known_answers() -> None:
    for case in VECTORS["inclusion_proofs"]:
        leaf, size = case["leaf"], case["size"]
        want = [bytes.fromhex(h) for h in case["path"]]
        tree = MerkleTree(LEAVES[:size])
        assert tree.proof(leaf) == want
        assert tree.proofs()[leaf] == want
        assert verify_inclusion(LEAVES[leaf], leaf, size, want, tree.root)


def test_ct_corruptions_are_rejected() -> None:
    """The probes transparency-dev/merkle runs against each known proof."""
    some_hash = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")
    for case in VECTORS["inclusion_proofs"]:
        i, n = case["leaf"], case["size"]
        proof = [bytes.fromhex(h) for h in case["path"]]
        r = bytes.fromhex(VECTORS["roots"][n])
        data = LEAVES[i]
        assert verify_inclusion(data, i, n, proof, r)
        probes = [
            (data, i - 1, n, proof, r), (data, i + 1, n, proof, r), (data, i ^ 2, n, proof, r),
            (data, i, n * 2, proof, r), (data, i, n // 2, proof, r),
            (b"WrongLeaf", i, n, proof, r), (data, i, n, proof, EMPTY_ROOT),
            (data, i, n, proof, some_hash),
            (data, i, n, [*proof, b""], r), (data, i, n, [*proof, r], r),
            (data, i, n, [b"", *proof], r), (data, i, n, [r, *proof], r),
        ]
        for k in range(len(proof)):
            flipped = list(proof)
            flipped[k] = bytes([flipped[k][0] ^ 8]) + flipped[k][1:]
            probes.append((data, i, n, flipped, r))
        if proof:
            probes.append((data, i, n, proof[:-1], r))
        if len(proof) > 1:
            probes.append((data, i, n, [proof[0], some_hash, *proof[1:]], r))
        for probe in probes:
            assert not verify_inclusion(*probe), probe


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (3, 3), (-1, 3)])
def test_index_outside_the_tree(index: int, size: int) -> None:
    assert not verify_inclusion(b"x", index, size, [], leaf_hash(b"x"))


def test_single_leaf_tree() -> None:
    tree = MerkleTree([b"data"])
    assert tree.root == leaf_hash(b"data")
    assert tree.proof(0) == []
    assert verify_inclusion(b"data", 0, 1, [], tree.root)
    assert not verify_inclusion(b"data", 0, 1, [], b"")       # root of the wrong length
    with pytest.raises(IndexError, match="leaf 1 is not in a tree of 1"):
        tree.proof(1)


def test_empty_tree() -> None:
    assert root([]) == MerkleTree([]).root == hashlib.sha256(b"").digest()
    assert MerkleTree([]).proofs() == []


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=70))
def test_agrees_with_the_rfc_definition(leaves: list[bytes]) -> None:
    tree = MerkleTree(leaves)
    assert tree.root == root(leaves) == reference_root(leaves)
    paths = tree.proofs()
    nodes = tree.nodes()
    assert len(nodes) == 32 * sum(level_sizes(len(leaves)))
    for i in range(len(leaves)):
        assert tree.proof(i) == paths[i] == reference_path(i, leaves)
        assert [nodes[32 * p:32 * p + 32] for p in path_positions(i, len(leaves))] == paths[i]
        assert verify_inclusion(leaves[i], i, len(leaves), paths[i], tree.root)


@given(st.lists(st.binary(max_size=16), min_size=1, max_size=40, unique=True), st.data())
def test_any_change_fails(leaves: list[bytes], data: st.DataObject) -> None:
    n = len(leaves)
    tree = MerkleTree(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = tree.proof(i)
    assert verify_inclusion(leaves[i], i, n, proof, tree.root)
    # another leaf's data at this index
    j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i)) if n > 1 else None
    if j is not None:
        assert not verify_inclusion(leaves[j], i, n, proof, tree.root)
        assert not verify_inclusion(leaves[i], j, n, proof, tree.root)       # wrong index
    # wrong size: fails, unless leaf i sits at the very same place in both shapes
    other = data.draw(st.integers(1, 2 * n + 2).filter(lambda m: m != n))
    assert verify_inclusion(leaves[i], i, other, proof, tree.root) == (
        i < other and sides(i, other) == sides(i, n))
    # one flipped bit anywhere: in a path hash, the root or the leaf data
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = list(proof)
        bad[k] = (int.from_bytes(bad[k], "big") ^ (1 << bit)).to_bytes(32, "big")
        assert not verify_inclusion(leaves[i], i, n, bad, tree.root)
    bit = data.draw(st.integers(0, 255))
    bad_root = (int.from_bytes(tree.root, "big") ^ (1 << bit)).to_bytes(32, "big")
    assert not verify_inclusion(leaves[i], i, n, proof, bad_root)
    if leaves[i]:
        bit = data.draw(st.integers(0, 8 * len(leaves[i]) - 1))
        flipped = bytearray(leaves[i])
        flipped[bit // 8] ^= 1 << bit % 8
        assert not verify_inclusion(bytes(flipped), i, n, proof, tree.root)


def test_a_leaf_cannot_pass_for_a_node() -> None:
    """The 0x00/0x01 prefixes: two leaf hashes concatenated are not a leaf of the parent."""
    tree = MerkleTree([b"a", b"b"])
    forged = leaf_hash(b"a") + leaf_hash(b"b")
    assert not verify_inclusion(forged, 0, 1, [], tree.root)


def test_ten_thousand_leaves_fast() -> None:
    leaves = [i.to_bytes(4, "big") * 35 for i in range(10_000)]     # ~record-sized leaves
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        tree = MerkleTree(leaves)
        paths = tree.proofs()
        best = min(best, time.perf_counter() - start)
    assert tree.root == root(leaves)
    assert sorted({len(p) for p in paths}) == [8, 12, 14]   # 10000 = 8192+1024+512+256+16
    for i in (0, 1, 4095, 8191, 8192, 9998, 9999):
        assert verify_inclusion(leaves[i], i, 10_000, paths[i], tree.root)
    # ~40 ms on the development machine; generous for loaded CI runners
    assert best < 0.5, f"root and all proofs of 10k leaves took {best * 1000:.0f} ms"
