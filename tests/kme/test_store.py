"""`kme.store.Store` on a real SQLite file: the link stream, reserved keys, pending, released."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from kme.errors import ApiError
from kme.store import LinkState, Pending, Released, Store, StreamGap

PEER = "KME_B"
STREAM = os.urandom(48)  # three 16-byte blocks
BLOCKS = [(0, STREAM[0:16]), (16, STREAM[16:32]), (32, STREAM[32:48])]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "KME_A.sqlite"  # the folder does not exist yet


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    s = Store(path)
    try:
        yield s
    finally:
        s.close()


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """What another connection sees in the file (committed state only)."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def block_offsets(path: Path) -> tuple[list[int], list[int]]:
    blocks = [r[0] for r in rows(path, "SELECT offset FROM block ORDER BY offset")]
    data = [r[0] for r in rows(path, "SELECT offset FROM block_data ORDER BY offset")]
    return blocks, data  # type: ignore[return-value]


def test_secure_delete_is_on(store: Store) -> None:
    assert store._db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unknown_link_is_empty(store: Store) -> None:
    assert store.link_state(PEER) == LinkState(0, 0, 0)
    assert store.available_bytes(PEER, emitter=True) == 0
    assert store.available_bytes(PEER, emitter=False) == 0


# -- the link stream ------------------------------------------------------------------------

def test_only_confirmed_bytes_can_be_allocated(store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=False)
    assert store.link_state(PEER) == LinkState(cursor=0, end=48, confirmed_end=0)
    assert store.unconfirmed_blocks(PEER) == BLOCKS
    assert store.available_bytes(PEER, emitter=True) == 0
    assert store.available_bytes(PEER, emitter=False) == 48  # a receiver counts what it holds
    with pytest.raises(ApiError) as info:
        store.allocate(PEER, [8])
    assert info.value.status == 503

    store.confirm_blocks(PEER, 32)
    assert store.link_state(PEER).confirmed_end == 32
    assert store.unconfirmed_blocks(PEER) == BLOCKS[2:]
    assert store.allocate(PEER, [8, 8, 4]) == [0, 8, 16]
    assert store.allocate(PEER, [12]) == [20]
    assert store.link_state(PEER).cursor == 32
    assert store.available_bytes(PEER, emitter=True) == 0
    assert store.held_bytes(PEER) == 16


def test_allocate_beyond_confirmed_is_503_and_takes_nothing(store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=False)
    store.confirm_blocks(PEER, 48)
    store.allocate(PEER, [40])
    with pytest.raises(ApiError) as info:
        store.allocate(PEER, [4, 4, 4])
    err = info.value
    assert err.status == 503 and "not enough key" in err.message
    assert err.details == [{"available_bits": 64, "requested_bits": 96}]
    assert store.link_state(PEER).cursor == 40  # unchanged
    assert store.allocate(PEER, [8]) == [40]  # what was there is still there


def test_confirm_is_monotonic(store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=False)
    store.confirm_blocks(PEER, 48)
    store.confirm_blocks(PEER, 16)  # a late, older acknowledgement
    assert store.link_state(PEER).confirmed_end == 48
    assert store.unconfirmed_blocks(PEER) == []


def test_repushed_block_is_ignored(store: Store) -> None:
    store.append_blocks(PEER, BLOCKS[:2], confirmed=True)
    store.append_blocks(PEER, [(0, b"\x00" * 16), BLOCKS[2]], confirmed=True)
    assert store.link_state(PEER).end == 48
    assert store.carve(PEER, 0, 48) == STREAM  # the first copy of block 0 was kept


def test_note_cursor_is_monotonic(store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=True)
    store.note_cursor(PEER, 32)
    store.note_cursor(PEER, 8)
    assert store.link_state(PEER).cursor == 32
    assert store.available_bytes(PEER, emitter=False) == 16


def test_carve_across_block_boundaries(path: Path, store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=True)
    assert store.carve(PEER, 10, 20) == STREAM[10:30]  # end of block 0, most of block 1
    assert block_offsets(path) == ([0, 16, 32], [0, 16, 32])  # nothing fully used yet
    assert store.carve(PEER, 30, 12) == STREAM[30:42]  # rest of block 1, start of block 2
    assert block_offsets(path) == ([0, 32], [0, 32])  # block 1 fully used: deleted
    assert store.carve(PEER, 0, 10) == STREAM[0:10]  # block 0 now fully used
    assert block_offsets(path) == ([32], [32])
    assert store.carve(PEER, 42, 6) == STREAM[42:48]
    assert block_offsets(path) == ([], [])
    assert store.link_state(PEER).end == 48  # the stream position is kept


def test_carve_a_whole_stream_at_once(path: Path, store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=True)
    assert store.carve(PEER, 0, 48) == STREAM
    assert block_offsets(path) == ([], [])


def test_carve_one_byte_and_whole_blocks(store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=True)
    assert store.carve(PEER, 15, 1) == STREAM[15:16]
    assert store.carve(PEER, 16, 16) == STREAM[16:32]
    assert store.carve(PEER, 32, 1) == STREAM[32:33]


@pytest.mark.parametrize("offset, length", [
    (48, 1),    # past the end
    (40, 16),   # runs past the end
    (16, 8),    # in the gap
    (10, 10),   # from a held block into the gap
    (28, 8),    # from the gap into a held block
    (0, 48),    # across the gap
])
def test_missing_range_is_a_stream_gap(store: Store, offset: int, length: int) -> None:
    store.append_blocks(PEER, [BLOCKS[0], BLOCKS[2]], confirmed=True)  # bytes 16..32 missing
    with pytest.raises(StreamGap):
        store.carve(PEER, offset, length)
    # A failed carve uses nothing up.
    assert store.carve(PEER, 0, 16) == STREAM[0:16]
    assert store.carve(PEER, 32, 16) == STREAM[32:48]


def test_carved_out_range_is_gone(store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=True)
    store.carve(PEER, 0, 16)
    with pytest.raises(StreamGap):
        store.carve(PEER, 0, 16)
    with pytest.raises(StreamGap):
        store.carve(PEER, 8, 16)


def test_streams_of_two_peers_are_apart(store: Store) -> None:
    other = os.urandom(16)
    store.append_blocks(PEER, BLOCKS, confirmed=True)
    store.append_blocks("KME_C", [(0, other)], confirmed=True)
    assert store.link_state("KME_C").end == 16
    assert store.carve("KME_C", 0, 16) == other
    assert store.carve(PEER, 0, 16) == STREAM[:16]


def test_used_key_material_is_overwritten_in_the_file(path: Path) -> None:
    stream, key = os.urandom(64), os.urandom(32)
    s = Store(path)
    s.append_blocks(PEER, [(0, stream)], confirmed=True)
    s.carve(PEER, 0, 64)
    with s.tx():
        s.add_key("k1", PEER, "SAE_1", 64, 32, key, ["SAE_2"])
    with s.tx():
        s.take_keys("SAE_2", "SAE_1", ["k1"])
    s.close()  # the last connection checkpoints the WAL into the file
    disk = path.read_bytes()
    for secret in (stream[:16], stream[48:], key[:16], key[16:]):
        assert secret not in disk


# -- reserved keys ------------------------------------------------------------------------

def add(store: Store, key_id: str, material: bytes, holders: tuple[str, ...] = ("SAE_2",),
        master: str = "SAE_1") -> None:
    with store.tx():
        store.add_key(key_id, PEER, master, 0, len(material), material, list(holders))


def api_error(status: int, fragment: str) -> pytest.RaisesExc[ApiError]:
    return pytest.raises(ApiError, check=lambda e: e.status == status and fragment in e.message)


def test_take_keys_hands_a_key_to_each_holder_once(store: Store) -> None:
    add(store, "k1", b"K" * 32, holders=("SAE_2", "SAE_3"))
    assert store.reserved_key_count() == 1
    with store.tx():
        assert store.take_keys("SAE_2", "SAE_1", ["k1"]) == [b"K" * 32]
    with api_error(400, "already delivered"), store.tx():
        store.take_keys("SAE_2", "SAE_1", ["k1"])
    assert store.reserved_key_count() == 1  # SAE_3 has not taken it yet
    with store.tx():
        assert store.take_keys("SAE_3", "SAE_1", ["k1"]) == [b"K" * 32]
    assert store.reserved_key_count() == 0  # every holder has it: forgotten
    with api_error(400, "unknown key_ID"), store.tx():
        store.take_keys("SAE_3", "SAE_1", ["k1"])


def test_take_keys_refuses_non_holder_wrong_master_and_unknown_id(store: Store) -> None:
    add(store, "k1", b"K" * 32)
    with api_error(401, "SAE_4"), store.tx():
        store.take_keys("SAE_4", "SAE_1", ["k1"])
    with api_error(401, "master SAE SAE_9"), store.tx():
        store.take_keys("SAE_2", "SAE_9", ["k1"])
    with api_error(400, "unknown key_ID nope"), store.tx():
        store.take_keys("SAE_2", "SAE_1", ["nope"])
    with store.tx():  # none of that used the key up
        assert store.take_keys("SAE_2", "SAE_1", ["k1"]) == [b"K" * 32]


def test_take_keys_is_all_or_nothing_inside_tx(path: Path, store: Store) -> None:
    add(store, "k1", b"1" * 32)
    add(store, "k2", b"2" * 32)
    with api_error(400, "unknown key_ID"), store.tx():
        store.take_keys("SAE_2", "SAE_1", ["k1", "k2", "nope"])
    assert rows(path, "SELECT key_id, taken FROM holder ORDER BY key_id") == [("k1", 0),
                                                                              ("k2", 0)]
    with api_error(400, "k2"), store.tx():
        store.take_keys("SAE_2", "SAE_1", ["k2", "k2"])  # a key twice in one request
    with store.tx():
        assert store.take_keys("SAE_2", "SAE_1", ["k2", "k1"]) == [b"2" * 32, b"1" * 32]
    assert store.reserved_key_count() == 0


def test_tx_rolls_back_everything_and_nested_tx_joins(path: Path, store: Store) -> None:
    store.append_blocks(PEER, BLOCKS, confirmed=False)
    store.confirm_blocks(PEER, 48)
    with pytest.raises(RuntimeError), store.tx():
        store.allocate(PEER, [16])
        with store.tx():  # joins the outer transaction
            store.add_pending(PEER, [Pending("p1", 0, 16)])
        assert rows(path, "SELECT count(*) FROM pending") == [(0,)]  # not committed yet
        raise RuntimeError("crash before commit")
    assert store.link_state(PEER).cursor == 0
    assert store.pending(PEER) == []
    with store.tx():
        store.allocate(PEER, [16])
    assert rows(path, "SELECT cursor FROM link") == [(16,)]


def test_drop_key(store: Store) -> None:
    with store.tx():
        store.add_key("k1", PEER, "SAE_1", 64, 32, b"x" * 32, ["SAE_2", "SAE_3"])
    assert store.drop_key("k1", "KME_OTHER") is None  # only the link it came from may drop it
    assert store.drop_key("k1", PEER) == (64, 32)
    assert store.drop_key("k1", PEER) is None
    assert store.reserved_key_count() == 0
    with api_error(400, "unknown key_ID"), store.tx():
        store.take_keys("SAE_2", "SAE_1", ["k1"])


def test_relayed_keys_are_not_dropped_by_a_link(store: Store) -> None:
    with store.tx():
        store.add_key("k1", "#relay:KME_X", "SAE_1", -1, 32, b"x" * 32, ["SAE_2"])
    assert store.drop_key("k1", "#relay:KME_X") is None
    assert store.key_record("k1") == ("SAE_1", b"x" * 32)


def test_key_id_is_reserved_once(store: Store) -> None:
    add(store, "k1", b"x" * 32)
    with pytest.raises(sqlite3.IntegrityError), store.tx():
        store.add_key("k1", PEER, "SAE_1", 32, 32, b"y" * 32, ["SAE_2"])
    with store.tx():
        assert store.take_keys("SAE_2", "SAE_1", ["k1"]) == [b"x" * 32]


# -- pending and released ---------------------------------------------------------------

def test_pending_add_list_drop(store: Store) -> None:
    first = [Pending("p1", 0, 32), Pending("p2", None, 16)]
    with store.tx():
        store.add_pending(PEER, first)
    with store.tx():
        store.add_pending("KME_C", [Pending("p3", 5, 8)])
    assert store.pending(PEER) == first
    assert store.pending("KME_C") == [Pending("p3", 5, 8)]
    store.drop_pending(["p1", "p3", "never-there"])
    assert store.pending(PEER) == [Pending("p2", None, 16)]
    assert store.pending("KME_C") == []


def test_released_tombstones(store: Store) -> None:
    assert not store.any_released(["r1"])
    assert store.released("r1") is None
    store.add_released("r1", (64, 32))
    store.add_released("r2", None)
    store.add_released("r1", None)  # idempotent: the first answer stays
    assert store.released("r1") == Released((64, 32)) and store.released("r2") == Released(None)
    assert store.any_released(["x", "r2"])
    assert not store.any_released(["x", "y"])
    assert not store.any_released([])
    store.prune_released(older_than_s=3600)  # too young to prune
    assert store.any_released(["r1"]) and store.any_released(["r2"])
    store.prune_released(older_than_s=-60)  # everything is older than a minute from now
    assert not store.any_released(["r1", "r2"])


# -- durability -----------------------------------------------------------------------------

def test_state_survives_closing_and_reopening(path: Path) -> None:
    s = Store(path)
    s.append_blocks(PEER, BLOCKS, confirmed=False)
    s.confirm_blocks(PEER, 32)
    with s.tx():
        (off,) = s.allocate(PEER, [8])
        s.add_key("k1", PEER, "SAE_1", off, 8, s.carve(PEER, off, 8), ["SAE_2"])
        s.add_pending(PEER, [Pending("p1", 8, 8)])
    s.add_released("r1", None)
    s.close()

    s = Store(path)
    try:
        assert s.link_state(PEER) == LinkState(cursor=8, end=48, confirmed_end=32)
        assert s.unconfirmed_blocks(PEER) == BLOCKS[2:]
        assert s.pending(PEER) == [Pending("p1", 8, 8)]
        assert s.any_released(["r1"])
        assert s.reserved_key_count() == 1
        with s.tx():
            assert s.take_keys("SAE_2", "SAE_1", ["k1"]) == [STREAM[0:8]]
        assert s.carve(PEER, 8, 40) == STREAM[8:48]  # the block count of carved bytes kept too
        assert s.allocate(PEER, [24]) == [8]
    finally:
        s.close()
