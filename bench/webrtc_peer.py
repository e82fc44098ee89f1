"""One participant of `bench.webrtc`'s calls, in a process of its own (frame crypto is
process-global: one participant per process at a time).

    python -m bench.webrtc_peer --signal http://127.0.0.1:PORT --room R --name N \
        --role master|slave --modes plain,sframe,sframe,plain --call-seconds 18 \
        [--rotations 30 --interval 1 --rotate-from 4] [--width 640 --height 360]

It prints "ready" once its (slow) imports are done, then reads one JSON line from
stdin: {"t0": time.monotonic() of the start, "seed": hex}. The seed comes over the
pipe rather than the command line so that no key appears in a process listing;
the benchmark gives both participants the same t0 and seed.

Then it makes one call per mode, one after the other in the same process (no
start-up between them), call i in room R-i from t0 + i * call-seconds for
call-seconds minus 1 s (both ends have left before the next call): `plain` is
aiortc without SFrame (the benchmark's baseline), `sframe` the gateway's media path.

BENCHMARK ONLY: keys come from the seed instead of a KeySession (call i's epoch e
key is SHA-256(seed || i || e): no key is used in two calls, whose SFrame counters
start over), and follow one CLOCK_MONOTONIC schedule, make-before-break as a
KeySession pair does: epoch 1 from the start of the call, then rotation
k = 1..rotations activates epoch k + 1 at the call's start + rotate-from +
(k - 1) * interval, installed `lead` before and epoch k retired `lead` after.

Prints one JSON object, {"calls": [...]}, per call: its mode and start, the
participant's stats, the activation times and the pattern frame times
(monotonic; created: by frame count, shown: [number, time]).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

from gateways.webrtc.keys import MediaKeys
from gateways.webrtc.participant import Participant
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret

CALL_GAP_S = 1.0


def epoch_key(seed: bytes, call: int, epoch: int) -> SessionKey:
    secret = hashlib.sha256(seed + call.to_bytes(8, "big") + epoch.to_bytes(8, "big")).digest()
    return SessionKey(epoch, KeySource.QKD, f"bench-{call}-{epoch}", Secret(secret))


async def sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))


async def rotate(keys: MediaKeys, seed: bytes, call: int, first: float,
                 args: argparse.Namespace, activated: list[float]) -> None:
    for k in range(1, args.rotations + 1):
        epoch = k + 1
        at = first + (k - 1) * args.interval
        await sleep_until(at - args.lead)
        keys.install(epoch, epoch_key(seed, call, epoch))
        await sleep_until(at)
        keys.activate(epoch)
        activated.append(time.monotonic())
        await sleep_until(at + args.lead)
        keys.retire(epoch - 1)


async def one_call(args: argparse.Namespace, call: int, mode: str, t0: float,
                   seed: bytes) -> dict[str, Any]:
    plain = mode == "plain"
    keys = MediaKeys(args.role)
    activated: list[float] = []
    rotation: asyncio.Future[None] | None = None
    await sleep_until(t0)
    load = os.getloadavg()[0]
    if not plain:
        keys.install(1, epoch_key(seed, call, 1))
        keys.activate(1)
        if args.rotations:
            rotation = asyncio.ensure_future(
                rotate(keys, seed, call, t0 + args.rotate_from, args, activated))
    participant = Participant(args.signal, f"{args.room}-{call}", args.name, keys,
                              width=args.width, height=args.height, fps=args.fps,
                              retry_s=None, crypto=not plain, frame_times=True)
    try:
        stats = await participant.run(
            seconds=t0 + args.call_seconds - CALL_GAP_S - time.monotonic())
    finally:
        if rotation is not None:
            rotation.cancel()
    times = participant.frame_times
    return {"mode": mode, "t0": t0, "loadavg_1m": load, "stats": stats.to_dict(),
            "activated": activated,
            "created": times.created if times is not None else [],
            "shown": times.shown if times is not None else []}


async def main(args: argparse.Namespace, t0: float, seed: bytes) -> dict[str, Any]:
    return {"calls": [await one_call(args, i, mode, t0 + i * args.call_seconds, seed)
                      for i, mode in enumerate(args.modes.split(","))]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.webrtc_peer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--role", choices=["master", "slave"], required=True)
    parser.add_argument("--modes", default="sframe",
                        help="one call per mode, comma-separated: plain (no SFrame) | sframe")
    parser.add_argument("--call-seconds", type=float, required=True,
                        help="from one call's start to the next's")
    parser.add_argument("--rotations", type=int, default=0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between keys")
    parser.add_argument("--rotate-from", type=float, default=4.0,
                        help="seconds after t0 of the first rotation (the call is up)")
    parser.add_argument("--lead", type=float, default=0.5,
                        help="install before / retire after each activation, seconds")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=float, default=30.0)
    cli = parser.parse_args()
    if not set(cli.modes.split(",")) <= {"plain", "sframe"}:
        parser.error("--modes: plain or sframe, comma-separated")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print("ready", flush=True)
    start = json.loads(sys.stdin.readline())
    result = asyncio.run(main(cli, float(start["t0"]), bytes.fromhex(start["seed"])))
    print(json.dumps(result))
