"""The writer's inputs: MQTT and/or REST ingest (ingest.py) as configured, feeding the writer.

Both hand the writer groups of readings (`LedgerWriter.take`): the readings of one
MQTT network pass, or of one REST request, are sealed and stored in one outbox
transaction (one fsync), and only then acknowledged (PUBACK, HTTP answer). An fsync
per reading would cap the writer at a few hundred readings a second (about 3 ms
each here); a group shares it. A reading without a QKD key is refused (`no_key`:
REST 503, MQTT refusal on `{prefix}/{device}/refused`): never sealed under nothing,
never written in clear, and the sensor is told to send it again.

The REST ingest runs on an event loop in a thread of its own (`RestServer`), and
hands each group to the writer in a worker thread, so the writer's blocking work
stalls neither that loop nor anything else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Protocol

from aiohttp import web

from gateways.config import Listen
from gateways.ledger.config import WriterSection
from gateways.ledger.ingest import DeviceRegistry, IngestStats, MqttIngest, Refused, RestIngest
from gateways.ledger.reading import Reading

log = logging.getLogger("qgw.gateway.ledger")

START_TIMEOUT_S = 10.0


class Writer(Protocol):
    """What the intake needs of the writer (writer.LedgerWriter)."""

    def take(self, readings: list[Reading]) -> list[Refused | None]: ...


class Intake:
    """The writer's inputs: MQTT and/or REST as configured, feeding `writer.take`
    (which refuses a reading it has no key for, `no_key`, for both inputs alike)."""

    def __init__(self, cfg: WriterSection, writer: Writer) -> None:
        self.cfg = cfg
        self.writer = writer
        self.devices = DeviceRegistry.from_config(cfg.devices, source="writer.devices")
        self.mqtt: MqttIngest | None = None
        self.rest: RestIngest | None = None
        self.rest_server: RestServer | None = None
        if cfg.mqtt is not None:
            self.mqtt = MqttIngest(cfg.mqtt.host, cfg.mqtt.port, devices=self.devices,
                                   on_readings=writer.take, topic_prefix=cfg.mqtt.prefix,
                                   client_id=cfg.mqtt.client_id)
        if cfg.rest is not None:
            self.rest = RestIngest(self.devices, on_readings=writer.take)
            self.rest_server = RestServer(self.rest.app(), cfg.rest)

    def start(self) -> None:
        if self.rest_server is not None:
            self.rest_server.start()
        if self.mqtt is not None:
            self.mqtt.start()

    def stop(self) -> None:
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.rest_server is not None:
            self.rest_server.stop()

    def wait_subscribed(self, timeout: float) -> bool:
        return self.mqtt is None or self.mqtt.wait_subscribed(timeout)

    @property
    def rest_port(self) -> int | None:
        return None if self.rest_server is None else self.rest_server.port

    def stats(self) -> IngestStats:
        """Both inputs' counters added up (refusals by reason, `no_key` included)."""
        total = IngestStats()
        for ingest in (self.mqtt, self.rest):
            if ingest is not None:
                total += ingest.stats()
        return total


class RestServer:
    """An aiohttp application served from an event loop in a thread of its own."""

    def __init__(self, app: web.Application, listen: Listen) -> None:
        self.app = app
        self.listen = listen
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="ledger-rest", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._up(), loop).result(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    async def _up(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen.host, self.listen.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("REST ingest on %s:%d (POST /v1/readings)", self.listen.host, self.port)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(START_TIMEOUT_S)
            except (TimeoutError, RuntimeError) as exc:
                log.warning("REST ingest did not stop cleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        loop.close()
