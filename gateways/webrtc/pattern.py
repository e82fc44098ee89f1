"""A test-pattern camera whose every picture says which frame it is.

The picture is a grid of 8 x 5 big black/white cells:

    rows 0-1   the 16-bit frame number, most significant bit first
    rows 2-3   the same 16 bits inverted
    row  4     CRC-8 (polynomial 0x07) of the number's two bytes

Cells are large (80 x 72 pixels at 640 x 360), so VP8 at any bitrate aiortc picks
keeps them readable, and `read_pattern` samples only the middle of each cell,
away from the ringing at its edges. A picture that is not such a pattern fails
the black-or-white test (a grey start-up frame, the mush decoded from wrong
bytes), or the inversion and the CRC: a random black-and-white grid passes
those two with probability 2^-24.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack

COLS, ROWS = 8, 5
NUMBER_BITS = 16
NUMBER_MODULUS = 1 << NUMBER_BITS
BLACK, WHITE = 16, 235          # video-range luma
CHROMA_NEUTRAL = 128
_BLACK_BELOW, _WHITE_ABOVE = 90, 160   # a cell between the two is neither: no pattern

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


def crc8(data: bytes) -> int:
    """CRC-8, polynomial x^8 + x^2 + x + 1 (0x07), initial value 0."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def pattern_bits(number: int) -> npt.NDArray[np.bool_]:
    """The ROWS x COLS cells (True: white) of frame `number`."""
    if not 0 <= number < NUMBER_MODULUS:
        raise ValueError(f"pattern numbers are 16-bit, not {number}")
    value = (number << 24) | ((number ^ 0xFFFF) << 8) | crc8(number.to_bytes(2, "big"))
    bits = [(value >> (ROWS * COLS - 1 - i)) & 1 for i in range(ROWS * COLS)]
    return np.array(bits, dtype=bool).reshape(ROWS, COLS)


def _spans(length: int, parts: int) -> npt.NDArray[np.int64]:
    """Sizes of `parts` near-equal spans covering `length` pixels."""
    edges = np.linspace(0, length, parts + 1).round().astype(np.int64)
    return np.diff(edges)


class PatternPainter:
    """yuv420p pictures of the pattern at one size (the grey chroma is reused)."""

    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 2 or width < 2 * COLS or height < 2 * ROWS:
            raise ValueError(f"{width}x{height}: need even sizes of at least "
                             f"{2 * COLS}x{2 * ROWS}")
        self.width, self.height = width, height
        self._rows, self._cols = _spans(height, ROWS), _spans(width, COLS)
        self._yuv = np.full((height * 3 // 2, width), CHROMA_NEUTRAL, dtype=np.uint8)

    def paint(self, number: int) -> av.VideoFrame:
        cells = np.where(pattern_bits(number), WHITE, BLACK).astype(np.uint8)
        luma = np.repeat(np.repeat(cells, self._rows, axis=0), self._cols, axis=1)
        self._yuv[: self.height] = luma
        return av.VideoFrame.from_ndarray(self._yuv, format="yuv420p")  # copies


def read_pattern(frame: av.VideoFrame) -> int | None:
    """The frame number a pattern picture carries, None if it carries none."""
    width, height = frame.width, frame.height
    if width < 2 * COLS or height < 2 * ROWS:
        return None
    if frame.format.name not in ("yuv420p", "yuvj420p", "gray"):
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    luma = np.frombuffer(memoryview(plane), dtype=np.uint8)
    luma = luma.reshape(-1, plane.line_size)[:height, :width]
    row_edges = np.concatenate(([0], np.cumsum(_spans(height, ROWS))))
    col_edges = np.concatenate(([0], np.cumsum(_spans(width, COLS))))
    value = 0
    for r in range(ROWS):
        top, bottom = row_edges[r], row_edges[r + 1]
        inset_y = (bottom - top) // 4
        for c in range(COLS):
            left, right = col_edges[c], col_edges[c + 1]
            inset_x = (right - left) // 4
            # every other pixel of the cell's middle: the mean is as good, 4x cheaper
            mean = float(luma[top + inset_y: bottom - inset_y: 2,
                              left + inset_x: right - inset_x: 2].mean())
            if mean < _BLACK_BELOW:
                bit = 0
            elif mean > _WHITE_ABOVE:
                bit = 1
            else:
                return None
            value = (value << 1) | bit
    number, inverted, crc = value >> 24, (value >> 8) & 0xFFFF, value & 0xFF
    if inverted != number ^ 0xFFFF or crc != crc8(number.to_bytes(2, "big")):
        return None
    return number


def pattern_follows(previous: int, number: int) -> bool:
    """Whether `number` comes after `previous` (16-bit, wrapping: half the circle ahead)."""
    step = (number - previous) % NUMBER_MODULUS
    return 0 < step < NUMBER_MODULUS // 2


class PatternTrack(VideoStreamTrack):
    """A camera showing frame numbers 0, 1, 2, ... (mod 2^16) at `fps`.

    `created`, if given, gets the time.monotonic() at which each frame was made
    (index = frame count): the capture side of a glass-to-glass latency.
    """

    def __init__(self, width: int = 640, height: int = 360, fps: float = 30.0, *,
                 created: list[float] | None = None) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.fps = fps
        self.painter = PatternPainter(width, height)
        self.frames_sent = 0
        self.created = created
        self._started: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        count = self.frames_sent
        now = time.monotonic()
        if self._started is None:
            self._started = now
        # Paced from the start time, not the last frame: no drift under load.
        delay = self._started + count / self.fps - now
        if delay > 0:
            await asyncio.sleep(delay)
        if self.created is not None:
            # After the pacing sleep: the moment the picture is "captured".
            self.created.append(time.monotonic())
        frame = self.painter.paint(count % NUMBER_MODULUS)
        frame.pts = round(count * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = VIDEO_TIME_BASE
        self.frames_sent = count + 1
        return frame


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone, 48 kHz mono, in 20 ms frames (Opus's frame size)."""

    SAMPLE_RATE = 48_000
    SAMPLES = 960

    def __init__(self, frequency: float = 440.0, level: float = 0.2) -> None:
        super().__init__()
        t = np.arange(self.SAMPLE_RATE) / self.SAMPLE_RATE   # one second, a whole number
        wave = level * 32767 * np.sin(2 * math.pi * round(frequency) * t)  # of periods
        self._second = wave.astype(np.int16)
        self.frames_sent = 0
        self._started: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        count = self.frames_sent
        now = time.monotonic()
        if self._started is None:
            self._started = now
        delay = self._started + count * self.SAMPLES / self.SAMPLE_RATE - now
        if delay > 0:
            await asyncio.sleep(delay)
        offset = (count * self.SAMPLES) % self.SAMPLE_RATE
        samples = self._second[offset: offset + self.SAMPLES].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.SAMPLE_RATE
        frame.pts = count * self.SAMPLES
        frame.time_base = fractions.Fraction(1, self.SAMPLE_RATE)
        self.frames_sent = count + 1
        return frame


@dataclass
class PatternGap:
    """Frames missing before `number`: how many, and when it was noticed (wall clock)."""

    number: int
    lost: int
    at: float


MAX_GAPS_KEPT = 64


@dataclass
class PatternStats:
    """What a receiver saw of a pattern stream, frame by frame."""

    decoded: int = 0
    ok: int = 0                  # carried a valid pattern
    garbage: int = 0             # decoded but no valid pattern: must stay 0
    duplicates: int = 0
    out_of_order: int = 0        # behind the newest number seen
    lost: int = 0                # numbers skipped going forward
    first: int | None = None
    last: int | None = None
    gaps: list[PatternGap] = field(default_factory=list)   # the first MAX_GAPS_KEPT


class PatternChecker:
    """Counts a pattern stream's numbers as they are decoded."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.stats = PatternStats()
        self._clock = clock

    def restart(self) -> None:
        """A new stream (a new call): numbers start over, counters carry on."""
        self.stats.last = None

    def feed(self, number: int | None) -> None:
        stats = self.stats
        stats.decoded += 1
        if number is None:
            stats.garbage += 1
            return
        stats.ok += 1
        last = stats.last
        if stats.first is None:
            stats.first = number
        if last is None:
            stats.last = number
        elif number == last:
            stats.duplicates += 1
        elif pattern_follows(last, number):
            skipped = (number - last) % NUMBER_MODULUS - 1
            if skipped:
                stats.lost += skipped
                if len(stats.gaps) < MAX_GAPS_KEPT:
                    stats.gaps.append(PatternGap(number, skipped, self._clock()))
            stats.last = number
        else:
            stats.out_of_order += 1
