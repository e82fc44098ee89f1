"""Prometheus metrics of one KME (a registry per KME, so tests can run several).

Counts and levels only: no metric carries key material or key IDs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class KmeMetrics:
    def __init__(self, kme_id: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"kme": kme_id}
        self.requests = Counter(
            "qgw_kme_requests", "ETSI 014 and KME-to-KME requests by call and HTTP status",
            ["call", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "qgw_kme_request_seconds", "Time to answer a request", ["call"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
            registry=self.registry,
        )
        self.keys_delivered = Counter(
            "qgw_kme_keys_delivered",
            "Keys handed to SAEs (ETSI 014 keys, ETSI 004 chunks, SKIP keys), by SAE role",
            ["role"], registry=self.registry,
        )
        self.key_bits_generated = Counter(
            "qgw_kme_link_key_bits_generated", "Secret key bits the simulated link produced",
            ["peer"], registry=self.registry,
        )
        self.link_available_bits = Gauge(
            "qgw_kme_link_available_bits", "Link key bits stored and not yet allocated",
            ["peer"], registry=self.registry,
        )
        self.link_up = Gauge(
            "qgw_kme_link_up",
            "1 when the KME-to-KME channel of a link works; an operator cut does not change "
            "it (see qgw_kme_link_admin_up)", ["peer"],
            registry=self.registry,
        )
        self.link_rate = Gauge(
            "qgw_kme_link_rate_bps",
            "Modelled secret key rate of a link while it runs; no key accrues while "
            "qgw_kme_link_up or qgw_kme_link_admin_up is 0", ["peer"],
            registry=self.registry,
        )
        self.link_admin_up = Gauge(
            "qgw_kme_link_admin_up",
            "0 while an operator holds a link down (qgw kme link down): no key accrues on it "
            "although qgw_kme_link_up may be 1 and qgw_kme_link_rate_bps keeps the modelled "
            "rate; 1 otherwise", ["peer"],
            registry=self.registry,
        )
        self.reserved_keys = Gauge(
            "qgw_kme_reserved_keys", "Keys held for slave SAEs that have not fetched them",
            registry=self.registry,
        )
        self.relayed_keys = Counter(
            "qgw_kme_relayed_keys", "Keys relayed through trusted nodes, by this KME's role",
            ["role"], registry=self.registry,
        )
        self.relay_hops = Histogram(
            "qgw_kme_relay_hops", "Hops of the paths relayed keys took from this KME",
            buckets=(1, 2, 3, 4, 5, 6, 8, 10), registry=self.registry,
        )
        self.relay_seconds = Histogram(
            "qgw_kme_relay_seconds", "Time to relay keys end to end, at the master's KME",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5),
            registry=self.registry,
        )
        self.relay_failures = Counter(
            "qgw_kme_relay_failures", "Relay attempts that failed at some hop",
            registry=self.registry,
        )
        self.relay_link_bits = Counter(
            "qgw_kme_relay_link_key_bits", "Link key bits spent on relay hops sent over a link",
            ["peer"], registry=self.registry,
        )
        self.keys_served = Counter(
            "qgw_kme_keys_served",
            "Keys handed to SAEs, by master and slave SAE (for an ETSI 004 stream: source "
            "and destination SAE, one per chunk)",
            ["master", "slave"], registry=self.registry,
        )
        # Every 004 outcome is HTTP 200 (qgw_kme_requests cannot tell them apart).
        self.etsi004_outcomes = Counter(
            "qgw_kme_etsi004_outcomes",
            "ETSI GS QKD 004 answers by call and 004 status (0 SUCCESSFUL, 1 PEER_NOT_CONNECTED, "
            "2 GET_KEY_INSUFFICIENT_KEY, 3 GET_KEY_PEER_NOT_CONNECTED, 4 NO_QKD_CONNECTION, "
            "5 KSID_IN_USE, 6 TIMEOUT_ERROR, 7 QOS_NOT_MET, 8 METADATA_SIZE_INSUFFICIENT)",
            ["call", "status", "outcome"], registry=self.registry,
        )
        self.info = Gauge("qgw_kme_info", "KME identity", ["kme"], registry=self.registry)
        self.info.labels(**labels).set(1)

    def request(self, call: str, code: int, seconds: float) -> None:
        self.requests.labels(call=call, code=str(code)).inc()
        self.latency.labels(call=call).observe(seconds)
