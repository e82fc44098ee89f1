"""Writer and reader gateways in one process, on the embedded chain (eth-tester).

The KMEs are real (KME_A and KME_B over mutual TLS, ETSI 004 streams: the writer SAE_1
is the source, the reader SAE_2 the destination); the readings come in over the real
REST ingest; the ledger is py-evm. Attacks are made with the writer's own tools (its
vault's keys, its account) or an intruder's, on the same chain.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import generate_latest

from gateways.base import GatewayState
from gateways.ledger.batch import batch_root, encode_batch
from gateways.ledger.chain import Ledger
from gateways.ledger.config import LedgerConfig
from gateways.ledger.gateway import LedgerGateway
from gateways.ledger.ingest import DEFAULT_PREFIX
from gateways.ledger.reader import Rejected
from gateways.ledger.reading import Reading
from gateways.ledger.records import SealedRecord, open_record, seal
from gateways.ledger.signing import sign_root
from gateways.ledger.state import load_or_create_account
from qgw.config import validate
from qgw.pki import Pki
from tests.gateways.ledger.broker import Mosquitto
from tests.harness import KmePair

RECORDS_PER_KEY = 25
UNIQUE_TEXT = "door-open-7f3a9c"     # a value to look for in what the ledger holds


def wait_for(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.05)


def readings(devices: int, per_device: int, *, first_seq: int = 1) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    return [{"device": f"sensor-{d:04d}", "seq": s, "ts_ms": now + s,
             "values": {"temperature_c": round(20 + d / 10 + s / 100, 2), "count": d * s,
                        "door": UNIQUE_TEXT if s % 2 else "closed", "alarm": s % 3 == 0}}
            for s in range(first_seq, first_seq + per_device) for d in range(1, devices + 1)]


def out_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Pair:
    tmp: Path
    chain: str
    pki: Pki
    kmes: KmePair
    writer_cfg: LedgerConfig
    reader_cfg: LedgerConfig
    writer: LedgerGateway
    reader: LedgerGateway
    account: LocalAccount

    @property
    def url(self) -> str:
        port = self.writer.stats()["writer"]["rest_port"]
        return f"http://127.0.0.1:{port}/v1/readings"

    def post(self, body: Any) -> tuple[int, dict[str, Any]]:
        resp = requests.post(self.url, json=body, timeout=10)
        return resp.status_code, resp.json()

    @property
    def out(self) -> Path:
        assert self.reader_cfg.reader is not None
        return self.reader_cfg.reader.out

    def delivered(self) -> int:
        return int(self.reader.stats()["reader"]["delivered"])

    def rejected(self) -> dict[str, int]:
        return {k: v for k, v in self.reader.stats()["reader"]["rejected"].items() if v}

    def ledger(self) -> Ledger:
        ledger = Ledger.connect(self.chain)
        assert self.writer.contract is not None
        ledger.use(self.writer.contract)
        return ledger


def writer_config(tmp: Path, pki: Pki, kmes: KmePair, chain: str, *, key_api: str = "004",
                  mqtt: Mosquitto | None = None, **keys: Any) -> LedgerConfig:
    intake: dict[str, Any] = {"rest": {"host": "127.0.0.1", "port": 0}}
    if mqtt is not None:
        intake["mqtt"] = {"host": mqtt.host, "port": mqtt.port, "client_id": "embedded-writer"}
    return validate("writer.yaml", {
        "role": "writer", "sae": "SAE_1", "pki": str(pki.root), "kme": kmes.url("KME_A"),
        "peer_sae": "SAE_2", "key_api": key_api, "state": str(tmp / "writer"),
        "ledger": {"url": chain},
        "writer": {**intake, "devices": {"count": 20},
                   "batch": {"max_records": 100, "interval_s": 0.2},
                   "keys": {"records_per_key": RECORDS_PER_KEY, **keys}}}, LedgerConfig)


def reader_config(tmp: Path, pki: Pki, kmes: KmePair, chain: str, writer: str, *,
                  key_api: str = "004", sae: str = "SAE_2",
                  name: str = "reader") -> LedgerConfig:
    return validate(f"{name}.yaml", {
        "role": "reader", "sae": sae, "pki": str(pki.root), "kme": kmes.url("KME_B"),
        "peer_sae": "SAE_1", "key_api": key_api, "state": str(tmp / name),
        "ledger": {"url": chain, "contract_file": str(tmp / "writer" / "contract.json")},
        "reader": {"writers": [writer], "out": str(tmp / name / "readings.jsonl"),
                   "poll_s": 0.1}}, LedgerConfig)


@pytest.fixture
def make_pair(tmp_path: Path, pki: Pki, kmes: KmePair) -> Iterator[Callable[..., Pair]]:
    opened: list[LedgerGateway] = []

    def make(*, key_api: str = "004", mqtt: Mosquitto | None = None, **keys: Any) -> Pair:
        chain = f"eth-tester:{uuid.uuid4()}"    # a chain of this test's own
        account = load_or_create_account(tmp_path / "writer" / "account.key")
        wcfg = writer_config(tmp_path, pki, kmes, chain, key_api=key_api, mqtt=mqtt, **keys)
        rcfg = reader_config(tmp_path, pki, kmes, chain, account.address, key_api=key_api)
        writer = LedgerGateway(wcfg)
        opened.append(writer)
        writer.open()
        reader = LedgerGateway(rcfg)
        opened.append(reader)
        reader.open()
        return Pair(tmp_path, chain, pki, kmes, wcfg, rcfg, writer, reader, account)

    yield make
    for gw in reversed(opened):
        gw.close()


@pytest.fixture
def pair(make_pair: Callable[..., Pair]) -> Pair:
    return make_pair()


def by_name(lines: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for line in lines:
        name = (line["device"], line["seq"])
        assert name not in found, f"{name} delivered twice"
        found[name] = line
    return found


# -- the honest path ------------------------------------------------------------------

@pytest.mark.parametrize("key_api", ["004", "014"])
def test_rest_readings_arrive_decrypted_with_the_same_values(
        make_pair: Callable[..., Pair], key_api: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pair = make_pair(key_api=key_api)
    sent = readings(devices=10, per_device=6)
    status, answer = pair.post(sent)
    assert (status, answer) == (202, {"accepted": 60, "refused": [], "failed": []})
    single = readings(devices=1, per_device=1, first_seq=7)
    status, answer = pair.post(single[0])
    assert status == 202 and answer["accepted"] == 1
    sent += single
    wait_for(lambda: pair.delivered() == 61, what="61 readings at the reader")

    got = by_name(out_lines(pair.out))
    assert set(got) == {(r["device"], r["seq"]) for r in sent}
    for r in sent:
        line = got[(r["device"], r["seq"])]
        assert (line["ts_ms"], line["values"]) == (r["ts_ms"], r["values"])
        assert line["writer"] == pair.account.address
    assert pair.rejected() == {}

    w = pair.writer.stats()
    assert w["writer"]["sealed"] == 61 and w["writer"]["records_anchored"] == 61
    assert w["keys"]["used"] == math.ceil(61 / RECORDS_PER_KEY)
    assert w["keys"]["key_wait_p50_ms"] < 10.0           # sealing found a key ready
    key_ids = {line["key_id"] for line in got.values()}
    assert len(key_ids) == w["keys"]["used"]
    if key_api == "004":        # chunks of one stream: "<Key_stream_ID>:<index>"
        assert all(k.startswith(w["keys"]["stream"] + ":") for k in key_ids)
    else:                       # ETSI 014 key IDs are UUIDs
        assert all(str(uuid.UUID(k)) == k for k in key_ids)

    # What the ledger holds: every record once, under distinct roots, and no value in clear.
    ledger = pair.ledger()
    try:
        anchored = ledger.batches(0)
    finally:
        ledger.close()
    assert sum(b.count for b in anchored) == 61
    assert len({b.root for b in anchored}) == len(anchored) == w["writer"]["batches_anchored"]
    assert not any(UNIQUE_TEXT.encode() in b.batch for b in anchored)
    assert not any(b'"temperature_c"' in b.batch for b in anchored)

    # The writer keeps its keys too: it can re-open what it wrote.
    assert pair.writer.outbox is not None and pair.writer.vault is not None
    record = pair.writer.outbox.record("sensor-0003", 4)
    assert record is not None
    key = pair.writer.vault.get(record.key_id)
    assert key is not None
    assert open_record(record, key).values == got[("sensor-0003", 4)]["values"]

    # A reading sent again is refused as a replay, and counted.
    status, answer = pair.post(sent[0])
    assert status == 409 and answer["reason"] == "replayed"
    assert pair.writer.stats()["writer"]["refused"]["replayed"] == 1

    # No key is in a log line, the status, the metrics or the output; key IDs are not
    # metrics either.
    shown = "\n".join((caplog.text, json.dumps(pair.writer.stats()),
                       json.dumps(pair.reader.stats()), pair.out.read_text()))
    metrics = b"".join(generate_latest(gw.registry) for gw in (pair.writer, pair.reader))
    assert b"qgw_ledger_records_anchored_total 61.0" in metrics
    for key_id in key_ids:
        kept = pair.writer.vault.get(key_id)
        assert kept is not None
        raw = kept.expose()
        for form in (raw.hex(), base64.b64encode(raw).decode(), repr(raw)):
            assert form not in shown and form.encode() not in metrics
        assert key_id.encode() not in metrics


def test_third_party_with_the_ledger_but_no_key_reads_nothing(pair: Pair) -> None:
    assert pair.post(readings(devices=5, per_device=2))[0] == 202
    wait_for(lambda: pair.delivered() == 10)
    # SAE_3 is an SAE of the reader's own KME, with the contract and the writer's address:
    # everything a party with ledger access can have, except the keys.
    cfg = reader_config(pair.tmp, pair.pki, pair.kmes, pair.chain, pair.account.address,
                        sae="SAE_3", name="eavesdropper")
    eavesdropper = LedgerGateway(cfg)
    eavesdropper.open()
    try:
        wait_for(lambda: eavesdropper.stats()["reader"]["batches"] >= 1
                 and eavesdropper.stats()["reader"]["cursor"] is not None
                 and eavesdropper.stats()["reader"]["rejected"]["no_key"] == 10,
                 what="the eavesdropper to give up on every record")
        stats = eavesdropper.stats()["reader"]
        assert stats["delivered"] == 0 and stats["keys_fetched"] == 0
        assert cfg.reader is not None and out_lines(cfg.reader.out) == []
    finally:
        eavesdropper.close()
    assert pair.delivered() == 10          # the real reader was not disturbed


# -- attacks --------------------------------------------------------------------------

def _reading(device: str, seq: int, **values: Any) -> Reading:
    return Reading(device, seq, int(time.time() * 1000), values or {"temperature_c": 99.5})


def _anchor(ledger: Ledger, sender: LocalAccount, records: list[SealedRecord], *,
            signer: LocalAccount, chain_id: int, root: bytes | None = None) -> None:
    root = root or batch_root(records)
    assert ledger.address is not None
    signature = sign_root(signer, root, chain_id=chain_id, contract=ledger.address)
    ledger.anchor(sender, root, len(records), encode_batch(records), signature)


def test_forgery_tampering_bad_roots_and_replays_are_each_detected_and_counted(
        pair: Pair) -> None:
    assert pair.post(readings(devices=4, per_device=2))[0] == 202
    wait_for(lambda: pair.delivered() == 8)
    honest = out_lines(pair.out)
    assert pair.writer.vault is not None and pair.writer.outbox is not None
    key_id = honest[0]["key_id"]            # a key the reader holds already
    key = pair.writer.vault.get(key_id)
    assert key is not None

    ledger = pair.ledger()
    chain_id = ledger.chain_id
    writer = pair.account
    intruder: LocalAccount = Account.create()
    try:
        ledger.fund(intruder.address, 10**18)
        ledger.set_writer(writer, intruder.address)       # the contract lets it anchor...

        def rec(device: str, seq: int) -> SealedRecord:
            return seal(_reading(device, seq), key, key_id)

        # forged: the writer's account anchors, but the root is signed by someone else
        _anchor(ledger, writer, [rec("sensor-0011", 1)], signer=intruder, chain_id=chain_id)
        # ...but the reader does not take its batches: unknown writer
        _anchor(ledger, intruder, [rec("sensor-0012", 1)], signer=intruder, chain_id=chain_id)
        # tampered: one byte of one ciphertext flipped, root and signature over the result
        good, bad = rec("sensor-0013", 1), rec("sensor-0013", 2)
        flipped = bytes([bad.ciphertext[0] ^ 1]) + bad.ciphertext[1:]
        _anchor(ledger, writer, [good, replace(bad, ciphertext=flipped)], signer=writer,
                chain_id=chain_id)
        # bad root: signed, but not the root of what the batch holds
        _anchor(ledger, writer, [rec("sensor-0014", 1)], signer=writer, chain_id=chain_id,
                root=os.urandom(32))
        # replayed: an honest record delivered before, again, next to a new one
        old = pair.writer.outbox.record(honest[0]["device"], honest[0]["seq"])
        assert old is not None
        _anchor(ledger, writer, [old, rec("sensor-0015", 1)], signer=writer,
                chain_id=chain_id)
    finally:
        ledger.close()

    expected = {"forged_signature": 1, "unknown_writer": 1, "tampered": 1, "bad_root": 1,
                "replayed": 1}
    wait_for(lambda: pair.rejected() == expected, what=f"rejections {expected}")
    got = by_name(out_lines(pair.out))
    assert len(got) == 8 + 2
    assert ("sensor-0013", 1) in got and ("sensor-0015", 1) in got
    for never in (("sensor-0011", 1), ("sensor-0012", 1), ("sensor-0013", 2),
                  ("sensor-0014", 1)):
        assert never not in got

    # A record with its inclusion proof (as the writer's outbox gives it to an auditor).
    reader = pair.reader.reader
    assert reader is not None
    device, seq = honest[1]["device"], honest[1]["seq"]
    record, proof = pair.writer.outbox.record(device, seq), pair.writer.outbox.proof(device, seq)
    assert record is not None and proof is not None
    assert reader.audit(record, proof).values == honest[1]["values"]
    wrong = replace(proof, path=(bytes([proof.path[0][0] ^ 1]) + proof.path[0][1:],
                                 *proof.path[1:]))
    with pytest.raises(Rejected) as err:
        reader.audit(record, wrong)
    assert err.value.reason == "bad_proof"
    with pytest.raises(Rejected) as err:
        reader.audit(record, replace(proof, batch_root=os.urandom(32)))
    assert err.value.reason == "bad_root"
    assert pair.rejected() == expected | {"bad_proof": 1, "bad_root": 2}

    # None of it stopped the reader.
    assert pair.post(readings(devices=1, per_device=1, first_seq=50))[0] == 202
    wait_for(lambda: pair.delivered() == 11)
    assert pair.reader.stats()["state"] == GatewayState.RUNNING.value


# -- key supply failing ---------------------------------------------------------------

class Refusals:
    """What the writer publishes on the refusal topics (QoS 0), as a sensor sees it."""

    def __init__(self, broker: Mosquitto) -> None:
        self.seen: list[dict[str, Any]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="refusal-watch",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{DEFAULT_PREFIX}/+/refused")
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda c, u, m: self.seen.append(
            {"topic": m.topic, **json.loads(m.payload)})
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(5)

    def publish(self, reading: dict[str, Any]) -> None:
        topic = f"{DEFAULT_PREFIX}/{reading['device']}/reading"
        self.client.publish(topic, json.dumps(reading), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_without_a_key_readings_are_refused_then_taken_when_keys_return(
        make_pair: Callable[..., Pair], tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "mqtt") as broker:
        pair = make_pair(mqtt=broker, records_per_key=2, prefetch=1, wait_s=0.3,
                         retry_s=0.1, retry_max_s=0.2)
        watch = Refusals(broker)
        try:
            _refused_then_taken(pair, watch)
        finally:
            watch.close()
            pair.writer.close()         # while its broker is still there


def _refused_then_taken(pair: Pair, watch: Refusals) -> None:
    assert pair.writer.intake is not None and pair.writer.intake.wait_subscribed(10)
    wait_for(lambda: pair.writer.stats()["keys"]["ready"] == 1)
    assert pair.post(readings(devices=1, per_device=1)[0])[0] == 202
    first_stream = pair.writer.stats()["keys"]["stream"]

    pair.kmes.stop("KME_A")
    refused: dict[str, Any] | None = None
    taken = 1
    for reading in readings(devices=1, per_device=10, first_seq=2):
        status, answer = pair.post(reading)
        if status == 503:
            refused = reading
            assert answer["reason"] == "no_key" and "send it again" in answer["message"]
            break
        assert status == 202
        taken += 1
    assert refused is not None, "readings were still sealed with the KME down"
    assert taken <= 1 + 2 * 2            # the current key and the one fetched ahead, no more
    stats = pair.writer.stats()
    assert stats["writer"]["refused"]["no_key"] == 1 and stats["writer"]["sealed"] == taken
    wait_for(lambda: pair.writer.stats()["state"] == GatewayState.FAILED_CLOSED.value)
    assert "KME" in pair.writer.stats()["keys"]["failing"]
    # over MQTT: the same refusal, on the device's refusal topic
    by_mqtt = readings(devices=2, per_device=1, first_seq=40)[1]
    watch.publish(by_mqtt)
    wait_for(lambda: watch.seen, what="an MQTT refusal")
    assert watch.seen[0]["topic"] == f"{DEFAULT_PREFIX}/sensor-0002/refused"
    assert watch.seen[0]["reason"] == "no_key"
    assert pair.writer.stats()["writer"]["refused"]["no_key"] == 2
    assert pair.writer.stats()["writer"]["sealed"] == taken

    pair.kmes.start("KME_A")
    wait_for(lambda: pair.writer.stats()["keys"]["failing"] is None, what="keys again")
    assert pair.post(refused)[0] == 202
    watch.publish(by_mqtt)
    wait_for(lambda: pair.writer.stats()["writer"]["sealed"] == taken + 2)
    assert pair.writer.stats()["keys"]["stream"] != first_stream   # a new 004 stream
    wait_for(lambda: pair.delivered() == taken + 2, what="every reading taken")
    assert {(x["device"], x["seq"]) for x in out_lines(pair.out)} == \
        {("sensor-0001", s) for s in range(1, taken + 1)} | {("sensor-0001", refused["seq"]),
                                                             ("sensor-0002", 40)}


def test_reader_waits_for_its_own_kme_and_loses_nothing(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(records_per_key=2, prefetch=2)
    assert pair.post(readings(devices=5, per_device=1))[0] == 202
    wait_for(lambda: pair.delivered() == 5)
    wait_for(lambda: pair.writer.stats()["keys"]["ready"] == 2)  # chunks made, at KME_B too
    pair.kmes.stop("KME_B")
    assert pair.post(readings(devices=3, per_device=1, first_seq=2))[0] == 202
    wait_for(lambda: pair.reader.stats()["reader"]["waiting"] is not None, what="the wait")
    stats = pair.reader.stats()
    assert "KME" in stats["reader"]["waiting"] and stats["state"] == "degraded"
    assert pair.delivered() == 5 and pair.rejected() == {}       # waiting, not giving up

    pair.kmes.start("KME_B")        # streams are in the KME's memory: the reader reopens
    wait_for(lambda: pair.delivered() == 8, what="the 3 readings after the KME came back")
    assert pair.rejected() == {} and len(by_name(out_lines(pair.out))) == 8
    assert pair.reader.stats()["reader"]["waiting"] is None


# -- a reader that stopped ------------------------------------------------------------

def test_restarted_reader_resumes_its_stream_and_cursor_without_repeats(
        make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(records_per_key=3)
    assert pair.post(readings(devices=4, per_device=1))[0] == 202
    wait_for(lambda: pair.delivered() == 4)
    cursor = pair.reader.stats()["reader"]["cursor"]
    pair.reader.close()
    # New chunks of the same ETSI 004 stream, which the stopped reader has not fetched.
    assert pair.post(readings(devices=4, per_device=2, first_seq=2))[0] == 202
    wait_for(lambda: pair.writer.stats()["writer"]["records_anchored"] == 12)

    again = LedgerGateway(pair.reader_cfg)
    pair.reader = again
    again.open()
    try:
        # Only what came after the cursor; the stream, open at KME_B since the first run,
        # is taken up again rather than opened (its Key_stream_ID is in use there).
        wait_for(lambda: again.stats()["reader"]["delivered"] == 8, what="8 new readings")
        stats = again.stats()["reader"]
        assert stats["keys_fetched"] >= 2 and stats["cursor"] > cursor
        assert pair.rejected() == {}
        assert len(by_name(out_lines(pair.out))) == 12
    finally:
        again.close()


# -- a writer that stopped half way -------------------------------------------------------

def test_restarted_writer_confirms_or_resends_pending_batches_never_twice(pair: Pair) -> None:
    assert pair.post(readings(devices=5, per_device=1))[0] == 202
    wait_for(lambda: pair.delivered() == 5)
    gw = pair.writer
    assert gw.writer is not None and gw.outbox is not None
    gw.writer.stop()                                   # anchoring stops; intake goes on
    assert pair.post(readings(devices=5, per_device=1, first_seq=2))[0] == 202
    sent_then_crashed = gw.outbox.take_batch(100)      # sent, but never marked anchored
    assert sent_then_crashed is not None
    ledger = pair.ledger()
    try:
        chain_id = ledger.chain_id
        signature = sign_root(pair.account, sent_then_crashed.root, chain_id=chain_id,
                              contract=gw.contract or "")
        ledger.anchor(pair.account, sent_then_crashed.root, sent_then_crashed.size,
                      sent_then_crashed.encoded, signature)
    finally:
        ledger.close()
    assert pair.post(readings(devices=5, per_device=1, first_seq=3))[0] == 202
    taken_then_crashed = gw.outbox.take_batch(100)     # taken, never sent
    assert taken_then_crashed is not None
    gw.close()

    again = LedgerGateway(pair.writer_cfg)
    pair.writer = again
    again.open()
    try:
        wait_for(lambda: again.stats()["writer"]["pending_batches"] == 0, what="recovery")
        stats = again.stats()["writer"]
        assert stats["confirmed_from_chain"] == 1 and stats["batches_anchored"] == 2
        wait_for(lambda: pair.delivered() == 15, what="15 readings at the reader")
        ledger = pair.ledger()
        try:
            anchored = ledger.batches(0)
        finally:
            ledger.close()
        assert len(anchored) == 3 and len({b.root for b in anchored}) == 3
        assert {b.root for b in anchored} >= {sent_then_crashed.root, taken_then_crashed.root}
        assert sum(b.count for b in anchored) == 15
        assert len(by_name(out_lines(pair.out))) == 15
        assert pair.rejected() == {}
    finally:
        again.close()
