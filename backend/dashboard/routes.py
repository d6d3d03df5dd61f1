"""Serving the dashboard: the page at ``/dashboard`` and its files under ``/dashboard/static/``.

The page is static; everything it shows comes from the API at run time. A strict Content Security
Policy keeps it to this origin, so a page that tried to load anything from the internet (a CDN, map
tiles) would fail in every browser, not only offline.
"""

from __future__ import annotations

from pathlib import Path

# Starlette's FileResponse opens files with anyio.open_file, which anyio imports lazily on first use.
# Import it now, at start-up: otherwise the first file served imports (and compiles) a module on the
# server's thread, which under pytest's import hook has failed with CPython 3.11's "AST constructor
# recursion depth mismatch" while another thread was compiling too.
from anyio import open_file as _preload_open_file  # noqa: F401
from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

#: The page, its script, style and the plan data (the Limfjord line), shipped inside the package.
STATIC_DIR = Path(__file__).parent / "static"

#: Only this origin: scripts, styles, data and the API; no inline script, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

#: The experiments page shows the runner's HTML report (its own inline styles and data: images) in a
#: sandboxed frame from a blob: URL the page makes; such a document takes the policy of the page that
#: made it, so this page's policy also allows inline styles and blob: frames (still no inline script).
EXPERIMENTS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-src blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/dashboard")
async def dashboard() -> HTMLResponse:
    """The dashboard page (the API key comes from the operator or the URL fragment, never the server)."""
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers=_HEADERS)


@router.get("/dashboard/experiments")
async def experiments() -> HTMLResponse:
    """The experiments page: jobs with their progress, submitting a file, the reports."""
    return HTMLResponse(
        (STATIC_DIR / "experiments.html").read_text(encoding="utf-8"),
        headers={**_HEADERS, "Content-Security-Policy": EXPERIMENTS_CSP},
    )


@router.get("/dashboard/")
async def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=308)


class _StaticFiles(StaticFiles):
    """StaticFiles with the dashboard's security headers on every file."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``: ``/dashboard`` and ``/dashboard/static/...``."""
    app.include_router(router)
    app.mount("/dashboard/static", _StaticFiles(directory=STATIC_DIR), name="dashboard-static")
