"""One participant of a test call, in a process of its own (frame crypto is per process).

    python -m tests.gateways.webrtc.call_peer --signal http://127.0.0.1:PORT --room R \
        --name N --role master|slave --seed HEX --rotate-every 2 --seconds 20

It prints "ready" once its (slow) imports are done, then reads the schedule's start
t0 (wall clock, seconds) from stdin: the test hands both participants the same t0.

TEST ONLY: the keys come from a seed on the command line instead of a KeySession.
Epoch e's key is SHA-256(seed || e), so two processes given the same seed hold the
same keys. Both follow one wall-clock schedule from t0, as a KeySession pair
does (make-before-break): epoch 1 from the start, then epoch e

    installed  at t0 + (e-1) * period - lead
    activated  at t0 + (e-1) * period
    retiring e-1 at t0 + (e-1) * period + lead

Prints the participant's stats and the activation times as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
import time
from typing import Any

from gateways.webrtc.keys import MediaKeys
from gateways.webrtc.participant import run_participant
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret


def epoch_key(seed: bytes, epoch: int) -> SessionKey:
    secret = hashlib.sha256(seed + epoch.to_bytes(8, "big")).digest()
    return SessionKey(epoch, KeySource.QKD, f"test-{epoch}", Secret(secret))


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def rotate(keys: MediaKeys, seed: bytes, t0: float, period: float, lead: float,
                 activated: list[float]) -> None:
    epoch = 2
    while True:
        at = t0 + (epoch - 1) * period
        await sleep_until(at - lead)
        keys.install(epoch, epoch_key(seed, epoch))
        await sleep_until(at)
        keys.activate(epoch)
        activated.append(time.time())
        await sleep_until(at + lead)
        keys.retire(epoch - 1)
        epoch += 1


async def main(args: argparse.Namespace, t0: float) -> dict[str, Any]:
    seed = bytes.fromhex(args.seed)
    keys = MediaKeys(args.role)
    keys.install(1, epoch_key(seed, 1))
    keys.activate(1)
    activated: list[float] = []
    rotation = asyncio.ensure_future(
        rotate(keys, seed, t0, args.rotate_every, args.lead, activated))
    try:
        stats = await run_participant(
            args.signal, args.room, args.name, keys,
            seconds=t0 + args.seconds - time.time(),
            width=args.width, height=args.height, fps=args.fps)
    finally:
        rotation.cancel()
    return {"stats": stats.to_dict(), "activated": activated}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--signal", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--role", choices=["master", "slave"], required=True)
    parser.add_argument("--seed", required=True, help="hex; the same at both participants")
    parser.add_argument("--rotate-every", type=float, default=2.0)
    parser.add_argument("--lead", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=10.0, help="from t0")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--fps", type=float, default=30.0)
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    print(json.dumps(asyncio.run(main(cli, start))))
