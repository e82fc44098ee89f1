"""Kept for imports from before the SCADA lab moved into the product."""

from gateways.scada.lab import PY, SAES, SITES, ScadaLab, tunnel_ip

__all__ = ["PY", "SAES", "SITES", "ScadaLab", "tunnel_ip"]
