"""Two aiortc participants on loopback, through the signalling server, SFrame on.

Each participant is a process of its own (frame crypto patches aiortc per
process): `tests/gateways/webrtc/call_peer.py`, keys from a shared seed on one
wall-clock rotation schedule. Two calls run side by side to keep the time down:

    rotating    the same keys at both ends, a new key every 2 s, 10 rotations
    wrong-key   the two ends hold different keys
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[3]
PERIOD_S = 2.0
ROTATIONS = 10
ROTATING_S = PERIOD_S * ROTATIONS + 1.0     # from t0: the last rotation plus a second
WRONG_KEY_S = 6.0
FPS = 30


@dataclass
class Peer:
    name: str
    proc: subprocess.Popen[str]
    log: Path
    result: dict[str, Any] | None = None

    @property
    def stats(self) -> dict[str, Any]:
        assert self.result is not None
        return self.result["stats"]  # type: ignore[no-any-return]

    @property
    def activated(self) -> list[float]:
        assert self.result is not None
        return self.result["activated"]  # type: ignore[no-any-return]

    def diagnosis(self) -> str:
        tail = self.log.read_text(errors="replace").splitlines()[-30:]
        return f"{self.name} (exit {self.proc.returncode}):\n" + "\n".join(tail)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the signalling server exited"
        try:
            if requests.get(f"{url}/healthz", timeout=1).text == "ok":
                return
        except requests.RequestException:
            time.sleep(0.1)
    pytest.fail("the signalling server did not come up")


def read_line(stream: IO[str], timeout_s: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return stream.readline().strip()


def spawn(tmp: Path, signal: str, room: str, name: str, role: str, seed: str,
          seconds: float) -> Peer:
    log = tmp / f"{room}-{name}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gateways.webrtc.call_peer", "--signal", signal,
             "--room", room, "--name", name, "--role", role, "--seed", seed,
             "--rotate-every", str(PERIOD_S), "--seconds", str(seconds), "--fps", str(FPS)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    return Peer(name, proc, log)


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Peer, Peer]]]:
    tmp = tmp_path_factory.mktemp("call")
    port = free_port()
    signal = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "apps.videocall.server", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "WARNING"], cwd=REPO, text=True)
    peers: list[Peer] = []
    try:
        wait_healthy(signal, server)
        seed = os.urandom(16).hex()
        rotating = (spawn(tmp, signal, "rotating", "alice", "master", seed, ROTATING_S),
                    spawn(tmp, signal, "rotating", "bob", "slave", seed, ROTATING_S))
        wrong = (spawn(tmp, signal, "wrong-key", "carol", "master", seed, WRONG_KEY_S),
                 spawn(tmp, signal, "wrong-key", "mallory", "slave", os.urandom(16).hex(),
                       WRONG_KEY_S))
        peers = [*rotating, *wrong]
        for peer in peers:
            assert peer.proc.stdout is not None
            assert read_line(peer.proc.stdout, 30) == "ready", peer.diagnosis()
        t0 = time.time() + 0.2     # one schedule for everybody
        for peer in peers:
            assert peer.proc.stdin is not None
            peer.proc.stdin.write(f"{t0}\n")
            peer.proc.stdin.flush()
        for peer in peers:
            out, _ = peer.proc.communicate(timeout=ROTATING_S + 30)
            assert peer.proc.returncode == 0, peer.diagnosis()
            peer.result = json.loads(out.strip().splitlines()[-1])
        yield {"rotating": rotating, "wrong-key": wrong}
    finally:
        for proc in [peer.proc for peer in peers] + [server]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()


def test_rotating_keys_keep_the_picture_in_order(calls: dict[str, tuple[Peer, Peer]]) -> None:
    alice, bob = calls["rotating"]
    for sender, receiver in ((alice, bob), (bob, alice)):
        sent, got = sender.stats, receiver.stats
        why = receiver.diagnosis()
        assert got["connected"] == 1 and got["calls"] == 1, why
        # Every rotation happened under one connection: a new KID each time.
        assert sender.stats["crypto"]["keys"]["rotations"] == ROTATIONS + 1
        assert len(sender.activated) == ROTATIONS
        # Media flowed the whole time (30 fps for ~20 s; generous for a loaded machine).
        assert got["pattern_ok"] >= FPS * ROTATING_S / 2, got
        # Every picture shown is one that was sent, in order, none twice, no garbage.
        assert got["garbage"] == 0 and got["pattern_ok"] == got["video_decoded"], got
        assert got["out_of_order"] == 0 and got["duplicates"] == 0, got
        assert got["first_number"] == 0
        assert sent["video_sent"] - 1 - got["last_number"] <= FPS // 2   # in flight at the end
        # Make-before-break: no frame failed to open across 10 key changes ...
        assert got["crypto"]["keys"]["drops"] == {}, got["crypto"]
        assert got["video_dropped"] == 0 and got["crypto"]["audio"]["dropped"] == 0
        # ... and any picture lost at all was lost near a rotation, a few at most.
        assert got["lost"] <= 3 * ROTATIONS, got["gaps"]
        for gap in got["gaps"]:
            assert any(-0.5 < gap["at"] - t < 1.5 for t in sender.activated), got["gaps"]
        assert got["audio_received"] >= 50 * ROTATING_S / 2
        assert sent["crypto"]["video"]["sealed"] >= got["crypto"]["video"]["opened"]
        assert got["open_us_per_video_frame"] > 0


def test_wrong_key_shows_nothing_and_counts_drops(calls: dict[str, tuple[Peer, Peer]]) -> None:
    carol, mallory = calls["wrong-key"]
    for sender, receiver in ((carol, mallory), (mallory, carol)):
        sent, got = sender.stats, receiver.stats
        why = receiver.diagnosis()
        assert got["connected"] == 1, why
        assert sent["crypto"]["video"]["sealed"] > FPS, sent     # frames did go out ...
        assert got["video_received"] > FPS, got                   # ... and arrived ...
        assert got["video_decoded"] == 0 and got["pattern_ok"] == 0 and got["garbage"] == 0
        assert got["audio_received"] == 0                         # ... but none was shown
        drops = got["crypto"]["keys"]["drops"]
        assert set(drops) == {"auth_failed"}, drops
        assert drops["auth_failed"] == (got["crypto"]["video"]["dropped"]
                                        + got["crypto"]["audio"]["dropped"])
        assert got["video_dropped"] == got["video_received"]
        assert got["crypto"]["keys"]["opened"] == 0
        assert got["keyframe_requests"] >= 1      # it asked, in vain, for a fresh key frame
