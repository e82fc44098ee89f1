"""`qgw demo`: the main job (see qgw.demo)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from keyclient.policy import SupplyMode
from qgw import logs
from qgw.commands.common import console, friendly_errors
from qgw.errors import QgwError


class _Trial:
    """The trials' KPIs from qgw.demo, imported when a step prints them: `qgw` starts
    faster for every other command (it matters in the emulated VM of the kernel tests)."""

    def __getattr__(self, name: str) -> float:
        from qgw import demo

        return float(getattr(demo, name))


TRIAL = _Trial()

if TYPE_CHECKING:   # the ledger gateway's packages are an extra: imported when its step runs
    from gateways.ipsec.demo import IpsecResult
    from gateways.ledger.demo import LedgerResult


def demo(
    state: Annotated[Path, typer.Option(help="Folder for PKI, configs, KME stores and logs.")] =
        Path(".qgw/demo"),
    rekeys: Annotated[int, typer.Option(min=1, help="Rekeys to run before reporting.")] = 10,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between rekeys.")] = 1.0,
    mode: Annotated[SupplyMode, typer.Option(help="Key supply policy.")] = SupplyMode.QKD,
    gateways: Annotated[bool | None, typer.Option(
        "--gateways/--no-gateways",
        help="Run the gateway steps in network namespaces (IPsec, SCADA, OPoT; needs "
             "root). Default: when root.")] = None,
    ipsec_vm: Annotated[bool, typer.Option(
        "--ipsec-vm/--no-ipsec-vm",
        help="Where this kernel has no ESP, run the IPsec step in Debian's kernel under "
             "qemu (software emulation: minutes, not seconds; needs the test tools, "
             "scripts/test installs them).")] = False,
    ledger: Annotated[bool, typer.Option(
        "--ledger/--no-ledger",
        help="Run the IoT-to-ledger step (UC35; no root needed): 10 sensors over MQTT "
             "(Mosquitto, if installed) or REST, the writer and reader gateways and an "
             "embedded Ethereum chain in this process.")] = True,
    ledger_burst: Annotated[int, typer.Option(
        min=0, help="Devices in the ledger step's burst, a reading each (0: no burst).")] =
        1000,
) -> None:
    """Run a simulated QKD network, a gateway key session and the gateways; KPIs vs OPENQKD."""
    from qgw.demo import p50, run_demo
    logs.setup("WARNING")
    with friendly_errors(), console.status("starting") as status:
        result = run_demo(state, rekeys=rekeys, interval_s=interval, mode=mode,
                          progress=lambda text: status.update(text))
    ttk = p50(result.key_latencies_s)
    table = Table(title="qkdgw demo: ETSI 014 key delivery and gateway rekeying")
    for col, just in (("KPI", "left"), ("OPENQKD trial", "right"), ("qkdgw", "right"),
                      ("ratio", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_row("time to get a QKD key (p50)", f"{TRIAL.UC35_TIME_TO_KEY_S:.2f} s (UC35)",
                  f"{ttk * 1e3:.1f} ms", f"{TRIAL.UC35_TIME_TO_KEY_S / ttk:,.0f}x faster")
    table.add_row("key pairs per second (burst from store)", "-",
                  f"{result.burst_pairs_per_s:,.0f}", "")
    table.add_row("key pairs per second (sustained, link-limited)", "-",
                  f"{result.link_rate_bps / 256:,.1f}",
                  f"{result.link_rate_bps / 1e3:.1f} kb/s link (UC33)")
    table.add_row("rekey interval", f"{TRIAL.UC31_REKEY_INTERVAL_S:.0f} s (UC31)",
                  f"{result.rekey_interval_s:g} s",
                  f"{TRIAL.UC31_REKEY_INTERVAL_S / result.rekey_interval_s:.0f}x more often")
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
    _ipsec_step(gateways, ipsec_vm)
    _scada_step(gateways)
    _opot_step(gateways)
    _webrtc_step(gateways)
    _ledger_step(ledger, state, ledger_burst)


def _ledger_step(wanted: bool, state: Path, burst: int) -> None:
    if not wanted:
        console.print("IoT-to-ledger step not run (--no-ledger).")
        return
    try:
        from gateways.ledger.demo import MOSQUITTO, run_ledger
    except ImportError as exc:   # the ledger gateway's packages are an extra
        console.print(f"IoT-to-ledger step not run ({exc.name} is missing): "
                      "pip install 'qkdgw[ledger]' adds it.")
        return
    with friendly_errors(), console.status("IoT-to-ledger") as status:
        r = run_ledger(state, burst=burst, progress=lambda text: status.update(text))
    console.print(_ledger_table(r))
    how = ("MQTT, through a Mosquitto broker on loopback" if r.transport == "MQTT" else
           f"REST (no Mosquitto at {MOSQUITTO}, so no MQTT)")
    logs_at = state / "logs" / "ledger.log"
    if not r.ok:
        console.print(f"[bold red]IoT-to-ledger step failed[/] (sensors over {how}); "
                      f"gateway logs in {logs_at}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: sensors over {how}; the embedded Ethereum chain (py-evm) "
                  f"and both gateways in this process. Gateway state in {state / 'ledger'}, "
                  f"logs in {logs_at}.")


def _ledger_table(r: LedgerResult) -> Table:
    from gateways.ledger.demo import TRIAL_DEVICES, TRIAL_RATE_PER_MIN

    table = Table(title="IoT-to-ledger gateway: sensor readings sealed with QKD keys, "
                        "anchored on a ledger, decrypted by the partner (UC35)")
    for col, just in (("KPI", "left"), ("OPENQKD trial", "right"), ("qkdgw", "right"),
                      ("ratio", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    most = max(r.devices, r.burst_devices)
    table.add_row("devices at once", f"{TRIAL_DEVICES} (UC35)",
                  f"{r.devices}" + (f"; {r.burst_devices:,} in the burst" if r.burst_devices
                                    else ""), f"{most / TRIAL_DEVICES:,.0f}x")
    table.add_row("measurement rate per device", f"{TRIAL_RATE_PER_MIN:g} / min (UC35)",
                  f"{r.rate_per_device_s * 60:g} / min",
                  f"{r.rate_per_device_s * 60 / TRIAL_RATE_PER_MIN:,.0f}x")
    if r.burst_devices:
        trial_rate = TRIAL_DEVICES * TRIAL_RATE_PER_MIN / 60
        table.add_row("readings per second, whole fleet (burst: sent to decrypted)",
                      f"{trial_rate:.2f}", f"{r.burst_per_s:,.0f}",
                      f"{r.burst_per_s / trial_rate:,.0f}x")
    writer, reader = r.writer_key_p50_ms, r.reader_key_p50_ms
    slowest = max(writer or 0.0, reader or 0.0)   # the ratio against the slower side
    table.add_row("time to get a QKD key (p50): writer / reader by key ID",
                  f"{TRIAL.UC35_TIME_TO_KEY_S:.2f} s (UC35)", f"{_ms(writer)} / {_ms(reader)}",
                  f"{TRIAL.UC35_TIME_TO_KEY_S * 1e3 / slowest:,.0f}x faster" if slowest else "")
    table.add_row("writer start to taking readings (contract deployed, first key)", "-",
                  f"{r.first_key_s:.2f} s", "")
    table.add_row("a reading waiting for a key when sealed (p50)", "-",
                  _ms(r.key_wait_p50_ms, 3), "keys fetched ahead")
    table.add_row("records anchored on the ledger / batches", "-",
                  f"{r.anchored:,} / {r.batches}", f"under {r.keys_used} QKD keys")
    table.add_row("records decrypted by the partner / sent", "-", f"{r.delivered:,} / {r.sent:,}",
                  "each once, as sent" if r.delivered_as_sent else "NOT as sent")
    table.add_row("a third party with the ledger but no key (SAE_3) decrypts", "-",
                  f"{r.third_party_decrypted} of {r.third_party_records}",
                  f"{r.third_party_refused} refused: no key")
    table.add_row("batches with reading values in clear", "-",
                  f"{r.batches_with_clear_values} of {r.batches}", "")
    return table


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} ms"


def _ipsec_step(wanted: bool | None, vm: bool) -> None:
    from gateways.ipsec.demo import esp_missing, p50_ms, run_ipsec
    from qgw import kernelvm
    from qgw.netlab import unavailable

    why = unavailable()
    if wanted is False or (wanted is None and why is not None):
        console.print(f"IPsec step not run ({why or '--no-gateways'}); `sudo scripts/demo` "
                      "runs it.")
        return
    missing = esp_missing()
    where = "in namespaces on this kernel"
    with friendly_errors(), console.status("IPsec") as status:
        if missing is None:
            r = run_ipsec(progress=lambda text: status.update(text))
        else:
            vm_why = kernelvm.unavailable() if vm else "--no-ipsec-vm"
            if vm_why is not None:
                console.print(f"IPsec step not run: {missing}; the VM that would run it "
                              f"instead: {vm_why}.")
                return
            where = "in Debian's kernel under qemu (this kernel has no ESP)"
            status.update("IPsec: booting Debian's kernel under qemu (a few minutes)")
            r = _ipsec_in_vm(kernelvm, lambda line: status.update(f"IPsec (VM): {line}"))
    table = Table(title=f"IPsec gateway: kernel ESP keyed by QKD, {where} (UC31, UC14)")
    for col, just in (("KPI", "left"), ("OPENQKD trial", "right"), ("qkdgw", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_row("rekey interval", f"{TRIAL.UC31_REKEY_INTERVAL_S:.0f} s (UC31)",
                  f"{r.rekey_interval_s:g} s ({r.rekeys} rekeys under traffic)")
    table.add_row("datagrams site A -> site B: sent / received / lost / duplicated", "-",
                  f"{r.sent} / {r.received} / {r.lost} / {r.duplicates}")
    table.add_row("rekey latency (offer to new SAs active at both ends)", "-",
                  f"{p50_ms(r.rekey_latencies_s):.1f} ms")
    table.add_row("gateway start to tunnel protected", f"{TRIAL.UC35_TIME_TO_KEY_S:.2f} s to get "
                  "a key (UC35)", f"{r.tunnel_up_s:.1f} s")
    table.add_row("QKD key per hour at this rekey interval", "-",
                  f"{r.key_bits_per_hour / 1e3:,.1f} kbit ({r.key_bits_per_hour / 3600 / 1800:.0%}"
                  " of UC28's 1.8 kbit/s link)")
    table.add_row("key source protecting the tunnel", "-", ", ".join(r.key_sources) or "none")
    console.print(table)
    if not r.ok:
        console.print("[bold red]IPsec step failed[/]")
        raise typer.Exit(1)


def _ipsec_in_vm(kernelvm: Any, progress: Callable[[str], None]) -> IpsecResult:
    import json
    import sys

    from gateways.ipsec.demo import IpsecResult

    repo = Path(__file__).resolve().parents[2]
    out = kernelvm.run_in_vm([sys.executable, "-m", "gateways.ipsec.demo"], cwd=repo,
                             on_line=progress)
    lines = [line for line in out.output.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise QgwError(f"the IPsec step failed in the VM:\n{out.tail()}")
    return IpsecResult(**json.loads(lines[-1]))


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
    added = p50_ms(r.rtt_s) - p50_ms(r.forward_rtt_s)
    table.add_row("TCP connect round trip through the chain (p50)", "-",
                  f"{p50_ms(r.rtt_s):.2f} ms vs {p50_ms(r.forward_rtt_s):.2f} ms forwarding "
                  "without proofs")
    table.add_row("latency OPoT adds (p50; UC15's KPI)", "a graph in D8.7, no figure",
                  f"{added:+.2f} ms ({p50_ms(r.rtt_s) / p50_ms(r.forward_rtt_s):.2f}x)")
    table.add_row("link key changes / profile rotations during the traffic", "-",
                  f"{r.rekeys} / {r.rotations}")
    per_s = 256 / r.rekey_interval_s
    table.add_row(f"QKD key per hop (rekey every {r.rekey_interval_s:g} s)", "-",
                  f"{per_s * 3.6:.1f} kbit/h ({per_s / 8400:.1%} of the 8.4 kb/s UC33 link)")
    table.add_row("start to first proven packet", f"{TRIAL.UC35_TIME_TO_KEY_S:.2f} s to get a key "
                  "(UC35)", f"{r.first_packet_s:.2f} s")
    console.print(table)
    if not r.ok:
        console.print("[bold red]OPoT step failed[/]")
        raise typer.Exit(1)


def _webrtc_step(wanted: bool | None) -> None:
    from qgw.netlab import unavailable

    why = unavailable()
    if wanted is False or (wanted is None and why is not None):
        console.print(f"WebRTC step not run ({why or '--no-gateways'}); `sudo scripts/demo` "
                      "runs it.")
        return
    try:
        from gateways.webrtc.demo import UC32_POST_PROCESSING_BPS, run_webrtc
    except ImportError as exc:   # aiortc is an extra
        console.print(f"WebRTC step not run ({exc.name} is missing): "
                      "pip install 'qkdgw[webrtc]' adds it.")
        return
    with friendly_errors(), console.status("WebRTC") as status:
        r = run_webrtc(progress=lambda text: status.update(text))
    table = Table(title="WebRTC gateway: SFrame end-to-end encrypted video call, keys over "
                        "ETSI 004 (UC32)")
    for col, just in (("KPI", "left"), ("OPENQKD trial", "right"), ("qkdgw", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    a, b = r.sides["a"], r.sides["b"]
    table.add_row("pictures shown, each checked against the sent pattern (A->B / B->A)",
                  "-", f"{int(b['pattern_ok'])} / {int(a['pattern_ok'])}")
    table.add_row("frames lost at key rotations / shown undecodable", "-",
                  f"{r.dropped} / {r.garbage} ({r.lost} pattern gaps)")
    table.add_row("key rotation (new QKD key, new SFrame KID)", "no figure (UC32)",
                  f"every {r.rotation_interval_s:g} s ({r.rotations} rotations)")
    table.add_row("SFrame seal / open per video frame, in the call", "-",
                  f"{a['seal_us_per_video_frame']:.0f} / {b['open_us_per_video_frame']:.0f} us")
    table.add_row("gateways started to first verified picture",
                  f"{TRIAL.UC35_TIME_TO_KEY_S:.2f} s to get a key (UC35)",
                  f"{r.first_picture_s:.1f} s")
    table.add_row("QKD key per hour of call at this rotation interval",
                  f"{UC32_POST_PROCESSING_BPS / 1e3:g} kbit/s distilled (UC32, no GPU)",
                  f"{r.key_bits_per_hour / 1e3:,.1f} kbit "
                  f"({r.key_bits_per_hour / 3600 / UC32_POST_PROCESSING_BPS:.1%} of it)")
    table.add_row("key source", "ETSI 004 (UC32)", ", ".join(r.key_sources) or "none")
    console.print(table)
    if not r.ok:
        console.print("[bold red]WebRTC step failed[/]")
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
    table.add_row("rekey interval", f"{TRIAL.UC31_REKEY_INTERVAL_S:.0f} s (UC31)",
                  f"{r.rekey_interval_s:g} s ({r.rekeys} rekeys during the polls)")
    table.add_row("gateway start to first protected packet", f"{TRIAL.UC35_TIME_TO_KEY_S:.2f} s "
                  "to get a key (UC35)", f"{r.first_packet_s:.2f} s")
    table.add_row("write to a forbidden breaker (CB3)", "-",
                  f"refused, connection reset ({r.refused_packets} policy drops)"
                  if r.refused_write else "NOT refused")
    console.print(table)
    if not r.ok:
        console.print("[bold red]SCADA step failed[/]")
        raise typer.Exit(1)
