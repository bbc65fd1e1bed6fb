"""Streamed output end to end on the real engine: `Accept: text/event-stream` on /v1/execute and the events
of async tasks (DESIGN.md 1b)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_TIERS, Service, start_service, stop_service
from tests.polling import wait_for
from tests.sse import events, stream_all, text_of

pytestmark = pytest.mark.docker

ONE = {"ram": "64MiB"}  # tier "one": a single container
SSE = {"accept": "text/event-stream"}
ALICE = {"authorization": "Bearer alice"}
HOSTNAME = "import socket; print(socket.gethostname())"
BODY_KEYS = {"id", "status", "exit_code", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "tier",
             "image", "resources", "timings", "usage", "message", "worker", "files", "files_truncated"}


@pytest.fixture(scope="module")
def svc(docker_client, tmp_path_factory) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("streaming")
    tiers = work / "tiers.json"
    tiers.write_text(json.dumps(TEST_TIERS))
    service = start_service(work, tiers, env={"WARMPOOL_API_KEYS": "alice,bob", "WARMPOOL_ADMIN_KEY": "root"})
    service.client.headers.update(ALICE)
    yield service
    stop_service(service, docker_client)


def run_seconds(svc: Service, tier: str, status: str) -> tuple[float, float]:
    """(count, sum) of the tier's task run-time histogram for `status`, from /metrics."""
    text = svc.client.get("/metrics").text
    found = {"count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "warmpool_task_run_seconds":
            for sample in family.samples:
                if sample.labels.get("tier") == tier and sample.labels.get("status") == status:
                    for kind in found:
                        if sample.name.endswith(f"_{kind}"):
                            found[kind] = sample.value
    return found["count"], found["sum"]


def test_the_first_chunk_reaches_the_client_while_the_task_still_sleeps(svc):
    code = ("import sys, time\nprint('stamp', time.time(), flush=True)\nprint('warn', file=sys.stderr)\n"
            "time.sleep(3)\nprint('done')")
    response, found = stream_all(svc.client, "POST", "/v1/execute", json={"code": code, "timeout_s": 10})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    first = found[0]
    assert first.name == "stdout" and first.data["text"].startswith("stamp ")
    printed_at = float(first.data["text"].split()[1])
    assert first.arrived_unix < printed_at + 3, "the first chunk arrived only after the task's sleep"
    *chunks, result = found
    assert {e.name for e in chunks} == {"stdout", "stderr"} and result.name == "result"
    body = result.data
    assert set(body) == BODY_KEYS and body["status"] == "succeeded"
    assert text_of(chunks, "stdout") == body["stdout"] == f"{first.data['text'].splitlines()[0]}\ndone\n"
    assert text_of(chunks, "stderr") == body["stderr"] == "warn\n"


def test_fast_output_comes_coalesced_and_whole(svc):
    code = "for i in range(20000):\n    print(i, flush=True)"
    _, found = stream_all(svc.client, "POST", "/v1/execute", json={"code": code})
    *chunks, result = found
    assert text_of(chunks, "stdout") == result.data["stdout"] == "".join(f"{i}\n" for i in range(20000))
    assert len(chunks) < 2000, f"{len(chunks)} events for 20000 flushed writes"


def test_streamed_output_stops_at_the_output_cap(svc):
    _, found = stream_all(svc.client, "POST", "/v1/execute", json={"code": "while True:\n    print('z' * 1023)"})
    *chunks, result = found
    assert result.data["status"] == "output_limit_exceeded" and result.data["stdout_truncated"] is True
    assert text_of(chunks, "stdout") == result.data["stdout"] and len(result.data["stdout"]) == 1 << 20


def test_a_client_that_disconnects_mid_stream_does_not_stop_the_task(svc):
    count, seconds = run_seconds(svc, "one", "succeeded")
    code = f"import time\n{HOSTNAME}\nimport sys; sys.stdout.flush()\ntime.sleep(2)\nprint('finished')"
    with svc.client.stream("POST", "/v1/execute", headers=SSE, json={"code": code, "resources": ONE}) as response:
        first = next(events(response))
    host = first.data["text"].strip()  # leaving the block dropped the connection while the task sleeps
    # The task ran on to its end: one more success on the tier, with its two-second sleep in its run time.
    wait_for(lambda: run_seconds(svc, "one", "succeeded")[0] == count + 1, timeout_s=30, what="the task to finish")
    assert run_seconds(svc, "one", "succeeded")[1] - seconds >= 2
    # And its container, the tier's only one, came back to the pool rather than being retired.
    after = svc.execute(HOSTNAME, resources=ONE, max_wait_ms=5000).json()
    assert (after["status"], after["stdout"].strip()) == ("succeeded", host)


def test_a_reader_that_stops_reading_holds_neither_the_task_nor_its_container(svc):
    code = f"{HOSTNAME}\nimport sys; sys.stdout.flush()\nfor i in range(4000):\n    print('x' * 200, flush=True)"
    with svc.client.stream("POST", "/v1/execute", headers=SSE, json={"code": code, "resources": ONE}) as response:
        stream = events(response)
        first = next(stream)
        # Not reading on: the task still ends, and the tier's only container serves the next task.
        after = svc.execute(HOSTNAME, resources=ONE, max_wait_ms=5000).json()
        assert (after["status"], after["stdout"]) == ("succeeded", first.data["text"].splitlines(True)[0])
        rest = list(stream)
    *chunks, result = [first, *rest]
    assert result.data["status"] == "succeeded"
    assert text_of(chunks, "stdout") == result.data["stdout"] and len(result.data["stdout"]) > 800_000


def test_errors_before_the_task_runs_stay_plain_http_errors(svc):
    def plain(response) -> int:
        assert response.headers["content-type"].startswith("application/json"), response.headers
        return response.status_code

    bad_ram = {"code": "print(1)", "resources": {"ram": "x"}}
    assert plain(svc.client.post("/v1/execute", headers=SSE, json=bad_ram)) == 422
    assert plain(svc.client.post("/v1/execute", headers={**SSE, "authorization": ""}, json={"code": "1"})) == 401
    assert plain(svc.client.post("/v1/execute", headers=SSE, json={"code": "#" * (2 << 20)})) == 413
    busy = {"code": "import time; time.sleep(3)", "resources": ONE}
    with svc.client.stream("POST", "/v1/execute", headers=SSE, json=busy) as holder:
        assert holder.status_code == 200  # it holds the tier's only container now
        refused = svc.client.post("/v1/execute", headers=SSE, json={"code": "1", "resources": ONE, "max_wait_ms": 100})
        assert plain(refused) == 503 and int(refused.headers["retry-after"]) >= 1


def test_an_async_task_streams_its_events_then_answers_its_result(svc):
    code = "import time\nprint('stamp', time.time(), flush=True)\ntime.sleep(3)\nprint('done')"
    accepted = svc.client.post("/v1/tasks", json={"code": code, "timeout_s": 10}).json()
    link = f"/v1/tasks/{accepted['id']}/events"
    response, found = stream_all(svc.client, "GET", link)
    assert response.status_code == 200
    first, *_, result = found
    assert first.arrived_unix < float(first.data["text"].split()[1]) + 3, "the chunk came after the task's sleep"
    assert result.name == "result" and result.data == svc.client.get(f"/v1/tasks/{accepted['id']}").json()
    assert text_of(found, "stdout") == result.data["stdout"] and result.data["stdout"].endswith("done\n")
    # Finished: its events are its result alone; another key's, or an unknown task, are 404.
    _, again = stream_all(svc.client, "GET", link)
    assert [(e.name, e.data) for e in again] == [("result", result.data)]
    assert svc.client.get(link, headers={**SSE, "authorization": "Bearer bob"}).status_code == 404
    assert svc.client.get("/v1/tasks/0123456789abcdef0123456789abcdef/events", headers=SSE).status_code == 404
    assert svc.client.get("/v1/tasks/nope/events", headers=SSE).status_code == 404
