"""Schemathesis against the API's own OpenAPI schema: generated requests, valid and invalid, to every
operation of the API served by uvicorn on the real test database, with an operator key; none may be
answered with a 5xx.

Where it sits in a message's journey: at the API's door, where anything a client sends arrives. Bounded:
a few dozen examples per operation (``MOLO_FUZZ_EXAMPLES`` raises it for a longer local run). The live
stream is left out (a request to it does not end by design); its own tests cover it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error

from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.settings import Settings
from molo.brokers import RunningBroker
from molo.provision import Credentials
from tests.fixtures.keys import Headers
from tests.fixtures.pipeline import settings_for

EXAMPLES = int(os.environ.get("MOLO_FUZZ_EXAMPLES", "25"))
# Experiment files (POST /api/v1/experiments) are TOML text: generated strings go out as text/plain does.
schemathesis.serializer.alias("application/toml", "text/plain")


@pytest.fixture(scope="module")
def api_url(database_url: str, broker: RunningBroker, credentials: Credentials) -> Iterator[str]:
    """The API served on a free port (test database, test broker)."""
    server = ApiServer(create_app(settings_for(database_url, broker, credentials))).start()
    try:
        yield server.url
    finally:
        server.stop()


# The schema as the app publishes it at /openapi.json (building the app opens no connection). It is read
# at import rather than from the running server because Schemathesis' fixture-based loader does not
# work with pytest 9 (it sets a private node attribute that pytest 9 no longer has).
schema = schemathesis.openapi.from_dict(create_app(Settings(database_url="postgresql://schema-only")).openapi())


# The server under test runs in this process (uvicorn in a thread), and its libraries use the global
# `random` (reconnect and pool jitter). Hypothesis sees the global state change while it generates a
# case and blames the strategy with this deprecation warning; here it is not the strategy's doing.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
@schema.exclude(path_regex=r"/stream$").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_with_a_server_error(case: Case[Any], api_url: str, api_keys: dict[str, Headers]) -> None:
    """Whatever Schemathesis sends to an operation (with an operator key), the answer is not a 5xx."""
    case.call_and_validate(base_url=api_url, headers=api_keys["operator"], checks=[not_a_server_error], timeout=30)
