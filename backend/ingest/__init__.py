"""Ingest: MQTT shared subscription -> validation -> batched, idempotent writes -> broker ack.

Where it sits in a message's journey: right after the broker. ``mqtt`` receives (never blocking
paho's network thread), ``writer`` validates and commits a batch in one transaction, and ``worker``
acknowledges each message to the broker only after its batch has committed. Several workers share
the load through the shared subscription ``$share/molo-ingest/...``.
"""
