"""`qgw` as a user meets it: help everywhere, clear errors, keys never printed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from qgw.cli import app
from qgw.ports import free_ports
from tests.harness import KmePair, free_port

runner = CliRunner()

SUBCOMMANDS = [[], ["pki"], ["pki", "init"], ["kme"], ["kme", "serve"], ["kme", "up"],
               ["kme", "prepare"], ["kme", "status"], ["kme", "link"], ["kme", "link", "down"],
               ["kme", "link", "up"], ["keys"], ["keys", "status"], ["keys", "get"],
               ["keys", "dec"], ["gateway"], ["gateway", "list"], ["gateway", "scada"],
               ["gateway", "ipsec"], ["gateway", "opot"], ["gateway", "ledger"],
               ["gateway", "webrtc"], ["demo"]]


def _commands() -> dict[str, Any]:
    """Every command of `qgw` (click commands), by its words ("" for qgw itself)."""
    found: dict[str, Any] = {}

    def walk(cmd: Any, words: list[str]) -> None:
        found[" ".join(words)] = cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*words, name])

    walk(typer.main.get_command(app), [])
    return found


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=lambda a: " ".join(a) or "qgw")
def test_help_everywhere(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 4


def test_help_list_covers_every_command() -> None:
    assert set(_commands()) == {" ".join(a) for a in SUBCOMMANDS}


@pytest.mark.parametrize("words", sorted(_commands()), ids=lambda w: w or "qgw")
def test_summaries_are_one_whole_sentence(words: str) -> None:
    """A command list shows the help's first paragraph: it must be one line, one sentence
    (a paragraph wrapped in the source shows as a sentence cut at the line break)."""
    summary = (_commands()[words].help or "").strip().split("\n\n")[0]
    assert summary and "\n" not in summary, summary
    assert summary.endswith("."), summary


def test_pki_init_and_errors(tmp_path: Path) -> None:
    target = tmp_path / "pki"
    result = runner.invoke(app, ["pki", "init", str(target), "--kme", "KME_A",
                                 "--kme", "KME_B=kme-b.example", "--sae", "SAE_1@KME_A"])
    assert result.exit_code == 0, result.output
    assert "created" in result.output and (target / "sae" / "SAE_1.key").exists()
    assert (target / "sae" / "SAE_1.key").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["pki", "init", str(target), "--sae", "SAE_2@KME_B"])
    assert again.exit_code == 0 and "kept" in again.output and "created" in again.output
    bad = runner.invoke(app, ["pki", "init", str(target), "--sae", "SAE_3@KME_Z"])
    assert bad.exit_code == 1 and "KME_Z" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["pki", "init", str(target), "--sae", "SAE_3"])
    assert bad.exit_code == 1 and "SAE_ID@KME_ID" in bad.output


def test_kme_serve_config_errors_name_file_and_field(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["kme", "serve", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "nope.yaml" in missing.output
    cfg = tmp_path / "kme.yaml"
    cfg.write_text(yaml.safe_dump({
        "kme_id": "KME_A", "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"},
        "store": "s.db", "saes": {"SAE_1": "KME_A"}, "listen": {"prot": 1}}))
    typo = runner.invoke(app, ["kme", "serve", "--config", str(cfg)])
    assert typo.exit_code == 1
    assert "kme.yaml" in typo.output and "listen.prot" in typo.output
    assert "unknown field" in typo.output
    cfg.write_text(yaml.safe_dump({
        "kme_id": "KME_A", "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"},
        "store": "s.db", "saes": {"SAE_1": "KME_A"}}))
    no_pki = runner.invoke(app, ["kme", "serve", "--config", str(cfg)])
    assert no_pki.exit_code == 1 and "qgw pki init" in no_pki.output


def test_keys_commands_against_a_kme(kmes: KmePair, tmp_path: Path) -> None:
    pki = str(kmes.pki.root)
    a, b = kmes.url("KME_A"), kmes.url("KME_B")
    st = runner.invoke(app, ["keys", "status", "SAE_2", "--kme", a, "--pki", pki,
                             "--sae", "SAE_1"])
    assert st.exit_code == 0, st.output
    assert "stored_key_count" in st.output and "KME_B" in st.output
    out = tmp_path / "keys.json"
    got = runner.invoke(app, ["keys", "get", "SAE_2", "-n", "2", "--kme", a, "--pki", pki,
                              "--sae", "SAE_1", "--out", str(out)])
    assert got.exit_code == 0, got.output
    assert out.stat().st_mode & 0o777 == 0o600
    import json
    keys = json.loads(out.read_text())["keys"]
    assert len(keys) == 2
    for k in keys:  # the terminal shows IDs, never the key
        assert k["key_ID"] in got.output and k["key"] not in got.output
    dec = runner.invoke(app, ["keys", "dec", "SAE_1", keys[0]["key_ID"], keys[1]["key_ID"],
                              "--kme", b, "--pki", pki, "--sae", "SAE_2"])
    assert dec.exit_code == 0, dec.output
    assert keys[0]["key_ID"] in dec.output and keys[0]["key"] not in dec.output
    twice = runner.invoke(app, ["keys", "dec", "SAE_1", keys[0]["key_ID"], "--kme", b,
                                "--pki", pki, "--sae", "SAE_2"])
    assert twice.exit_code == 1 and "400" in twice.output and "Traceback" not in twice.output
    exists = runner.invoke(app, ["keys", "get", "SAE_2", "--kme", a, "--pki", pki,
                                 "--sae", "SAE_1", "--out", str(out)])
    assert exists.exit_code == 1 and "not overwriting" in exists.output


def test_keys_with_kme_down_or_no_identity(pki: object, tmp_path: Path) -> None:
    from qgw.pki import Pki
    assert isinstance(pki, Pki)
    down = runner.invoke(app, ["keys", "status", "SAE_2", "--kme",
                               f"https://localhost:{free_port()}", "--pki", str(pki.root),
                               "--sae", "SAE_1"])
    assert down.exit_code == 1 and "cannot reach the KME" in down.output
    who = runner.invoke(app, ["keys", "status", "SAE_2", "--kme", "https://localhost:1",
                              "--pki", str(pki.root)])
    assert who.exit_code == 1 and "--sae" in who.output


def test_gateway_list_names_the_scada_gateway() -> None:
    result = runner.invoke(app, ["gateway", "list"])
    assert result.exit_code == 0 and "scada: QKD-keyed tunnel for Modbus/TCP" in result.output


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc; Linux)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def kme_up(state: Path, ports: list[int], *options: str,
           timeout_s: float = 30) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """`qgw kme up` (first KME on ports[0]) until every port in `ports` is open: the
    process and the PIDs of its KMEs. Whatever still runs afterwards is killed."""
    metrics = free_ports(len(ports))[0]
    proc = subprocess.Popen([sys.executable, "-m", "qgw", "kme", "up", *options, "--state",
                             str(state), "--port", str(ports[0]), "--metrics-port",
                             str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, COLUMNS="200"))
    kmes: list[int] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not all(_port_open(p) for p in ports):
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "kme up did not open every KME's port"
            time.sleep(0.1)
        kmes.extend(pid for pid in _children(proc.pid)
                    if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes())
        yield proc, kmes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in kmes:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _wait_gone(kmes: list[int], ports: list[int]) -> None:
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in kmes) or any(_port_open(p) for p in ports):
        assert time.monotonic() < deadline, \
            f"KMEs left running: {[pid for pid in kmes if _alive(pid)]}"
        time.sleep(0.1)


def test_kme_up_runs_the_embedded_network_until_ctrl_c(tmp_path: Path) -> None:
    ports = free_ports(2)
    with kme_up(tmp_path / "state", ports) as (proc, _):
        pki = tmp_path / "state" / "pki"
        assert (pki / "sae" / "SAE_1.pem").exists() and (pki / "sae" / "SAE_2.key").exists()
        st = runner.invoke(app, ["keys", "status", "SAE_2", "--kme",
                                 f"https://localhost:{ports[0]}", "--pki", str(pki),
                                 "--sae", "SAE_1"])
        assert st.exit_code == 0 and "KME_B" in st.output
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    assert "KME_A" in out.decode() and "Ctrl-C" in out.decode()
    assert not any(_port_open(p) for p in ports)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_kme_up_takes_its_kmes_along_when_signalled(tmp_path: Path, sig: int) -> None:
    ports = free_ports(2)
    with kme_up(tmp_path / "state", ports) as (proc, kmes):
        assert len(kmes) == 2
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        if sig != signal.SIGKILL:  # an orderly stop, reported
            assert proc.returncode == 0, out.decode()
            assert signal.Signals(sig).name in out.decode()
        # With SIGKILL nothing ran in `up`: the kernel told the KMEs (PR_SET_PDEATHSIG).
        _wait_gone(kmes, ports)


def test_kme_up_runs_the_whole_madrid_network_on_one_machine(tmp_path: Path) -> None:
    """`qgw kme up --topology madrid`: 13 KME processes, the 15 links of the trials, a live
    `kme status`, and all of them gone after SIGTERM."""
    state, ports = tmp_path / "state", free_ports(13)
    with kme_up(state, ports, "--topology", "madrid", timeout_s=90) as (proc, kmes):
        assert len(kmes) == 13
        # Every KME hears the others' link-state adverts within a few seconds.
        deadline = time.monotonic() + 30
        while True:
            st = runner.invoke(app, ["kme", "status", "--state", str(state)],
                               env={"COLUMNS": "250"})
            assert st.exit_code == 0, st.output
            up = re.findall(r"(KME_\w+) - (KME_\w+)\s+\S\s+up\s", st.output)
            if "(13 KMEs heard)" in st.output and len(up) == 15:
                break
            assert time.monotonic() < deadline, st.output
            time.sleep(0.5)
        assert {frozenset(link) for link in up} >= {
            frozenset(("KME_ALMAGRO", "KME_NORTE")), frozenset(("KME_CIEMAT", "KME_URJC")),
            frozenset(("KME_UC3M", "KME_IMDEA_NET")), frozenset(("KME_CSIC", "KME_NORTE"))}
        assert "DOWN" not in st.output, st.output
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode()
        _wait_gone(kmes, ports)
