"""`qgw kme`: run one KME or a whole simulated network, and operate it."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.table import Table

from kme import config as kme_config
from kme.network import LocalNetwork, NetworkSpec, default_network, prepare
from qgw import logs
from qgw.commands.common import console, friendly_errors
from qgw.errors import QgwError

app = typer.Typer(help="KME simulator (ETSI GS QKD 014/004, SKIP) and simulated QKD networks.",
                  no_args_is_help=True)
link_app = typer.Typer(help="Take a QKD link down or bring it back (both ends).",
                       no_args_is_help=True)
app.add_typer(link_app, name="link")

State = Annotated[Path, typer.Option(help="Folder for PKI, configs, stores and logs.")]
TopologyOpt = Annotated[str | None, typer.Option(
    "--topology", "-t",
    help="Shipped topology name (madrid) or a topology YAML file. "
         "Default: two KMEs on the UC33 Norte-Distrito link.")]
Dns = Annotated[bool, typer.Option(
    "--dns", help="One KME per container/namespace: listen on all addresses, reach peers "
                  "by DNS name (kme-norte:8443).")]


def _spec(topology: str | None, key_rate: float | None = None) -> NetworkSpec:
    if topology is None:
        spec = default_network()
        if key_rate is not None:
            spec.links = [type(link)(link.a, link.b, key_rate, link.loss_db)
                          for link in spec.links]
        return spec
    if key_rate is not None:
        raise QgwError("--key-rate applies to the default network; a topology file gives "
                       "each link its own rate")
    from kme.topology import load_topology

    return load_topology(topology).to_spec()


@app.command("serve")
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="KME config file (YAML).")],
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run one KME until SIGTERM or Ctrl-C."""
    from kme.run import run

    logs.setup(log_level)
    with friendly_errors():
        cfg = kme_config.load(config)
        run(cfg)


@app.command("prepare")
def prepare_cmd(state: State = Path(".qgw"), topology: TopologyOpt = None,
                dns: Dns = False) -> None:
    """Write the PKI and one KME config per node of a network, then exit."""
    with friendly_errors():
        spec = _spec(topology)
        endpoints = prepare(state, spec, dns=dns)
        console.print(f"network {spec.name!r}: {len(endpoints)} KME configs in "
                      f"{state / 'config'}, PKI in {state / 'pki'}")


class _Stop(Exception):
    """SIGTERM or SIGHUP reached `qgw kme up`: stop like Ctrl-C does."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into `_Stop`, so the network's `with` block stops the KMEs.

    The KMEs run in sessions of their own (a Ctrl-C at the terminal must not reach them
    before `up` stops them in order), so a signal to `up` alone would orphan them.
    """
    def handler(signum: int, frame: FrameType | None) -> None:
        # A second signal must not cut the orderly stop short.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@app.command("up")
def up(
    state: State = Path(".qgw"),
    topology: TopologyOpt = None,
    node: Annotated[str | None, typer.Option(
        help="Run only this KME of the topology, in the foreground (one per container).")] =
        None,
    dns: Dns = False,
    port: Annotated[int, typer.Option(help="HTTPS port of the first KME; the next use +1.")] =
        8443,
    metrics_port: Annotated[int, typer.Option(
        help="Metrics port of the first KME (/metrics, /health); the next use +1.")] = 9443,
    key_rate: Annotated[float | None, typer.Option(
        help="Link secret key rate in bit/s for the default network (8400, UC33).")] = None,
) -> None:
    """Run every KME of a network on this machine (or one node) until Ctrl-C or SIGTERM.

    Certificates are generated on first run in STATE/pki and kept afterwards.
    """
    logs.setup()
    with friendly_errors():
        spec = _spec(topology, key_rate)
        if node is not None:
            from kme.run import run

            endpoints = prepare(state, spec, base_port=port, metrics_base_port=metrics_port,
                                dns=dns, only=node)
            run(kme_config.load(endpoints[node].config))
            return
        endpoints = prepare(state, spec, base_port=port, metrics_base_port=metrics_port,
                            dns=dns)
        console.print(f"starting {len(endpoints)} KMEs of network {spec.name!r}...")
        try:
            with _stop_on_signals(), LocalNetwork(endpoints, state / "logs"):
                table = Table(title=f"Simulated QKD network {spec.name!r}")
                for col in ("KME", "ETSI 014 URL", "metrics", "SAEs"):
                    table.add_column(col)
                for ep in endpoints.values():
                    saes = ", ".join(s for s, k in spec.saes.items() if k == ep.kme_id)
                    table.add_row(ep.kme_id, ep.url, ep.metrics_url + "/metrics", saes)
                console.print(table)
                console.print(f"SAE certificates: {state / 'pki' / 'sae'}; "
                              f"logs: {state / 'logs'}; "
                              f"live view: qgw kme status --state {state}")
                console.print("Press Ctrl-C to stop (SIGTERM and SIGHUP stop it too).")
                while True:
                    time.sleep(3600)
        except (KeyboardInterrupt, _Stop) as stop:
            # LocalNetwork has stopped every KME by now.
            console.print(f"stopped ({stop or 'Ctrl-C'})")


def _operator(state: Path, kme: str | None, url: str | None) -> Any:
    from kme.operator import OperatorClient
    from qgw.pki import Pki

    configs = sorted((state / "config").glob("*.yaml"))
    if kme is None:
        if not configs:
            raise QgwError(f"no KME configs in {state / 'config'}; run `qgw kme up` first "
                           f"or pass --state")
        kme = configs[0].stem
    if url is None:
        path = state / "config" / f"{kme}.yaml"
        if not path.exists():
            raise QgwError(f"no config for {kme} in {state / 'config'}; pass --url")
        cfg = kme_config.load(path)
        host = cfg.listen.host if cfg.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
        url = f"https://{host}:{cfg.listen.port}"
    return OperatorClient(url, kme, Pki(state / "pki").operator_files())


def _set_link(a: str, b: str, up: bool, state: Path, url: str | None) -> None:
    with friendly_errors():
        client = _operator(state, a, url)
        try:
            got = client.set_link(b, up)
        finally:
            client.close()
        told = "" if got.get("peer_told") else f" ({b} could not be told; it is unreachable)"
        console.print(f"link {a}-{b}: {got.get('state')}{told}")


Url = Annotated[str | None, typer.Option(help="URL of KME A (default: from STATE/config).")]


@link_app.command("down")
def link_down(a: Annotated[str, typer.Argument(help="KME at one end, e.g. KME_NORTE.")],
              b: Annotated[str, typer.Argument(help="KME at the other end.")],
              state: State = Path(".qgw"), url: Url = None) -> None:
    """Cut the QKD link A-B: no new key on it, stored key remains, relays go around it."""
    _set_link(a, b, False, state, url)


@link_app.command("up")
def link_up(a: Annotated[str, typer.Argument(help="KME at one end.")],
            b: Annotated[str, typer.Argument(help="KME at the other end.")],
            state: State = Path(".qgw"), url: Url = None) -> None:
    """Restore the QKD link A-B."""
    _set_link(a, b, True, state, url)


@app.command("status")
def status(state: State = Path(".qgw"),
           kme: Annotated[str | None, typer.Option(
               help="KME to ask (any: each knows the whole network).")] = None,
           url: Annotated[str | None, typer.Option(help="URL of that KME.")] = None) -> None:
    """Print the live network: links, key rates, key pools, relay key spend, outages."""
    with friendly_errors():
        client = _operator(state, kme, url)
        try:
            view = client.network()
        finally:
            client.close()
        console.print(network_table(view, relay_spend(state)))


RELAY_METRIC = "qgw_kme_relay_link_key_bits"


def relay_spend(state: Path, timeout_s: float = 2.0) -> dict[tuple[str, str], float]:
    """Link key bits each KME spent on relay hops, as (KME, peer): bits, since it started.

    Read from the /metrics of every KME with a config in STATE/config. The routing
    adverts a KME hears carry no relay figures, so each KME is asked for its own; a
    KME without a metrics listener, or unreachable, is left out.
    """
    import urllib.request
    from urllib.parse import urlsplit

    from prometheus_client.parser import text_string_to_metric_families

    configs = [kme_config.load(path) for path in sorted((state / "config").glob("*.yaml"))]
    # A KME listening on all addresses is reached where its peers reach it.
    reach = {link.peer: urlsplit(link.url).hostname for cfg in configs for link in cfg.links}
    spend: dict[tuple[str, str], float] = {}
    for cfg in configs:
        if cfg.metrics is None:
            continue
        host = cfg.metrics.host
        if host in ("0.0.0.0", "::"):
            host = reach.get(cfg.kme_id) or "127.0.0.1"
        url = f"http://{host}:{cfg.metrics.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                text = r.read().decode()
        except (OSError, ValueError):
            continue
        for family in text_string_to_metric_families(text):
            if family.name == RELAY_METRIC:
                for sample in family.samples:
                    if sample.name == RELAY_METRIC + "_total":
                        spend[(cfg.kme_id, sample.labels["peer"])] = sample.value
        for link in cfg.links:  # no sample yet: nothing relayed over it
            spend.setdefault((cfg.kme_id, link.peer), 0.0)
    return spend


def _relay_cell(spend: dict[tuple[str, str], float], a: str, b: str) -> str:
    """Both ends' relay spend on link a-b: relays in either direction draw on its one pool."""
    ends = [spend.get((a, b)), spend.get((b, a))]
    known = [v for v in ends if v is not None]
    if not known:
        return "-"
    return f"{sum(known):,.0f}" + ("" if len(known) == 2 else " + ?")


def network_table(view: dict[str, Any],
                  relay: dict[tuple[str, str], float] | None = None) -> Table:
    adverts = {a["origin"]: a["links"] for a in view.get("network", [])}
    table = Table(title=f"QKD network as seen by {view.get('kme_id')} "
                        f"({len(adverts)} KMEs heard)",
                  caption="relay spent: link key bits used by trusted-node relay hops since "
                          "the KMEs started (from their /metrics)")
    for col in ("link", "state", "key rate b/s", "pool A (bits)", "pool B (bits)",
                "relay spent (bits)"):
        table.add_column(col)
    seen = set()
    for a in sorted(adverts):
        for b, ad in sorted(adverts[a].items()):
            if frozenset((a, b)) in seen:
                continue
            seen.add(frozenset((a, b)))
            back = adverts.get(b, {}).get(a)
            up = ad["up"] and back is not None and back["up"]
            state = "[green]up[/]" if up else "[red]DOWN[/]" if back is not None \
                else "[yellow]? (far end not heard)[/]"
            rate = ad.get("rate_bps") or (back or {}).get("rate_bps")
            table.add_row(f"{a} - {b}", state, f"{rate:,.0f}" if rate is not None else "-",
                          f"{ad['available_bits']:,}",
                          f"{back['available_bits']:,}" if back else "-",
                          _relay_cell(relay or {}, a, b))
    return table
