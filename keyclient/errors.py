"""Errors of the key client, translated from requests/ssl/socket errors in one place
(`Etsi014Client._call`, `Etsi004Client._call`). Messages carry what the KME said,
never key bytes.

    KeySupplyError               no usable key could be obtained
     +-- KMEError                the KME answered with an error, or could not be reached
     |    +-- KMEBadRequest      400: the request was malformed, or a key_ID unknown
     |    |    +-- KeyStreamRefused      ETSI 004 status 5, 7, 8: asked for what cannot be
     |    |                              (KSID in use, QoS not met, Metadata too small)
     |    +-- KMEUnauthorized    401: this SAE may not have these keys
     |    +-- KMEUnavailable     503: no key on the link right now, or the peer KME is down
     |    |    +-- KMEUnreachable    no HTTP answer at all (connection, TLS, timeout)
     |    |         +-- KMEAnswerLost    sent, but the answer was lost: the KME may have
     |    |                              served it (dec_keys: keys used up, do not ask again)
     |    |    +-- KeyStreamUnavailable  ETSI 004 status 2, 3, 4, 6: no chunk now
     |    +-- KeyStreamError     base of the two ETSI 004 ones: `code` is the 004 status
     +-- KeyExhausted            a KeySession has no key left and its policy forbids going on
     +-- PeerError               the gateway's peer did not complete key agreement
"""

from __future__ import annotations


class KeySupplyError(Exception):
    pass


class KMEError(KeySupplyError):
    def __init__(self, status: int | None, message: str, url: str = "") -> None:
        self.status = status
        self.message = message
        self.url = url
        code = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"KME {url or ''} {code}: {message}".replace("  ", " "))


class KMEBadRequest(KMEError):
    pass


class KMEUnauthorized(KMEError):
    pass


class KMEUnavailable(KMEError):
    pass


class KMEUnreachable(KMEUnavailable):
    pass


class KMEAnswerLost(KMEUnreachable):
    """The request went out but no answer came back (read timeout, dropped connection).

    The KME may have served it. For dec_keys that means the keys may be delivered and
    so deleted at the KME: asking again gets 400 "unknown key_ID". Still a
    KMEUnreachable, because callers that count "no answer" outcomes treat both alike.
    """


class KeyExhausted(KeySupplyError):
    pass


class PeerError(KeySupplyError):
    pass


class KeyStreamError(KMEError):
    """An ETSI 004 call answered (HTTP 200) with a status other than success.

    `code` is the 004 status (an int, `keyclient.etsi004.StreamStatus`), `qos` the
    KME's counter-proposal (status 7), `metadata_size` the size needed (status 8).
    """

    def __init__(self, code: int, message: str, url: str = "", *,
                 qos: dict[str, object] | None = None,
                 metadata_size: int | None = None) -> None:
        self.code = code
        self.qos = qos
        self.metadata_size = metadata_size
        super().__init__(200, f"ETSI 004 status {code}: {message}", url)


class KeyStreamRefused(KeyStreamError, KMEBadRequest):
    pass


class KeyStreamUnavailable(KeyStreamError, KMEUnavailable):
    pass


def from_status(status: int, message: str, url: str) -> KMEError:
    cls = {400: KMEBadRequest, 401: KMEUnauthorized, 503: KMEUnavailable}.get(status, KMEError)
    return cls(status, message, url)
