"""Keyword routing of a subscriber's text to a short code (data: keywords/routes.toml).

``route(short_code, text, locale_hint)`` says what the text asks for: subscribe to the short
code's price point, stop, help, an opt-in PIN, or nothing we know (answered with HELP).
The data is checked when loaded: every error names the file and the field.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from carriers.loader import Registry, default_registry

ROUTES_FILE = Path(__file__).resolve().parent / "routes.toml"
_PIN = re.compile(r"^\d{4,8}$")
_EDGE_PUNCTUATION = ".,;:!?\"'()"


class RoutesError(ValueError):
    """routes.toml is not usable; the message names the file and the field."""


class ActionKind(StrEnum):
    SUBSCRIBE = "subscribe"
    STOP = "stop"
    HELP = "help"
    PIN = "pin"
    UNKNOWN = "unknown"  # answered with the HELP text


@dataclass(frozen=True)
class ShortCodeRoute:
    short_code: str
    price_point_id: str
    carrier_id: str
    service: str  # the name texts give the service
    support: str  # the contact HELP names


@dataclass(frozen=True)
class KeywordAction:
    kind: ActionKind
    short_code: str
    # None when the short code is not one of ours: nothing to answer from
    route: ShortCodeRoute | None
    # the language to answer in: the hint's, else the keyword's, else None (the carrier's)
    language: str | None = None
    pin: str | None = None


def fold(text: str) -> str:
    """Upper case, accents removed, no whitespace, no punctuation at either end."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(bare.upper().split()).strip(_EDGE_PUNCTUATION)


def _language(locale: str | None) -> str | None:
    return locale.replace("-", "_").split("_")[0].lower() if locale else None


@dataclass(frozen=True)
class KeywordRoutes:
    short_codes: dict[str, ShortCodeRoute]
    # folded keyword -> (kind, languages that use it, in file order)
    keywords: dict[str, tuple[ActionKind, tuple[str, ...]]]
    # the support contact of notices that name no short code of ours
    default_support: str
    # the platform's own short code, named in notices of carriers without one of ours
    default_short_code: str | None = None

    def for_price_point(self, price_point_id: str) -> ShortCodeRoute | None:
        return next((r for r in self.short_codes.values()
                     if r.price_point_id == price_point_id), None)

    def route(self, short_code: str, text: str, locale_hint: str | None = None) -> KeywordAction:
        route = self.short_codes.get(short_code.strip())
        hint = _language(locale_hint)
        folded = fold(text)
        if _PIN.match(folded):
            return KeywordAction(ActionKind.PIN, short_code, route, hint, pin=folded)
        found = self.keywords.get(folded)
        if found is None:
            # STOP or HELP followed by other words ("stop please") still counts; a subscribe
            # keyword must stand alone, or "go away" would sign someone up
            first = text.split(maxsplit=1)
            found = self.keywords.get(fold(first[0])) if first else None
            if found is not None and found[0] is ActionKind.SUBSCRIBE:
                found = None
        if found is None:
            return KeywordAction(ActionKind.UNKNOWN, short_code, route, hint)
        kind, languages = found
        # a keyword of one language only says which; "STOP" (many) leaves it to the carrier
        language = hint or (languages[0] if len(languages) == 1 else None)
        return KeywordAction(kind, short_code, route, language)


def _fail(path: Path, field: str, problem: str) -> RoutesError:
    return RoutesError(f"{path}: {field}: {problem}")


def _text(path: Path, table: dict[str, Any], field: str, name: str) -> str:
    value = table.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"{field}.{name}", "must be a non-empty string")
    return value.strip()


def _short_codes(path: Path, data: Any, registry: Registry) -> dict[str, ShortCodeRoute]:
    if not isinstance(data, dict) or not data:
        raise _fail(path, "short_codes", "must be a table of at least one short code")
    prices = {p.id: (c.id, p) for c in registry.carriers.values() for p in c.price_points}
    routes = {}
    for code, table in data.items():
        field = f"short_codes.{code}"
        if not isinstance(table, dict):
            raise _fail(path, field, "must be a table")
        unknown = set(table) - {"price_point", "service", "support"}
        if unknown:
            raise _fail(path, f"{field}.{sorted(unknown)[0]}", "unknown field")
        price_id = _text(path, table, field, "price_point")
        if price_id not in prices:
            raise _fail(path, f"{field}.price_point", f"no price point {price_id!r} in the registry")
        carrier_id, price = prices[price_id]
        if price.short_code != code:
            raise _fail(path, field, f"short code {code} does not belong to price point "
                        f"{price_id!r} (its short code is {price.short_code})")
        routes[code] = ShortCodeRoute(code, price_id, carrier_id,
                                      _text(path, table, field, "service"),
                                      _text(path, table, field, "support"))
    return routes


def _keywords(path: Path, data: Any) -> dict[str, tuple[ActionKind, tuple[str, ...]]]:
    if not isinstance(data, dict) or not data:
        raise _fail(path, "languages", "must be a table of at least one language")
    kinds = {k.value: k for k in (ActionKind.SUBSCRIBE, ActionKind.STOP, ActionKind.HELP)}
    found: dict[str, tuple[ActionKind, tuple[str, ...]]] = {}
    for language, table in data.items():
        field = f"languages.{language}"
        if not isinstance(table, dict):
            raise _fail(path, field, "must be a table")
        for name, words in table.items():
            if name not in kinds:
                raise _fail(path, f"{field}.{name}", f"unknown keyword kind (one of {sorted(kinds)})")
            if not isinstance(words, list) or not all(isinstance(w, str) and fold(w)
                                                      for w in words):
                raise _fail(path, f"{field}.{name}", "must be a list of keywords")
            for word in words:
                key = fold(word)
                if _PIN.match(key):
                    raise _fail(path, f"{field}.{name}", f"{word!r} would read as a PIN")
                kind, languages = found.get(key, (kinds[name], ()))
                if kind is not kinds[name]:
                    raise _fail(path, f"{field}.{name}",
                                f"{word!r} is already a {kind.value} keyword")
                found[key] = (kind, languages + (language,))
    if not any(kind is ActionKind.STOP for kind, _ in found.values()):
        raise _fail(path, "languages", "no stop keyword at all")
    return found


def load_routes(path: Path = ROUTES_FILE, registry: Registry | None = None) -> KeywordRoutes:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RoutesError(f"{path}: {exc}") from None
    unknown = set(data) - {"short_codes", "languages", "defaults"}
    if unknown:
        raise _fail(path, sorted(unknown)[0], "unknown table")
    defaults = data.get("defaults")
    if not isinstance(defaults, dict) or "support" not in defaults or (
            set(defaults) - {"support", "short_code"}):
        raise _fail(path, "defaults", "must be a table of support and, optionally, short_code")
    short_code = (_text(path, defaults, "defaults", "short_code")
                  if "short_code" in defaults else None)
    return KeywordRoutes(_short_codes(path, data.get("short_codes"), registry or default_registry()),
                         _keywords(path, data.get("languages")),
                         _text(path, defaults, "defaults", "support"), short_code)


@lru_cache(maxsize=1)
def default_routes() -> KeywordRoutes:
    return load_routes()


def route(short_code: str, text: str, locale_hint: str | None = None) -> KeywordAction:
    """What a text to one of our short codes asks for (routes.toml against our registry)."""
    return default_routes().route(short_code, text, locale_hint)
