"""The providers a model gateway forwards to, from MODEL_PROVIDERS_FILE (YAML):

    providers:
      - name: openai-main
        api: openai                  # openai | anthropic | echo
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY  # the variable that holds the provider's key
        models: ["gpt-*", "o4-*"]    # exact names or patterns ending in *; longest wins
        max_output_tokens: 4096      # the output cap when a request names none
        timeouts: {connect: 5s, first_byte: 60s, between_events: 60s}

A model is routed to the provider with the longest matching entry (an exact name beats
any pattern). The key is read from the environment once, at start; it is kept out of
`repr` so that no log line can carry it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from services.common.settings import parse_duration

APIS = ("openai", "anthropic", "echo")


class ProvidersError(ValueError):
    """The providers file is wrong: the message names the entry and the field."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 60.0
    between_events: float = 60.0


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    api: str
    base_url: str = ""
    models: tuple[str, ...] = ()
    max_output_tokens: int = 4096
    timeouts: Timeouts = Timeouts()
    api_key: str = field(default="", repr=False)  # never in a log line or an answer

    def matches(self, model: str) -> int:
        """How well `model` matches: the length of the entry that matched, -1 for none
        (an exact name scores above every pattern)."""
        best = -1
        for entry in self.models:
            if entry == model:
                return 10_000
            if entry.endswith("*") and model.startswith(entry[:-1]):
                best = max(best, len(entry) - 1)
        return best


class Catalog:
    """Model name → provider."""

    def __init__(self, providers: list[Provider]) -> None:
        self.providers = providers
        self._routes: dict[str, Provider | None] = {}

    def route(self, model: str) -> Provider | None:
        if model in self._routes:
            return self._routes[model]
        scored = [(p.matches(model), p) for p in self.providers]
        best = max(scored, key=lambda item: item[0], default=(-1, None))
        found = best[1] if best[0] >= 0 else None
        if len(self._routes) < 10_000:  # bounded: model names come from callers
            self._routes[model] = found
        return found

    def listed(self) -> list[tuple[str, Provider]]:
        """The exact model names configured (patterns cannot be listed), in file order."""
        return [(m, p) for p in self.providers for m in p.models if not m.endswith("*")]


def load(path: str, env: Mapping[str, str] | None = None) -> Catalog:
    """The providers of the YAML file at `path` ('' for none: no model is served)."""
    if not path:
        return Catalog([])
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise ProvidersError(f"cannot read MODEL_PROVIDERS_FILE={path!r}: {exc}") from None
    entries = data.get("providers") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ProvidersError(f"{path}: expected a top-level 'providers:' list")
    env = os.environ if env is None else env
    providers = [_provider(entry, i, env) for i, entry in enumerate(entries)]
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        raise ProvidersError(f"{path}: provider names must be unique, got {names}")
    return Catalog(providers)


def _provider(entry: Any, i: int, env: Mapping[str, str]) -> Provider:
    where = f"providers[{i}]"
    if not isinstance(entry, dict):
        raise ProvidersError(f"{where}: expected a mapping")
    name = _text(entry, "name", where)
    api = _text(entry, "api", where)
    if api not in APIS:
        raise ProvidersError(f"{where}.api: must be one of {list(APIS)}, got {api!r}")
    base_url = str(entry.get("base_url") or "").rstrip("/")
    if api != "echo" and not base_url.startswith(("http://", "https://")):
        raise ProvidersError(f"{where}.base_url: an http(s) URL is required for api {api}")
    return Provider(
        name=name, api=api, base_url=base_url, models=_models(entry, where),
        max_output_tokens=_cap(entry, where),
        timeouts=_timeouts(entry.get("timeouts") or {}, where), api_key=_key(entry, where, env),
    )  # fmt: skip


def _models(entry: dict[str, Any], where: str) -> tuple[str, ...]:
    models = entry.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise ProvidersError(f"{where}.models: a non-empty list of model names or patterns")
    return tuple(models)


def _key(entry: dict[str, Any], where: str, env: Mapping[str, str]) -> str:
    if not entry.get("api_key_env"):
        return ""
    variable = str(entry["api_key_env"])
    key = env.get(variable, "")
    if not key:
        raise ProvidersError(f"{where}.api_key_env: the variable {variable} is not set")
    return key


def _cap(entry: dict[str, Any], where: str) -> int:
    cap = entry.get("max_output_tokens", 4096)
    if not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= 1_000_000:
        raise ProvidersError(f"{where}.max_output_tokens: an integer from 1 to 1,000,000")
    return cap


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ProvidersError(f"{where}.{key}: required (a non-empty string)")
    return value


def _timeouts(given: Any, where: str) -> Timeouts:
    if not isinstance(given, dict):
        raise ProvidersError(f"{where}.timeouts: expected a mapping")
    values: dict[str, float] = {}
    for name in ("connect", "first_byte", "between_events"):
        if name in given:
            try:
                values[name] = parse_duration(str(given[name]))
            except ValueError:
                raise ProvidersError(
                    f"{where}.timeouts.{name}: not a duration (like 5s, 2m)"
                ) from None
            if not 0 < values[name] <= 3600:
                raise ProvidersError(f"{where}.timeouts.{name}: between 0 and 1h")
    unknown = set(given) - {"connect", "first_byte", "between_events"}
    if unknown:
        raise ProvidersError(f"{where}.timeouts: unknown {sorted(unknown)}")
    return Timeouts(**values)
