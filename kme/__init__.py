"""KME simulator: ETSI GS QKD 014 over mutual TLS, a durable key store, simulated QKD links."""
