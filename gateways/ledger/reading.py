"""One sensor measurement as the gateway ingests it (MQTT or REST), before protection.

A sensor publishes JSON: {"device": "sensor-0001", "seq": 17, "ts_ms": 1790000000000,
"values": {"temperature_c": 21.5, "humidity_pct": 40}}. `seq` counts up per device
from 1; (device, seq) names a reading uniquely, which is how replays are caught.
"""

from __future__ import annotations

from dataclasses import dataclass

Value = float | int | str | bool


@dataclass(frozen=True)
class Reading:
    device: str
    seq: int
    ts_ms: int                 # sensor's clock, milliseconds since the Unix epoch
    values: dict[str, Value]
