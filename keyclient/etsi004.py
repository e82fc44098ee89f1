"""ETSI GS QKD 004 V2.1.1 key stream client, and a key supply for `KeySession` over it.

`Etsi004Client` speaks the KME simulator's 004 transport: JSON POSTs to
/api/v2/004/{open_connect,get_key,close} over mutual TLS (one SSL context,
one urllib3 pool, nothing read from the environment, as `Etsi014Client`).
Every 004 answer is HTTP 200 with a `status`; `_call` turns a status that is
not success into `KeyStreamRefused` (5, 7, 8) or `KeyStreamUnavailable`
(2, 3, 4, 6), and HTTP errors into the usual `KMEError` classes. Calls are not
retried: a GET_KEY whose answer was lost has handed its chunk out already.

`StreamKeySupply` offers the two calls a `KeySession` makes of its key source
(`get_keys`, `get_keys_with_ids`) over one open stream. The source SAE's side
reads the next chunks and names each `<Key_stream_ID>:<index>`; the
destination's side reads the index such a key_ID names. So a gateway pair can
run its master/slave agreement on a 004 stream (the master is the stream's
source) exactly as on ETSI 014.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError, SSLError

from keyclient.errors import (
    KeyStreamError,
    KeyStreamRefused,
    KeyStreamUnavailable,
    KMEBadRequest,
    KMEError,
    KMEUnreachable,
    from_status,
)
from keyclient.etsi014 import Key, _reason
from qgw.secret import Secret
from qgw.tls import TlsFiles, client_context

PREFIX = "/api/v2/004"
MAX_HELD = 256  # chunks a StreamKeySupply read for a request that then failed


class StreamStatus(IntEnum):
    """ETSI GS QKD 004 V2.1.1 status codes (the same as `kme.api004.Status`)."""

    SUCCESSFUL = 0
    PEER_NOT_CONNECTED = 1
    GET_KEY_INSUFFICIENT_KEY = 2
    GET_KEY_PEER_NOT_CONNECTED = 3
    NO_QKD_CONNECTION = 4
    KSID_IN_USE = 5
    TIMEOUT_ERROR = 6
    QOS_NOT_MET = 7
    METADATA_SIZE_INSUFFICIENT = 8


REFUSED = {StreamStatus.KSID_IN_USE, StreamStatus.QOS_NOT_MET,
           StreamStatus.METADATA_SIZE_INSUFFICIENT}


@dataclass(frozen=True)
class Qos:
    """The spec's QoS; a None field is left to the KME (its answer fills it in)."""

    Key_chunk_size: int | None = None
    Max_bps: int | None = None
    Min_bps: int | None = None
    Jitter: int | None = None
    Priority: int | None = None
    Timeout: int | None = None
    TTL: int | None = None
    Metadata_mimetype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: object) -> Qos:
        if not isinstance(data, dict):
            return cls()
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class StreamInfo:
    """An open stream: OPEN_CONNECT's answer (status 0 or 1)."""

    key_stream_id: str
    qos: Qos
    status: StreamStatus

    @property
    def peer_connected(self) -> bool:
        return self.status is StreamStatus.SUCCESSFUL


@dataclass(frozen=True)
class Chunk:
    """One GET_KEY answer: the key at `index` and the KME's metadata about it."""

    index: int
    secret: Secret = field(repr=True)
    metadata: str | None = None


class Etsi004Client:
    """Client of one KME for one SAE (the one named by the client certificate)."""

    def __init__(self, url: str, tls: TlsFiles, *, timeout_s: float = 5.0,
                 pool_size: int = 4) -> None:
        self.url = url.rstrip("/")
        parsed = urllib3.util.parse_url(self.url)
        if parsed.scheme != "https" or not parsed.host:
            raise ValueError(f"KME URL must be https://host[:port], not {url!r}")
        self._prefix = (parsed.path or "") + PREFIX
        self.timeout_s = timeout_s
        self._timeouts_ms: dict[str, int] = {}
        self._pool = urllib3.HTTPSConnectionPool(
            parsed.host, parsed.port or 443, ssl_context=client_context(tls),
            maxsize=pool_size, block=False, retries=False,
            timeout=urllib3.Timeout(connect=min(timeout_s, 3.0), read=timeout_s),
        )

    def __enter__(self) -> Etsi004Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (CLOSE of a stream is `close_stream`)."""
        self._pool.close()

    # -- the three ETSI 004 calls -------------------------------------------------------

    def open_connect(self, source: str, destination: str, qos: Qos | None = None,
                     key_stream_id: str | None = None) -> StreamInfo:
        """Open a stream (`key_stream_id` None: the KME picks one, at the source only)."""
        body = {"source": source, "destination": destination,
                "QoS": (qos or Qos()).to_json(), "Key_stream_ID": key_stream_id}
        data = self._call("open_connect", body)
        ksid = data.get("Key_stream_ID")
        if not isinstance(ksid, str):
            raise KMEError(200, "OPEN_CONNECT answer lacks Key_stream_ID", self.url)
        info = StreamInfo(ksid.lower(), Qos.from_json(data.get("QoS")),
                          StreamStatus(data["status"]))
        if isinstance(info.qos.Timeout, int):
            self._timeouts_ms[ksid] = info.qos.Timeout
        return info

    def get_key(self, key_stream_id: str, index: int | None = None, *,
                metadata_size: int | None = None) -> Chunk:
        """The chunk at `index` (None: the one after the last this SAE read)."""
        body: dict[str, Any] = {"Key_stream_ID": key_stream_id}
        if index is not None:
            body["index"] = index
        if metadata_size is not None:
            body["Metadata"] = {"Metadata_size": metadata_size}
        wait_s = self._timeouts_ms.get(key_stream_id.lower(), 0) / 1000
        data = self._call("get_key", body, extra_s=wait_s)
        try:
            meta = data.get("Metadata")
            buffer = meta.get("Metadata_buffer") if isinstance(meta, dict) else None
            return Chunk(int(data["index"]),
                         Secret(base64.b64decode(data["key_buffer"], validate=True)),
                         buffer if isinstance(buffer, str) else None)
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise KMEError(200, "malformed GET_KEY answer", self.url) from None

    def close_stream(self, key_stream_id: str) -> None:
        """CLOSE: this SAE is done with the stream."""
        self._call("close", {"Key_stream_ID": key_stream_id})
        self._timeouts_ms.pop(key_stream_id.lower(), None)

    # -- plumbing -----------------------------------------------------------------------

    def _call(self, call: str, body: dict[str, Any], extra_s: float = 0.0) -> dict[str, Any]:
        """One 004 call; every failure, and every status but 0 and 1, becomes a KMEError."""
        timeout = urllib3.Timeout(connect=min(self.timeout_s, 3.0),
                                  read=self.timeout_s + extra_s)
        try:
            resp = self._pool.urlopen("POST", f"{self._prefix}/{call}",
                                      body=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"},
                                      timeout=timeout)
        except SSLError as exc:
            raise KMEUnreachable(None, f"TLS handshake failed: {_reason(exc)}",
                                 self.url) from None
        except (HTTPError, OSError) as exc:
            raise KMEUnreachable(None, f"cannot reach the KME: {_reason(exc)}",
                                 self.url) from None
        raw = resp.data
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            data = None
        if resp.status != 200 or not isinstance(data, dict):
            message = data.get("message") if isinstance(data, dict) else None
            if resp.status == 200:
                raise KMEError(200, "answer is not a JSON object", self.url)
            raise from_status(resp.status,
                              str(message or f"non-JSON answer ({len(raw)} bytes)"), self.url)
        code = data.get("status")
        try:
            if isinstance(code, bool) or not isinstance(code, int):
                raise ValueError(code)
            status = StreamStatus(code)
        except ValueError:
            raise KMEError(200, f"unknown ETSI 004 status {data.get('status')!r}",
                           self.url) from None
        if status in (StreamStatus.SUCCESSFUL, StreamStatus.PEER_NOT_CONNECTED):
            return data
        raise _status_error(status, data, self.url)


def _status_error(status: StreamStatus, data: dict[str, Any], url: str) -> KeyStreamError:
    message = str(data.get("message") or status.name.lower().replace("_", " "))
    meta = data.get("Metadata")
    size = meta.get("Metadata_size") if isinstance(meta, dict) else None
    qos = data.get("QoS") if status is StreamStatus.QOS_NOT_MET else None
    cls = KeyStreamRefused if status in REFUSED else KeyStreamUnavailable
    return cls(int(status), message, url, qos=qos if isinstance(qos, dict) else None,
               metadata_size=size if isinstance(size, int) else None)


class StreamKeySupply:
    """A `KeySupply` over one open 004 stream between `local_sae` and `peer_sae`.

    The stream's source SAE is the master of a `KeySession`: `get_keys` reads the
    next chunks. The destination is the slave: `get_keys_with_ids` reads the
    chunks the key_IDs name. Chunks read for a call that then failed are kept
    (at most MAX_HELD) and handed out by the next call naming them.
    """

    def __init__(self, client: Etsi004Client, key_stream_id: str, *, peer_sae: str,
                 chunk_bytes: int) -> None:
        self.client = client
        self.key_stream_id = key_stream_id.lower()
        self.peer_sae = peer_sae
        self.chunk_bytes = chunk_bytes
        self._held: OrderedDict[str, Key] = OrderedDict()

    @classmethod
    def open(cls, client: Etsi004Client, *, source: str, destination: str, local_sae: str,
             qos: Qos | None = None, key_stream_id: str | None = None) -> StreamKeySupply:
        """OPEN_CONNECT as `local_sae` (the source or the destination) and wrap the stream."""
        info = client.open_connect(source, destination, qos, key_stream_id)
        chunk = info.qos.Key_chunk_size
        if not isinstance(chunk, int) or chunk <= 0:
            raise KMEError(200, "OPEN_CONNECT answer lacks QoS.Key_chunk_size", client.url)
        peer = destination if local_sae == source else source
        return cls(client, info.key_stream_id, peer_sae=peer, chunk_bytes=chunk)

    def key_id(self, index: int) -> str:
        return f"{self.key_stream_id}:{index}"

    def _index(self, key_id: str) -> int:
        ksid, _, index = key_id.lower().rpartition(":")
        if ksid != self.key_stream_id or not index.isdigit():
            raise KMEBadRequest(400, f"key_ID {key_id!r} names no chunk of stream "
                                     f"{self.key_stream_id}", self.client.url)
        return int(index)

    def _check(self, peer_sae: str, size: int | None = None) -> None:
        if peer_sae != self.peer_sae:
            raise KMEBadRequest(400, f"this stream joins {self.peer_sae}, not {peer_sae}",
                                self.client.url)
        if size is not None and size != self.chunk_bytes * 8:
            raise KMEBadRequest(400, f"stream chunks are {self.chunk_bytes * 8} bits, "
                                     f"not {size}", self.client.url)

    def _read(self, index: int | None) -> Key:
        chunk = self.client.get_key(self.key_stream_id, index)
        return Key(self.key_id(chunk.index), chunk.secret)

    def _hold(self, key: Key) -> None:
        self._held[key.key_id] = key
        while len(self._held) > MAX_HELD:
            _, old = self._held.popitem(last=False)
            old.secret.wipe()

    def get_keys(self, slave_sae_id: str, number: int = 1, size: int | None = None) -> list[Key]:
        """Master (source) side: the next `number` chunks of the stream."""
        self._check(slave_sae_id, size)
        keys = [self._held.popitem(last=False)[1] for _ in range(min(number, len(self._held)))]
        try:
            while len(keys) < number:
                keys.append(self._read(None))
        except KMEError:
            for k in keys:
                self._hold(k)
            raise
        return keys

    def get_keys_with_ids(self, master_sae_id: str, key_ids: Sequence[str]) -> list[Key]:
        """Slave (destination) side: the chunks the master's key_IDs name."""
        self._check(master_sae_id)
        indices = [self._index(k) for k in key_ids]
        for kid, index in zip(key_ids, indices, strict=True):
            if kid.lower() not in self._held:
                self._hold(self._read(index))
        return [self._held.pop(k.lower()) for k in key_ids]

    def close(self) -> None:
        """CLOSE the stream and wipe chunks held back."""
        for k in self._held.values():
            k.secret.wipe()
        self._held.clear()
        self.client.close_stream(self.key_stream_id)


class SessionStreamSupply:
    """The `KeySupply` of one gateway of a pair over ETSI 004, streams opened as needed.

    The master (the source SAE) opens a stream to the peer on its first key and
    again whenever its KME has forgotten the stream (a restart). The slave
    follows the master: the key_IDs it is offered name the stream
    (`<Key_stream_ID>:<index>`), and it opens the destination side of each new
    one. No Key_stream_ID has to be configured on either side.
    """

    def __init__(self, client: Etsi004Client, *, local_sae: str, peer_sae: str,
                 qos: Qos | None = None) -> None:
        self.client = client
        self.local_sae = local_sae
        self.peer_sae = peer_sae
        self.qos = qos
        self._stream: StreamKeySupply | None = None

    @property
    def key_stream_id(self) -> str | None:
        return None if self._stream is None else self._stream.key_stream_id

    def get_keys(self, slave_sae_id: str, number: int = 1, size: int | None = None) -> list[Key]:
        if self._stream is None:
            self._stream = StreamKeySupply.open(self.client, source=self.local_sae,
                                                destination=self.peer_sae,
                                                local_sae=self.local_sae, qos=self.qos)
        try:
            return self._stream.get_keys(slave_sae_id, number, size)
        except KMEBadRequest:
            self._stream = None   # unknown to the KME now: the next call opens a new one
            raise

    def get_keys_with_ids(self, master_sae_id: str, key_ids: Sequence[str]) -> list[Key]:
        ksids = {k.lower().rpartition(":")[0] for k in key_ids}
        if len(ksids) != 1:
            raise KMEBadRequest(400, "key_IDs of one request must name one ETSI 004 stream",
                                self.client.url)
        (ksid,) = ksids
        if self._stream is None or self._stream.key_stream_id != ksid:
            self._stream = self._follow(master_sae_id, ksid)
        return self._stream.get_keys_with_ids(master_sae_id, key_ids)

    def _follow(self, master_sae_id: str, ksid: str) -> StreamKeySupply:
        try:
            return StreamKeySupply.open(self.client, source=master_sae_id,
                                        destination=self.local_sae, local_sae=self.local_sae,
                                        qos=self.qos, key_stream_id=ksid)
        except KeyStreamRefused as exc:
            if exc.code != StreamStatus.KSID_IN_USE:
                raise
            # Opened at our KME by an earlier run of this gateway: its chunks are still
            # ours (the KME checks the SAE on every GET_KEY); a destination never needs
            # the chunk size.
            return StreamKeySupply(self.client, ksid, peer_sae=master_sae_id, chunk_bytes=1)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(KMEError):  # the KME may be gone
                stream.close()
        self.client.close()
