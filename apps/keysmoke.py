"""Key-client smoke test of a two-KME deployment (the `keysmoke` compose service).

As the master SAE at the master KME it gets N new keys (ETSI 014 enc_keys), as
the slave SAE at the slave KME it fetches the same keys by key_ID (dec_keys),
and checks both ends hold identical keys. Key bytes are compared in memory and
never printed: the output names key IDs, counts, sizes and timings only.

Before that it waits, up to --timeout seconds in all, until both KMEs answer
and the QKD link has delivered enough key for the request.

    python -m apps.keysmoke --master-kme https://kme-a:8443 \\
        --slave-kme https://kme-b:8443 --pki /state/pki --count 8

Exit codes: 0 keys matched, 1 the check failed (mismatch or KME error),
2 bad usage or PKI, 3 the KMEs were not ready before the timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from keyclient import Etsi014Client, Key
from keyclient.errors import KMEError, KMEUnavailable
from qgw.errors import QgwError
from qgw.pki import Pki

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_READY = 3

PROGRESS_EVERY_S = 2.0
POLL_S = 0.2


class SmokeFailed(Exception):
    """The smoke test failed; the message says why. `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Options:
    master_kme: str
    slave_kme: str
    pki: Path
    master: str
    slave: str
    count: int
    size: int | None
    timeout: float


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.keysmoke",
        description="Get keys as the master SAE, fetch them by ID as the slave SAE and "
                    "check both ends hold the same keys (key bytes are never printed).",
        epilog="Exit codes: 0 keys matched, 1 check failed, 2 bad usage or PKI, "
               "3 KMEs not ready before --timeout.",
    )
    parser.add_argument("--master-kme", default="https://kme-a:8443", metavar="URL",
                        help="ETSI 014 URL of the master SAE's KME (default: %(default)s).")
    parser.add_argument("--slave-kme", default="https://kme-b:8443", metavar="URL",
                        help="ETSI 014 URL of the slave SAE's KME (default: %(default)s).")
    parser.add_argument("--pki", type=Path, default=Path("/state/pki"), metavar="DIR",
                        help="PKI folder made by `qgw pki init` (default: %(default)s).")
    parser.add_argument("--master", default="SAE_1", metavar="SAE_ID",
                        help="Master SAE ID, attached to --master-kme (default: %(default)s).")
    parser.add_argument("--slave", default="SAE_2", metavar="SAE_ID",
                        help="Slave SAE ID, attached to --slave-kme (default: %(default)s).")
    parser.add_argument("--count", type=_positive_int, default=8, metavar="N",
                        help="How many keys to get and compare (default: %(default)s).")
    parser.add_argument("--size", type=_positive_int, default=None, metavar="BITS",
                        help="Key size in bits (default: the KME's default size).")
    parser.add_argument("--timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                        help="Give up after this long in all, waiting included "
                             "(default: %(default)s).")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Options:
    ns = build_parser().parse_args(argv)
    if ns.master == ns.slave:
        build_parser().error("--master and --slave must be different SAEs")
    return Options(ns.master_kme, ns.slave_kme, ns.pki, ns.master, ns.slave, ns.count,
                   ns.size, ns.timeout)


def say(text: str) -> None:
    print(f"keysmoke: {text}", flush=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def wait_ready(master: Etsi014Client, slave: Etsi014Client, opts: Options,
               deadline: float) -> float:
    """Wait until both KMEs answer and the link holds `count` keys. Returns seconds waited."""
    started = time.monotonic()
    next_report = started
    while True:
        now = time.monotonic()
        try:
            slave.status(opts.master)  # the slave's KME answers this SAE
            st = master.status(opts.slave)
            if st.stored_key_count >= opts.count:
                say(f"ready after {now - started:.2f} s: link {st.source_KME_ID} -> "
                    f"{st.target_KME_ID} holds {st.stored_key_count} keys of {st.key_size} bits")
                return now - started
            waiting_for = (f"link {st.source_KME_ID} -> {st.target_KME_ID} holds "
                           f"{st.stored_key_count} of {opts.count} keys")
        except KMEUnavailable as exc:
            if "TLS handshake failed" in exc.message:  # a certificate does not heal by waiting
                raise SmokeFailed(f"cannot talk to the KME: {exc}") from None
            waiting_for = str(exc)
        except KMEError as exc:
            # 400/401 do not heal by waiting: wrong SAE, wrong KME, wrong certificate.
            raise SmokeFailed(f"KME refused the status request: {exc}") from None
        if now >= deadline:
            raise SmokeFailed(f"KMEs not ready after {now - started:.1f} s: {waiting_for}",
                              EXIT_NOT_READY)
        if now >= next_report:
            say(f"waiting ({now - started:.0f}/{opts.timeout:g} s): {waiting_for}")
            next_report = now + PROGRESS_EVERY_S
        time.sleep(min(POLL_S, max(0.0, deadline - now)))


def get_keys(master: Etsi014Client, opts: Options, deadline: float) -> list[Key]:
    """enc_keys, retried while the KME says no key is available (503) and time is left."""
    while True:
        try:
            return master.get_keys(opts.slave, opts.count, opts.size)
        except KMEUnavailable as exc:
            if time.monotonic() >= deadline:
                raise SmokeFailed(f"enc_keys still unavailable at the timeout: {exc}",
                                  EXIT_NOT_READY) from None
            say(f"enc_keys unavailable, retrying: {exc}")
            time.sleep(POLL_S)
        except KMEError as exc:
            raise SmokeFailed(f"enc_keys failed: {exc}") from None


def compare(sent: list[Key], received: list[Key]) -> int:
    """How many keys match by ID, size and bytes (constant-time byte comparison)."""
    matched = 0
    by_id = {k.key_id: k for k in received}
    for key in sent:
        other = by_id.get(key.key_id)
        if other is not None and len(other.secret) == len(key.secret) and \
                other.secret == key.secret:
            matched += 1
        else:
            say(f"MISMATCH key_ID {key.key_id}")
    return matched


def _wipe(*groups: list[Key]) -> None:
    for keys in groups:
        for key in keys:
            key.secret.wipe()


def run(opts: Options) -> None:
    started = time.monotonic()
    deadline = started + opts.timeout
    pki = Pki(opts.pki)
    say(f"{opts.master}@{opts.master_kme} -> {opts.slave}@{opts.slave_kme}: {opts.count} keys, "
        f"timeout {opts.timeout:g} s, PKI {opts.pki}")
    sent: list[Key] = []
    received: list[Key] = []
    with contextlib.ExitStack() as stack:
        try:
            master = stack.enter_context(
                Etsi014Client(opts.master_kme, pki.sae_files(opts.master)))
            slave = stack.enter_context(
                Etsi014Client(opts.slave_kme, pki.sae_files(opts.slave)))
        except (QgwError, ValueError) as exc:
            raise SmokeFailed(f"cannot set up the key clients: {exc}", EXIT_USAGE) from None
        stack.callback(_wipe, sent, received)
        waited = wait_ready(master, slave, opts, deadline)

        t0 = time.perf_counter()
        sent.extend(get_keys(master, opts, deadline))
        enc_s = time.perf_counter() - t0
        say(f"enc_keys: {len(sent)} keys of {sent[0].bits} bits for {opts.slave} "
            f"in {_ms(enc_s)}")
        for key in sent:
            say(f"  key_ID {key.key_id}")

        t0 = time.perf_counter()
        try:
            received.extend(slave.get_keys_with_ids(opts.master, [k.key_id for k in sent]))
        except KMEError as exc:
            raise SmokeFailed(f"dec_keys failed: {exc}") from None
        dec_s = time.perf_counter() - t0
        say(f"dec_keys: {len(received)} keys for {opts.slave} from {opts.master} "
            f"in {_ms(dec_s)}")

        matched = compare(sent, received)
        total = time.monotonic() - started
        if matched != len(sent) or len(received) != len(sent):
            raise SmokeFailed(f"FAILED: only {matched}/{len(sent)} keys matched "
                              f"({len(received)} received)")
        say(f"OK: {matched}/{len(sent)} keys matched at both ends "
            f"(waited {waited:.2f} s, enc_keys {_ms(enc_s)}, dec_keys {_ms(dec_s)}, "
            f"total {total:.2f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        run(opts)
    except SmokeFailed as exc:
        print(f"keysmoke: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        print("keysmoke: interrupted", file=sys.stderr, flush=True)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
