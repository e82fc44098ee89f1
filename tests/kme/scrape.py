"""Read a KME's Prometheus /metrics the way Prometheus does (its text format parser)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> str:
    """The /metrics text of the KME whose metrics listener is on loopback `port`."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def sample(text: str, name: str, /, **labels: str) -> float | None:
    """The value of sample `name` whose labels include `labels`; None when there is none."""
    found = [s.value for family in text_string_to_metric_families(text)
             for s in family.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples; name more labels"
    return found[0] if found else None
