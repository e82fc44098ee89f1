"""Control channels between the two gateways of a pair: how KeySession messages travel.

A channel carries small JSON objects and tells its owner when the peer comes
and goes. `TlsControlChannel` is the default (mutual TLS over TCP with the
network's PKI, 4-byte length-prefixed JSON frames); `LoopbackChannel` joins two
sessions inside one process. A gateway whose protocol already has a signalling
path can implement the same three methods over it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from keyclient.errors import PeerError
from qgw.tls import ROLE_SAE, TlsFiles, client_context, peer_identity, server_context

log = logging.getLogger("qgw.keyclient.control")

MAX_FRAME = 64 * 1024
Message = dict[str, Any]
OnMessage = Callable[[Message], None]
OnLink = Callable[[bool], None]


class ChannelDown(PeerError):
    """The peer is not connected; the message was not sent."""


class ControlChannel(Protocol):
    def bind(self, on_message: OnMessage, on_link: OnLink) -> None:
        """Register the receiver of messages and of link up/down events (before start)."""

    def start(self) -> None: ...

    def send(self, msg: Message) -> None:
        """Send one message or raise ChannelDown."""

    def close(self) -> None: ...


class LoopbackChannel:
    """Two ends joined in memory, for sessions inside one process."""

    def __init__(self) -> None:
        self.peer: LoopbackChannel | None = None
        self._on_message: OnMessage | None = None
        self._on_link: OnLink | None = None
        self.up = False

    @classmethod
    def pair(cls) -> tuple[LoopbackChannel, LoopbackChannel]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    def rejoin(self) -> LoopbackChannel:
        """A new far end for this channel: the peer restarted and connects again."""
        other = LoopbackChannel()
        other.peer, self.peer = self, other
        return other

    def bind(self, on_message: OnMessage, on_link: OnLink) -> None:
        self._on_message, self._on_link = on_message, on_link

    def start(self) -> None:
        self.up = True
        if self.peer and self.peer.up:
            self._link(True)
            self.peer._link(True)

    def _link(self, up: bool) -> None:
        if self._on_link:
            self._on_link(up)

    def send(self, msg: Message) -> None:
        peer = self.peer
        if not self.up or peer is None or not peer.up or peer._on_message is None:
            raise ChannelDown("peer is not connected")
        # A JSON round trip, so both ends see exactly what a network would carry.
        peer._on_message(json.loads(json.dumps(msg)))

    def close(self) -> None:
        was_up = self.up
        self.up = False
        if was_up and self.peer and self.peer.up:
            self.peer._link(False)
        self._link(False)


def _send_frame(sock: ssl.SSLSocket, msg: Message) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ValueError("control message too large")
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the control channel")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: ssl.SSLSocket) -> Message:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    if size > MAX_FRAME:
        raise ConnectionError(f"control frame of {size} bytes is over the {MAX_FRAME} limit")
    try:
        msg = json.loads(_recv_exact(sock, size))
    except RecursionError:
        raise ConnectionError("control frame nests too deeply") from None
    if not isinstance(msg, dict):
        raise ConnectionError("control frame is not a JSON object")
    return msg


class TlsControlChannel:
    """Mutual-TLS control channel to one peer gateway, identified by its SAE ID.

    One end listens (`listen=(host, port)`), the other connects
    (`connect=(host, port)`) and reconnects with backoff whenever the link
    drops. A new connection from the peer replaces the old one (the peer may
    have restarted). The peer certificate must be an SAE certificate of the
    same CA whose CN is `peer_sae`.
    """

    def __init__(self, tls: TlsFiles, peer_sae: str, *, listen: tuple[str, int] | None = None,
                 connect: tuple[str, int] | None = None, io_timeout_s: float = 10.0) -> None:
        if (listen is None) == (connect is None):
            raise ValueError("give exactly one of listen= or connect=")
        self.peer_sae = peer_sae
        self._listen_addr = listen
        self._connect_addr = connect
        self._timeout = io_timeout_s
        self._ctx = server_context(tls) if listen else client_context(tls, check_hostname=False)
        self._sock: ssl.SSLSocket | None = None
        self._server: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._on_message: OnMessage = lambda m: None
        self._on_link: OnLink = lambda up: None
        self._threads: list[threading.Thread] = []
        self.port: int | None = None

    def bind(self, on_message: OnMessage, on_link: OnLink) -> None:
        self._on_message, self._on_link = on_message, on_link

    def start(self) -> None:
        if self._listen_addr:
            srv = socket.create_server(self._listen_addr, reuse_port=False)
            srv.settimeout(0.5)
            self._server = srv
            self.port = srv.getsockname()[1]
            target = self._accept_loop
        else:
            target = self._connect_loop
        t = threading.Thread(target=target, name=f"control-{self.peer_sae}", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def up(self) -> bool:
        return self._sock is not None

    def send(self, msg: Message) -> None:
        with self._lock:
            sock = self._sock
            if sock is None:
                raise ChannelDown(f"peer {self.peer_sae} is not connected")
            try:
                _send_frame(sock, msg)
            except (OSError, ValueError) as exc:
                raise ChannelDown(f"sending to {self.peer_sae} failed: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._closed.set()
        self._drop(None)
        if self._server is not None:
            self._server.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2)

    # -- connection management -------------------------------------------------

    def _check_peer(self, sock: ssl.SSLSocket) -> bool:
        ident = peer_identity(sock.getpeercert())
        if ident is None or ident.role != ROLE_SAE or ident.name != self.peer_sae:
            who = ident.name if ident else "an unidentified party"
            log.warning("control channel: refused %s (expected SAE %s)", who, self.peer_sae)
            return False
        return True

    def _adopt(self, sock: ssl.SSLSocket) -> None:
        sock.settimeout(None)
        with self._lock:
            if self._closed.is_set():  # closed while this connection was being set up
                _close_quietly(sock)
                return
            old, self._sock = self._sock, sock
        if old is not None:
            _close_quietly(old)
        self._on_link(True)
        self._read_loop(sock)

    def _drop(self, sock: ssl.SSLSocket | None) -> None:
        with self._lock:
            current = self._sock
            if sock is not None and current is not sock:
                _close_quietly(sock)
                return
            self._sock = None
        if current is not None:
            _close_quietly(current)
            self._on_link(False)

    def _read_loop(self, sock: ssl.SSLSocket) -> None:
        try:
            while not self._closed.is_set():
                msg = _recv_frame(sock)
                try:
                    self._on_message(msg)
                except Exception:
                    log.exception("control message handler failed")
        except (OSError, ConnectionError, ValueError) as exc:
            if not self._closed.is_set():
                log.info("control channel to %s closed: %s", self.peer_sae, exc)
        finally:
            self._drop(sock)

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._closed.is_set():
            try:
                raw, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve_one, args=(raw,), daemon=True,
                                 name=f"control-conn-{self.peer_sae}")
            t.start()

    def _serve_one(self, raw: socket.socket) -> None:
        raw.settimeout(self._timeout)
        try:
            sock = self._ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.warning("control channel: TLS handshake failed: %s", exc)
            _close_quietly(raw)
            return
        if not self._check_peer(sock):
            _close_quietly(sock)
            return
        self._adopt(sock)

    def _connect_loop(self) -> None:
        assert self._connect_addr is not None
        backoff = 0.05
        while not self._closed.is_set():
            try:
                raw = socket.create_connection(self._connect_addr, timeout=self._timeout)
                sock = self._ctx.wrap_socket(raw, server_hostname=None)
            except (OSError, ssl.SSLError):
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if not self._check_peer(sock):
                _close_quietly(sock)
                self._closed.wait(2.0)
                continue
            backoff = 0.05
            self._adopt(sock)
            if not self._closed.is_set():
                time.sleep(0.05)


def _close_quietly(sock: socket.socket) -> None:
    # shutdown() first: close() alone does not wake a thread blocked in recv().
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
