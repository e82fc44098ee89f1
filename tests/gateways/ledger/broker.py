"""A real Mosquitto broker on loopback for tests and benches (the Debian package's binary).

    with Mosquitto(tmp_path) as broker:
        ingest = MqttIngest(broker.host, broker.port, ...)
        broker.restart()          # same port; sessions and queued messages are lost

Missing mosquitto is an error, not a skip: CI installs it (scripts/test), so a run
without it would silently test less.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from qgw.ports import free_ports

MOSQUITTO = "/usr/sbin/mosquitto"
START_TIMEOUT_S = 5.0


class BrokerError(RuntimeError):
    pass


def mosquitto_binary() -> str:
    found = MOSQUITTO if os.access(MOSQUITTO, os.X_OK) else shutil.which("mosquitto")
    if found is None:
        raise BrokerError(f"mosquitto is not installed ({MOSQUITTO}): "
                          "apt-get install mosquitto; scripts/test does it")
    return found


class Mosquitto:
    """One broker process listening on 127.0.0.1:`port` (a free port unless given).

    Unlimited queues for QoS 1 (Mosquitto's default drops beyond 1000 queued messages per
    client, which a benchmark burst exceeds: a drop would look like an ingest loss)."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, port: int | None = None,
                 extra_config: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_ports(1)[0]
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.extra_config = extra_config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 0",
            # as root Mosquitto drops to user "mosquitto", who cannot write the log here
            *(["user root"] if os.geteuid() == 0 else []),
            *self.extra_config,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        binary = mosquitto_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._proc = subprocess.Popen([binary, "-c", str(self.config)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._accepts():
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise BrokerError(f"mosquitto exited at start: {err.strip()} {self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto not accepting on {self.address} after "
                                  f"{START_TIMEOUT_S} s: {self.log_text()}")
            time.sleep(0.02)
        return self

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        """Stop and start again on the same port (clients see the connection drop)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
