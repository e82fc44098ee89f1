"""`qgw.secret.Secret`: key bytes that never show, compare in constant time and can be wiped."""

from __future__ import annotations

import base64
import hmac
import operator
import pickle

import pytest

from qgw.secret import Secret

KEY = bytes(range(1, 33))  # 256 bits, no zero byte, so a wiped buffer differs from it


def test_repr_and_str_hide_the_bytes() -> None:
    s = Secret(KEY)
    shown = [repr(s), str(s), f"{s}", "%s" % s, "%r" % s, repr([s]), repr({"k": s})]  # noqa: UP031
    for text in shown:
        assert "<SECRET 256 bits>" in text
        for leak in (KEY.hex(), KEY.hex().upper(), base64.b64encode(KEY).decode(), repr(KEY)):
            assert leak not in text
    assert repr(Secret(b"")) == "<SECRET 0 bits>"


def test_expose_and_len_give_the_bytes_back() -> None:
    source = bytearray(KEY)
    s = Secret(source)
    source[:] = bytes(len(source))  # the Secret holds its own copy
    assert s.expose() == KEY and isinstance(s.expose(), bytes)
    assert len(s) == 32
    assert Secret(memoryview(KEY)).expose() == KEY


def test_equality_compares_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes | bytearray, b: bytes | bytearray) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert Secret(KEY) == Secret(KEY)
    assert Secret(KEY) != Secret(KEY[:-1] + b"\xff")
    assert Secret(KEY) != Secret(KEY[:16])
    assert len(calls) == 3  # every comparison went through the constant-time compare
    # A Secret never equals plain bytes, even the very same bytes.
    assert Secret(KEY) != KEY
    assert operator.eq(KEY, Secret(KEY)) is False  # bytes on the left too
    assert Secret(KEY) != KEY.hex()


def test_secret_is_unhashable() -> None:
    s = Secret(KEY)
    with pytest.raises(TypeError):
        hash(s)
    with pytest.raises(TypeError):
        {s}  # noqa: B018
    with pytest.raises(TypeError):
        {s: 1}  # noqa: B018


def test_wipe_zeroes_the_buffer_and_expose_then_raises() -> None:
    s = Secret(KEY)
    buf = s._buf  # the one place the bytes live
    assert not s.wiped
    s.wipe()
    assert s.wiped
    assert buf == bytearray(32) and s._buf is buf  # overwritten in place, not replaced
    with pytest.raises(ValueError, match="wiped"):
        s.expose()
    s.wipe()  # a second wipe is harmless
    assert s.wiped and repr(s) == "<SECRET 256 bits>"


def test_disposal_zeroes_the_buffer() -> None:
    s = Secret(KEY)
    buf = s._buf
    del s  # CPython frees it at once (refcount), running __del__
    assert buf == bytearray(32)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_cannot_be_pickled(protocol: int) -> None:
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(Secret(KEY), protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps({"key": [Secret(KEY)]}, protocol=protocol)
