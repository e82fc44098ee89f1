"""Key material with a type of its own.

A `Secret` never shows its bytes in a repr, str, log line or exception; the
bytes live in a bytearray that is overwritten on `wipe()` and on disposal.
Python copies bytes freely (slicing, `bytes()`), so wiping is best effort: it
shortens the time material lingers, it does not guarantee erasure.
"""

from __future__ import annotations

import hmac


def _zero(buf: bytearray) -> None:
    # Same-length slice assignment overwrites in place (no reallocation).
    buf[:] = bytes(len(buf))


class Secret:
    __slots__ = ("_buf", "_wiped")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)
        self._wiped = False

    def expose(self) -> bytes:
        """The key bytes, for a cipher or KDF call. Do not keep the result."""
        if self._wiped:
            raise ValueError("secret was wiped")
        return bytes(self._buf)

    def wipe(self) -> None:
        _zero(self._buf)
        self._wiped = True

    @property
    def wiped(self) -> bool:
        return self._wiped

    def __len__(self) -> int:
        return len(self._buf)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        if self._wiped or other._wiped:
            return False
        return hmac.compare_digest(self._buf, other._buf)

    __hash__ = None  # type: ignore[assignment]  # a hash of key bytes would leak them

    def __repr__(self) -> str:
        return f"<SECRET {len(self._buf) * 8} bits>"

    __str__ = __repr__

    def __del__(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf:
            _zero(buf)

    def __reduce__(self) -> str:
        raise TypeError("Secret cannot be pickled")
