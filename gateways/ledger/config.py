"""Configuration of the IoT-to-ledger gateway (`qgw gateway ledger --config FILE`).

Writer (takes sensor readings, seals each under a QKD-derived key, anchors batches):

    role: writer
    sae: SAE_1                       # this gateway's SAE ID (certificate in pki/sae/)
    pki: /state/pki                  # the network's PKI folder (qgw pki init)
    kme: https://kme-a:8443          # this gateway's KME
    peer_sae: SAE_2                  # the reader's SAE: the other end of the QKD keys
    key_api: "004"                   # ETSI 004 key stream (default) or "014"
    state: /state/ledger-writer      # outbox, key vault (+ master key), account key, contract.json
    ledger:
      url: http://anvil:8545         # or eth-tester: a chain inside this process (demo, tests)
      contract: null                 # null: use state/contract.json, or deploy and write it
      fund_wei: 1000000000000000000  # dev chains only: fund the account at start
    account: /state/ledger-writer/account.key   # Ethereum key, created 0600 if absent
    metrics: {host: 0.0.0.0, port: 9620}
    writer:
      mqtt: {host: mosquitto, port: 1883, prefix: qkdgw/sensors}
      rest: {host: 0.0.0.0, port: 8080}          # POST /v1/readings
      devices: {count: 10}                       # sensor-0001 .. sensor-0010
      batch: {max_records: 1000, interval_s: 1.0}
      keys: {records_per_key: 100, max_key_age_s: 60}

Reader (the partner at the other end of the QKD keys; watches the ledger, decrypts):

    role: reader
    sae: SAE_2
    pki: /state/pki
    kme: https://kme-b:8443          # its OWN KME: keys are fetched here by ID
    peer_sae: SAE_1                  # the writer's SAE
    state: /state/ledger-reader      # key vault (+ master key), reader.sqlite (cursor, seen)
    ledger:
      url: http://anvil:8545
      contract_file: /shared/contract.json   # written by the writer; or contract: 0x...
    metrics: {host: 0.0.0.0, port: 9621}
    reader:
      writers: ["0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"]   # accounts allowed to write
      out: /state/ledger-reader/readings.jsonl   # decrypted readings, one JSON per line
      poll_s: 1.0

Keys are QKD keys only (no PQC fallback): the reader must obtain the very key the
writer used from its own KME, and nothing but the KMEs carries keys between them.
Without a key the writer refuses readings (REST 503, MQTT refusal `no_key`) and
never writes anything in clear. Relative paths are resolved against the config
file's folder; any field can be set from the environment
(`QGW_LEDGER__LEDGER__URL=http://127.0.0.1:8545`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateways.config import GatewayConfig, Listen, Strict
from gateways.ledger.batch import MAX_RECORDS
from gateways.ledger.ingest import DEFAULT_PREFIX, DevicesConfig
from gateways.ledger.signing import checksum_address
from qgw.config import load_model

# EIP-7825 caps a transaction at 2**24 gas; at the calldata floor (40 gas a byte) that is
# about 400 kB of batch. 300 kB leaves room for the call's own encoding.
DEFAULT_MAX_BATCH_BYTES = 300_000


def _resolve(v: Path | None, info: ValidationInfo) -> Path | None:
    base = (info.context or {}).get("base")
    if v is None or v.is_absolute() or base is None:
        return v
    return Path(base) / v


class ChainSection(Strict):
    url: str = "eth-tester"
    contract: str | None = None       # the RecordAnchor contract's address
    contract_file: Path | None = None  # writer: where it records a deployment; reader: reads it
    fund_wei: Annotated[int, Field(gt=0)] | None = None   # eth-tester: 10 ether if unset
    timeout_s: Annotated[float, Field(gt=0)] = 10.0          # one request to the node
    receipt_timeout_s: Annotated[float, Field(gt=0)] = 60.0  # a transaction being mined
    connect_timeout_s: Annotated[float, Field(ge=0)] = 30.0  # keep trying to reach it at start

    _paths = field_validator("contract_file")(_resolve)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v == "eth-tester" or v.startswith(("eth-tester:", "http://", "https://",
                                                   "ws://", "wss://"))):
            raise ValueError("expected eth-tester, http(s)://host:port or ws(s)://host:port")
        return v

    @field_validator("contract")
    @classmethod
    def _contract(cls, v: str | None) -> str | None:
        return None if v is None else checksum_address(v)


class MqttSource(Strict):
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    prefix: str = DEFAULT_PREFIX
    client_id: str = "qkdgw-ledger-writer"   # persistent session: unique per writer

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "+#\0") or v.endswith("/"):
            raise ValueError("a topic prefix without wildcards or a trailing /")
        return v


class BatchPolicy(Strict):
    max_records: Annotated[int, Field(ge=1, le=MAX_RECORDS)] = 1000
    max_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_BATCH_BYTES
    interval_s: Annotated[float, Field(gt=0)] = 1.0     # anchor at least this often


class KeyPolicy(Strict):
    """How the writer uses QKD keys: each record gets its own HKDF-derived AES key; one QKD
    key is the root of at most `records_per_key` of them, and is retired after
    `max_key_age_s` even if not used up."""

    records_per_key: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    max_key_age_s: Annotated[float, Field(gt=0)] = 60.0
    prefetch: Annotated[int, Field(ge=1, le=64)] = 4     # keys fetched ahead of need
    wait_s: Annotated[float, Field(ge=0, le=30)] = 1.0   # a reading waits this long for a key
    retry_s: Annotated[float, Field(gt=0)] = 0.5         # first retry after a KME failure
    retry_max_s: Annotated[float, Field(gt=0)] = 10.0


class WriterSection(Strict):
    mqtt: MqttSource | None = None
    rest: Listen | None = None
    devices: DevicesConfig
    batch: BatchPolicy = BatchPolicy()
    keys: KeyPolicy = KeyPolicy()

    @model_validator(mode="after")
    def _some_input(self) -> WriterSection:
        if self.mqtt is None and self.rest is None:
            raise ValueError("a writer takes readings over mqtt, rest or both: give one")
        if not (self.devices.names or self.devices.patterns or self.devices.count):
            raise ValueError("devices lets no sensor in: give names, patterns or count")
        return self


class ReaderSection(Strict):
    writers: Annotated[list[str], Field(min_length=1)]  # accounts whose batches are accepted
    out: Path
    poll_s: Annotated[float, Field(gt=0)] = 1.0
    start_block: Annotated[int, Field(ge=0)] = 0   # with `contract`: where to start reading
    key_stream_ttl_s: Annotated[int, Field(ge=1)] = 7 * 86_400  # ETSI 004 only, see keys.py
    key_patience_s: Annotated[float, Field(gt=0)] = 300.0  # a key the KME lacks: see keys.py

    _paths = field_validator("out")(_resolve)

    @field_validator("writers")
    @classmethod
    def _writers(cls, v: list[str]) -> list[str]:
        return [checksum_address(w) for w in v]


class LedgerConfig(GatewayConfig):
    role: Literal["writer", "reader"]
    peer_sae: str
    key_api: Literal["004", "014"] = "004"
    state: Path
    ledger: ChainSection = ChainSection()
    account: Path | None = None      # writer only; default state/account.key
    writer: WriterSection | None = None
    reader: ReaderSection | None = None

    _paths = field_validator("state", "account")(_resolve)

    @model_validator(mode="after")
    def _shape(self) -> LedgerConfig:
        if self.peer_sae == self.sae:
            raise ValueError("peer_sae names this gateway's own SAE")
        if self.role == "writer":
            if self.writer is None or self.reader is not None:
                raise ValueError("a writer has a writer section (and no reader section)")
        else:
            if self.reader is None or self.writer is not None:
                raise ValueError("a reader has a reader section (and no writer section)")
            if self.account is not None:
                raise ValueError("a reader signs nothing: remove account")
            if self.ledger.contract is None and self.ledger.contract_file is None:
                raise ValueError("a reader needs ledger.contract or ledger.contract_file "
                                 "(the writer writes it at deployment)")
            if self.ledger.fund_wei is not None:
                raise ValueError("a reader sends no transactions: remove ledger.fund_wei")
        return self

    @property
    def account_file(self) -> Path:
        return self.account or self.state / "account.key"

    @property
    def contract_file(self) -> Path:
        return self.ledger.contract_file or self.state / "contract.json"


def load(path: Path) -> LedgerConfig:
    return load_model(path, LedgerConfig, env_prefix="QGW_LEDGER")
