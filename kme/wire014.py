"""ETSI GS QKD 014 v1.1.1 data formats: parsing of requests, building of responses.

Parsing is strict about what the spec defines (types, bounds, UUIDs) and lenient
about the rest: unknown fields are ignored and the body is parsed as JSON
whatever Content-Type the client sent. Every violation is an `ApiError` 400
whose message names the field.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiMapping

from kme.errors import ApiError

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
INT_RE = re.compile(r"[0-9]{1,12}")  # used with fullmatch: no sign, no newline


@dataclass(frozen=True)
class Limits:
    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    max_SAE_ID_count: int


@dataclass(frozen=True)
class KeyRequest:
    number: int
    size: int
    additional_slave_SAE_IDs: tuple[str, ...] = ()
    extension_optional: tuple[dict[str, Any], ...] = field(default=(), repr=False)


def parse_json_body(raw: bytes, *, allow_empty: bool) -> dict[str, Any]:
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError.bad_request("request body is empty; a JSON object is required")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError.bad_request("request body is not valid JSON") from None
    except RecursionError:
        raise ApiError.bad_request("request body nests too deeply") from None
    if not isinstance(data, dict):
        raise ApiError.bad_request("request body must be a JSON object")
    return data


def _json_int(data: Mapping[str, Any], name: str, default: int) -> int:
    if name not in data or data[name] is None:
        return default
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError.bad_request(f"{name} must be an integer", parameter=name)
    return value


def _query_int(query: Mapping[str, str], name: str, default: int) -> int:
    if name not in query:
        return default
    # A plain mapping keeps one value per name; aiohttp's query keeps them all. The first
    # of `number=1&number=0` is no better a guess than the last: refuse, do not pick.
    if isinstance(query, MultiMapping) and len(query.getall(name)) > 1:
        raise ApiError.bad_request(f"{name} is given more than once; give it once",
                                   parameter=name)
    raw = query[name]
    if not INT_RE.fullmatch(raw):
        raise ApiError.bad_request(f"{name} must be a positive integer", parameter=name)
    return int(raw)


def _check_bounds(number: int, size: int, limits: Limits) -> None:
    if not 1 <= number <= limits.max_key_per_request:
        raise ApiError.bad_request(
            f"number must be between 1 and max_key_per_request ({limits.max_key_per_request})",
            parameter="number",
        )
    if size % 8 or not limits.min_key_size <= size <= limits.max_key_size:
        raise ApiError.bad_request(
            f"size must be a multiple of 8 between min_key_size ({limits.min_key_size}) "
            f"and max_key_size ({limits.max_key_size})",
            parameter="size",
        )


def _object_list(data: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ApiError.bad_request(f"{name} must be an array of objects", parameter=name)
    return value


def key_request_from_query(query: Mapping[str, str], limits: Limits) -> KeyRequest:
    number = _query_int(query, "number", 1)
    size = _query_int(query, "size", limits.key_size)
    _check_bounds(number, size, limits)
    return KeyRequest(number, size)


def key_request_from_json(data: Mapping[str, Any], limits: Limits) -> KeyRequest:
    number = _json_int(data, "number", 1)
    size = _json_int(data, "size", limits.key_size)
    _check_bounds(number, size, limits)
    extra = data.get("additional_slave_SAE_IDs")
    additional: tuple[str, ...] = ()
    if extra is not None:
        if not isinstance(extra, list) or not all(isinstance(s, str) and s for s in extra):
            raise ApiError.bad_request(
                "additional_slave_SAE_IDs must be an array of SAE ID strings",
                parameter="additional_slave_SAE_IDs",
            )
        if not extra:
            raise ApiError.bad_request("additional_slave_SAE_IDs is empty; omit it instead",
                                       parameter="additional_slave_SAE_IDs")
        if len(set(extra)) != len(extra):
            raise ApiError.bad_request("additional_slave_SAE_IDs lists an SAE twice",
                                       parameter="additional_slave_SAE_IDs")
        if len(extra) > limits.max_SAE_ID_count:
            raise ApiError.bad_request(
                f"at most max_SAE_ID_count ({limits.max_SAE_ID_count}) additional slave SAEs",
                parameter="additional_slave_SAE_IDs",
            )
        additional = tuple(extra)
    mandatory = _object_list(data, "extension_mandatory")
    for ext in mandatory:
        if ext:
            names = ", ".join(sorted(ext))
            raise ApiError.bad_request(f"unsupported mandatory extension: {names}",
                                       parameter="extension_mandatory")
    optional = _object_list(data, "extension_optional")
    return KeyRequest(number, size, additional, tuple(optional))


def key_id(value: object) -> str:
    if not isinstance(value, str) or not UUID_RE.fullmatch(value.lower()):
        raise ApiError.bad_request("key_ID must be a UUID (8-4-4-4-12 hex digits)",
                                   parameter="key_ID")
    return value.lower()


def _unique(ids: list[str], limits: Limits) -> list[str]:
    if not ids:
        raise ApiError.bad_request("no key_ID given", parameter="key_ID")
    if len(set(ids)) != len(ids):
        raise ApiError.bad_request("a key_ID is listed twice", parameter="key_ID")
    if len(ids) > limits.max_key_per_request:
        raise ApiError.bad_request(
            f"at most max_key_per_request ({limits.max_key_per_request}) key_IDs per request",
            parameter="key_ID",
        )
    return ids


def key_ids_from_query(values: list[str], limits: Limits) -> list[str]:
    return _unique([key_id(v) for v in values], limits)


def key_ids_from_json(data: Mapping[str, Any], limits: Limits) -> list[str]:
    entries = data.get("key_IDs")
    if not isinstance(entries, list):
        raise ApiError.bad_request("key_IDs must be an array of {\"key_ID\": ...} objects",
                                   parameter="key_IDs")
    ids = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ApiError.bad_request("each key_IDs entry must be an object with key_ID",
                                       parameter="key_IDs")
        ids.append(key_id(entry.get("key_ID")))
    return _unique(ids, limits)


def key_container(keys: list[tuple[str, bytes]]) -> dict[str, Any]:
    return {"keys": [{"key_ID": kid, "key": base64.b64encode(k).decode()} for kid, k in keys]}
