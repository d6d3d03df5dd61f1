"""The operators' dashboard: one web page served by the API process, every asset bundled (works offline).

Where it sits in a message's journey: at the very end, in an operator's browser. The page reads the
same public API as any other client (boxes, alerts, KPIs and the live stream) with the API key the
operator gives it; the backend only serves its files. ``install(app)`` adds ``GET /dashboard`` and
``/dashboard/static/...`` to the API (neither is part of the OpenAPI schema).
"""

from backend.dashboard.routes import STATIC_DIR, install

__all__ = ["STATIC_DIR", "install"]
