"""Numbers no quantity can be: every one is a 422 naming its field, never a 500 (issue 9, finding 5).

These go through the real app object (`create_app`) in process: validation happens before anything
reaches a pool, so no engine is needed, and a number that slipped through would reach the endpoint, which
has no dispatcher here and would fail the test with an exception.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from api.app import create_app
from pool.model.errors import InvalidRequest
from pool.model.resources import parse_bytes, parse_count, parse_number
from pool.model.tiers import tier_from_dict
from pool.settings import Settings, from_env

DIGITS_400 = "1" + "0" * 400
DIGITS_5000 = "9" * 5001  # past CPython's 4300-digit int parsing limit
HUGE = [DIGITS_400, "-" + DIGITS_400, DIGITS_5000, "1e400", "-1e400", "1.5e308", f'"{DIGITS_400}"', '"1e400"',
        f'"{DIGITS_400}GiB"', f'"{DIGITS_5000}"', '"' + "9" * 1_000_000 + '"']


def _post_raw(bodies: list[bytes], path: str = "/v1/execute") -> list[httpx.Response]:
    app = create_app(Settings())

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # app exceptions propagate: a 500 would fail the test
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post(path, content=b, headers={"content-type": "application/json"})
                    for b in bodies]

    return anyio.run(post_all)


@pytest.mark.parametrize("field", ["cpu", "gpu", "ram", "storage"])
def test_huge_numbers_in_resources_are_422_naming_the_field(field):
    bodies = [f'{{"code": "print(1)", "resources": {{"{field}": {raw}}}}}'.encode() for raw in HUGE]
    for raw, response in zip(HUGE, _post_raw(bodies), strict=True):
        assert response.status_code == 422, (raw[:30], response.status_code, response.text[:300])
        detail = json.loads(response.text)["detail"]  # valid JSON: no bare Infinity in it
        assert detail[0]["loc"] == ["body", "resources", field], detail
        assert len(response.content) < 2_000_000


@pytest.mark.parametrize("field", ["timeout_s", "max_wait_ms"])
def test_huge_numbers_in_top_level_fields_are_422_naming_the_field(field):
    bodies = [f'{{"code": "print(1)", "{field}": {raw}}}'.encode() for raw in HUGE[:5]]
    for raw, response in zip(HUGE[:5], _post_raw(bodies), strict=True):
        assert response.status_code == 422, (raw[:30], response.status_code, response.text[:300])
        assert json.loads(response.text)["detail"][0]["loc"] == ["body", field]


def test_a_huge_integer_where_a_string_belongs_is_422():
    (response,) = _post_raw([f'{{"code": {DIGITS_5000}}}'.encode()])
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "code"]


def test_huge_sizes_in_admin_patch_are_422_not_500():
    app = create_app(Settings(admin_key="admin-key"))

    async def patch() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.patch("/v1/admin/pools/small", content=f'{{"min_idle": {DIGITS_400}}}',
                                      headers={"content-type": "application/json",
                                               "authorization": "Bearer admin-key"})

    response = anyio.run(patch)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "min_idle"]


@pytest.mark.parametrize("value", [10 ** 400, -(10 ** 400), float("inf"), DIGITS_400, "1e400",
                                   "9" * 100_000, f"{DIGITS_400}GiB", f"{DIGITS_400}.5M"],
                         ids=lambda value: repr(value)[:12])
def test_the_parsers_are_total(value):
    for parse in (lambda: parse_number("f", value, allow_zero=True), lambda: parse_bytes("f", value),
                  lambda: parse_count("f", value)):
        with pytest.raises(InvalidRequest) as info:
            parse()
        assert info.value.field == "f" and len(info.value.message) < 200


def test_huge_numbers_in_settings_and_tiers_files_name_the_setting():
    for name in ("MAX_TIMEOUT_S", "MAX_QUEUED", "MAX_BODY_BYTES", "HOST_RAM", "RATE_LIMIT_BURST"):
        with pytest.raises(InvalidRequest) as info:
            from_env({f"WARMPOOL_{name}": DIGITS_400})
        assert info.value.field == f"WARMPOOL_{name}"
    for key in ("min_idle", "max_size", "pids_limit", "max_uses", "max_age_s", "gpu", "ram"):
        with pytest.raises(InvalidRequest) as info:
            tier_from_dict({"name": "t", key: 10 ** 400}, 0)
        assert info.value.field == f"tiers[0].{key}"
