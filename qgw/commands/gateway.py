"""`qgw gateway`: the protected services (one subcommand per gateway)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from gateways.base import registry
from qgw import logs
from qgw.commands.common import console, friendly_errors

app = typer.Typer(help="Run a QKD-keyed gateway.", no_args_is_help=True)


@app.command("list")
def list_gateways() -> None:
    """List the gateways this installation has (built in and plugins)."""
    found = registry()
    if not found:
        console.print("No gateways are installed yet.")
    for name, entry in sorted(found.items()):
        cls = entry.load()
        console.print(f"{name}: {cls.summary} ({entry.summary})")


@app.command("scada")
def scada(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config (YAML); "
                                         "see gateways/scada/config.py.")],
    status_every: Annotated[float, typer.Option(
        help="Print the pairs' state every N seconds (0: never).")] = 10.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """QKD-keyed Modbus/TCP tunnel: a control centre and its substations (needs NET_ADMIN)."""
    from gateways.scada.config import load
    from gateways.scada.gateway import ScadaGateway

    logs.setup(log_level)
    with friendly_errors():
        _serve(ScadaGateway(load(config)), status_every, _status_line)


@app.command("ipsec")
def ipsec(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config (YAML); "
                                         "see gateways/ipsec/config.py.")],
    status_every: Annotated[float, typer.Option(
        help="Print the tunnel's state every N seconds (0: never).")] = 10.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Kernel ESP tunnel between two sites, SAs keyed by QKD (needs NET_ADMIN, kernel ESP)."""
    from gateways.ipsec.config import load
    from gateways.ipsec.gateway import IpsecGateway

    logs.setup(log_level)
    with friendly_errors():
        _serve(IpsecGateway(load(config)), status_every, _ipsec_line)


@app.command("opot")
def opot(
    config: Annotated[Path, typer.Option("--config", "-c", help="Node config (YAML); "
                                         "see gateways/opot/config.py.")],
    status_every: Annotated[float, typer.Option(
        help="Print the node's counters every N seconds (0: never).")] = 10.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """One node of a service chain with ordered proof of transit (needs NET_ADMIN)."""
    from gateways.opot.config import load
    from gateways.opot.gateway import OpotGateway

    logs.setup(log_level)
    with friendly_errors():
        _serve(OpotGateway(load(config)), status_every, _opot_line)


@app.command("ledger")
def ledger(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config (YAML); "
                                         "see gateways/ledger/config.py.")],
    status_every: Annotated[float, typer.Option(
        help="Print the counters every N seconds (0: never).")] = 10.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """IoT readings sealed with QKD keys and anchored on Ethereum (writer), or decrypted (reader).

    The writer seals readings and anchors them on the ledger; the partner's reader
    fetches them back and decrypts them.
    """
    from gateways.ledger.config import load
    from gateways.ledger.gateway import LedgerGateway

    logs.setup(log_level)
    with friendly_errors():
        _serve(LedgerGateway(load(config)), status_every, _ledger_line)


@app.command("webrtc")
def webrtc(
    config: Annotated[Path, typer.Option("--config", "-c", help="Participant config (YAML); "
                                         "see gateways/webrtc/config.py.")],
    status_every: Annotated[float, typer.Option(
        help="Print the call's counters every N seconds (0: never).")] = 10.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """One participant of an end-to-end encrypted video call (SFrame keyed by QKD).

    Either a headless aiortc camera, or the key source of a browser page (media: browser).
    """
    try:
        from gateways.webrtc.config import load
        from gateways.webrtc.gateway import WebrtcGateway
    except ImportError as exc:   # aiortc is an extra
        raise typer.BadParameter(f"{exc.name} is missing: pip install 'qkdgw[webrtc]'") \
            from exc

    logs.setup(log_level)
    with friendly_errors():
        gw = WebrtcGateway(load(config))
        _serve(gw, status_every, _webrtc_line, on_open=_show_page_link)


def _show_page_link(gw: Any) -> None:
    if gw.page_link is not None:
        # The link carries the handoff token: printed for the user, never logged.
        console.print(f"Open this participant's page (its keys come from this gateway):\n"
                      f"  {gw.page_link}", highlight=False, soft_wrap=True, markup=False)


def _webrtc_line(stats: dict[str, Any]) -> str:
    text = (f"[{stats['state']}] {stats['role']} {stats['sae']} ({stats['media']}): "
            f"KID {stats['kid']} epoch {stats['epoch']} ({stats['key_source'] or 'no key'}) "
            f"rotations {stats['rotations']} sealed {stats['frames_sealed']} "
            f"opened {stats['frames_opened']}")
    dropped = sum(stats["drops"].values())
    if dropped:
        text += f" dropped {dropped} {stats['drops']}"
    if stats.get("fail_closed"):
        text += f" (not sending: {stats['fail_closed']})"
    return text


def _serve(gw: Any, status_every: float, line: Callable[[dict[str, Any]], str],
           on_open: Callable[[Any], None] = lambda gw: None) -> None:
    """Run an opened gateway until SIGTERM or Ctrl-C, printing a status line now and then."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gw.open()
    try:
        on_open(gw)
        while not stop.wait(status_every or None):
            console.print(line(gw.stats()), highlight=False, soft_wrap=True, markup=False)
    finally:
        gw.close()
        console.print(f"stopped; {line(gw.stats())}", highlight=False, soft_wrap=True,
                      markup=False)


def _ipsec_line(stats: dict[str, Any]) -> str:
    spis = stats["spis"]
    text = (f"[{stats['state']}] {stats['role']} {stats['sae']}: epoch {stats['epoch']} "
            f"({stats['key_source'] or 'no key'}) rekeys {stats['rekeys']}")
    if spis.get("out") is not None:
        text += f" spi out {spis['out']:#010x} in {spis['in']:#010x}"
    if stats["epoch"] is None and stats["fail_closed"]:
        text += f" FAIL-CLOSED: {stats['fail_closed']}"
    t = stats["traffic"]
    return text + (f"; esp out {t['out_packets']} pkts in {t['in_packets']} pkts; "
                   f"expires {stats['expires']}")


def _ledger_line(stats: dict[str, Any]) -> str:
    text = f"[{stats['state']}] {stats['role']} {stats['sae']}"
    if "writer" in stats:
        w, k = stats["writer"], stats["keys"]
        refused = ", ".join(f"{r} {n}" for r, n in sorted(w["refused"].items()) if n)
        wait = k["key_wait_p50_ms"]
        text += (f" -> {stats['peer_sae']}: received {w['received']} sealed {w['sealed']} "
                 f"refused {sum(w['refused'].values())}{f' ({refused})' if refused else ''}; "
                 f"anchored {w['records_anchored']} in {w['batches_anchored']} batches, "
                 f"queued {w['queued']} pending batches {w['pending_batches']}; "
                 f"keys used {k['used']} ({k['records_per_key']}/key), key wait p50 "
                 + (f"{wait:.2f} ms" if wait is not None else "-"))
        if k["failing"]:
            text += f"; NO KEY: {k['failing']}"
        if w["ledger_error"]:
            text += f"; LEDGER: {w['ledger_error']}"
    if "reader" in stats:
        r = stats["reader"]
        rejected = ", ".join(f"{k} {n}" for k, n in sorted(r["rejected"].items()) if n)
        text += (f" <- {stats['peer_sae']}: delivered {r['delivered']} from {r['batches']} "
                 f"batches, rejected {sum(r['rejected'].values())}"
                 f"{f' ({rejected})' if rejected else ''}; cursor block {r['cursor']}")
        if r["waiting"]:
            text += f"; waiting for {r['waiting']}"
    return text


def _opot_line(stats: dict[str, Any]) -> str:
    links = ", ".join(f"{name} epoch {v['epoch']}" for name, v in stats["links"].items())
    text = (f"[{stats['state']}] {stats['role']} {stats['node']}: profiles {stats['profiles']}; "
            f"{links}; packets {stats['counters']}")
    if "verified" in stats:
        text += f"; verified {stats['verified']} rejected {stats['rejected']}"
    if "rotations" in stats:
        text += f"; rotations {stats['rotations']}"
    return text


def _status_line(stats: dict[str, object]) -> str:
    pairs = stats.get("pairs", {})
    assert isinstance(pairs, dict)
    parts = [f"pair {p}: epoch {s['epoch']} ({s['key_source'] or 'no key'}) rekeys {s['rekeys']}"
             + (f" FAIL-CLOSED: {s['fail_closed']}" if s["fail_closed"] and s["epoch"] is None
                else "")
             for p, s in pairs.items()]
    traffic = stats.get("traffic", {})
    assert isinstance(traffic, dict)
    return (f"[{stats.get('state')}] " + "; ".join(parts)
            + f"; sent {traffic.get('sent_packets', 0)} recv {traffic.get('received_packets', 0)}"
            + f" dropped {sum(traffic.get('dropped', {}).values())}")
