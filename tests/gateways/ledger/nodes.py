"""A real Ethereum node for ledger tests: anvil from tools/node_modules on a free loopback port.

    node = AnvilNode(tmp_path).start(state_file=tmp_path / "chain.json")
    ledger = Ledger.connect(node.url)
    node.stop()                      # SIGTERM: anvil writes the whole chain to state_file
    node.start(state_file=...)       # same port, same URL: blocks, receipts, logs are back
    node.kill()                      # SIGKILL, a crash: nothing since the last dump is kept

anvil 1.7 persists with `--state FILE` (load at start if the file exists, dump on exit);
the dump holds blocks and transactions too, so logs and receipts survive a restart, not
just balances and storage. `state_interval` adds a dump every N seconds, which bounds
what a crash loses.

The native binary is started rather than the npm wrapper (.bin/anvil, a node script that
spawns it): on SIGTERM the wrapper exits without waiting for anvil, so waiting for it does
not say when the state file is complete, and SIGKILL on it would leave anvil running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import pytest

from qgw.ports import free_ports

TOOLS = Path(__file__).resolve().parents[3] / "tools" / "node_modules"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0   # a SIGTERM dump of a long chain takes a while


def anvil_binary() -> Path:
    """The platform's anvil binary that `npm ci` put under tools/node_modules."""
    found = sorted(TOOLS.glob("@foundry-rs/anvil-*/bin/anvil"))
    if not found or not os.access(found[0], os.X_OK):
        pytest.fail(f"anvil is missing from {TOOLS}: run scripts/tools")
    return found[0]


class AnvilNode:
    """One anvil, restartable on the same port so that its URL stays valid."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_ports(1)[0]
        self.log = log_dir / f"anvil-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, state_file: Path | None = None, state_interval: int | None = None,
              extra_args: tuple[str, ...] = ()) -> AnvilNode:
        if self.running:
            raise RuntimeError(f"anvil on port {self.port} is already running")
        argv = [str(anvil_binary()), "--port", str(self.port), "--host", "127.0.0.1",
                "--silent", *extra_args]
        if state_file is not None:
            argv += ["--state", str(state_file)]
        if state_interval is not None:
            argv += ["--state-interval", str(state_interval)]
        with self.log.open("ab") as log:
            # Its own session: a Ctrl-C on the test run is not also delivered to anvil,
            # which would then dump state behind the test's back.
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        return self

    def stop(self) -> int:
        """SIGTERM and wait: anvil dumps its state file (if it has one) before exiting."""
        return self._end(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL: what a crash or a power cut does; the state file is not written."""
        return self._end(signal.SIGKILL)

    def __enter__(self) -> AnvilNode:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.running:
            self.stop()

    def _end(self, how: signal.Signals) -> int:
        process, self._process = self._process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(how)
            try:
                return process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def _wait_ready(self) -> None:
        request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber",
                              "params": []}).encode()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"anvil exited with {self._process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                post = urllib.request.Request(  # noqa: S310 (our own http:// URL)
                    self.url, data=request, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(post, timeout=2) as answer:  # noqa: S310
                    if "result" in json.load(answer):
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"anvil on port {self.port} not ready after {START_TIMEOUT:g} s: "
                           f"{self.log.read_text()[-2000:]}")
