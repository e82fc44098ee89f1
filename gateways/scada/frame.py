"""The tunnel's packet on the wire: a 16-byte header, then AES-256-GCM ciphertext and tag.

     0       1       2       3       4       5       6       7
    +-------+-------+---------------+-------------------------------+
    | ver=1 | type  |  pair (u16)   |          epoch (u32)          |
    +-------+-------+---------------+-------------------------------+
    |                    sequence number (u64)                      |
    +---------------------------------------------------------------+
    |          ciphertext of one IP packet || 16-byte tag           |

`type` is 1 for a data packet, 2 for a keepalive (a sealed empty packet a
substation sends when it gets a key and when idle, so the control centre
learns and keeps its address, through NAT too). `pair` names the gateway
pair (the substation's number) whose keys protect the packet, `epoch` which
of that pair's keys, `seq` the sender's counter under that key and direction
(from 1, never repeated: it is half the nonce).
The whole header is the AEAD's associated data, so none of it can be changed
without the packet failing authentication.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

VERSION = 1
TYPE_DATA = 1
TYPE_KEEPALIVE = 2  # sealed, empty: tells the control centre where the substation is
TYPES = (TYPE_DATA, TYPE_KEEPALIVE)
HEADER = struct.Struct("!BBHIQ")
HEADER_LEN = HEADER.size  # 16
TAG_LEN = 16
OVERHEAD = HEADER_LEN + TAG_LEN


class FrameError(ValueError):
    """Not a frame of this tunnel (too short, other version or type)."""


class Header(NamedTuple):
    # A NamedTuple, not a dataclass: it is made for every packet received.
    pair: int
    epoch: int
    seq: int
    type: int = TYPE_DATA

    def __bytes__(self) -> bytes:
        return HEADER.pack(VERSION, self.type, self.pair, self.epoch, self.seq)

    @classmethod
    def parse(cls, frame: bytes | bytearray | memoryview) -> Header:
        if len(frame) < OVERHEAD:
            raise FrameError("truncated")
        version, kind, pair, epoch, seq = HEADER.unpack_from(frame)
        if version != VERSION or kind not in TYPES:
            raise FrameError("unknown version or type")
        return cls(pair, epoch, seq, kind)

