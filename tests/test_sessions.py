"""Sessions end to end on the real engine (embedded mode): state kept between calls, one call at a time,
deletion with a verified reset, endings with a reason, idle timeout, limits, drain, admin view and metrics."""

from __future__ import annotations

import base64
import concurrent.futures
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_TIERS, Service, start_service, stop_service
from tests.polling import wait_for
from tests.sse import stream_all, text_of

pytestmark = pytest.mark.docker

ONE = {"ram": "64MiB"}  # tier "one": a single container
TWO = {"ram": "200MiB"}  # tier "two": 256 MiB, up to four containers
ALICE, BOB, CAROL = ({"authorization": f"Bearer {key}"} for key in ("alice", "bob", "carol"))
ADMIN = {"authorization": "Bearer root"}
HOSTNAME = "import socket; print(socket.gethostname())"
SESSION_KEYS = {"id", "tier", "image", "resources", "idle_timeout_s", "state", "calls", "created_unix", "idle_s",
                "expires_in_s"}
BODY_KEYS = {"id", "status", "exit_code", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "tier",
             "image", "resources", "timings", "usage", "message", "worker", "files", "files_truncated"}
MAX_PER_KEY = 2


@pytest.fixture(scope="module")
def svc(docker_client, tmp_path_factory) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("sessions")
    tiers = work / "tiers.json"
    tiers.write_text(json.dumps(TEST_TIERS))
    service = start_service(work, tiers, env={
        "WARMPOOL_API_KEYS": "alice,bob,carol", "WARMPOOL_ADMIN_KEY": "root",
        "WARMPOOL_SESSION_IDLE_TIMEOUT_S": "1",  # when a request names none (most here ask for 120 s)
        "WARMPOOL_MAX_SESSIONS_PER_KEY": str(MAX_PER_KEY)})
    yield service
    stop_service(service, docker_client)


@pytest.fixture
def opened(svc) -> Iterator[Callable[..., dict[str, Any]]]:
    """Open sessions (`opened(resources=..., headers=...)`); any still open are deleted afterwards."""
    made: list[tuple[str, dict[str, str]]] = []

    def open_one(headers: dict[str, str] = ALICE, **body: Any) -> dict[str, Any]:
        response = svc.client.post("/v1/sessions", headers=headers,
                                   json={"resources": TWO, "idle_timeout_s": 120, **body})
        assert response.status_code == 201, response.text
        made.append((response.json()["id"], headers))
        return response.json()

    yield open_one
    for session_id, headers in made:
        svc.client.delete(f"/v1/sessions/{session_id}", headers=headers)


def call(svc: Service, session_id: str, code: str, headers: dict[str, str] = ALICE, **fields: Any) -> httpx.Response:
    return svc.client.post(f"/v1/sessions/{session_id}/execute", headers=headers, json={"code": code, **fields})


def ok(svc: Service, session_id: str, code: str, **fields: Any) -> str:
    response = call(svc, session_id, code, **fields)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body
    return body["stdout"]


def gone(response: httpx.Response) -> str:
    """The detail of a 404."""
    assert response.status_code == 404, (response.status_code, response.text)
    return response.json()["detail"]


def metric(svc: Service, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(svc.client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_session_keeps_variables_imports_and_files_between_calls(svc, opened):
    session = opened()
    assert set(session) == SESSION_KEYS
    assert (session["tier"], session["image"], session["state"], session["calls"]) == ("two", "python", "idle", 0)
    assert session["idle_timeout_s"] == 120 and session["resources"]["ram_bytes"] == 256 * 1024 ** 2
    sid = session["id"]
    first = call(svc, sid, "x = 41 + 1\nimport json\nopen('kept.txt', 'w').write('on disk')")
    assert first.status_code == 200 and set(first.json()) == BODY_KEYS and first.json()["tier"] == "two"
    assert ok(svc, sid, "print(x)") == "42\n"
    assert ok(svc, sid, "print(json.dumps({'x': x}), open('kept.txt').read())") == '{"x": 42} on disk\n'
    assert ok(svc, sid, "import sys\nprint(sys.stdin.read()[::-1])", stdin="olleh") == "hello\n"
    shown = svc.client.get(f"/v1/sessions/{sid}", headers=ALICE).json()
    assert (shown["calls"], shown["state"], shown["id"]) == (4, "idle", sid) and shown["expires_in_s"] <= 120


def test_calls_run_one_at_a_time(svc, opened):
    sid = opened()["id"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(call, svc, sid, "import time\ntime.sleep(2)\ny = 'slept'")
        wait_for(lambda: svc.client.get(f"/v1/sessions/{sid}", headers=ALICE).json()["state"] == "busy",
                 timeout_s=10, what="the first call to run")
        refused = call(svc, sid, "print('meanwhile')")
        assert refused.status_code == 409 and "one at a time" in refused.json()["detail"]
        assert slow.result().json()["status"] == "succeeded"
    assert ok(svc, sid, "print(y)") == "slept\n"


def test_a_deleted_sessions_container_is_reset_before_anyone_else_gets_it(svc, opened):
    sid = opened(resources=ONE)["id"]
    host = ok(svc, sid, HOSTNAME)
    ok(svc, sid, "import subprocess\nsecret = 'WPSESSION'\nopen('/tmp/work/planted', 'w').write(secret)\n"
                 "open('/dev/shm/planted', 'w').write(secret)\nsubprocess.Popen(['sleep', '300'])")
    response = svc.client.delete(f"/v1/sessions/{sid}", headers=ALICE)
    assert response.status_code == 204 and response.content == b""
    assert "deleted" in gone(call(svc, sid, "print(secret)"))
    assert "deleted" in gone(svc.client.get(f"/v1/sessions/{sid}", headers=ALICE))
    assert "deleted" in gone(svc.client.delete(f"/v1/sessions/{sid}", headers=ALICE))
    # The tier's only container serves a plain task next: the same one, with nothing of the session left.
    look = ("import os, socket\nprint(socket.gethostname(), sorted(os.listdir('/tmp/work')), os.listdir('/dev/shm'),"
            " len([p for p in os.listdir('/proc') if p.isdigit()]), 'secret' in globals())")
    body = svc.client.post("/v1/execute", headers=ALICE, json={"code": look, "resources": ONE,
                                                                "max_wait_ms": 5000}).json()
    assert body["stdout"] == f"{host.strip()} [] [] 3 False\n", body
    # So does a new session on it.
    again = opened(resources=ONE)["id"]
    assert ok(svc, again, look) == f"{host.strip()} [] [] 3 False\n"


def test_another_keys_or_an_unknown_session_is_404(svc, opened):
    sid = opened()["id"]
    assert gone(call(svc, sid, "print(1)", headers=BOB)) == f"no session '{sid}'"
    assert gone(svc.client.get(f"/v1/sessions/{sid}", headers=BOB)) == f"no session '{sid}'"
    assert gone(svc.client.delete(f"/v1/sessions/{sid}", headers=BOB)) == f"no session '{sid}'"
    assert ok(svc, sid, "print('still mine')") == "still mine\n"
    gone(svc.client.get("/v1/sessions/0123456789abcdef0123456789abcdef", headers=ALICE))
    gone(svc.client.get("/v1/sessions/not-an-id", headers=ALICE))
    assert svc.client.get(f"/v1/sessions/{sid}").status_code == 401


def test_a_timed_out_call_is_interrupted_and_the_session_keeps_its_state(svc, opened):
    sid = opened()["id"]
    ok(svc, sid, "x = 'kept'")
    body = call(svc, sid, "print('spinning', flush=True)\nwhile True: pass", timeout_s=1).json()
    assert (body["status"], body["stdout"], body["message"]) == ("timed_out", "spinning\n", "")
    assert body["stderr"].endswith("KeyboardInterrupt\n")
    assert ok(svc, sid, "print(x)") == "kept\n"
    # Code that will not be interrupted ends the session instead; later calls say why.
    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    body = call(svc, sid, stubborn, timeout_s=1).json()
    assert body["status"] == "timed_out" and "the session has ended (timed out)" in body["message"]
    assert gone(call(svc, sid, "print(x)")) == f"session '{sid}' has ended: timed out"


def test_a_call_that_exceeds_memory_ends_the_session(svc, opened):
    sid = opened()["id"]
    ok(svc, sid, "x = 1")
    body = call(svc, sid, "b = bytearray(512 * 1024 * 1024)", timeout_s=20).json()
    assert body["status"] == "memory_exceeded" and "memory exceeded" in body["message"]
    assert gone(call(svc, sid, "print(x)")) == f"session '{sid}' has ended: memory exceeded"


def test_a_session_whose_interpreter_exits_ends(svc, opened):
    sid = opened()["id"]
    body = call(svc, sid, "import os\nos._exit(0)").json()
    assert body["status"] == "failed" and "interpreter exited" in body["message"]
    assert gone(svc.client.get(f"/v1/sessions/{sid}", headers=ALICE)) == \
        f"session '{sid}' has ended: interpreter exited"


def test_an_idle_session_is_closed_after_its_idle_timeout(svc, opened):
    session = opened(idle_timeout_s=None)  # the server's default: WARMPOOL_SESSION_IDLE_TIMEOUT_S=1 here
    assert session["idle_timeout_s"] == 1
    ok(svc, session["id"], "x = 1")
    detail = wait_for(lambda: svc.client.get(f"/v1/sessions/{session['id']}", headers=ALICE).status_code == 404
                      and gone(call(svc, session["id"], "print(x)")), timeout_s=15, what="the idle timeout")
    assert detail == f"session '{session['id']}' has ended: idle timeout"


def test_sessions_per_key_are_bounded(svc, opened):
    first = opened(headers=CAROL)
    opened(headers=CAROL)
    refused = svc.client.post("/v1/sessions", headers=CAROL, json={"resources": TWO})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "WARMPOOL_MAX_SESSIONS_PER_KEY" in refused.json()["detail"]
    opened(headers=BOB)  # another key is not held back
    assert svc.client.delete(f"/v1/sessions/{first['id']}", headers=CAROL).status_code == 204
    opened(headers=CAROL)


def test_a_session_holds_its_container_against_the_tiers_capacity(svc, opened):
    sid = opened(resources=ONE)["id"]
    refused = svc.client.post("/v1/execute", headers=ALICE, json={"code": "1", "resources": ONE, "max_wait_ms": 200})
    assert refused.status_code == 503
    one = next(t for t in svc.client.get("/v1/tiers", headers=ALICE).json() if t["name"] == "one")
    assert (one["busy"], one["max_size"]) == (1, 1)
    assert metric(svc, "warmpool_sessions", tier="one") == 1
    svc.client.delete(f"/v1/sessions/{sid}", headers=ALICE)
    body = svc.client.post("/v1/execute", headers=ALICE, json={"code": "print(2)", "resources": ONE,
                                                                "max_wait_ms": 5000}).json()
    assert body["stdout"] == "2\n"


def test_a_drain_ends_idle_sessions_and_their_next_call_says_drained(svc, opened):
    sid = opened()["id"]
    ok(svc, sid, "x = 1")
    assert svc.client.post("/v1/admin/pools/two/drain", headers=ADMIN).status_code == 200
    detail = wait_for(lambda: call(svc, sid, "print(x)").status_code == 404
                      and gone(call(svc, sid, "print(x)")), timeout_s=10, what="the drain to end the session")
    assert detail == f"session '{sid}' has ended: drained"


def test_the_admin_view_and_metrics_show_sessions(svc, opened):
    ended_before = metric(svc, "warmpool_sessions_ended_total", reason="deleted")
    sid = opened()["id"]
    listed = svc.client.get("/v1/admin/sessions", headers=ADMIN).json()
    mine = next(s for s in listed["sessions"] if s["id"] == sid)
    assert (mine["tier"], mine["state"], mine["container"].startswith("warmpool-two-")) == ("two", "idle", True)
    assert len(mine["owner"]) == 24 and "alice" not in json.dumps(listed)
    assert svc.client.get("/v1/admin/sessions", headers=ALICE).status_code == 403
    assert metric(svc, "warmpool_sessions", tier="two") >= 1
    svc.client.delete(f"/v1/sessions/{sid}", headers=ALICE)
    assert metric(svc, "warmpool_sessions_ended_total", reason="deleted") == ended_before + 1


def test_a_session_call_streams_its_output(svc, opened):
    sid = opened()["id"]
    ok(svc, sid, "import time")
    code = "print('stamp', time.time(), flush=True)\ntime.sleep(3)\nlater = 'yes'\nprint('done')"
    response, found = stream_all(svc.client, "POST", f"/v1/sessions/{sid}/execute", headers=ALICE,
                                 json={"code": code})
    assert response.status_code == 200
    first, *_, result = found
    assert first.arrived_unix < float(first.data["text"].split()[1]) + 3, "the chunk came after the call's sleep"
    assert result.name == "result" and set(result.data) == BODY_KEYS and result.data["status"] == "succeeded"
    assert text_of(found, "stdout") == result.data["stdout"]
    assert ok(svc, sid, "print(later)") == "yes\n"
    unknown = stream_all(svc.client, "POST", "/v1/sessions/0123456789abcdef0123456789abcdef/execute",
                              headers=ALICE, json={"code": "1"})[0]
    assert unknown.status_code == 404  # errors before the call runs stay plain HTTP errors


def test_a_sessions_calls_take_files_and_collect_outputs(svc, opened):
    sid = opened()["id"]
    first = call(svc, sid, "import csv\nrows = list(csv.DictReader(open('data/in.csv')))\n"
                           "open('made.txt', 'w').write(f'{len(rows)} rows')",
                 files=[{"path": "data/in.csv", "content": "a,b\n1,2\n3,4\n"}], outputs=["*.txt"]).json()
    assert first["status"] == "succeeded", first
    assert first["files"] == [{"path": "made.txt", "size_bytes": 6, "encoding": "base64",
                               "content": base64.b64encode(b"2 rows").decode()}] and first["files_truncated"] is False
    # Call 2 reads the CSV call 1 was sent, and its outputs return the file call 1 wrote.
    second = call(svc, sid, "print(sum(int(r['b']) for r in csv.DictReader(open('data/in.csv'))), len(rows))",
                  outputs=["made.txt"]).json()
    assert (second["status"], second["stdout"]) == ("succeeded", "6 2\n"), second
    assert [(f["path"], base64.b64decode(f["content"])) for f in second["files"]] == [("made.txt", b"2 rows")]
    # A file sent as base64 replaces the one at its path; a call without outputs gives no files back.
    third = call(svc, sid, "print(open('data/in.csv', 'rb').read())",
                 files=[{"path": "data/in.csv", "content": base64.b64encode(b"\xff\x00").decode(),
                         "encoding": "base64"}]).json()
    assert (third["stdout"], third["files"], third["files_truncated"]) == ("b'\\xff\\x00'\n", [], False), third
    # Past the server's output files cap (16 MiB by default): listed, content null, files_truncated.
    big = call(svc, sid, "open('big.bin', 'wb').truncate(17 << 20)", outputs=["*.bin"]).json()
    assert big["files"] == [{"path": "big.bin", "size_bytes": 17 << 20, "encoding": "base64", "content": None}]
    assert big["files_truncated"] is True


@pytest.mark.parametrize(("entry", "field"), [
    ({"files": [{"path": "ok.txt"}, {"path": "../escape.txt"}]}, "files[1].path"),
    ({"files": [{"path": "/etc/passwd"}]}, "files[0].path"),
    ({"files": [{"path": ""}]}, "files[0].path"),
    ({"files": [{"path": "a\u0000b"}]}, "files[0].path"),
    ({"files": [{"path": "x", "content": "!!", "encoding": "base64"}]}, "files[0].content"),
    ({"outputs": ["../*"]}, "outputs[0]"),
])
def test_bad_files_in_a_session_call_are_422_naming_the_entry(svc, opened, entry, field):
    sid = opened()["id"]
    ok(svc, sid, "x = 1")
    response = call(svc, sid, "print('must not run')", **entry)
    assert response.status_code == 422 and field in response.text, response.text
    assert ok(svc, sid, "print(x)") == "1\n"  # nothing ran, and the session goes on


def test_files_over_the_cap_in_a_session_call_are_413(svc, opened):
    sid = opened()["id"]
    response = call(svc, sid, "1", files=[{"path": "big.txt", "content": "x" * ((16 << 20) + 1)}])
    assert response.status_code == 413 and "files" in response.json()["detail"], response.text


@pytest.mark.parametrize(("body", "field"), [
    ({"idle_timeout_s": -1}, "idle_timeout_s"),
    ({"image": "nope"}, "image"),
    ({"resources": {"ram": "1TiB"}}, "ram"),
    ({"resources": {"ram": "lots"}}, "ram"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_session_requests_are_422_naming_the_field(svc, body, field):
    response = svc.client.post("/v1/sessions", headers=ALICE, json=body)
    assert response.status_code == 422 and field in response.text, response.text


def test_bad_calls_are_4xx_and_the_session_goes_on(svc, opened):
    sid = opened()["id"]
    assert call(svc, sid, "").status_code == 422
    assert call(svc, sid, "print(1)", timeout_s=3600).status_code == 422
    assert svc.client.post(f"/v1/sessions/{sid}/execute", headers=ALICE,
                           json={"code": "1", "extra": True}).status_code == 422
    assert call(svc, sid, "#" * (2 << 20)).status_code == 413
    assert ok(svc, sid, "print('fine')") == "fine\n"
