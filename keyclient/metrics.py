"""Prometheus metrics of a KeySession, read from its status at scrape time.

A gateway registers its session on the registry it serves:
`register_session(session, registry, gateway="ipsec")`. Counts and levels
only; key material and key IDs never become labels or values.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keyclient.session import KeySession, SessionState


class SessionCollector(Collector):
    def __init__(self, session: KeySession, gateway: str) -> None:
        self.session = session
        self.labels = [gateway, session.role.value, session.local_sae, session.peer_sae]

    def collect(self) -> Iterator[Metric]:
        st = self.session.status()
        names = ["gateway", "role", "sae", "peer_sae"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(self.labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(self.labels, value)
            return c

        yield gauge("qgw_session_epoch", "Key epoch protecting traffic now (0: none)",
                    st.epoch or 0)
        yield gauge("qgw_session_pool_keys", "Agreed keys prefetched for later rekeys",
                    st.pool_level)
        state = GaugeMetricFamily("qgw_session_state", "1 for the session's current state",
                                  labels=[*names, "state"])
        for s in SessionState:
            state.add_metric([*self.labels, s.value], 1.0 if st.state is s else 0.0)
        yield state
        source = GaugeMetricFamily("qgw_session_key_source",
                                   "1 for the source of the current key (qkd, hybrid, pqc)",
                                   labels=[*names, "source"])
        if st.source is not None:
            source.add_metric([*self.labels, st.source.value], 1.0)
        yield source
        yield counter("qgw_session_rekeys", "Epochs activated", st.rekeys)
        yield counter("qgw_session_rekey_failures", "Rekeys the peer refused or let time out",
                      st.rekey_failures)
        yield counter("qgw_session_keys_fetched", "QKD keys fetched from the KME",
                      st.keys_fetched)
        yield counter("qgw_session_supply_failures", "Times no key could be obtained",
                      st.supply_failures)
        yield gauge("qgw_session_peer_connected", "1 while the control channel is up",
                    1.0 if st.peer_connected else 0.0)
        if st.last_time_to_key_s is not None:
            yield gauge("qgw_session_time_to_key_seconds",
                        "Last fetch-to-both-ends time of a prefetched key", st.last_time_to_key_s)
        if st.last_rekey_s is not None:
            yield gauge("qgw_session_rekey_seconds", "Last offer-to-switch time of a rekey",
                        st.last_rekey_s)


def register_session(session: KeySession, registry: CollectorRegistry, gateway: str) -> None:
    registry.register(SessionCollector(session, gateway))
