"""Shared fixtures: a real Mosquitto with broker_config, a real PostgreSQL, the pipeline on top."""

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.database",
    "tests.fixtures.keys",
    "tests.fixtures.pipeline",
]
