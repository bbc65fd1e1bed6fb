"""The operator dashboard: `GET /admin` and its script and style, static files shipped in the package.

The page holds no data, so it is served without a key; it asks the operator for the admin key and then
reads and changes the pools through the admin API (`/v1/admin/*`), as any other admin client would.
Nothing is fetched from outside this server (no CDN, no build step), and the Content-Security-Policy
says so to the browser: scripts, styles and requests to this origin only, no inline script, no framing.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC = resources.files("api") / "static"
FILES = {  # what may be served, by name: nothing else under static/ is reachable
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/admin")
async def dashboard() -> Response:
    """The page; it asks for the admin key before it shows anything."""
    return _file("dashboard.html", "text/html; charset=utf-8")


@router.get("/admin/static/{name}")
async def dashboard_asset(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail="no such file")
    return _file(name, media_type)
