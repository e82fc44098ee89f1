"""gateways.ledger.ingest without a broker: strict reading validation, the device registry,
and the REST ingest through aiohttp's in-process test server (a request's readings go on
as one group; `no_key` and a group that cannot be stored are 503)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateways.ledger.ingest import (
    EARLIEST_TS_MS,
    MAX_AHEAD_MS,
    REST_INGEST,
    RETRY_LATER,
    DeviceRegistry,
    IngestStats,
    Refused,
    one_by_one,
    parse_reading,
    rest_app,
)
from gateways.ledger.reading import Reading
from qgw.errors import ConfigError

NOW_MS = 1_790_000_000_000
DEVICES = DeviceRegistry(["pump.7"], patterns=["plant-?-temp"], count=10)


def reading(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"device": "sensor-0001", "seq": 17, "ts_ms": NOW_MS,
                            "values": {"temperature_c": 21.5, "humidity_pct": 40,
                                       "door": "closed", "alarm": False}}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


def parse(data: bytes, **kwargs: Any) -> Reading:
    return parse_reading(data, devices=DEVICES, now_ms=NOW_MS, **kwargs)


def refusal(data: bytes, **kwargs: Any) -> Refused:
    with pytest.raises(Refused) as info:
        parse(data, **kwargs)
    return info.value


# ---- parse_reading -----------------------------------------------------------------------


def test_valid_reading_round_trips() -> None:
    got = parse(raw(reading()), topic_device="sensor-0001")
    assert got == Reading("sensor-0001", 17, NOW_MS, {"temperature_c": 21.5, "humidity_pct": 40,
                                                      "door": "closed", "alarm": False})


@pytest.mark.parametrize(("data", "reason", "says"), [
    (b"temperature=21", "malformed", "not valid JSON"),
    (b"\xff\xfe{}", "malformed", "not UTF-8"),
    (b"[1, 2]", "malformed", "JSON object, not list"),
    (b"null", "malformed", "JSON object, not null"),
    (b'{"device": "sensor-0001", "device": "sensor-0002"}', "malformed", "duplicate key"),
    (raw(reading()).replace(b"21.5", b"NaN"), "malformed", "NaN is not a number"),
    (raw(reading()).replace(b"21.5", b"-Infinity"), "malformed", "not a number"),
    (b" " * 4097, "oversized", "4097 bytes, more than 4096"),
    (raw(reading(device=...)), "bad_field", "device must be"),
    (raw(reading(device="sensor/0001")), "bad_field", "device must be"),
    (raw(reading(device="s" * 65)), "bad_field", "device must be"),
    (raw(reading(device=7)), "bad_field", "not int"),
    (raw(reading(device="sensor-0011")), "unknown_device", "sensor-0011: not a registered"),
    (raw(reading(seq=...)), "bad_field", "missing seq"),
    (raw(reading(extra=1)), "bad_field", "unexpected 'extra'"),
    (raw(reading(seq=0)), "bad_field", "seq 0 is out of range"),
    (raw(reading(seq=-3)), "bad_field", "seq -3 is out of range"),
    (raw(reading(seq=2**63)), "bad_field", "out of range"),
    (raw(reading(seq=1.0)), "bad_field", "seq must be an integer, not float"),
    (raw(reading(seq=True)), "bad_field", "seq must be an integer, not bool"),
    (raw(reading(seq="5")), "bad_field", "seq must be an integer, not str"),
    (raw(reading(ts_ms=EARLIEST_TS_MS - 1)), "bad_field", "ts_ms"),
    (raw(reading(ts_ms=NOW_MS + MAX_AHEAD_MS + 1)), "bad_field", "ts_ms"),
    (raw(reading(ts_ms=NOW_MS / 1000)), "bad_field", "ts_ms must be an integer"),
    (raw(reading(values=[1, 2])), "bad_field", "values must be an object, not list"),
    (raw(reading(values={})), "bad_field", "1 to 32 entries, not 0"),
    (raw(reading(values={f"v{i}": i for i in range(33)})), "bad_field", "not 33"),
    (raw(reading(values={"": 1})), "bad_field", "values key ''"),
    (raw(reading(values={"t c": 1})), "bad_field", "values key 't c'"),
    (raw(reading(values={"k" * 33: 1})), "bad_field", "values key"),
    (raw(reading(values={"t": None})), "bad_field", "values.t must be a number, text or "
                                                    "boolean, not null"),
    (raw(reading(values={"t": [1]})), "bad_field", "not list"),
    (raw(reading(values={"t": {"a": 1}})), "bad_field", "not dict"),
    (raw(reading(values={"t": "x" * 65})), "bad_field", "at most 64 characters"),
    (raw(reading(values={"t": "a\nb"})), "bad_field", "printable"),
    (raw(reading(values={"t": 2**53 + 1})), "bad_field", "2**53"),
    (raw(reading()).replace(b"21.5", b"1e999"), "bad_field", "values.temperature_c is not "
                                                            "finite"),
])
def test_bad_input_is_refused_with_its_reason(data: bytes, reason: str, says: str) -> None:
    exc = refusal(data)
    assert exc.reason == reason
    assert says in str(exc)


def test_refusal_names_the_device_when_known() -> None:
    exc = refusal(raw(reading(seq=0)))
    assert str(exc).startswith("sensor-0001: ")
    assert exc.device == "sensor-0001"
    assert exc.to_json() == {"reason": "bad_field", "message": str(exc)}


def test_unknown_device_learns_nothing_about_the_other_fields() -> None:
    exc = refusal(raw(reading(device="intruder", seq="junk", extra=1)))
    assert exc.reason == "unknown_device"
    assert "seq" not in str(exc)


def test_topic_must_name_the_payloads_device() -> None:
    exc = refusal(raw(reading()), topic_device="sensor-0002")
    assert exc.reason == "topic_mismatch"
    assert "sensor-0001" in str(exc) and "sensor-0002" in str(exc)


def test_oversized_checked_before_parsing_and_configurable() -> None:
    exc = refusal(b"{" * 5000, topic_device="sensor-0003")
    assert exc.reason == "oversized"
    assert str(exc).startswith("sensor-0003: ")
    assert parse(raw(reading()), max_bytes=len(raw(reading()))).seq == 17
    assert refusal(raw(reading()), max_bytes=100).reason == "oversized"


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    # py_ecc (under web3) raises the recursion limit so; the C decoder would then overflow
    # the C stack on these and kill the process instead of raising RecursionError
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(100_000, limit))
    try:
        for deep in (b"[" * 500_000 + b"]" * 500_000,
                     b'{"a":' * 200_000 + b"1" + b"}" * 200_000):
            exc = refusal(deep, max_bytes=len(deep))
            assert exc.reason == "malformed"
            assert "nested more than 8 levels" in str(exc)
    finally:
        sys.setrecursionlimit(limit)


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = '[{"x\\"}[' * 5 + '"'
    got = parse(raw(reading(values={f"k{i}": text[:60] for i in range(12)})))
    assert got.values["k0"] == text[:60]


def test_plausible_clock_uses_the_given_time() -> None:
    ahead = raw(reading(ts_ms=NOW_MS + MAX_AHEAD_MS))
    assert parse(ahead).ts_ms == NOW_MS + MAX_AHEAD_MS
    with pytest.raises(Refused):
        parse_reading(ahead, devices=DEVICES, now_ms=NOW_MS - 1)


# ---- DeviceRegistry ----------------------------------------------------------------------


def test_registry_names_patterns_and_count() -> None:
    assert "pump.7" in DEVICES
    assert "plant-3-temp" in DEVICES
    assert "plant-33-temp" not in DEVICES
    assert "Plant-3-temp" not in DEVICES            # patterns are case-sensitive
    assert "sensor-0001" in DEVICES and "sensor-0010" in DEVICES
    assert "sensor-0011" not in DEVICES
    assert "sensor-0000" not in DEVICES
    assert "sensor-01" not in DEVICES               # only the fleet's own spelling
    assert 7 not in DEVICES


def test_registry_count_past_9999_and_invalid_names_never_match() -> None:
    big = DeviceRegistry(count=10_000, patterns=["*"])
    assert "sensor-9999" in big and "sensor-10000" in big
    assert "a/b" not in big and "" not in big and "x" * 65 not in big
    with pytest.raises(ValueError, match="not valid device names"):
        DeviceRegistry(["ok", "not ok"])


def test_registry_from_config() -> None:
    reg = DeviceRegistry.from_config({"names": ["gw-probe"], "patterns": ["lab-*"],
                                      "count": 2})
    assert all(d in reg for d in ("gw-probe", "lab-x", "sensor-0002"))
    assert "sensor-0003" not in reg


@pytest.mark.parametrize(("config", "field", "says"), [
    ({}, None, "no device may publish"),
    ({"count": -1}, "count", "greater than or equal to 0"),
    ({"cuont": 3}, "cuont", "Extra inputs"),
    ({"names": ["bad name"]}, "names", "not valid device names"),
])
def test_registry_config_errors_name_the_field(config: dict[str, Any], field: str | None,
                                               says: str) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceRegistry.from_config(config, source="ledger.yaml")
    assert info.value.field == field
    assert says in str(info.value)
    assert str(info.value).startswith("ledger.yaml")


# ---- REST --------------------------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.refused: list[tuple[str | None, str]] = []
        self.seen: set[tuple[str, int]] = set()

    def on_reading(self, r: Reading) -> None:
        if (r.device, r.seq) in self.seen:
            raise Refused("replayed", f"seq {r.seq} already taken", r.device)
        self.seen.add((r.device, r.seq))
        self.readings.append(r)

    def on_refused(self, device: str | None, exc: Refused) -> None:
        self.refused.append((device, exc.reason))


def run_rest(collector: Collector, body: Callable[[TestClient[Any, Any]], Awaitable[None]],
             **kwargs: Any) -> web.Application:
    app = rest_app(DEVICES, collector.on_reading, on_refused=collector.on_refused,
                   clock=lambda: NOW_MS / 1000, **kwargs)

    async def main() -> None:
        async with TestClient(TestServer(app)) as client:
            await body(client)

    asyncio.run(main())
    return app


def test_rest_statuses_and_bad_input_does_not_stop_good_input() -> None:
    got = Collector()
    answers: list[tuple[int, dict[str, Any]]] = []

    async def body(client: TestClient[Any, Any]) -> None:
        for data in (raw(reading(seq=1)), b"{oops", raw(reading(seq=0)),
                     raw(reading(device="intruder")), b" " * 5000, raw(reading(seq=1)),
                     raw(reading(seq=2))):
            resp = await client.post("/v1/readings", data=data,
                                     headers={"Content-Type": "application/json"})
            answers.append((resp.status, await resp.json()))

    app = run_rest(got, body)
    assert [s for s, _ in answers] == [202, 400, 400, 403, 413, 409, 202]
    assert answers[0][1] == {"accepted": 1, "refused": [], "failed": []}
    assert answers[1][1]["reason"] == "malformed"
    assert answers[2][1] == {"reason": "bad_field",
                             "message": f"sensor-0001: seq 0 is out of range [1, {2**63 - 1}]"}
    assert answers[3][1]["reason"] == "unknown_device"
    assert answers[4][1]["reason"] == "oversized"
    assert answers[5][1]["reason"] == "replayed"
    assert [r.seq for r in got.readings] == [1, 2]
    assert got.refused == [(None, "malformed"), ("sensor-0001", "bad_field"),
                           ("intruder", "unknown_device"), (None, "oversized"),
                           ("sensor-0001", "replayed")]
    stats = app[REST_INGEST].stats()
    assert (stats.received, stats.accepted, stats.refused_total) == (7, 2, 5)
    assert stats.refused["replayed"] == 1


def test_rest_batch_takes_the_good_readings_and_lists_the_refused() -> None:
    got = Collector()
    answers: list[tuple[int, dict[str, Any]]] = []
    batch = [reading(seq=1), reading(seq=2, values="hot"), reading(device="sensor-0002", seq=1),
             reading(device="ghost"), "not a reading"]

    async def body(client: TestClient[Any, Any]) -> None:
        for data in (raw(batch), raw([reading(device="ghost")]), raw([]),
                     raw([reading(seq=n) for n in range(10, 14)])):
            resp = await client.post("/v1/readings", data=data)
            answers.append((resp.status, await resp.json()))

    run_rest(got, body, max_batch=3)
    statuses = [s for s, _ in answers]
    # a batch over max_batch is refused whole (413); so is one with nothing good in it
    assert statuses == [413, 403, 400, 413]
    got2 = Collector()
    answers.clear()

    async def body2(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/v1/readings", data=raw(batch))
        answers.append((resp.status, await resp.json()))

    run_rest(got2, body2)
    status, answer = answers[0]
    assert status == 202
    assert answer["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in answer["refused"]] == [
        (1, "bad_field"), (3, "unknown_device"), (4, "malformed")]
    assert [(r.device, r.seq) for r in got2.readings] == [("sensor-0001", 1), ("sensor-0002", 1)]


def test_rest_body_limit_and_health() -> None:
    got = Collector()
    answers: list[tuple[int, Any]] = []

    async def body(client: TestClient[Any, Any]) -> None:
        big = b"[" + b",".join([raw(reading())] * 40) + b"]"  # > 2 readings' worth of bytes
        resp = await client.post("/v1/readings", data=big)
        answers.append((resp.status, await resp.json()))
        resp = await client.get("/v1/health")
        answers.append((resp.status, await resp.json()))

    run_rest(got, body, max_batch=2, max_bytes=1024)
    assert answers[0][0] == 413 and answers[0][1]["reason"] == "oversized"
    assert answers[1][0] == 200
    assert answers[1][1]["status"] == "ok" and answers[1][1]["refused"]["oversized"] == 1


def test_rest_on_reading_bug_is_counted_and_does_not_stop_the_server() -> None:
    calls: list[int] = []

    def on_reading(r: Reading) -> None:
        calls.append(r.seq)
        if r.seq == 1:
            raise RuntimeError("ledger down")

    statuses: list[int] = []
    app = rest_app(DEVICES, on_reading, clock=lambda: NOW_MS / 1000)

    async def main() -> None:
        async with TestClient(TestServer(app)) as client:
            for seq in (1, 2):
                resp = await client.post("/v1/readings", data=raw(reading(seq=seq)))
                statuses.append(resp.status)

    asyncio.run(main())
    assert calls == [1, 2]
    assert statuses == [503, 202]
    assert app[REST_INGEST].stats().failed == 1


# ---- REST: a request is one group ----------------------------------------------------------


class GroupStore:
    """An on_readings that records its groups and answers what it is told to."""

    def __init__(self, answer: Callable[[Reading], Refused | None] = lambda r: None,
                 fail: bool = False) -> None:
        self.groups: list[list[tuple[str, int]]] = []
        self.answer = answer
        self.fail = fail

    def __call__(self, readings: list[Reading]) -> list[Refused | None]:
        self.groups.append([(r.device, r.seq) for r in readings])
        if self.fail:
            raise OSError("disk full")
        return [self.answer(r) for r in readings]


def post_all(store: GroupStore, bodies: list[bytes]) -> tuple[list[tuple[int, Any]], Any]:
    answers: list[tuple[int, Any]] = []
    app = rest_app(DEVICES, on_readings=store, clock=lambda: NOW_MS / 1000)

    async def main() -> None:
        async with TestClient(TestServer(app)) as client:
            for data in bodies:
                resp = await client.post("/v1/readings", data=data)
                answers.append((resp.status, await resp.json()))

    asyncio.run(main())
    return answers, app[REST_INGEST].stats()


def test_rest_request_goes_to_on_readings_as_one_group() -> None:
    store = GroupStore()
    batch = [reading(seq=1), reading(device="ghost"), reading(seq=2), reading(seq=0),
             reading(device="sensor-0002", seq=1)]
    answers, stats = post_all(store, [raw(batch), raw(reading(seq=3))])
    assert store.groups == [[("sensor-0001", 1), ("sensor-0001", 2), ("sensor-0002", 1)],
                            [("sensor-0001", 3)]]
    assert answers[0] == (202, {"accepted": 3, "failed": [], "refused": [
        {"index": 1, "reason": "unknown_device", "message": "ghost: not a registered device"},
        {"index": 3, "reason": "bad_field",
         "message": f"sensor-0001: seq 0 is out of range [1, {2**63 - 1}]"}]})
    assert answers[1][0] == 202
    assert (stats.received, stats.accepted, stats.groups, stats.refused_total) == (6, 4, 2, 2)


def test_rest_no_key_is_503_send_again() -> None:
    def no_key_for_odd(r: Reading) -> Refused | None:
        return Refused("no_key", "not taken (no QKD key ready); send it again later",
                       r.device) if r.seq % 2 else None

    store = GroupStore(no_key_for_odd)
    answers, stats = post_all(store, [
        raw(reading(seq=1)),                                     # alone: 503
        raw([reading(seq=3), reading(seq=5), reading(seq=0)]),   # none taken: 503, not 400
        raw([reading(seq=7), reading(seq=8)])])                  # one taken: 202
    assert answers[0] == (503, {"reason": "no_key", "message": "sensor-0001: not taken (no QKD "
                                                               "key ready); send it again later"})
    status, body = answers[1]
    assert status == 503 and body["reason"] == "no_key" and body["accepted"] == 0
    assert [(r["index"], r["reason"]) for r in body["refused"]] == [
        (0, "no_key"), (1, "no_key"), (2, "bad_field")]
    status, body = answers[2]
    assert status == 202 and body["accepted"] == 1
    assert [(r["index"], r["reason"]) for r in body["refused"]] == [(0, "no_key")]
    assert stats.refused["no_key"] == 4 and stats.accepted == 1


def test_rest_group_not_stored_is_503_with_every_valid_reading_failed() -> None:
    store = GroupStore(fail=True)
    answers, stats = post_all(store, [raw([reading(seq=1), reading(seq=0), reading(seq=2)]),
                                      raw(reading(seq=3))])
    status, body = answers[0]
    assert status == 503 and body["message"] == RETRY_LATER
    assert body["failed"] == [0, 2] and body["accepted"] == 0
    assert [(r["index"], r["reason"]) for r in body["refused"]] == [(1, "bad_field")]
    assert answers[1] == (503, {"message": RETRY_LATER})
    assert (stats.failed, stats.accepted, stats.groups) == (3, 0, 2)


def test_one_by_one_turns_a_reading_callback_into_a_group_callback() -> None:
    seen: list[int] = []

    def on_reading(r: Reading) -> None:
        if r.seq == 2:
            raise Refused("replayed", "seen", r.device)
        if r.seq == 4:
            raise OSError("disk full")
        seen.append(r.seq)

    group = one_by_one(on_reading)
    readings = [Reading("sensor-0001", seq, NOW_MS, {"t": 1}) for seq in (1, 2, 3)]
    outcomes = group(readings)
    assert [None if o is None else o.reason for o in outcomes] == [None, "replayed", None]
    with pytest.raises(OSError, match="disk full"):
        group([Reading("sensor-0001", 4, NOW_MS, {"t": 1})])
    assert seen == [1, 3]


def test_stats_of_two_inputs_add_up() -> None:
    a = IngestStats(3, 2, {"replayed": 1, "no_key": 0}, 0, 1, 1, 1)
    b = IngestStats(5, 4, {"replayed": 0, "no_key": 1}, 1, 0, 0, 2)
    assert a + b == IngestStats(8, 6, {"replayed": 1, "no_key": 1}, 1, 1, 1, 3)
    assert (a + b).refused_total == 2
