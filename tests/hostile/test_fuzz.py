"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis) against a live server.

Valid and invalid bodies, paths, headers and query strings, bounded in examples per operation: whatever
arrives, the answer is never a 500 (a 503 only with Retry-After, for capacity or Docker). Every operation
must be fuzzed (a count per operation and generation mode), the admin routes with the admin key, and every
third call of an operation with an id in its path names a real one (the tier, a task or a session seen
earlier), so that the handlers behind the validators are fuzzed too, not only their 404s.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

# About 2 minutes on an idle 2-core machine, more under load: since the document declares the bearer schemes,
# schemathesis also fuzzes the Authorization header, so operations with no other input (GET /v1/tiers) get
# negative cases too. The suite's 120 s default is too tight for that.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(420)]

EXAMPLES_PER_OPERATION = 150
# Admin calls resize and drain the live tier for real: fewer of them keep the container churn bounded.
ADMIN_EXAMPLES_PER_OPERATION = 50
ADMIN_KEY = "fuzz-admin-key"
TIER = "fuzz"
FUZZ_TIERS = {"tiers": [{"name": TIER, "cpu": 0.5, "ram": "128MiB", "storage": "32MiB", "min_idle": 1,
                         "max_size": 2}]}
# What an operation answers once the fuzz reached its handler's work with what it generates (or with a real
# id): at least one of these each. (A session's id is gone within its idle second: those get 404s only.)
MUST_REACH = {"POST /v1/execute": {200}, "POST /v1/tasks": {202}, "POST /v1/tasks/batch": {202},
              "GET /v1/tasks/{task_id}": {200}, "GET /v1/tasks/{task_id}/events": {200}, "GET /v1/tiers": {200},
              "GET /healthz": {200}, "GET /readyz": {200}, "POST /v1/sessions": {201}, "GET /v1/admin/pools": {200},
              # a resize of the real tier: applied, or refused by the host's ledger (four containers at most)
              "PATCH /v1/admin/pools/{tier}": {200, 409}, "POST /v1/admin/pools/{tier}/drain": {200},
              "GET /v1/admin/sessions": {200}, "GET /metrics": {200}}


@dataclass
class Record:
    """What the fuzz did: calls per (operation, mode), statuses per operation, failures, ids it learnt."""

    base_url: str
    calls: collections.Counter[tuple[str, GenerationMode]] = field(default_factory=collections.Counter)
    seen: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    known: dict[str, str] = field(default_factory=lambda: {"tier": TIER})  # a real value per path parameter

    def statuses(self, label: str) -> set[int]:
        return {status for (seen_label, status) in self.seen if seen_label == label}


def fuzz(operation: Any, mode: GenerationMode, max_examples: int, headers: dict[str, str], record: Record) -> None:
    """Call one operation with up to `max_examples` cases of `mode`, recording every answer."""
    label = operation.label

    @hypothesis.settings(max_examples=max_examples, deadline=None, database=None,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        record.calls[label, mode] += 1
        # Every third call (two in three for the admin's few examples) names a real tier, task or session,
        # so that the handler's own work is reached, not only its 404.
        if record.calls[label, mode] % 3 == 0 or (label.split()[1].startswith("/v1/admin/") and
                                                  record.calls[label, mode] % 3 == 1):
            for name in case.path_parameters or {}:
                if name in record.known:
                    case.path_parameters[name] = record.known[name]
        response = case.call(base_url=record.base_url, headers=headers, timeout=30)
        record.seen[label, response.status_code] += 1
        remember(record.known, case, response)
        if response.status_code >= 500 and not (response.status_code == 503 and "retry-after" in response.headers):
            body = "" if type(case.body).__name__ == "NotSet" else f" {case.body!r:.300}"
            record.failures.append(f"{case.method} {case.formatted_path}{body} -> {response.status_code} "
                                   f"{response.text[:300]}")

    call()


def test_fuzzing_the_openapi_schema_never_gives_a_500(serve):
    # Random code runs for real, in the sandbox; a short default timeout keeps an accidental loop cheap.
    # Sessions hold a container each: one per key, idle out after a second, so that the fuzz of POST /v1/sessions
    # never leaves the tier without a container for the other operations (they would wait for one, then 503).
    # The host is said to have 512 MiB, so no resize the fuzz makes can hold more than four containers.
    svc = serve(tiers=FUZZ_TIERS, env={"WARMPOOL_DEFAULT_TIMEOUT_S": "2", "WARMPOOL_MAX_TIMEOUT_S": "3",
                                       "WARMPOOL_MAX_SESSIONS_PER_KEY": "1", "WARMPOOL_SESSION_IDLE_TIMEOUT_S": "1",
                                       "WARMPOOL_MAX_SESSION_IDLE_S": "1", "WARMPOOL_ADMIN_KEY": ADMIN_KEY,
                                       "WARMPOOL_HOST_RAM": "512MiB", "WARMPOOL_HOST_CPUS": "2"})
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    schema = schemathesis.openapi.from_url(f"{svc.base_url}/openapi.json")
    record = Record(base_url=svc.base_url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 16, [op.label for op in operations]
    for operation in operations:
        is_admin = operation.path.startswith("/v1/admin/")
        has_inputs = any(True for _ in operation.iter_parameters()) or len(operation.body) > 0
        has_body = len(operation.body) > 0
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode, ADMIN_EXAMPLES_PER_OPERATION if is_admin else EXAMPLES_PER_OPERATION,
                     admin if is_admin else {}, record)
            except hypothesis.errors.Unsatisfiable as exc:
                # No invalid input exists for an operation whose only inputs are free strings in its path (a
                # task id) or that has none (GET /healthz); any other operation that cannot be fuzzed fails.
                if has_body or mode != GenerationMode.NEGATIVE:
                    raise AssertionError(f"{operation.label} could not be fuzzed in {mode.value} mode") from exc
        wanted = EXAMPLES_PER_OPERATION // 4 if has_inputs and not is_admin else 1
        assert record.calls[operation.label, GenerationMode.POSITIVE] >= wanted, (operation.label, record.calls)
        assert record.calls[operation.label, GenerationMode.NEGATIVE] >= int(has_body), (operation.label,
                                                                                       record.calls)

    assert record.failures == [], "\n".join(record.failures[:20])
    # Every operation got past its validator into its handler, and into its work where a real id leads.
    statuses = {op.label: record.statuses(op.label) for op in operations}
    assert all(found - {422} for found in statuses.values()), statuses
    assert [label for label, wanted in MUST_REACH.items() if not wanted & statuses[label]] == [], statuses
    assert {422, 200} <= statuses["POST /v1/execute"], statuses
    # Put the tier back (the fuzz resized and drained it), then it still serves.
    assert svc.client.patch(f"/v1/admin/pools/{TIER}", json={"min_idle": 1, "max_size": 2},
                            headers=admin).status_code == 200
    assert svc.execute("print('after the fuzz')").json()["stdout"] == "after the fuzz\n"


def remember(known: dict[str, str], case: schemathesis.Case, response: Any) -> None:
    """Keep the id of a task or session the server just created, for later calls to name."""
    if response.status_code not in (201, 202):
        return
    try:
        created = response.json()["id"]
    except (ValueError, KeyError, TypeError):
        return
    if case.path == "/v1/tasks":
        known["task_id"] = created
    elif case.path == "/v1/sessions":
        known["session_id"] = created
