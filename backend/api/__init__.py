"""The HTTP API (FastAPI): boxes, their compartments and events, health, readiness and metrics.

Where it sits in a message's journey: last. It reads what ingest committed; it never writes events.
"""
