"""The OpenAPI document is one a client can be generated from: stable operation ids, tags, bearer security on
the routes that need a key, a schema for every error answer (Retry-After on 429 and 503), typed resources.

Then the same document against the app in process (over the fake backend): the routes it says need a key
answer 401 without one, and the error and admin bodies they really send fit the schemas it gives them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from api.admin import DrainedOut, PoolsOut, ResizedOut, TierAdminOut
from api.app import create_app
from api.responses import TAGS, ErrorOut, ValidationErrorOut
from api.sessions import AdminSessionOut, AdminSessionsOut, admin_session_body
from pool.model.sessions import SessionInfo
from pool.settings import from_env
from tests.conftest import TEST_TIERS
from tests.inprocess import embedded_over_fake
from tests.polling import until

OPERATION_IDS = {
    "POST /v1/execute": "execute", "POST /v1/tasks": "submit_task", "POST /v1/tasks/batch": "submit_batch",
    "GET /v1/tasks/{task_id}": "get_task", "GET /v1/tasks/{task_id}/events": "task_events",
    "GET /v1/tiers": "list_tiers", "GET /v1/images": "list_images",
    "POST /v1/sessions": "open_session", "GET /v1/sessions/{session_id}": "get_session",
    "DELETE /v1/sessions/{session_id}": "delete_session", "POST /v1/sessions/{session_id}/execute": "session_execute",
    "GET /v1/admin/pools": "get_pools", "PATCH /v1/admin/pools/{tier}": "patch_pool",
    "POST /v1/admin/pools/{tier}/drain": "drain_pool", "GET /v1/admin/sessions": "admin_sessions",
    "GET /healthz": "healthz", "GET /readyz": "readyz", "GET /metrics": "metrics",
}
OPEN = {"GET /healthz", "GET /readyz", "GET /metrics"}  # no key
ERROR_STATUSES = {"401", "403", "404", "409", "413", "422", "429", "503"}
KEYS = {"WARMPOOL_API_KEYS": "alice", "WARMPOOL_ADMIN_KEY": "root-key"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(from_env(KEYS)).openapi()


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{method.upper()} {path}": op for path, ops in document["paths"].items() for method, op in ops.items()}


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_operation_ids_are_stable_names(document):
    assert {label: op["operationId"] for label, op in operations(document).items()} == OPERATION_IDS


def test_every_operation_has_one_declared_tag(document):
    declared = {tag["name"] for tag in document["tags"]}
    assert declared == {tag["name"] for tag in TAGS}
    for label, op in operations(document).items():
        assert len(op["tags"]) == 1 and op["tags"][0] in declared, label
    assert operations(document)["POST /v1/sessions/{session_id}/execute"]["tags"] == ["sessions"]
    assert operations(document)["GET /v1/admin/sessions"]["tags"] == ["admin"]


def test_bearer_schemes_are_declared_and_applied_to_the_protected_routes(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes == {"ApiKey": {"type": "http", "scheme": "bearer", "description": schemes["ApiKey"]["description"]},
                       "AdminKey": {"type": "http", "scheme": "bearer",
                                    "description": schemes["AdminKey"]["description"]}}
    for label, op in operations(document).items():
        if label in OPEN:
            assert "security" not in op, label
            continue
        wanted = "AdminKey" if " /v1/admin/" in label else "ApiKey"
        assert op["security"] == [{wanted: []}], label
        assert {"401", "403"} <= set(op["responses"]), label


def test_every_documented_error_has_a_schema_and_429_503_document_retry_after(document):
    components = document["components"]["schemas"]
    for label, op in operations(document).items():
        for status, response in op["responses"].items():
            if status not in ERROR_STATUSES:
                assert not status.startswith(("4", "5")), f"{label}: {status} is not one the service documents"
                continue
            schema = response["content"]["application/json"]["schema"]
            expected = "ValidationErrorOut" if status == "422" else ("ReadyOut" if label == "GET /readyz"
                                                                      else "ErrorOut")
            assert schema == {"$ref": f"#/components/schemas/{expected}"}, (label, status)
            if status in ("429", "503"):
                assert response["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}, label
    assert components["ErrorOut"]["properties"]["detail"]["type"] == "string"
    item = resolve(document, components["ValidationErrorOut"]["properties"]["detail"]["items"])
    assert {"loc", "msg", "type"} <= set(item["required"])
    assert "HTTPValidationError" not in components, "a route answers 422 without our schema"


def test_every_operation_with_inputs_documents_its_422_and_the_task_routes_their_429_503(document):
    for label, op in operations(document).items():
        if op.get("parameters") or op.get("requestBody"):
            assert "422" in op["responses"], label
        if op.get("requestBody"):
            assert "413" in op["responses"], label  # the body cap applies before any route
        if label not in OPEN:
            assert "503" in op["responses"], label  # the connection cap answers any route but the probes 503
    for label in ("POST /v1/execute", "POST /v1/tasks", "POST /v1/tasks/batch", "POST /v1/sessions",
                  "POST /v1/sessions/{session_id}/execute"):
        assert {"413", "422", "429", "503"} <= set(operations(document)[label]["responses"]), label


def test_resources_fields_are_typed_with_numeric_examples(document):
    resources = document["components"]["schemas"]["ResourcesIn"]["properties"]
    numeric = {"cpu": "number", "gpu": "integer", "ram": "integer", "storage": "integer"}
    for name, kind in numeric.items():
        types = [choice.get("type") for choice in resources[name]["anyOf"]]
        assert types == [kind, "string", "null"], name
        assert any(isinstance(e, int | float) for e in resources[name]["examples"]), name
        assert any(isinstance(e, str) for e in resources[name]["examples"]), name
    out = document["components"]["schemas"]["ResourcesOut"]["properties"]
    assert {name: out[name]["type"] for name in out} == {"cpu": "number", "gpu": "integer", "ram_bytes": "integer",
                                                         "storage_bytes": "integer"}


def test_admin_answers_are_models(document):
    expected = {"GET /v1/admin/pools": "PoolsOut", "PATCH /v1/admin/pools/{tier}": "ResizedOut",
                "POST /v1/admin/pools/{tier}/drain": "DrainedOut", "GET /v1/admin/sessions": "AdminSessionsOut"}
    for label, model in expected.items():
        schema = operations(document)[label]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}, label


def fits(model: type, body: dict[str, Any]) -> None:
    """`body` validates against `model`, and has no top-level field the model does not document."""
    model.model_validate(body)
    assert set(body) <= set(model.model_fields), (model.__name__, set(body) - set(model.model_fields))


@pytest.mark.anyio
async def test_the_documented_security_and_error_bodies_match_what_the_app_answers(tmp_path: Path, document):
    """Every protected operation answers 401 without a key (and an open one does not), and the 401, 403, 413,
    422, 429 and 503 bodies fit the documented schemas."""
    env = {**KEYS, "WARMPOOL_API_KEYS": "alice,bob", "WARMPOOL_MAX_BODY_BYTES": "64KiB",
           "WARMPOOL_RATE_LIMIT_PER_S": "0.001", "WARMPOOL_RATE_LIMIT_BURST": "1"}
    alice, bob = {"authorization": "Bearer alice"}, {"authorization": "Bearer bob"}
    async with embedded_over_fake(tmp_path, TEST_TIERS, env) as (client, _, _app):
        for label in operations(document):
            method, path = label.split(" ", 1)
            path = path.format(task_id="0" * 32, session_id="0" * 32, tier="one")
            answer = await client.request(method, path)
            if label in OPEN:
                assert answer.status_code in (200, 503), label  # /readyz may be 503 before warm
            else:
                assert answer.status_code == 401, label
                ErrorOut.model_validate(answer.json())
        wrong = await client.get("/v1/tiers", headers={"authorization": "Bearer eve"})
        assert wrong.status_code == 403 and ErrorOut.model_validate(wrong.json())
        too_big = await client.post("/v1/execute", content=b"x" * 70_000, headers=alice)
        assert too_big.status_code == 413 and ErrorOut.model_validate(too_big.json())
        invalid = await client.post("/v1/execute", json={"code": "x", "resources": {"ram": "lots"}}, headers=alice)
        assert invalid.status_code == 422
        assert ValidationErrorOut.model_validate(invalid.json()).detail[0].loc == ["body", "resources", "ram"]
        # bob's burst of one: a task, then the next submission is over the rate.
        assert (await client.post("/v1/execute", json={"code": "print(1)"}, headers=bob)).status_code == 200
        limited = await client.post("/v1/execute", json={"code": "print(1)"}, headers=bob)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        ErrorOut.model_validate(limited.json())


@pytest.mark.anyio
async def test_a_503_body_fits_the_documented_schema(tmp_path: Path):
    async with embedded_over_fake(tmp_path, TEST_TIERS, {}) as (client, _, _app):
        busy = asyncio.create_task(client.post("/v1/execute", json={"code": "# fake: sleep=0.3",
                                                                     "resources": {"ram": "64MiB"}}))
        await until(lambda: busy_one(client, {}), "tier one busy")
        refused = await client.post("/v1/execute", json={"code": "print(1)", "resources": {"ram": "64MiB"},
                                                          "max_wait_ms": 20})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        ErrorOut.model_validate(refused.json())
        assert (await busy).status_code == 200


async def busy_one(client: Any, headers: dict[str, str]) -> bool:
    return bool((await client.get("/v1/tiers", headers=headers)).json()[0]["busy"] == 1)


@pytest.mark.anyio
async def test_admin_bodies_fit_their_models(tmp_path: Path):
    admin = {"authorization": "Bearer root-key"}
    async with embedded_over_fake(tmp_path, TEST_TIERS, {"WARMPOOL_ADMIN_KEY": "root-key"}) as (client, _, _app):
        pools = (await client.get("/v1/admin/pools", headers=admin)).json()
        fits(PoolsOut, pools)
        for tier in pools["tiers"]:
            fits(TierAdminOut, tier)
        resized = await client.patch("/v1/admin/pools/two", json={"min_idle": 3}, headers=admin)
        assert resized.status_code == 200
        fits(ResizedOut, resized.json())
        drained = await client.post("/v1/admin/pools/one/drain", headers=admin)
        assert drained.status_code == 200
        fits(DrainedOut, drained.json())
        sessions = (await client.get("/v1/admin/sessions", headers=admin)).json()
        fits(AdminSessionsOut, sessions)
    # The fake backend holds no sessions: one session's row, as the route makes it.
    tier = from_env({}).tiers[0]
    info = SessionInfo(session_id="a" * 32, owner="digest", tier=tier, image="python", idle_timeout_s=300, busy=False,
                       created_unix=1.0, idle_s=2.0, calls=3, worker="w", container="c")
    fits(AdminSessionOut, admin_session_body(info))
    fits(AdminSessionsOut, {"sessions": [admin_session_body(info)], "count": 1})
