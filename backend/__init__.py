"""The backend: ingest from the broker, storage in PostgreSQL/TimescaleDB, and the HTTP API.

Where it sits in a message's journey: after the broker. ``backend.ingest`` takes messages from the
MQTT shared subscription and commits them; ``backend.api`` serves what is stored. Both depend on
``contract`` and never on ``firmware_stub`` or ``simulator``.
"""
