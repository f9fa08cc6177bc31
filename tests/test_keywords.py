"""Keyword routing (keywords/routes.toml) and the checks made when it is loaded."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from keywords.routes import ROUTES_FILE, ActionKind, RoutesError, fold, load_routes, route
from models.inbound_sms import dedup_key


@pytest.mark.parametrize(("text", "kind"), [
    ("JOIN", ActionKind.SUBSCRIBE), (" play ", ActionKind.SUBSCRIBE), ("Go", ActionKind.SUBSCRIBE),
    ("abbona", ActionKind.SUBSCRIBE), ("Jouer!", ActionKind.SUBSCRIBE),
    ("STOP", ActionKind.STOP), ("stop   all", ActionKind.STOP), ("StopAll", ActionKind.STOP),
    ("end", ActionKind.STOP), ("Unsubscribe.", ActionKind.STOP), ("quit", ActionKind.STOP),
    ("annulla", ActionKind.STOP), ("arrêt", ActionKind.STOP), ("ARRET", ActionKind.STOP),
    ("sair", ActionKind.STOP), ("Baja", ActionKind.STOP), ("stop please", ActionKind.STOP),
    ("help", ActionKind.HELP), ("Info", ActionKind.HELP), ("aide", ActionKind.HELP),
    ("AIUTO", ActionKind.HELP), ("ayuda me", ActionKind.HELP),
    ("1234", ActionKind.PIN), (" 12345678 ", ActionKind.PIN),
    ("123", ActionKind.UNKNOWN), ("123456789", ActionKind.UNKNOWN),
    ("hello", ActionKind.UNKNOWN), ("", ActionKind.UNKNOWN),
    # a subscribe keyword must stand alone: "go away" never signs anyone up
    ("go away", ActionKind.UNKNOWN), ("join?? no", ActionKind.UNKNOWN),
])
def test_texts_route_to_their_action(text: str, kind: ActionKind) -> None:
    action = route("84422", text, None)
    assert action.kind is kind
    assert action.route is not None and action.route.price_point_id == "gb-mersey-pass-weekly"
    assert action.route.carrier_id == "gb-mersey"
    assert action.pin == (text.strip() if kind is ActionKind.PIN else None)


def test_the_short_code_decides_the_price_point() -> None:
    demo = route("84150", "JOIN", None).route
    assert demo is not None and demo.price_point_id == "gb-mersey-pass-demo"
    unknown = route("99999", "JOIN", None)
    assert unknown.kind is ActionKind.SUBSCRIBE and unknown.route is None


def test_the_answer_language() -> None:
    assert route("84422", "arrêt", None).language == "fr"  # a French-only keyword
    assert route("84422", "STOP", None).language is None  # many languages: the carrier's
    assert route("84422", "STOP", "it_IT").language == "it"  # the subscriber's wins
    assert route("84422", "hello", "pt-BR").language == "pt"


def test_folding() -> None:
    assert fold("  Ärrêt  Tout. ") == "ARRETTOUT"
    assert fold("Kündigen") == "KUNDIGEN"


def test_a_redelivered_text_keeps_its_key() -> None:
    morning = datetime(2026, 3, 1, 8, tzinfo=UTC)
    evening = datetime(2026, 3, 1, 20, tzinfo=UTC)
    assert dedup_key("abc", "+447100000001", "84422", "JOIN", morning) == "id:abc"
    by_hash = dedup_key(None, "+447100000001", "84422", "JOIN", morning)
    assert by_hash == dedup_key(None, "+447100000001", "84422", "JOIN", evening)
    assert by_hash != dedup_key(None, "+447100000001", "84422", "STOP", morning)
    assert by_hash != dedup_key(None, "+447100000001", "84422", "JOIN",
                                datetime(2026, 3, 2, 8, tzinfo=UTC))


# -- loading -------------------------------------------------------------------------------------

GOOD = ROUTES_FILE.read_text(encoding="utf-8")


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(text, encoding="utf-8")
    load_routes(path)


@pytest.mark.parametrize(("change", "field", "problem"), [
    (('price_point = "gb-mersey-pass-weekly"', 'price_point = "gb-mersey-pass-yearly"'),
     "short_codes.84422.price_point", "no price point"),
    (('price_point = "gb-mersey-pass-weekly"', 'price_point = "gb-mersey-pass-demo"'),
     "short_codes.84422", "does not belong to price point"),
    (('service = "Game Pass"\nsupport = "0800 555 0100"\n\n[short_codes."84150"]',
      'service = "Game Pass"\nsupport = "0800 555 0100"\ncolour = "red"\n\n'
      '[short_codes."84150"]'), "short_codes.84422.colour", "unknown field"),
    (('service = "Game Pass"\nsupport = "0800 555 0100"\n\n[short_codes."84150"]',
      'service = ""\nsupport = "0800 555 0100"\n\n[short_codes."84150"]'),
     "short_codes.84422.service", "non-empty"),
    (('help = ["AIDE", "INFO"]', 'help = ["AIDE", "INFO", "JOUER"]'),
     "languages.fr.help", "already a subscribe keyword"),
    (('help = ["AIDE", "INFO"]', 'help = ["AIDE", "1234"]'), "languages.fr.help", "PIN"),
    (('help = ["AIDE", "INFO"]', 'hello = ["SALUT"]'), "languages.fr.hello",
     "unknown keyword kind"),
    (('[defaults]\nsupport = "0800 555 0100"', '[defaults]'), "defaults", "support"),
])
def test_a_bad_routes_file_is_refused_naming_file_and_field(
        tmp_path: Path, change: tuple[str, str], field: str, problem: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(RoutesError) as refused:
        _load(tmp_path, GOOD.replace(old, new, 1))
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'routes.toml'}: {field}:"), message
    assert problem in message


def test_the_shipped_routes_cover_every_premium_short_code() -> None:
    """Every short code a subscriber is charged from can be answered (HELP, STOP)."""
    from carriers.loader import default_registry

    routes = load_routes()
    for carrier in default_registry().carriers.values():
        for price in carrier.price_points:
            if price.short_code:
                assert routes.short_codes[price.short_code].price_point_id == price.id
