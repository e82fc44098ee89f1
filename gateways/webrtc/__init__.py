"""WebRTC gateway: SFrame (RFC 9605) end-to-end encrypted media keyed by QKD."""
