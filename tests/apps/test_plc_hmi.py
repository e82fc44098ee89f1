"""apps.substation, apps.plc and apps.hmi on 127.0.0.1: values, breakers, 100 polls/s,
duplicates, failures, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pymodbus.client import AsyncModbusTcpClient

from apps import hmi, plc, substation
from apps.hmi import HmiOptions, Poller, PollStats, run_hmi
from apps.plc import Plc
from apps.substation import Measurements, Substation
from tests.harness import Loop, free_port

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, 20)
    return asyncio.run(main())


async def started_plc(port: int | None = None, **kw: Any) -> Plc:
    station = Plc(host="127.0.0.1", port=port or free_port(), seed=7, **kw)
    await station.start()
    return station


def assert_plausible(m: Measurements) -> None:
    assert all(200.0 < v < 260.0 for v in m.voltages), m
    assert all(0.0 <= i < 350.0 for i in m.currents), m
    assert 49.8 < m.frequency < 50.2, m
    assert 0.0 <= m.power_kw < 500.0, m
    assert 20.0 < m.trafo_temp < 100.0, m


# ---- register map and model (no network) --------------------------------------------------

def test_docstring_register_map_is_the_code_map() -> None:
    rows = re.findall(r"^\| ([a-z ]+?) +\| (\d+) +\| (\w+) +\| (\d+) +\| (\w+) +\| (R/W|R) ",
                      substation.__doc__ or "", re.MULTILINE)
    documented = [(t, int(a), n, int(s), u, acc == "R/W") for t, a, n, s, u, acc in rows]
    points = substation.REGISTER_MAP
    in_code = [(p.table, p.address, p.name, p.scale, p.unit, p.writable) for p in points]
    assert documented == in_code
    assert len({(p.table, p.address) for p in points}) == len(points)


def test_measurements_round_trip_and_clamp() -> None:
    m = Measurements((230.1, 229.9, 230.4), (180.5, 0.0, 90.2), 50.01, 250.3, 41.2, 65535)
    regs = m.to_registers()
    assert regs == [2301, 2299, 2304, 1805, 0, 902, 5001, 2503, 412, 65535]
    assert Measurements.from_registers(regs) == m
    wild = Measurements((-5.0, 1e9, 0.0), (0.0, 0.0, 0.0), 0.0, 0.0, 0.0, 65536 + 3)
    assert wild.to_registers()[:3] == [0, 65535, 0] and wild.to_registers()[9] == 3
    with pytest.raises(ValueError, match="need 10"):
        Measurements.from_registers([0] * 9)


def test_model_drifts_within_bounds_and_breakers_follow() -> None:
    t = 1000.0
    model = Substation(t, seed=3)
    seen = set()
    for _ in range(3000):  # 5 minutes of 100 ms ticks, no sleeping
        t += 0.1
        model.step(t)
        assert_plausible(model.measurements)
        seen.add(model.measurements.currents[0])
    assert len(seen) > 1000  # it moves
    model.command_breaker(1, False, t)
    model.step(t + 0.01)  # within the 50 ms operating time: not yet open
    assert model.position[1] and model.measurements.currents[1] > 0
    model.step(t + 0.1)
    assert not model.position[1] and model.measurements.currents[1] == 0.0
    assert model.discrete_inputs()[:3] == [True, False, True]
    assert not model.write_holding(substation.HR_V_SETPOINT, 2600)
    assert model.write_holding(substation.HR_I_LIMIT, 100)
    model.step(t + 0.2)
    assert model.discrete_inputs()[substation.DI_OVERCURRENT]  # feeder 1 carries > 10 A


# ---- HMI against an in-process PLC --------------------------------------------------------

def test_hmi_sees_values_changing_within_bounds() -> None:
    async def scenario() -> None:
        station = await started_plc()
        poller = Poller("127.0.0.1", station.port, timeout=2)
        try:
            await poller.connect()
            snapshots = []
            for _ in range(8):
                latency = await poller.poll_once()
                assert 0 < latency < 1
                assert poller.last is not None
                snapshots.append(poller.last)
                await asyncio.sleep(0.12)
        finally:
            poller.close()
            await station.stop()
        for s in snapshots:
            assert_plausible(s.measurements)
            assert s.breakers == s.positions == (True, True, True)
        beats = [s.measurements.heartbeat for s in snapshots]
        assert beats == sorted(beats) and beats[-1] - beats[0] >= 5
        assert len({s.measurements.currents for s in snapshots}) > 4
        assert poller.stats.ok == poller.stats.sent == 8
        assert station.counters().requests == 8 * hmi.POLL_REQUESTS
    run(scenario())


def test_operating_a_breaker_moves_coil_feedback_and_current() -> None:
    async def scenario() -> None:
        station = await started_plc()
        poller = Poller("127.0.0.1", station.port)
        try:
            await poller.connect()
            await poller.poll_once()
            assert poller.last is not None and poller.last.measurements.currents[1] > 0
            took = await poller.operate(2, close=False)
            assert 0.04 < took < 1.0  # the feedback follows after the operating time
            await poller.poll_once()
            opened = poller.last
            assert station.model.command == [True, False, True]
            await poller.operate(2, close=True)
            await asyncio.sleep(0.25)
            await poller.poll_once()
            closed = poller.last
        finally:
            poller.close()
            await station.stop()
        assert opened.breakers == opened.positions == (True, False, True)
        assert opened.measurements.currents[1] == 0.0
        assert opened.measurements.currents[0] > 0 and opened.measurements.currents[2] > 0
        assert closed is not None and closed.positions == (True, True, True)
        assert closed.measurements.currents[1] > 0
        assert poller.stats.operations_ok == 2 and station.counters().writes == 2
        with pytest.raises(ValueError, match="breaker must be"):
            await poller.operate(4, close=True)
    run(scenario())


def test_100_polls_per_second_all_ok_and_counts_agree() -> None:
    async def scenario() -> tuple[PollStats, plc.PlcCounters, list[plc.ClientConnection]]:
        station = await started_plc()
        lines: list[str] = []
        try:
            stats = await run_hmi(HmiOptions("127.0.0.1", station.port, rate=100, duration=3,
                                             quiet=True), write=lines.append)
        finally:
            await station.stop()
        assert len(lines) == 1 and lines[0].startswith("hmi: summary: polls ")
        return stats, station.counters(), station.connections
    stats, counters, connections = run(scenario())
    assert stats.sent >= 240, stats.summary_line()  # 100/s, some slack for a busy machine
    assert stats.ok == stats.sent and stats.failed == 0 and stats.all_ok
    assert stats.duplicate_responses == stats.out_of_order_responses == 0
    assert len(stats.latencies_s) == stats.ok
    p50, p99 = stats.percentile(0.5), stats.percentile(0.99)
    assert p50 is not None and p99 is not None and p50 <= p99 < 0.5
    assert counters.duplicates == 0 and counters.exceptions == 0 and counters.writes == 0
    assert counters.requests == stats.requests == hmi.POLL_REQUESTS * stats.sent
    assert len(connections) == 1 and connections[0].requests == counters.requests


def _read_input_adu(tid: int, unit: int = 1) -> bytes:
    pdu = struct.pack(">BHH", 4, 0, substation.IR_COUNT)
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def _recv_adu(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 7:
        head += sock.recv(7 - len(head))
    length = struct.unpack(">H", head[4:6])[0]
    body = b""
    while len(body) < length - 1:
        body += sock.recv(length - 1 - len(body))
    return head + body


def test_a_repeated_transaction_id_is_a_duplicate() -> None:
    loop = Loop()
    try:
        station = loop.run(started_plc())
        with socket.create_connection(("127.0.0.1", station.port), timeout=5) as sock:
            adu = _read_input_adu(0x1234)
            for _ in range(2):  # the same ADU twice on one connection
                sock.sendall(adu)
                answer = _recv_adu(sock)
                assert answer[:2] == b"\x12\x34" and answer[7] == 4  # answered, not refused
            sock.sendall(_read_input_adu(0x1235))
            assert _recv_adu(sock)[:2] == b"\x12\x35"
        with socket.create_connection(("127.0.0.1", station.port), timeout=5) as sock:
            sock.sendall(adu)  # same ID on another connection: not a duplicate
            assert _recv_adu(sock)[:2] == b"\x12\x34"
        counters = station.counters()
        assert (counters.requests, counters.duplicates, counters.connections) == (4, 1, 2)
        assert [c.duplicates for c in station.connections] == [1, 0]
        assert station.connections[0].peer.startswith("127.0.0.1:")
        with socket.create_connection(("127.0.0.1", station.port), timeout=5) as sock:
            # both copies in one TCP segment: pymodbus 3.16 answers only the first and drops
            # the second; the PLC still counts it, as a duplicate and as dropped
            sock.sendall(_read_input_adu(0x0042) * 2)
            assert _recv_adu(sock)[:2] == b"\x00\x42"
            sock.sendall(_read_input_adu(0x0043))
            assert _recv_adu(sock)[:2] == b"\x00\x43"
        third = station.connections[2]
        assert (third.requests, third.duplicates, third.dropped) == (3, 1, 1)
        loop.run(station.stop())
    finally:
        loop.close()


def test_duplicate_window_forgets_old_ids() -> None:
    conn = plc.ClientConnection(1, window=3)
    for tid in (1, 2, 3, 4, 1, 4):  # 1 has left the window of 3 IDs, 4 has not
        conn.record(tid, 4)
    conn.record(9, 5)  # write single coil
    assert (conn.requests, conn.duplicates, conn.writes) == (7, 1, 1)
    assert plc.mbap_frames(_read_input_adu(7) + _read_input_adu(8) + b"\x00\x09\x00") == \
        [(7, 4), (8, 4)]


async def _duplicating_proxy(target: int, nth: int) -> tuple[asyncio.Server, int]:
    """A TCP proxy that sends the nth response from the PLC twice (the copy 5 ms later)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       dup: bool) -> None:
            seen = 0
            with _quiet_close(dst):
                while data := await src.read(65536):
                    dst.write(data)
                    seen += 1
                    if dup and seen == nth:
                        await asyncio.sleep(0.005)
                        dst.write(data)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_w, False), pump(up_r, writer, True))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class _quiet_close:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        self.writer.close()
        return exc[0] is not None and issubclass(exc[0], ConnectionError)  # type: ignore[arg-type]


def test_hmi_detects_a_duplicated_response() -> None:
    async def scenario() -> PollStats:
        station = await started_plc()
        proxy, port = await _duplicating_proxy(station.port, nth=5)
        try:
            stats = await run_hmi(HmiOptions("127.0.0.1", port, rate=50, count=10, quiet=True),
                                  write=lambda _line: None)
            await asyncio.sleep(0.05)  # let the proxy see both ends close
            return stats
        finally:
            proxy.close()
            await station.stop()
    stats = run(scenario())
    assert stats.duplicate_responses == 1
    assert not stats.all_ok and stats.sent == 10


def test_plc_killed_mid_run_counts_failures_and_recovers() -> None:
    async def scenario() -> tuple[PollStats, list[str], Plc]:
        port = free_port()
        first = await started_plc(port)
        lines: list[str] = []
        task = asyncio.create_task(run_hmi(
            HmiOptions("127.0.0.1", port, rate=50, duration=2.4, timeout=0.5, reconnect=0.2),
            write=lines.append))
        await asyncio.sleep(0.7)
        await first.stop()
        await asyncio.sleep(0.6)
        second = await started_plc(port)
        try:
            stats = await task
        finally:
            await second.stop()
        return stats, lines, second
    stats, lines, second = run(scenario())
    assert stats.sent == stats.ok + stats.failed
    assert stats.failed >= 5 and stats.ok >= 40, stats.summary_line()
    assert stats.disconnects >= 1 and stats.reconnects >= 1
    assert second.counters().requests >= 3 * 20  # polling went on against the new PLC
    assert set(stats.failures) <= {"connection lost", "not connected"}, stats.failures
    assert not stats.all_ok
    text = "\n".join(lines)
    assert "lost, reconnecting" in text and "reconnected to PLC" in text
    assert lines[-1].startswith("hmi: summary: ") and "failures: not connected x" in lines[-1]


def test_setpoints_are_range_checked() -> None:
    async def scenario() -> None:
        station = await started_plc()
        client = AsyncModbusTcpClient("127.0.0.1", port=station.port, retries=0,
                                      reconnect_delay=0)
        try:
            assert await client.connect()
            bad = await client.write_register(substation.HR_V_SETPOINT, 2600, device_id=1)
            assert bad.isError() and bad.exception_code == 3
            good = await client.write_register(substation.HR_V_SETPOINT, 2400, device_id=1)
            assert not good.isError()
            regs = await client.read_holding_registers(0, count=substation.HR_COUNT, device_id=1)
            assert regs.registers == [2400, 2500]
            outside = await client.read_coils(substation.BREAKERS, count=1, device_id=1)
            assert outside.isError() and outside.exception_code == 2
        finally:
            client.close()
            await station.stop()
        assert station.model.v_setpoint == 2400
        c = station.counters()
        assert (c.requests, c.writes, c.exceptions) == (4, 2, 2)
    run(scenario())


# ---- CLI ----------------------------------------------------------------------------------

def _cli(module: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, check=False)


def test_cli_help_and_bad_usage() -> None:
    helped = _cli("apps.hmi", "--help")
    assert helped.returncode == 0
    assert "--plc HOST[:PORT]" in helped.stdout and "3 PLC unreachable" in helped.stdout
    bad = _cli("apps.hmi", "--plc", "127.0.0.1", "--rate", "0")
    assert bad.returncode == 2 and "--rate: must be > 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    for argv in (["--count", "1"], ["--plc", "h:99999"], ["--plc", "h", "--operate", "CB9=open"],
                 ["--plc", "h", "--operate", "CB1=toggle"], ["--plc", "[::1"]):
        with pytest.raises(SystemExit) as exc:
            hmi.parse_args(argv)
        assert exc.value.code == 2, argv
    opts = hmi.parse_args(["--plc", "[::1]:1502", "--operate", "cb2=open", "--operate", "3=close"])
    assert (opts.host, opts.port, opts.operate) == ("::1", 1502, ((2, False), (3, True)))
    assert hmi.parse_args(["--plc", "plc.local"]).port == 502
    with pytest.raises(SystemExit):
        plc.parse_args(["--port", "70000"])


def test_cli_unreachable_plc_exits_3() -> None:
    done = _cli("apps.hmi", "--plc", f"127.0.0.1:{free_port()}", "--count", "3")
    assert done.returncode == 3
    assert "unreachable: connection refused" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_cli_plc_and_hmi_end_to_end() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "apps.plc", "--host", "127.0.0.1",
                             "--port", str(port), "--status-every", "0.3", "--seed", "5"],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}, unit 1, seed 5" in first
        done = _cli("apps.hmi", "--plc", f"127.0.0.1:{port}", "--count", "5", "--rate", "5",
                    "--operate", "CB3=open")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count(": poll ") == 5
        assert "CB3 open: position feedback open after" in done.stdout
        assert "summary: polls 5, ok 5, failed 0, requests " in done.stdout
        busy = _cli("apps.plc", "--host", "127.0.0.1", "--port", str(port))
        assert busy.returncode == 1 and "cannot listen on 127.0.0.1:" in busy.stderr
        assert "Traceback" not in busy.stderr
        time.sleep(0.4)  # one status line after the HMI left
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(r"clients 0 \(connections 1\), requests \d+, duplicates 0, writes 1", out)
    summary = out.strip().splitlines()[-1]
    assert "stopped:" in summary and "duplicates 0, writes 1" in summary


def test_main_json_and_failed_polls_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    loop = Loop()
    try:
        station = loop.run(started_plc())
        ok = hmi.main(["--plc", f"127.0.0.1:{station.port}", "--count", "2", "--rate", "5",
                       "--json"])
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        wrong_unit = hmi.main(["--plc", f"127.0.0.1:{station.port}", "--count", "2",
                               "--rate", "50", "--unit", "9", "--quiet"])
        text = capsys.readouterr().out
        loop.run(station.stop())
    finally:
        loop.close()
    assert ok == 0
    assert [r["event"] for r in records] == ["connection", "poll", "poll", "summary"]
    assert records[1]["ok"] and len(records[1]["voltages"]) == 3
    assert records[-1]["sent"] == records[-1]["ok"] == 2
    assert wrong_unit == 1
    assert text.startswith("hmi: summary: polls 2, ok 0, failed 2")
    assert "exception response 0x04 x2" in text

