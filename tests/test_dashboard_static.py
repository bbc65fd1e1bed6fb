"""The dashboard's files as served (no engine, no browser): open without a key, nothing from outside the
machine, a Content-Security-Policy that allows this origin only, and no other file reachable."""

from __future__ import annotations

import re

import httpx
import pytest

from api.app import create_app
from api.dashboard import STATIC
from pool.settings import from_env

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client():
    settings = from_env({"WARMPOOL_ADMIN_KEY": "k", "WARMPOOL_API_KEYS": "a"})
    # No lifespan: the dashboard's routes need no dispatcher, and one that touched it would fail here.
    app = create_app(settings, lambda s: None)  # type: ignore[arg-type,return-value]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


async def test_the_page_and_its_files_need_no_key(client):
    page = await client.get("/admin")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="admin-key"' in page.text and 'src="/admin/static/dashboard.js"' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    script = await client.get("/admin/static/dashboard.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "/v1/admin/pools" in script.text
    style = await client.get("/admin/static/dashboard.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")


async def test_only_the_dashboard_files_are_reachable(client):
    for path in ("/admin/static/dashboard.html.bak", "/admin/static/..%2Fdashboard.py", "/admin/static/",
                 "/admin/static/__init__.py"):
        assert (await client.get(path)).status_code == 404, path
    # The data stays behind the admin key: the page's own requests go to the admin API.
    assert (await client.get("/v1/admin/pools")).status_code == 401


def test_nothing_is_fetched_from_outside_the_machine():
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):
        text = (STATIC / name).read_text()
        # The one absolute URL allowed is the SVG namespace, a name that is never fetched.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{name} refers to {urls}"
        assert "@import" not in text and "url(" not in text, name
