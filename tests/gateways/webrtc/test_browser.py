"""The browser participant in real headless Chromium: its SFrame against RFC 9605 and
the Python module, and whole calls with an aiortc participant.

In a call each side sends the test pattern (gateways/webrtc/pattern.py; Chromium's
fake camera plays it from a Y4M file), so each side checks that what it shows is the
other's picture, not just that something decoded. Needs the Debian package chromium.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestServer

from apps.videocall.server import create_app
from gateways.webrtc.handoff import KeyHandoff
from gateways.webrtc.keys import Drop, MediaKeys, kid_for
from gateways.webrtc.participant import Participant
from gateways.webrtc.pattern import PatternPainter
from gateways.webrtc.sframe import decode_header, vp8_clear_bytes
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret
from tests.webrtc_browser import Browser

VECTORS = json.loads((Path(__file__).parent / "rfc9605_vectors.json").read_text())
GCM_SUITES = {"0x0004", "0x0005"}   # the suites the page implements (WebCrypto AES-GCM)

VP8_KEY_FRAME = bytes.fromhex("5042009d012a8002e001") + os.urandom(300)   # 640x480 key frame
VP8_DELTA_FRAME = bytes([0x31, 0x07, 0x00]) + os.urandom(120)
OPUS_PACKET = bytes([0x78]) + os.urandom(60)


def session_key(epoch: int, secret: bytes, source: KeySource = KeySource.QKD) -> SessionKey:
    return SessionKey(epoch, source, f"qkd-key-{epoch}", Secret(secret))


def keyed(role: str, epoch: int, secret: bytes) -> MediaKeys:
    keys = MediaKeys(role)
    keys.install(epoch, session_key(epoch, secret))
    keys.activate(epoch)
    return keys


@asynccontextmanager
async def signalling() -> AsyncIterator[str]:
    """The videocall server (page and signalling) on loopback; yields its origin."""
    server = TestServer(create_app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


# -- a: the JS SFrame ------------------------------------------------------------------

JS_HELPERS = """
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
const bytes = (h) => Uint8Array.from(h.match(/../g) || [], (x) => parseInt(x, 16));
const u64 = (v) => '0x' + v.toString(16).padStart(16, '0');
"""

JS_VECTORS = JS_HELPERS + """
const s = await import('/static/sframe.js');
const headers = vectors.header.map((v) => hex(s.encodeHeader(BigInt(v.kid), BigInt(v.ctr))));
const decoded = vectors.header.map((v) => {
  const d = s.decodeHeader(bytes(v.header));
  return [u64(d.kid), u64(d.ctr), d.length];
});
const frames = [];
for (const v of vectors.sframe.filter((v) => suites.includes(v.cipher_suite))) {
  const suite = parseInt(v.cipher_suite, 16);
  const kid = BigInt(v.kid), ctr = BigInt(v.ctr);
  const { key, salt } = await s.deriveSecrets(suite, kid, bytes(v.base_key));
  const km = await s.deriveKeyMaterial(suite, kid, bytes(v.base_key));
  const ct = await s.encryptFrame(km, ctr, bytes(v.pt), bytes(v.metadata));
  const lookup = (k) => (k === km.kid ? km : undefined);
  const opened = await s.decryptFrame(lookup, bytes(v.ct), bytes(v.metadata));
  const tampered = bytes(v.ct);
  tampered[tampered.length - 1] ^= 1;
  let refused = 'nothing';
  try {
    await s.decryptFrame(lookup, tampered, bytes(v.metadata));
  } catch (err) {
    refused = err.constructor.name;
  }
  frames.push({ suite: v.cipher_suite, key: hex(key), salt: hex(salt),
    nonce: hex(s.makeNonce(salt, ctr)), ct: hex(ct), pt: hex(opened.plaintext), refused });
}
return { headers, decoded, frames };
"""

JS_INTEROP = JS_HELPERS + """
const s = await import('/static/sframe.js');
const frames = new s.FrameCrypto();
const ws = new WebSocket(keysUrl);
await new Promise((resolve, reject) => {
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    frames.handle(message);
    if (message.type === 'activate') resolve();
  };
  ws.onerror = () => reject(new Error('the key handoff refused the page'));
});
await frames.pending;
const sealed = [];
for (const [kind, data] of toSeal) sealed.push(hex(await frames.seal(kind, bytes(data))));
const opened = [];
for (const [kind, data] of toOpen) {
  const out = await frames.open(kind, bytes(data));
  opened.push(out === null ? null : hex(out));
}
ws.close();
return { sealed, opened, stats: frames.stats };
"""


async def run_js(browser: Browser, body: str, **args: Any) -> Any:
    bindings = "".join(f"const {name} = {json.dumps(value)};\n" for name, value in args.items())
    return await browser.evaluate(f"(async () => {{\n{bindings}{body}\n}})()")


def test_js_sframe_passes_rfc9605_vectors_and_interoperates_with_python(tmp_path: Path) -> None:
    async def main() -> None:
        async with signalling() as origin, \
                Browser(tmp_path / "chromium", f"{origin}/?room=r&name=n") as browser:
            # Without a key URL in the fragment the page starts no call.
            await browser.wait_for("document.getElementById('needs-gateway')?.hidden === false",
                                   10)
            assert await browser.evaluate("document.getElementById('call').hidden") is True

            result = await run_js(browser, JS_VECTORS, vectors=VECTORS,
                                  suites=sorted(GCM_SUITES))
            assert result["headers"] == [v["header"] for v in VECTORS["header"]]
            assert result["decoded"] == [[v["kid"], v["ctr"], len(v["header"]) // 2]
                                         for v in VECTORS["header"]]
            expected = [v for v in VECTORS["sframe"] if v["cipher_suite"] in GCM_SUITES]
            assert len(result["frames"]) == len(expected) == 2
            for got, want in zip(result["frames"], expected, strict=True):
                assert got == {"suite": want["cipher_suite"], "key": want["sframe_key"],
                               "salt": want["sframe_salt"], "nonce": want["nonce"],
                               "ct": want["ct"], "pt": want["pt"],
                               "refused": "AuthenticationFailed"}

            await check_interop(browser, origin)

            # A link whose fragment points at keys off this machine starts no call either.
            foreign = quote("ws://192.0.2.1:8765/keys?token=t", safe="")
            await browser.evaluate(f"location.replace('/?room=r&name=other#keys={foreign}')")
            await browser.wait_for("location.search.includes('other') && "
                                   "document.getElementById('needs-gateway')?.hidden === false",
                                   10)
            assert await browser.evaluate("document.getElementById('call').hidden") is True

    asyncio.run(main())


async def check_interop(browser: Browser, origin: str) -> None:
    """The page's FrameCrypto, keyed through a real KeyHandoff, against MediaKeys."""
    secret = os.urandom(32)
    browser_keys = keyed("slave", 1, secret)     # what the page's gateway holds
    peer = keyed("master", 1, secret)            # the aiortc side of the call
    stranger = keyed("master", 1, os.urandom(32))
    to_seal = [("video", VP8_KEY_FRAME), ("video", VP8_DELTA_FRAME), ("audio", OPUS_PACKET)]
    to_open = [(kind, peer.seal(frame, clear_of(kind, frame))) for kind, frame in to_seal]
    to_open.append(("video", stranger.seal(VP8_KEY_FRAME, 10)))         # another key
    to_open.append(("video", browser_keys.seal(VP8_DELTA_FRAME, 3)))    # its own send KID

    handoff = KeyHandoff(browser_keys, origins=[origin])
    await handoff.start()
    try:
        result = await run_js(browser, JS_INTEROP, keysUrl=handoff.url,
                              toSeal=[(k, f.hex()) for k, f in to_seal],
                              toOpen=[(k, f.hex()) for k, f in to_open if f is not None])
    finally:
        await handoff.stop()

    assert len(to_open) == 5
    assert result["opened"] == [VP8_KEY_FRAME.hex(), VP8_DELTA_FRAME.hex(), OPUS_PACKET.hex(),
                                None, None]
    stats = result["stats"]
    assert (stats["frames_decrypted"], stats["decrypt_failures"], stats["unknown_kid"]) == (3, 1, 1)
    assert stats["frames_encrypted"] == 3
    assert stats["send_kid"] == kid_for(1, "slave")
    assert stats["source"] == "qkd" and stats["key_id"] == "qkd-key-1"
    assert stats["rotations"] == 1

    for (kind, frame), hex_sealed in zip(to_seal, result["sealed"], strict=True):
        sealed = bytes.fromhex(hex_sealed)
        clear = clear_of(kind, frame)
        assert sealed[:clear] == frame[:clear]                   # readable VP8 header
        header, _ = decode_header(sealed[clear:])
        assert header.kid == kid_for(1, "slave")
        assert header.ctr >= 1 << 32                             # the page's own range
        assert peer.open(sealed, clear) == frame
    # The clear bytes are authenticated: changing one fails, as in Python.
    key_frame = bytearray(bytes.fromhex(result["sealed"][0]))
    key_frame[8] ^= 0x01                                         # part of the dimensions
    assert peer.open(bytes(key_frame), 10) is None
    assert peer.drops[Drop.AUTH_FAILED] == 1


def clear_of(kind: str, frame: bytes) -> int:
    return vp8_clear_bytes(frame) if kind == "video" else 0


# -- b, c: a call between the browser and an aiortc participant -------------------------

ROOM = "quantum"
WIDTH, HEIGHT, FPS = 320, 180, 15   # small: two cores run both ends of the call
CALL_TIMEOUT_S = 30.0
Y4M_FRAMES = 64

# The remote <video> as the user sees it: the aiortc peer's pattern number, or null.
JS_READ_PATTERN = """
const video = document.getElementById('remote');
const [w, h] = [video.videoWidth, video.videoHeight];
if (!w || !h) return null;
const canvas = new OffscreenCanvas(w, h);
const g = canvas.getContext('2d', { willReadFrequently: true });
g.drawImage(video, 0, 0);
const px = g.getImageData(0, 0, w, h).data;
const edge = (i, n, parts) => Math.round((i * n) / parts);
const bits = [];
for (let r = 0; r < rows; r++) {
  const [top, bottom] = [edge(r, h, rows), edge(r + 1, h, rows)];
  const dy = Math.floor((bottom - top) / 4);
  for (let c = 0; c < cols; c++) {
    const [left, right] = [edge(c, w, cols), edge(c + 1, w, cols)];
    const dx = Math.floor((right - left) / 4);
    let sum = 0, n = 0;
    for (let y = top + dy; y < bottom - dy; y += 2) {
      for (let x = left + dx; x < right - dx; x += 2) {
        const i = (y * w + x) * 4;
        sum += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
        n += 1;
      }
    }
    const mean = sum / n;
    if (mean > 80 && mean < 175) return null;    // neither black nor white: no pattern
    bits.push(mean >= 175 ? 1 : 0);
  }
}
const field = (from, len) => bits.slice(from, from + len).reduce((v, b) => (v << 1) | b, 0);
const number = field(0, 16), inverted = field(16, 16), crc = field(32, 8);
let want = 0;
for (const byte of [number >> 8, number & 0xff]) {
  want ^= byte;
  for (let i = 0; i < 8; i++) want = want & 0x80 ? ((want << 1) ^ 0x07) & 0xff : (want << 1) & 0xff;
}
return inverted === (number ^ 0xffff) && crc === want ? number : null;
"""


def write_pattern_y4m(path: Path) -> Path:
    """A short looping camera for Chromium: the pattern the aiortc side can read."""
    painter = PatternPainter(WIDTH, HEIGHT)
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F{FPS}:1 Ip A1:1 C420jpeg\n".encode())
        for number in range(Y4M_FRAMES):
            out.write(b"FRAME\n")
            out.write(painter.paint(number).to_ndarray().tobytes())
    return path


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str,
                explain: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{explain()}")
        await asyncio.sleep(0.25)


class Call:
    """The signalling server, the browser (keys through a KeyHandoff) and the aiortc
    participant, all on this host."""

    def __init__(self, tmp: Path, browser_keys: MediaKeys, peer_keys: MediaKeys,
                 transform: str | None = None, browser_first: bool = True) -> None:
        self.tmp = tmp
        self.browser_keys = browser_keys
        self.peer_keys = peer_keys
        self.transform = transform
        self.browser_first = browser_first
        self.handoff: KeyHandoff | None = None
        self.browser: Browser | None = None
        self.peer: Participant | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Call]:
        async with signalling() as origin, AsyncExitStack() as cleanup:
            self.handoff = KeyHandoff(self.browser_keys, origins=[origin])
            await self.handoff.start()
            cleanup.push_async_callback(self.handoff.stop)
            link = self.handoff.page_link(origin, ROOM, "browser")
            if self.transform is not None:
                link = link.replace("name=browser", f"name=browser&transform={self.transform}")
            camera = write_pattern_y4m(self.tmp / "pattern.y4m")
            self.browser = Browser(self.tmp / "chromium", link,
                                   extra_flags=[f"--use-file-for-fake-video-capture={camera}"])
            cleanup.push_async_callback(self.browser.close)
            self.peer = peer = Participant(origin, ROOM, "camera", self.peer_keys, width=WIDTH,
                                           height=HEIGHT, fps=FPS, retry_s=None)
            runs: list[asyncio.Task[Any]] = []

            async def stop_peer() -> None:
                await peer.stop()
                await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 15)
            cleanup.push_async_callback(stop_peer)

            if not self.browser_first:
                runs.append(asyncio.create_task(peer.run()))
                await until(self._peer_joined, 10, "the aiortc peer to join", self.explain)
            await self.browser.start()
            if self.browser_first:
                await until(self._page_joined, 10, "the page to join", self.explain)
                runs.append(asyncio.create_task(peer.run()))
            yield self

    def _peer_joined(self) -> bool:
        return self.peer is not None and self.peer.snapshot().offerer is not None

    async def _page_joined(self) -> bool:
        assert self.browser is not None
        return bool(await self.browser.evaluate(
            "document.getElementById('status')?.textContent.startsWith('waiting')"))

    def page(self) -> dict[str, Any]:
        assert self.handoff is not None
        return self.handoff.latest_stats() or {}

    def both_decode(self, page_frames: int, peer_frames: int) -> bool:
        """The page has decoded `page_frames` video frames, the peer `peer_frames`
        pictures with a valid pattern."""
        assert self.peer is not None
        return (self.page().get("video_frames_decoded", 0) >= page_frames
                and self.peer.snapshot().pattern_ok >= peer_frames)

    def explain(self) -> str:
        peer = self.peer.stats() if self.peer is not None else {}
        lines = [f"page: {self.page()}", f"aiortc peer: {peer}"]
        if self.browser is not None:
            lines += ["browser console:", *self.browser.console()[-15:]]
        return "\n".join(lines)

    async def read_remote_pattern(self) -> int | None:
        assert self.browser is not None
        result: int | None = await run_js(self.browser, JS_READ_PATTERN, rows=5, cols=8)
        return result


@pytest.mark.parametrize("transform", ["script-transform", "insertable-streams"])
def test_browser_and_aiortc_decrypt_each_other_through_a_rotation(
        tmp_path: Path, transform: str) -> None:
    secret, secret2 = os.urandom(32), os.urandom(32)
    browser_keys = keyed("slave", 1, secret)
    peer_keys = keyed("master", 1, secret)
    call = Call(tmp_path, browser_keys, peer_keys,
                transform=None if transform == "script-transform" else "streams")

    async def main() -> None:
        async with call.running():
            assert call.peer is not None
            peer = call.peer

            await until(lambda: call.both_decode(15, 15), CALL_TIMEOUT_S, "video both ways",
                        call.explain)
            page = call.page()
            assert page["transform"] == transform
            assert page["send_kid"] == kid_for(1, "slave") and page["source"] == "qkd"
            # What the page shows is the peer's pattern, frame numbers going up.
            seen = [await call.read_remote_pattern() for _ in range(4)]
            numbers = [n for n in seen if n is not None]
            assert len(numbers) >= 3 and numbers == sorted(numbers), seen

            # A rotation, make-before-break as the key session does it.
            for keys in (browser_keys, peer_keys):
                keys.install(2, session_key(2, secret2, KeySource.HYBRID))
            for keys in (browser_keys, peer_keys):
                keys.activate(2)
            await until(lambda: call.page().get("send_kid") == kid_for(2, "slave"), 5,
                        "the page to send under the new KID", call.explain)
            await asyncio.sleep(2.0)            # frames under the old KIDs drain
            for keys in (browser_keys, peer_keys):
                keys.retire(1)
            decoded = call.page()["video_frames_decoded"]
            ok = peer.snapshot().pattern_ok
            await until(lambda: call.both_decode(decoded + 15, ok + 15), CALL_TIMEOUT_S,
                        "video both ways after the rotation", call.explain)

            page = call.page()
            assert page["rotations"] == 2 and page["source"] == "hybrid"
            # A frame the browser queued under the old KID may still arrive after the
            # retire (the key session's overlap plays this part); none fails to open.
            assert page["decrypt_failures"] == 0 and page["unknown_kid"] <= 2, page
            assert page["frames_encrypted"] > 0 and page["frames_decrypted"] > 0
            assert page["connection_state"] == "connected" and not page["bypass_detected"]
            assert page["video_width"] == WIDTH
            seen_by_peer = peer.snapshot()
            assert seen_by_peer.garbage == 0 and seen_by_peer.video_dropped == 0, call.explain()
            assert not peer_keys.drops, call.explain()
            crypto = seen_by_peer.crypto
            assert crypto["video"]["opened"] > 0 and crypto["audio"]["opened"] > 0

    asyncio.run(main())


def test_browser_with_the_wrong_keys_shows_nothing_and_counts_failures(tmp_path: Path) -> None:
    browser_keys = keyed("slave", 1, os.urandom(32))    # not the peer's session key
    peer_keys = keyed("master", 1, os.urandom(32))
    call = Call(tmp_path, browser_keys, peer_keys, browser_first=False)

    async def main() -> None:
        async with call.running():
            assert call.peer is not None and call.browser is not None
            peer = call.peer

            def failing() -> bool:
                return (call.page().get("decrypt_failures", 0) >= 30
                        and peer.snapshot().video_dropped >= 10)

            await until(failing, CALL_TIMEOUT_S, "frames to fail both ways", call.explain)
            page = call.page()
            assert page["connection_state"] == "connected" and not page["bypass_detected"]
            assert page["transform"] == "script-transform"
            assert page["frames_encrypted"] > 0          # the page does send...
            assert page["frames_decrypted"] == 0         # ...but opens nothing
            assert page["video_frames_decoded"] == 0
            assert not page["video_width"]
            assert await call.browser.evaluate(
                "document.getElementById('remote').videoWidth") == 0
            assert peer.snapshot().video_decoded == 0 and peer_keys.opened == 0
            assert peer_keys.drops[Drop.AUTH_FAILED] > 0

    asyncio.run(main())
