"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis) against a live server.

Valid and invalid bodies, paths, headers and query strings, bounded in examples per operation: whatever
arrives, the answer is never a 500 (a 503 only with Retry-After, for capacity or Docker).
"""

from __future__ import annotations

import collections

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 150
FUZZ_TIERS = {"tiers": [{"name": "fuzz", "cpu": 0.5, "ram": "128MiB", "storage": "32MiB", "min_idle": 1,
                         "max_size": 2}]}


def test_fuzzing_the_openapi_schema_never_gives_a_500(serve):
    # Random code runs for real, in the sandbox; a short default timeout keeps an accidental loop cheap.
    # Sessions hold a container each: one per key, idle out after a second, so that the fuzz of POST /v1/sessions
    # never leaves the tier without a container for the other operations (they would wait for one, then 503).
    svc = serve(tiers=FUZZ_TIERS, env={"WARMPOOL_DEFAULT_TIMEOUT_S": "2", "WARMPOOL_MAX_TIMEOUT_S": "3",
                                       "WARMPOOL_MAX_SESSIONS_PER_KEY": "1", "WARMPOOL_SESSION_IDLE_TIMEOUT_S": "1",
                                       "WARMPOOL_MAX_SESSION_IDLE_S": "1"})
    schema = schemathesis.openapi.from_url(f"{svc.base_url}/openapi.json")
    failures: list[str] = []
    seen: collections.Counter[tuple[str, str, int]] = collections.Counter()
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                                 phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def call(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=svc.base_url, timeout=30)
                seen[(case.method, case.path, response.status_code)] += 1
                bad = response.status_code >= 500 and not (
                    response.status_code == 503 and "retry-after" in response.headers)
                if bad:
                    failures.append(f"{case.method} {case.formatted_path} {case.body!r:.300} -> "
                                    f"{response.status_code} {response.text[:300]}")

            try:
                call()
            except hypothesis.errors.Unsatisfiable:
                pass  # no invalid input exists for an operation without parameters (GET /healthz)
    assert calls >= 2 * EXAMPLES_PER_OPERATION, calls
    # It reached both the validator and the sandbox.
    assert seen["POST", "/v1/execute", 422] > 0 and seen["POST", "/v1/execute", 200] > 0, seen
    assert failures == [], "\n".join(failures[:20])
    assert svc.execute("print('after the fuzz')").json()["stdout"] == "after the fuzz\n"
