"""Errors the KME answers with. Every one becomes an ETSI Error body
`{"message": ..., "details": [...]}` in one place (`kme.server.error_middleware`).

    ApiError(status, message, details)
      400 bad_request   malformed request, unknown SAE or key_ID
      401 unauthorized  the authenticated caller is not the one the keys belong to
      503 no_key        the link has not enough key; or the peer KME is unreachable

Messages never contain key material.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.details:
            out["details"] = self.details
        return out

    @classmethod
    def bad_request(cls, message: str, **details: Any) -> ApiError:
        return cls(400, message, [details] if details else None)

    @classmethod
    def unauthorized(cls, message: str) -> ApiError:
        return cls(401, message)

    @classmethod
    def no_key(cls, available_bytes: int, wanted_bytes: int) -> ApiError:
        return cls(503, "not enough key material on the QKD link",
                   [{"available_bits": max(0, available_bytes) * 8,
                     "requested_bits": wanted_bytes * 8}])

    @classmethod
    def unavailable(cls, message: str) -> ApiError:
        return cls(503, message)
