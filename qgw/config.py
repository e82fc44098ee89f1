"""Load a YAML file into a pydantic model: unknown keys refused, errors name file and field.

Containers override fields through the environment: with prefix `QGW_KME`,
`QGW_KME__LISTEN__PORT=8443` sets `listen.port` (field names match without
regard to case, so `QGW_KME__LIMITS__MAX_SAE_ID_COUNT` reaches
`limits.max_SAE_ID_count`). Values are parsed as YAML scalars, so numbers and
booleans keep their types.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from qgw.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _field_name(model: type[BaseModel] | None, part: str) -> tuple[str, type[BaseModel] | None]:
    """The field a variable-name part means (case-insensitive), and its model if nested."""
    if model is None:
        return part, None  # inside a mapping: keys are taken as written
    for name, info in model.model_fields.items():
        if name.lower() == part.lower():
            sub = None
            for candidate in (info.annotation, *getattr(info.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    sub = candidate
            return name, sub
    return part.lower(), None


def _apply_env(data: dict[str, Any], prefix: str, env: Mapping[str, str],
               model: type[BaseModel]) -> list[str]:
    applied = []
    head = prefix + "__"
    for name, raw in sorted(env.items()):
        if not name.startswith(head):
            continue
        parts = [p for p in name[len(head):].split("__") if p]
        if not parts:
            continue
        path: list[str] = []
        current: type[BaseModel] | None = model
        for part in parts:
            field, current = _field_name(current, part)
            path.append(field)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(name, ".".join(path),
                                  "environment override crosses a non-mapping")
            node = nxt
        node[path[-1]] = yaml.safe_load(raw)
        applied.append(name)
    return applied


def load_model(path: Path, model: type[M], *, env_prefix: str | None = None,
               env: Mapping[str, str] | None = None) -> M:
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(source, None, "file does not exist") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, f"not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, None, "must be a YAML mapping")
    if env_prefix:
        _apply_env(data, env_prefix, os.environ if env is None else env, model)
    return validate(source, data, model, base=Path(path).parent)


def validate(source: str, data: dict[str, Any], model: type[M], base: Path | None = None) -> M:
    try:
        return model.model_validate(data, context={"base": base})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        more = len(exc.errors()) - 1
        if more:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(source, field, msg) from None
