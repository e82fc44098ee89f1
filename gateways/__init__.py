"""QKD-keyed gateways: one folder per gateway (ipsec, scada, webrtc, ledger, opot...)."""
