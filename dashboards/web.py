"""Serves the web UIs (the ICU board) as static files: `/` is the board, `/static/...` its assets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

if TYPE_CHECKING:
    from api.app import ApiContext

STATIC = Path(__file__).parent / "static"

# The board holds a bearer token and patient data: no caching by proxies, no framing by other origins.
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
}


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Mount the board: `/` answers index.html, `/static` the files beside it."""

    @app.get("/", include_in_schema=False)
    async def board() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The OpenAPI explorer, from the vendored Swagger UI (no internet needed)."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Vigil API",
            swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/vendor/swagger-ui/favicon-32x32.png",
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
