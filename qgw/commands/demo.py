"""`qgw demo`: the main job (see qgw.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from keyclient.policy import SupplyMode
from qgw import logs
from qgw.commands.common import console, friendly_errors
from qgw.demo import UC31_REKEY_INTERVAL_S, UC35_TIME_TO_KEY_S, p50, run_demo


def demo(
    state: Annotated[Path, typer.Option(help="Folder for PKI, configs, KME stores and logs.")] =
        Path(".qgw/demo"),
    rekeys: Annotated[int, typer.Option(min=1, help="Rekeys to run before reporting.")] = 10,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between rekeys.")] = 1.0,
    mode: Annotated[SupplyMode, typer.Option(help="Key supply policy.")] = SupplyMode.QKD,
    gateways: Annotated[bool | None, typer.Option(
        "--gateways/--no-gateways",
        help="Run the gateway steps in network namespaces (SCADA, OPoT; needs root). "
             "Default: when root.")] = None,
) -> None:
    """Run a simulated QKD network, a gateway key session and the gateways; KPIs vs OPENQKD."""
    logs.setup("WARNING")
    with friendly_errors(), console.status("starting") as status:
        result = run_demo(state, rekeys=rekeys, interval_s=interval, mode=mode,
                          progress=lambda text: status.update(text))
    ttk = p50(result.key_latencies_s)
    table = Table(title="qkdgw demo: ETSI 014 key delivery and gateway rekeying")
    for col, just in (("KPI", "left"), ("OPENQKD trial", "right"), ("qkdgw", "right"),
                      ("ratio", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_row("time to get a QKD key (p50)", f"{UC35_TIME_TO_KEY_S:.2f} s (UC35)",
                  f"{ttk * 1e3:.1f} ms", f"{UC35_TIME_TO_KEY_S / ttk:,.0f}x faster")
    table.add_row("key pairs per second (burst from store)", "-",
                  f"{result.burst_pairs_per_s:,.0f}", "")
    table.add_row("key pairs per second (sustained, link-limited)", "-",
                  f"{result.link_rate_bps / 256:,.1f}",
                  f"{result.link_rate_bps / 1e3:.1f} kb/s link (UC33)")
    table.add_row("rekey interval", f"{UC31_REKEY_INTERVAL_S:.0f} s (UC31)",
                  f"{result.rekey_interval_s:g} s",
                  f"{UC31_REKEY_INTERVAL_S / result.rekey_interval_s:.0f}x more often")
    table.add_row("rekey latency (offer to switch, p50)", "-",
                  f"{p50(result.rekey_latencies_s) * 1e3:.1f} ms", "")
    table.add_row("rekeys completed", "-",
                  f"{result.rekeys} ({result.rekey_failures} failed)", "")
    table.add_row("key pool level (gateway / KME store)", "-",
                  f"{result.pool_level} / {result.stored_keys}", "")
    table.add_row("epochs with identical keys at both gateways", "-",
                  f"{result.epochs_matching}/{result.epochs_compared}", "")
    console.print(table)
    if not result.ok:
        console.print("[bold red]demo failed:[/] keys did not agree at both ends")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {result.rekeys} rekeys under supply mode {result.mode}, "
                  f"last key from {result.source}. State and logs in {state}.")
    _scada_step(gateways)
    _opot_step(gateways)


def _opot_step(wanted: bool | None) -> None:
    from gateways.opot.demo import p50_ms, run_opot
    from qgw.netlab import unavailable

    why = unavailable()
    if wanted is False or (wanted is None and why is not None):
        console.print(f"OPoT step not run ({why or '--no-gateways'}); `sudo scripts/demo` runs it.")
        return
    with friendly_errors(), console.status("OPoT") as status:
        r = run_opot(progress=lambda text: status.update(text))
    table = Table(title="OPoT: ordered proof of transit through ingress, SF1, SF2, egress (UC15)")
    for col, just in (("KPI", "left"), ("OPENQKD trial", "right"), ("qkdgw", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_row("packets sent / delivered / verified at the egress", "-",
                  f"{r.sent} / {r.received} / {r.verified}")
    table.add_row("proofs rejected (false rejections)", "-", str(r.rejected))
    table.add_row("TCP connect round trip through the chain (p50)", "-",
                  f"{p50_ms(r.rtt_s):.2f} ms")
    table.add_row("link key changes / profile rotations during the traffic", "-",
                  f"{r.rekeys} / {r.rotations}")
    per_s = 256 / r.rekey_interval_s
    table.add_row(f"QKD key per hop (rekey every {r.rekey_interval_s:g} s)", "-",
                  f"{per_s * 3.6:.1f} kbit/h ({per_s / 8400:.1%} of the 8.4 kb/s UC33 link)")
    table.add_row("start to first proven packet", f"{UC35_TIME_TO_KEY_S:.2f} s to get a key "
                  "(UC35)", f"{r.first_packet_s:.2f} s")
    console.print(table)
    if not r.ok:
        console.print("[bold red]OPoT step failed[/]")
        raise typer.Exit(1)


def _scada_step(wanted: bool | None) -> None:
    from gateways.scada.demo import run_scada
    from qgw.netlab import unavailable

    why = unavailable()
    if wanted is False or (wanted is None and why is not None):
        console.print(f"SCADA gateway step not run ({why or '--no-gateways'}); "
                      f"`sudo scripts/demo` runs it.")
        return
    with friendly_errors(), console.status("SCADA") as status:
        r = run_scada(progress=lambda text: status.update(text))
    table = Table(title="SCADA gateway: HMI -> PLC Modbus/TCP through the QKD-keyed tunnel "
                        "(UC16, UC02)")
    for col, just in (("KPI", "left"), ("OPENQKD trial", "right"), ("qkdgw", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    d, t = r.direct, r.polls
    added = t["latency_p50_ms"] - d["latency_p50_ms"]
    table.add_row("Modbus poll round trip p50 (3 requests): direct / tunnel", "-",
                  f"{d['latency_p50_ms']:.2f} / {t['latency_p50_ms']:.2f} ms "
                  f"(+{added:.2f} ms)")
    table.add_row("  p99: direct / tunnel", "-",
                  f"{d['latency_p99_ms']:.2f} / {t['latency_p99_ms']:.2f} ms")
    table.add_row("polls through the tunnel, failed", "-", f"{t['sent']}, {t['failed']} failed")
    table.add_row("rekey interval", f"{UC31_REKEY_INTERVAL_S:.0f} s (UC31)",
                  f"{r.rekey_interval_s:g} s ({r.rekeys} rekeys during the polls)")
    table.add_row("gateway start to first protected packet", f"{UC35_TIME_TO_KEY_S:.2f} s "
                  "to get a key (UC35)", f"{r.first_packet_s:.2f} s")
    table.add_row("write to a forbidden breaker (CB3)", "-",
                  "refused, connection reset" if r.refused_write else "NOT refused")
    console.print(table)
    if not r.ok:
        console.print("[bold red]SCADA step failed[/]")
        raise typer.Exit(1)
