"""Video call demo: a WebSocket signalling server and the browser page it serves.

Two participants per room exchange SDP through `apps.videocall.server`; the media
goes peer to peer, end-to-end encrypted with SFrame under QKD keys (the headless
participant is `gateways.webrtc.participant`, the browser page is in `static/`).
"""
