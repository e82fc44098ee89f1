"""Tunnel frame header and the anti-replay window."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateways.replay import ReplayWindow
from gateways.scada.frame import HEADER_LEN, OVERHEAD, FrameError, Header


def test_header_round_trip_and_known_bytes() -> None:
    h = Header(pair=2, epoch=7, seq=0x0102030405060708)
    raw = bytes(h)
    assert raw == bytes.fromhex("0101" "0002" "00000007" "0102030405060708")
    assert len(raw) == HEADER_LEN == 16
    assert Header.parse(raw + bytes(16)) == h


@given(st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_header_round_trips(pair: int, epoch: int, seq: int) -> None:
    h = Header(pair, epoch, seq)
    assert Header.parse(bytes(h) + bytes(16)) == h


@pytest.mark.parametrize("frame", [b"", bytes(OVERHEAD - 1),
                                   bytes.fromhex("02010001000000010000000000000001") + bytes(16),
                                   bytes.fromhex("01030001000000010000000000000001") + bytes(16)])
def test_not_a_frame(frame: bytes) -> None:
    with pytest.raises(FrameError):
        Header.parse(frame)


def accept(w: ReplayWindow, seq: int) -> bool:
    if w.check(seq):
        w.update(seq)
        return True
    return False


def test_replay_window() -> None:
    w = ReplayWindow(size=64)
    assert not accept(w, 0)            # sequence numbers start at 1
    assert accept(w, 1) and not accept(w, 1)
    assert accept(w, 5) and accept(w, 3) and not accept(w, 3)   # reordering within the window
    assert accept(w, 100)
    assert not accept(w, 36)           # 64 behind the newest: too old
    assert accept(w, 37) and not accept(w, 37)
    assert accept(w, 100 + 1000)       # a jump beyond the window resets the bitmap
    assert not accept(w, 100) and accept(w, 1099)


@given(st.lists(st.integers(1, 300), max_size=200))
def test_window_accepts_each_number_at_most_once(seqs: list[int]) -> None:
    w = ReplayWindow(size=32)
    accepted = [s for s in seqs if accept(w, s)]
    assert len(accepted) == len(set(accepted))
    top = 0
    for s in accepted:
        assert s > top - 32       # never older than the window behind the newest so far
        top = max(top, s)
