"""CAMARA's own Gherkin test definitions (shared/standards/camara/Test_definitions) run with
pytest-bdd against the CAMARA simulator over real sockets. Scenarios that cannot apply are in
not_applicable.toml with a reason each; the count is printed at the end of the run."""

from __future__ import annotations

import asyncio
import threading
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

FEATURES = Path(__file__).parents[2].parent / "shared/standards/camara/Test_definitions"
NOT_APPLICABLE: dict[str, str] = tomllib.loads(
    (Path(__file__).parent / "not_applicable.toml").read_text())["scenarios"]

if not FEATURES.is_dir() or not list(FEATURES.glob("*.feature")):
    raise RuntimeError(f"CAMARA test definitions missing: {FEATURES} (shared/ must lie beside "
                       "the repository)")

from pytest_bdd import scenarios  # noqa: E402

from tests.camara_bdd.steps import *  # noqa: E402,F403

scenarios(str(FEATURES))


@pytest.fixture(autouse=True)
def _skip_not_applicable(request: pytest.FixtureRequest) -> None:
    for marker in request.node.iter_markers():
        reason = NOT_APPLICABLE.get(marker.name)
        if reason is not None:
            pytest.skip(f"not applicable: {reason}")


__all__ = ["Decimal", "asyncio", "threading"]
