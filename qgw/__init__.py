"""qkdgw: quantum-secure service gateways keyed by QKD key management entities."""

__version__ = "0.1.0"
