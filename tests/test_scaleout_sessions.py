"""Streaming and sessions in scale-out mode: an API and workers as processes, a real Redis, the real engine.

The worker relays a streamed task's output through Redis; a session's calls reach the worker holding its
container; when that worker dies or stops, the session ends with a reason and nothing hangs.
"""

from __future__ import annotations

import base64
import concurrent.futures
import time

import pytest

from tests.polling import wait_for
from tests.sse import events, stream_all, text_of

pytestmark = [pytest.mark.redis, pytest.mark.docker]

ONE = {"ram": "64MiB"}  # tier "one": one container per worker
TWO = {"ram": "200MiB"}
ALICE, BOB = {"authorization": "Bearer alice"}, {"authorization": "Bearer bob"}
ADMIN = {"authorization": "Bearer root"}
SSE = {"accept": "text/event-stream"}
HOSTNAME = "import socket; print(socket.gethostname(), flush=True)"
API_ENV = {"WARMPOOL_API_KEYS": "alice,bob", "WARMPOOL_ADMIN_KEY": "root", "WARMPOOL_MAX_SESSIONS_PER_KEY": "2"}


def open_session(api, headers=ALICE, **body) -> dict:
    response = api.client.post("/v1/sessions", headers=headers, json={"resources": TWO, "idle_timeout_s": 120, **body})
    assert response.status_code == 201, response.text
    return response.json()


def call(api, session_id: str, code: str, headers=ALICE, **fields):
    return api.client.post(f"/v1/sessions/{session_id}/execute", headers=headers, json={"code": code, **fields})


def test_a_streamed_task_reaches_the_client_through_redis_while_it_runs(cluster):
    c = cluster()
    worker = c.worker()
    api = c.api(env=API_ENV)
    code = "import sys, time\nprint('stamp', time.time(), flush=True)\nprint('e', file=sys.stderr)\ntime.sleep(3)"
    response, found = stream_all(api.client, "POST", "/v1/execute", headers=ALICE, json={"code": code})
    assert response.status_code == 200
    first, *_, result = found
    assert first.name == "stdout" and first.arrived_unix < float(first.data["text"].split()[1]) + 3
    body = result.data
    assert (result.name, body["status"], body["worker"]) == ("result", "succeeded", worker.instance_id)
    assert text_of(found, "stdout") == body["stdout"] and text_of(found, "stderr") == body["stderr"] == "e\n"
    wait_for(lambda: not c.redis.exists(f"{c.prefix}:out:{body['id']}"), timeout_s=10,
             what="the API to drop the output it has read")
    # Errors before the task runs stay plain HTTP errors here too.
    refused = api.client.post("/v1/execute", headers={**ALICE, **SSE}, json={"code": "1", "resources": {"ram": "9TiB"}})
    assert refused.status_code == 422 and refused.headers["content-type"].startswith("application/json")


def test_a_client_that_disconnects_mid_stream_does_not_stop_the_task(cluster):
    c = cluster()
    c.worker()
    api = c.api(env=API_ENV)
    code = f"import time\n{HOSTNAME}\ntime.sleep(2)\nprint('finished')"
    with api.client.stream("POST", "/v1/execute", headers={**ALICE, **SSE},
                           json={"code": code, "resources": ONE}) as response:
        first = next(events(response))
        (task_id,) = c.running_tasks()
    # The client is gone; the task runs to its end, and the worker's only "one" container comes back.
    wait_for(lambda: c.task_hash(task_id).get("state") == "done", timeout_s=30, what="the task to finish")
    after = api.client.post("/v1/execute", headers=ALICE, json={"code": HOSTNAME, "resources": ONE}).json()
    assert (after["status"], after["stdout"]) == ("succeeded", first.data["text"])


def test_an_async_task_is_followed_through_its_events(cluster):
    c = cluster()
    c.worker()
    api = c.api(env=API_ENV)
    code = "import time\nprint('stamp', time.time(), flush=True)\ntime.sleep(3)\nprint('done')"
    accepted = api.client.post("/v1/tasks", headers=ALICE, json={"code": code}).json()
    link = f"/v1/tasks/{accepted['id']}/events"
    assert api.client.get(link, headers={**BOB, **SSE}).status_code == 404
    _, found = stream_all(api.client, "GET", link, headers=ALICE)
    first, *_, result = found
    assert first.arrived_unix < float(first.data["text"].split()[1]) + 3
    assert result.data == api.client.get(f"/v1/tasks/{accepted['id']}", headers=ALICE).json()
    assert text_of(found, "stdout") == result.data["stdout"]
    _, again = stream_all(api.client, "GET", link, headers=ALICE)
    assert [(e.name, e.data) for e in again] == [("result", result.data)]


def test_sessions_run_on_the_worker_that_holds_them(cluster):
    c = cluster()
    first, second = c.worker(), c.worker()
    api = c.api(env=API_ENV)
    session = open_session(api)
    sid = session["id"]
    assert call(api, sid, "x = 41 + 1\nimport socket").json()["status"] == "succeeded"
    bodies = [call(api, sid, "print(x, socket.gethostname())").json() for _ in range(4)]
    assert len({b["stdout"] for b in bodies}) == 1 and bodies[0]["stdout"].startswith("42 ")
    holder = bodies[0]["worker"]
    assert holder in (first.instance_id, second.instance_id) and all(b["worker"] == holder for b in bodies)
    shown = api.client.get(f"/v1/sessions/{sid}", headers=ALICE).json()
    assert (shown["calls"], shown["state"], shown["tier"]) == (5, "idle", "two")
    assert api.client.get(f"/v1/sessions/{sid}", headers=BOB).status_code == 404
    # One call at a time, across the hop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(call, api, sid, "import time\ntime.sleep(2)")
        wait_for(lambda: api.client.get(f"/v1/sessions/{sid}", headers=ALICE).json()["state"] == "busy",
                 timeout_s=10, what="the call to start")
        assert call(api, sid, "print(1)").status_code == 409
        assert slow.result().json()["status"] == "succeeded"
    # Streamed calls, then the admin view, the per-key bound and deletion.
    _, found = stream_all(api.client, "POST", f"/v1/sessions/{sid}/execute", headers=ALICE,
                          json={"code": "print(x, flush=True)"})
    assert text_of(found, "stdout") == found[-1].data["stdout"] == "42\n"
    listed = api.client.get("/v1/admin/sessions", headers=ADMIN).json()["sessions"]
    assert [(s["id"], s["worker"]) for s in listed] == [(sid, holder)]
    assert 'warmpool_sessions{tier="two"} 1.0' in api.client.get("/metrics").text
    open_session(api)
    assert api.client.post("/v1/sessions", headers=ALICE, json={"resources": TWO}).status_code == 429
    assert api.client.delete(f"/v1/sessions/{sid}", headers=ALICE).status_code == 204
    gone = call(api, sid, "print(x)")
    assert (gone.status_code, gone.json()["detail"]) == (404, f"session '{sid}' has ended: deleted")
    open_session(api)  # the deleted one's slot is free again


def test_a_sessions_files_and_outputs_travel_through_redis(cluster):
    c = cluster()
    c.worker()
    api = c.api(env=API_ENV)
    sid = open_session(api)["id"]
    payload = bytes(range(256)) * 4
    first = call(api, sid, "open('made.txt', 'w').write(open('data/in.csv').read().upper())",
                 files=[{"path": "data/in.csv", "content": "a,b\n1,2\n"},
                        {"path": "blob.bin", "content": base64.b64encode(payload).decode(), "encoding": "base64"}],
                 outputs=["*.txt"]).json()
    assert first["status"] == "succeeded", first
    assert [(f["path"], base64.b64decode(f["content"])) for f in first["files"]] == [("made.txt", b"A,B\n1,2\n")]
    second = call(api, sid, "print(len(open('blob.bin', 'rb').read()), open('data/in.csv').read().count(','))",
                  outputs=["made.txt", "*.bin"]).json()
    assert (second["status"], second["stdout"], second["files_truncated"]) == ("succeeded", "1024 2\n", False)
    assert {f["path"]: base64.b64decode(f["content"]) for f in second["files"]} == {
        "blob.bin": payload, "made.txt": b"A,B\n1,2\n"}
    # Streamed, the result event carries the files too; a bad path is a 422 naming it, before any hop.
    _, found = stream_all(api.client, "POST", f"/v1/sessions/{sid}/execute", headers=ALICE,
                          json={"code": "print('s', flush=True)", "outputs": ["made.txt"]})
    assert [f["path"] for f in found[-1].data["files"]] == ["made.txt"]
    refused = call(api, sid, "1", files=[{"path": "../x", "content": ""}])
    assert refused.status_code == 422 and "files[0].path" in refused.text, refused.text
    assert api.client.delete(f"/v1/sessions/{sid}", headers=ALICE).status_code == 204


def test_a_session_whose_worker_dies_ends_with_a_reason_and_nothing_hangs(cluster):
    c = cluster()
    victim = c.worker()
    api = c.api(env=API_ENV)
    sid = open_session(api)["id"]
    assert call(api, sid, "x = 1").json()["status"] == "succeeded"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(call, api, sid, "import time\ntime.sleep(60)", timeout_s=60)
        wait_for(lambda: api.client.get(f"/v1/sessions/{sid}", headers=ALICE).json()["state"] == "busy",
                 timeout_s=10, what="the call to start")
        started = time.monotonic()
        victim.kill()
        answer = waiting.result(timeout=30)
    assert time.monotonic() - started < 30  # the call ended with the worker, not with its own timeout
    assert (answer.status_code, answer.json()["detail"]) == (404, f"session '{sid}' has ended: worker lost")
    again = api.client.get(f"/v1/sessions/{sid}", headers=ALICE)
    assert (again.status_code, again.json()["detail"]) == (404, f"session '{sid}' has ended: worker lost")
    # Its slot is free; a new worker serves new sessions.
    c.worker()
    wait_for(lambda: api.client.get("/readyz").status_code == 200, timeout_s=30, what="the new worker")
    fresh = open_session(api)["id"]
    assert call(api, fresh, "print('anew')").json()["stdout"] == "anew\n"


def test_idle_timeout_and_a_stopping_worker_end_sessions_with_their_reason(cluster):
    c = cluster()
    worker = c.worker()
    api = c.api(env={**API_ENV, "WARMPOOL_SESSION_IDLE_TIMEOUT_S": "1"})
    idle = open_session(api, idle_timeout_s=None)
    assert idle["idle_timeout_s"] == 1
    wait_for(lambda: api.client.get(f"/v1/sessions/{idle['id']}", headers=ALICE).status_code == 404,
             timeout_s=15, what="the idle timeout")  # a GET does not count as use; a call would
    assert call(api, idle["id"], "1").json()["detail"] == f"session '{idle['id']}' has ended: idle timeout"
    held = open_session(api)["id"]
    worker.stop()  # SIGTERM: it ends the sessions it holds, and says why
    answer = call(api, held, "1")
    assert (answer.status_code, answer.json()["detail"]) == (404, f"session '{held}' has ended: worker stopped")
