"""Test-suite wide rules: integration tests may skip on a developer machine without root or Prosody, but
under the README's test command (IPOP_REQUIRE_INTEGRATION=1, as in CI) a missing prerequisite is a failure,
so a broken install cannot turn the real-parts tests into silent skips."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("IPOP_REQUIRE_INTEGRATION") != "1":
        return
    if not any(item.get_closest_marker("integration") for item in items):
        return
    from tests.support.group import missing_prerequisites

    why = missing_prerequisites()
    if why is not None:
        raise pytest.UsageError(f"integration tests cannot run: {why}")
