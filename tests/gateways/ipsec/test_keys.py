"""SPIs and ESP keys per epoch: both ends agree, no key serves two directions or two SAs."""

from __future__ import annotations

import pytest

from gateways.ipsec.keys import KEY_BYTES, Endpoints, sa_key, spi_for
from gateways.ipsec.xfrm import Lifetime
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret


def key(epoch: int, secret: bytes = b"k" * 32) -> SessionKey:
    return SessionKey(epoch, KeySource.QKD, "2f1c0d4e-key", Secret(secret))


def test_spis_name_reqid_epoch_and_direction() -> None:
    assert spi_for(0x51D0, 21, "a>b") == 0x51D0002A
    assert spi_for(0x51D0, 21, "b>a") == 0x51D0002B
    spis = {spi_for(0x51D0, e, d) for e in range(1000) for d in ("a>b", "b>a")}
    assert len(spis) == 2000 and min(spis) > 255  # 1-255 are reserved (RFC 4303)
    with pytest.raises(ValueError, match="direction"):
        spi_for(1, 1, "a<b")


def test_each_direction_and_epoch_gets_its_own_key() -> None:
    blobs = {sa_key(key(e), 0x51D0, d) for e in (1, 2) for d in ("a>b", "b>a")}
    assert len(blobs) == 4 and all(len(b) == KEY_BYTES for b in blobs)
    # Another reqid (another pair on the host) never shares a key either.
    assert sa_key(key(1), 0x51D1, "a>b") not in blobs
    # The same session key at both gateways gives the same SA key: they interoperate.
    assert sa_key(key(7), 0x51D0, "a>b") == sa_key(key(7), 0x51D0, "a>b")
    assert sa_key(key(7, b"x" * 32), 0x51D0, "a>b") != sa_key(key(7), 0x51D0, "a>b")


def test_master_sends_what_the_slave_receives() -> None:
    lt = Lifetime()
    master = Endpoints("master", "192.0.2.1", "192.0.2.2", 0x51D0, 32, lt)
    slave = Endpoints("slave", "192.0.2.2", "192.0.2.1", 0x51D0, 32, lt)
    assert master.out_direction == slave.in_direction == "a>b"
    assert master.in_direction == slave.out_direction == "b>a"
