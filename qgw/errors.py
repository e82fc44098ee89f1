"""Errors shared by every component: configuration and environment problems.

    QgwError
     +-- ConfigError      a config file or value is wrong; names the file and field
     +-- PkiError         certificates or keys missing, unreadable or too open

Package-specific trees hang off their own roots: `keyclient.errors.KeySupplyError`,
`kme.errors.ApiError`.
"""

from __future__ import annotations


class QgwError(Exception):
    """Root of every error this product raises on purpose."""


class ConfigError(QgwError):
    def __init__(self, source: str, field: str | None, message: str) -> None:
        self.source = source
        self.field = field
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")


class PkiError(QgwError):
    pass
