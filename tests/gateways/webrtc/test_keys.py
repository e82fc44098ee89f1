"""MediaKeys: the SFrame keys a KeySession installs, per epoch and direction."""

from __future__ import annotations

import os

import pytest

from gateways.webrtc.keys import Drop, KeyEvent, MediaKeys, kid_for
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret

FRAME = bytes(range(256)) * 8


def session_key(epoch: int, secret: bytes | None = None) -> SessionKey:
    return SessionKey(epoch, KeySource.QKD, f"stream:{epoch}", Secret(secret or os.urandom(32)))


def pair() -> tuple[MediaKeys, MediaKeys]:
    return MediaKeys("master"), MediaKeys("slave")


def give(epoch: int, *sides: MediaKeys, activate: bool = True) -> SessionKey:
    key = session_key(epoch)
    for side in sides:
        side.install(epoch, key)
        if activate:
            side.activate(epoch)
    return key


def test_kids_name_epoch_and_sender() -> None:
    assert (kid_for(0, "master"), kid_for(0, "slave"), kid_for(7, "slave")) == (0, 1, 15)
    with pytest.raises(ValueError):
        kid_for(1, "camera")


def test_both_directions_open_and_no_frame_before_a_key() -> None:
    a, b = pair()
    assert a.seal(FRAME, 10) is None and a.drops[Drop.NO_KEY] == 1
    give(1, a, b)
    sealed = a.seal(FRAME, 10)
    assert sealed is not None and sealed[:10] == FRAME[:10] and FRAME[10:40] not in sealed
    assert b.open(sealed, 10) == FRAME
    back = b.seal(FRAME, 3)
    assert back is not None and a.open(back, 3) == FRAME
    assert (a.send_kid, b.send_kid) == (2, 3) and a.source == "qkd"
    # Our own frames echoed back are not accepted: each key has one direction.
    assert a.open(sealed, 10) is None and a.drops[Drop.UNKNOWN_KEY] == 1


def test_rotation_overlap_then_retire() -> None:
    a, b = pair()
    give(1, a, b)
    old = a.seal(FRAME)
    key2 = session_key(2)
    b.install(2, key2)               # the receiver accepts epoch 2 before the sender uses it
    a.install(2, key2)
    a.activate(2)
    new = a.seal(FRAME)
    assert new is not None and old is not None
    assert b.open(new) == FRAME and b.open(old) == FRAME   # in flight across the boundary
    b.retire(1)
    assert b.open(old) is None and b.drops[Drop.UNKNOWN_KEY] == 1
    assert a.rotations == 2


def test_wrong_key_tampered_and_malformed_frames_are_dropped_and_counted() -> None:
    a, b = pair()
    a.install(1, session_key(1))
    a.activate(1)
    b.install(1, session_key(1))     # same epoch, another key: what a wrong key looks like
    sealed = a.seal(FRAME, 10)
    assert sealed is not None
    assert b.open(sealed, 10) is None and b.drops[Drop.AUTH_FAILED] == 1
    c = MediaKeys("slave")
    key = session_key(1)
    a2 = MediaKeys("master")
    for side in (a2, c):
        side.install(1, key)
    a2.activate(1)
    good = a2.seal(FRAME, 10)
    assert good is not None
    tampered = bytearray(good)
    tampered[2] ^= 1                  # a clear byte: bound as SFrame metadata
    assert c.open(bytes(tampered), 10) is None
    assert c.open(good[:10], 10) is None   # nothing after the clear bytes
    assert c.drops[Drop.AUTH_FAILED] == 1 and c.drops[Drop.MALFORMED] == 1
    assert c.open(good, 10) == FRAME


def test_invalidate_fails_closed_until_the_next_key() -> None:
    a, b = pair()
    give(1, a, b)
    a.invalidate("KME down")
    assert a.seal(FRAME) is None and a.closed_reason == "KME down"
    give(2, a, b)
    sealed = a.seal(FRAME)
    assert sealed is not None and b.open(sealed) == FRAME and a.closed_reason is None


def test_subscribers_get_held_keys_first_then_changes_without_keys_in_repr() -> None:
    a = MediaKeys("master")
    give(1, a)
    events: list[KeyEvent] = []
    unsubscribe = a.subscribe(events.append)
    assert [e.kind for e in events] == ["install", "activate"]
    first = events[0]
    assert first.send_kid == 2 and first.recv_kid == 3 and first.send_key is not None
    give(2, a)
    a.retire(1)
    assert [e.kind for e in events[2:]] == ["install", "activate", "retire"]
    for event in events:
        for secret in (event.send_key, event.recv_key):
            if secret is not None:
                assert secret.expose().hex() not in repr(event)
    unsubscribe()
    a.invalidate("stop")
    assert events[-1].kind == "retire"
