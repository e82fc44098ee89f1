"""The IoT-to-ledger gateway (OPENQKD use case 35): one process per role.

Writer: intake.py (MQTT, REST) -> writer.py (keys.py seals, outbox.py keeps, chain.py
anchors). Reader: reader.py (chain.py reads, keys.py fetches by ID, journal.py keeps
progress and output). Both keep their QKD keys in a vault (vault.py) in the state
folder, since a KME hands each key out once and a ledger record stays for good.

    writer state/   outbox.sqlite, vault.sqlite(.master), account.key, contract.json
    reader state/   vault.sqlite(.master), reader.sqlite

The writer attaches to `ledger.contract`, else to the deployment recorded in its
contract file, else deploys RecordAnchor (owner: its account) and records it there.
On the embedded chain (eth-tester) the chain lives in the process: a recorded
contract that is not there any more is deployed again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from eth_account.signers.local import LocalAccount
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateways.base import GatewayState, ThreadedGateway
from gateways.config import serve_metrics
from gateways.ledger.chain import Ledger, LedgerError
from gateways.ledger.config import ChainSection, LedgerConfig
from gateways.ledger.intake import Intake
from gateways.ledger.journal import ReaderJournal
from gateways.ledger.keys import (
    DecKeysLookup,
    EncKeysFetcher,
    KeyFetcher,
    KeyLookup,
    ReaderKeys,
    StreamFetcher,
    StreamLookup,
    WriterKeys,
)
from gateways.ledger.outbox import Outbox
from gateways.ledger.reader import LedgerReader
from gateways.ledger.state import Deployment, load_or_create_account
from gateways.ledger.vault import KeyVault
from gateways.ledger.writer import LedgerWriter
from keyclient import Etsi004Client, Etsi014Client
from qgw.errors import ConfigError
from qgw.pki import Pki
from qgw.tls import TlsFiles

log = logging.getLogger("qgw.gateway.ledger")

EMBEDDED_FUND_WEI = 10 * 10**18


def connect(section: ChainSection) -> Ledger:
    """The ledger node, retried for `connect_timeout_s` (a container may start first)."""
    deadline = time.monotonic() + section.connect_timeout_s
    delay = 0.2
    while True:
        try:
            return Ledger.connect(section.url, timeout=section.timeout_s,
                                  receipt_timeout=section.receipt_timeout_s)
        except LedgerError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s; trying again", exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class LedgerGateway(ThreadedGateway):
    name: ClassVar[str] = "ledger"
    summary: ClassVar[str] = ("IoT readings sealed with QKD keys, batched and anchored on an "
                              "Ethereum ledger; the partner decrypts")

    def __init__(self, cfg: LedgerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.ledger: Ledger | None = None
        self.chain_id: int | None = None
        self.contract: str | None = None
        self.account_address: str | None = None
        self.vault: KeyVault | None = None
        # writer
        self.keys: WriterKeys | None = None
        self.outbox: Outbox | None = None
        self.writer: LedgerWriter | None = None
        self.intake: Intake | None = None
        # reader
        self.reader_keys: ReaderKeys | None = None
        self.journal: ReaderJournal | None = None
        self.reader: LedgerReader | None = None
        self._stop_metrics: Callable[[], None] = lambda: None
        self._final: dict[str, Any] | None = None

    # -- lifecycle -------------------------------------------------------------------


    def open(self) -> None:
        cfg = self.cfg
        self.state = GatewayState.STARTING
        files = Pki(cfg.pki).sae_files(cfg.sae)
        try:
            cfg.state.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.ledger = connect(cfg.ledger)
            self.chain_id = self.ledger.chain_id
            self.vault = KeyVault(cfg.state / "vault.sqlite")
            if cfg.role == "writer":
                self._open_writer(files)
            else:
                self._open_reader(files)
            self.registry.register(_LedgerCollector(self))
            self._stop_metrics = serve_metrics(cfg.metrics, self.registry)
        except BaseException:
            self.close()
            raise
        self.state = GatewayState.RUNNING
        log.info("ledger %s %s up: ledger %s (chain %d), contract %s", cfg.role, cfg.sae,
                 cfg.ledger.url, self.chain_id, self.contract or "(waiting for it)")

    def _open_writer(self, files: TlsFiles) -> None:
        cfg, wcfg, ledger = self.cfg, self.cfg.writer, self.ledger
        assert wcfg is not None and ledger is not None and self.vault is not None
        account = load_or_create_account(cfg.account_file)
        self.account_address = account.address
        fund = cfg.ledger.fund_wei
        if fund is None and cfg.ledger.url.startswith("eth-tester"):
            fund = EMBEDDED_FUND_WEI    # a chain in this process: nobody else could fund it
        if fund is not None:
            ledger.fund(account.address, fund)
        self.contract = self._writer_contract(account)
        if not ledger.is_writer(account.address):
            raise LedgerError(f"account {account.address} may not anchor on the contract at "
                              f"{self.contract}: its owner must allow it (setWriter)")
        fetcher: KeyFetcher = (
            StreamFetcher(Etsi004Client(cfg.kme, files), cfg.sae, cfg.peer_sae)
            if cfg.key_api == "004" else
            EncKeysFetcher(Etsi014Client(cfg.kme, files), cfg.peer_sae))
        self.keys = WriterKeys(fetcher, self.vault, wcfg.keys)
        self.keys.start()
        self.outbox = Outbox(cfg.state / "outbox.sqlite")
        assert self.chain_id is not None
        self.writer = LedgerWriter(keys=self.keys, outbox=self.outbox, ledger=ledger,
                                   account=account, chain_id=self.chain_id,
                                   contract=self.contract, policy=wcfg.batch,
                                   stop_timeout_s=cfg.ledger.receipt_timeout_s)
        self.writer.start()
        self.intake = Intake(wcfg, self.writer)
        self.intake.start()

    def _writer_contract(self, account: LocalAccount) -> str:
        cfg, ledger = self.cfg, self.ledger
        assert ledger is not None and self.chain_id is not None
        if cfg.ledger.contract is not None:
            ledger.use(cfg.ledger.contract)
            return cfg.ledger.contract
        file = cfg.contract_file
        if file.exists():
            deployment = self._deployment()
            assert deployment is not None
            try:
                ledger.use(deployment.address)
                return deployment.address
            except LedgerError:
                if not cfg.ledger.url.startswith("eth-tester"):
                    raise
                log.warning("the embedded chain has no contract at %s (it lived in an earlier "
                            "process): deploying again", deployment.address)
        first_block = ledger.head()
        address = ledger.deploy(account)
        Deployment(address, self.chain_id, first_block, account.address).save(file)
        log.info("deployed RecordAnchor at %s (block %d); recorded in %s", address,
                 ledger.head(), file)
        return address

    def _deployment(self) -> Deployment | None:
        """The recorded deployment, if the file is there; ConfigError if it is another chain's."""
        file = self.cfg.contract_file
        try:
            deployment = Deployment.load(file)
        except FileNotFoundError:
            return None
        if deployment.chain_id != self.chain_id:
            raise ConfigError(str(file), "chain_id",
                              f"the contract was deployed on chain {deployment.chain_id}, the "
                              f"ledger at {self.cfg.ledger.url} is chain {self.chain_id}")
        return deployment

    def _open_reader(self, files: TlsFiles) -> None:
        cfg, rcfg, ledger = self.cfg, self.cfg.reader, self.ledger
        assert rcfg is not None and ledger is not None and self.vault is not None
        assert self.chain_id is not None
        lookup: KeyLookup = (
            StreamLookup(Etsi004Client(cfg.kme, files), cfg.sae, cfg.peer_sae,
                         ttl_s=rcfg.key_stream_ttl_s)
            if cfg.key_api == "004" else
            DecKeysLookup(Etsi014Client(cfg.kme, files), cfg.peer_sae))
        self.reader_keys = ReaderKeys(lookup, self.vault, patience_s=rcfg.key_patience_s)
        self.journal = ReaderJournal(cfg.state / "reader.sqlite", rcfg.out)
        self.reader = LedgerReader(ledger=ledger, keys=self.reader_keys, journal=self.journal,
                                   writers=rcfg.writers, chain_id=self.chain_id,
                                   contract=self._reader_contract,
                                   start_block=self._reader_start, poll_s=rcfg.poll_s)
        self.reader.start()

    def _reader_contract(self) -> str | None:
        if self.cfg.ledger.contract is not None:
            self.contract = self.cfg.ledger.contract
        else:
            deployment = self._deployment()
            self.contract = None if deployment is None else deployment.address
        return self.contract

    def _reader_start(self) -> int:
        assert self.cfg.reader is not None
        if self.cfg.ledger.contract is not None:
            return self.cfg.reader.start_block
        deployment = self._deployment()
        return 0 if deployment is None else deployment.block

    def close(self) -> None:
        """Stop taking readings first, then anchoring, then keys; close the stores last."""
        if self.state is GatewayState.STOPPED:
            return
        self.state = GatewayState.STOPPING
        for stop in (self.intake.stop if self.intake else None,
                     self.writer.stop if self.writer else None,
                     self.keys.stop if self.keys else None,
                     self.reader.stop if self.reader else None,
                     self.reader_keys.close if self.reader_keys else None,
                     self._stop_metrics):
            if stop is not None:
                try:
                    stop()
                except Exception:  # closing must reach the stores whatever failed before
                    log.exception("while stopping the ledger gateway")
        self._stop_metrics = lambda: None
        try:
            # The counters as they ended, for the last status line: the stores close now.
            self._final = self.stats()
        except Exception:  # a gateway that failed half way through open has nothing to say
            self._final = None
        for store in (self.outbox, self.journal, self.vault, self.ledger):
            if store is not None:
                store.close()
        self.intake = self.writer = self.keys = self.reader = self.reader_keys = None
        self.outbox = self.journal = self.vault = self.ledger = None
        self.state = GatewayState.STOPPED

    # -- status ----------------------------------------------------------------------

    def overall_state(self) -> GatewayState:
        if self.state is not GatewayState.RUNNING:
            return self.state
        if self.keys is not None and self.keys.failing is not None and not self.keys.ready():
            return GatewayState.FAILED_CLOSED       # readings are refused: no key
        if self.writer is not None and self.writer.stats().ledger_error is not None:
            return GatewayState.DEGRADED            # readings are kept, not anchored yet
        if self.reader is not None and self.reader.stats().waiting is not None:
            return GatewayState.DEGRADED
        return GatewayState.RUNNING

    def stats(self) -> dict[str, Any]:
        if self.state is GatewayState.STOPPED and self._final is not None:
            return self._final | {"state": GatewayState.STOPPED.value}
        cfg = self.cfg
        out: dict[str, Any] = {
            "role": cfg.role, "sae": cfg.sae, "peer_sae": cfg.peer_sae,
            "state": self.overall_state().value, "key_api": cfg.key_api,
            "ledger": {"url": cfg.ledger.url, "chain_id": self.chain_id,
                       "contract": self.contract, "account": self.account_address},
        }
        if self.writer is not None and self.keys is not None and self.intake is not None:
            w, k, i = self.writer.stats(), self.keys.stats(), self.intake.stats()
            refused = dict(i.refused)
            out["writer"] = {
                "received": i.received, "refused": refused, "failed": i.failed,
                "sealed": w.sealed, "batches_anchored": w.batches_anchored,
                "records_anchored": w.records_anchored,
                "confirmed_from_chain": w.confirmed_from_chain, "queued": w.queued,
                "pending_batches": w.pending_batches, "anchored_total": w.anchored_total,
                "anchor_p50_ms": w.anchor_p50_ms, "ledger_error": w.ledger_error,
                "rest_port": self.intake.rest_port,
                "mqtt_subscribed": (self.intake.wait_subscribed(0)
                                    if self.intake.mqtt is not None else None),
            }
            out["keys"] = {"fetched": k.fetched, "used": k.used, "ready": k.ready,
                           "records_per_key": round(k.records_per_key, 2),
                           "key_wait_p50_ms": k.key_wait_p50_ms,
                           "key_wait_p99_ms": k.key_wait_p99_ms,
                           "fetch_p50_ms": k.fetch_p50_ms, "failing": k.failing,
                           "stream": k.stream}
        if self.reader is not None:
            r = self.reader.stats()
            out["reader"] = {"batches": r.batches, "delivered": r.delivered,
                             "rejected": r.rejected, "cursor": r.cursor, "waiting": r.waiting,
                             "keys_fetched": r.keys_fetched,
                             "key_fetch_p50_ms": r.key_fetch_p50_ms}
        return out


class _LedgerCollector(Collector):
    """Counts and levels only: no key, key ID or reading value becomes a label or value."""

    def __init__(self, gw: LedgerGateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        stats = self.gw.stats()
        if "writer" in stats:
            w, k = stats["writer"], stats["keys"]
            yield _counter("qgw_ledger_readings_received", "Readings received (MQTT and REST)",
                           w["received"])
            refused = CounterMetricFamily("qgw_ledger_readings_refused",
                                          "Readings refused, by reason", labels=["reason"])
            for reason, n in sorted(w["refused"].items()):
                refused.add_metric([reason], n)
            yield refused
            yield _counter("qgw_ledger_records_sealed", "Readings sealed into the outbox",
                           w["sealed"])
            yield _counter("qgw_ledger_records_anchored", "Records anchored on the ledger",
                           w["records_anchored"])
            yield _counter("qgw_ledger_batches_anchored", "Batches anchored on the ledger",
                           w["batches_anchored"])
            if w["mqtt_subscribed"] is not None:
                yield _gauge("qgw_ledger_mqtt_subscribed",
                             "1 while subscribed to the readings topic", w["mqtt_subscribed"])
            yield _gauge("qgw_ledger_records_queued", "Records in the outbox, not batched yet",
                         w["queued"])
            yield _gauge("qgw_ledger_batches_pending", "Batches taken, not confirmed anchored",
                         w["pending_batches"])
            yield _counter("qgw_ledger_keys_fetched", "QKD keys fetched (and kept in the vault)",
                           k["fetched"])
            yield _counter("qgw_ledger_keys_used", "QKD keys that sealed records", k["used"])
            yield _gauge("qgw_ledger_key_supply_ok", "1 while readings find a key",
                         0.0 if k["failing"] and not k["ready"] else 1.0)
            wait = GaugeMetricFamily("qgw_ledger_key_wait_ms",
                                     "Time sealing waited for a ready QKD key",
                                     labels=["quantile"])
            for q, name in (("0.5", "key_wait_p50_ms"), ("0.99", "key_wait_p99_ms")):
                if k[name] is not None:
                    wait.add_metric([q], k[name])
            yield wait
        if "reader" in stats:
            r = stats["reader"]
            yield _counter("qgw_ledger_batches_read", "Anchored batches handled", r["batches"])
            yield _counter("qgw_ledger_readings_delivered", "Readings decrypted and written out",
                           r["delivered"])
            rejected = CounterMetricFamily("qgw_ledger_rejected",
                                           "Batches and records rejected, by reason",
                                           labels=["reason"])
            for reason, n in sorted(r["rejected"].items()):
                rejected.add_metric([reason], n)
            yield rejected
            yield _gauge("qgw_ledger_reader_cursor_block", "Last block read completely",
                         r["cursor"] if r["cursor"] is not None else -1)
            yield _counter("qgw_ledger_keys_fetched", "QKD keys fetched by ID from the KME",
                           r["keys_fetched"])
        yield _gauge("qgw_ledger_up", "1 while the gateway runs normally",
                     1.0 if stats["state"] == GatewayState.RUNNING.value else 0.0)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g
