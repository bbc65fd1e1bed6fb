"""Callbacks against real servers: signed, retried, never redirected, only to allowed addresses, sent once."""

from __future__ import annotations

import time

import pytest

from tests.callback_receiver import receiver  # noqa: F401 - a fixture
from tests.polling import wait_for

pytestmark = pytest.mark.docker

SECRET = "s3cret-for-tests"
# Receivers listen on 127.0.0.2, the one address the servers allow: 127.0.0.1 (and so `localhost`) is not.
ALLOW = {"WARMPOOL_CALLBACK_ALLOW": "127.0.0.2", "WARMPOOL_CALLBACK_SECRET": SECRET}


def settle(seconds: float = 3.0) -> None:
    """Give a wrongly repeated callback the time to show up (only used after the expected one arrived)."""
    time.sleep(seconds)


def test_callbacks_are_off_unless_allowed(serve, receiver):  # noqa: F811
    hook = receiver()
    svc = serve()
    refused = svc.client.post("/v1/tasks", json={"code": "print(1)", "callback_url": hook.url()})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "callback_url"]
    assert "disabled" in refused.text
    assert svc.client.post("/v1/execute", json={"code": "print(1)", "callback_url": hook.url()}).status_code == 422


def test_a_callback_carries_the_signed_result_and_retries(serve, receiver):  # noqa: F811
    svc = serve(env=ALLOW)
    hook = receiver()
    task = svc.client.post("/v1/tasks", json={"code": "print('called back')", "callback_url": hook.url("/a?x=1")})
    assert task.status_code == 202, task.text
    [got] = hook.wait_count(1)
    stored = svc.client.get(task.json()["link"]).json()
    assert got.path == "/a?x=1" and got.json() == stored and stored["stdout"] == "called back\n"
    assert got.signed_with(SECRET) and not got.signed_with("another secret")
    assert got.headers["x-warmpool-task-id"] == stored["id"] and got.headers["x-warmpool-attempt"] == "1"
    assert got.headers["content-type"] == "application/json"

    flaky = receiver(statuses=[500, 503, 200])
    svc.client.post("/v1/tasks", json={"code": "raise SystemExit(3)", "callback_url": flaky.url()})
    attempts = flaky.wait_count(3, timeout_s=30)
    assert [a.headers["x-warmpool-attempt"] for a in attempts] == ["1", "2", "3"]
    assert len({a.body for a in attempts}) == 1 and all(a.signed_with(SECRET) for a in attempts)
    assert attempts[0].json()["status"] == "failed" and attempts[0].json()["exit_code"] == 3
    settle()
    assert len(flaky.received) == 3, "no attempt after the one that was answered 200"


def test_redirects_are_not_followed_and_retries_stop(serve, receiver):  # noqa: F811
    svc = serve(env={**ALLOW, "WARMPOOL_CALLBACK_RETRY_S": "4"})
    elsewhere = receiver()
    redirecting = receiver(statuses=[307], location=elsewhere.url())
    svc.client.post("/v1/tasks", json={"code": "print(1)", "callback_url": redirecting.url()})
    redirecting.wait_count(2, timeout_s=30)  # the first attempt and a retry, both answered 307
    settle(6)  # past the 4 s retry window: the schedule (1, 2, ...) has stopped
    assert elsewhere.received == [], "a redirect was followed"
    count = len(redirecting.received)
    assert 2 <= count <= 3
    settle(3)
    assert len(redirecting.received) == count, "retries went on past the window"


def test_only_allowed_addresses_may_be_called(serve, receiver):  # noqa: F811
    svc = serve(env=ALLOW)
    hook = receiver()

    def refused(url: str) -> str:
        answer = svc.client.post("/v1/tasks", json={"code": "print(1)", "callback_url": url})
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["detail"][0]["loc"] == ["body", "callback_url"]
        return answer.json()["detail"][0]["msg"]

    assert "not in WARMPOOL_CALLBACK_ALLOW" in refused(f"http://127.0.0.1:{hook.port}/hook")
    # A name is checked on what it resolves to: localhost is 127.0.0.1 (and ::1), not the allowed 127.0.0.2.
    assert "localhost resolves to" in refused(f"http://localhost:{hook.port}/hook")
    assert "not in WARMPOOL_CALLBACK_ALLOW" in refused("http://10.1.2.3/hook")
    assert "http" in refused(f"ftp://127.0.0.2:{hook.port}/hook")
    assert "user name" in refused(f"http://me:pw@127.0.0.2:{hook.port}/hook")
    assert "host" in refused("http:///nothing")
    batch = svc.client.post("/v1/tasks/batch", json={"tasks": [
        {"code": "print(1)", "callback_url": hook.url()}, {"code": "print(2)", "callback_url": "http://[::1]/"}]})
    assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == ["body", "tasks", 1, "callback_url"]
    settle(1)
    assert hook.received == [], "nothing of the refused batch ran"


def test_batch_items_are_called_back_once_each(serve, receiver):  # noqa: F811
    svc = serve(env=ALLOW)
    hook = receiver()
    other = receiver()
    tasks = [{"code": f"print({i})", "callback_url": (hook if i % 2 else other).url(f"/t{i}")} for i in range(6)]
    tasks.append({"code": "print('no callback')"})
    accepted = svc.client.post("/v1/tasks/batch", json={"tasks": tasks})
    assert accepted.status_code == 202, accepted.text
    ids = [t["id"] for t in accepted.json()["tasks"]]
    hook.wait_count(3)
    other.wait_count(3)
    settle()
    for target, indexes in ((hook, (1, 3, 5)), (other, (0, 2, 4))):
        by_task = target.by_task()
        assert sorted(by_task) == sorted(ids[i] for i in indexes)
        assert all(len(calls) == 1 for calls in by_task.values())
        assert {calls[0].path: calls[0].json()["stdout"] for calls in by_task.values()} == {
            f"/t{i}": f"{i}\n" for i in indexes}


@pytest.mark.redis
def test_scaleout_callback_is_sent_once_after_its_api_is_gone(cluster, receiver):  # noqa: F811
    c = cluster()
    c.worker()
    accepting = c.api(env=ALLOW)
    survivor = c.api(env=ALLOW)
    hook = receiver()
    task = accepting.client.post("/v1/tasks", json={"code": "import time; time.sleep(3); print('orphan')",
                                                    "callback_url": hook.url("/orphan")})
    assert task.status_code == 202, task.text
    accepting.process.kill()  # as abrupt as a crash: the API that took the task is gone before it ends
    accepting.process.wait()
    [got] = hook.wait_count(1)
    assert got.json()["stdout"] == "orphan\n" and got.signed_with(SECRET)
    assert got.json() == survivor.client.get(task.json()["link"]).json()

    # Two API processes compete for every callback: each is still sent once.
    second = c.api(env=ALLOW)
    batch = second.client.post("/v1/tasks/batch", json={"tasks": [
        {"code": f"print({i})", "callback_url": hook.url(f"/b{i}")} for i in range(8)]})
    assert batch.status_code == 202, batch.text
    hook.wait_count(9)
    settle()
    by_task = hook.by_task()
    assert len(hook.received) == 9 and all(len(calls) == 1 for calls in by_task.values())
    assert sorted(calls[0].path for calls in by_task.values()) == sorted(["/orphan"] + [f"/b{i}" for i in range(8)])


@pytest.mark.redis
def test_scaleout_callback_retries_until_answered(cluster, receiver):  # noqa: F811
    c = cluster()
    c.worker()
    api = c.api(env=ALLOW)
    flaky = receiver(statuses=[500, 200])
    api.client.post("/v1/tasks", json={"code": "print('again')", "callback_url": flaky.url()})
    attempts = flaky.wait_count(2, timeout_s=30)
    assert [a.headers["x-warmpool-attempt"] for a in attempts] == ["1", "2"]
    assert attempts[1].json()["stdout"] == "again\n" and attempts[1].signed_with(SECRET)
    wait_for(lambda: all(c.redis.hget(k, "callback_state") == "delivered"
                         for k in c.redis.scan_iter(f"{c.prefix}:task:*")), what="the callback marked delivered")
    assert c.redis.zcard(f"{c.prefix}:callbacks") == 0
