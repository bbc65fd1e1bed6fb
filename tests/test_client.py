"""warmpool.client against a real server started by the test: typed results, errors, retries, both clients."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO
from warmpool.client import (
    AsyncClient,
    AuthError,
    Client,
    ExecuteResult,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    TaskPending,
    WarmpoolError,
)
from warmpool.client.protocol import RetryPolicy, task_body

pytestmark = pytest.mark.docker


def test_the_client_imports_nothing_of_the_server():
    """Importable where only httpx is: docker, redis, fastapi and our server packages blocked."""
    blocked = ("docker", "redis", "fastapi", "starlette", "uvicorn", "pool", "api", "anyio")
    code = ("import sys\n"
            f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
            "import warmpool.client, warmpool.client.protocol\n"
            "from warmpool.client import Client, AsyncClient, WarmpoolError\n"
            "Client('http://127.0.0.1:9').close()\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_task_bodies_and_the_retry_policy():
    body = task_body("print(1)", resources={"cpu": 1, "ram": "1GiB"}, ram="64MiB", image="python",
                     files={"a.txt": "hi", "b.bin": b"\x00\xff"}, outputs=["*.png"], timeout_s=None)
    assert body == {"code": "print(1)", "resources": {"cpu": 1, "ram": "64MiB"}, "image": "python",
                    "files": [{"path": "a.txt", "content": "hi"},
                              {"path": "b.bin", "content": "AP8=", "encoding": "base64"}],
                    "outputs": ["*.png"]}
    policy = RetryPolicy(max_retries=2, max_wait_s=10)

    def answer(status: int, **headers: str) -> httpx.Response:
        return httpx.Response(status, headers=headers)
    assert policy.delay_s(answer(429, **{"Retry-After": "3"}), 0) == 3
    assert policy.delay_s(answer(503, **{"Retry-After": "300"}), 1) == 10, "capped"
    assert policy.delay_s(answer(503), 1) == 1.0, "no Retry-After: a doubling backoff"
    assert 0 <= policy.delay_s(answer(503, **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), 0) <= 10
    assert policy.delay_s(answer(503), 2) is None, "retries are bounded"
    assert policy.delay_s(answer(500), 0) is None and policy.delay_s(answer(422), 0) is None


def test_the_client_runs_tasks_and_raises_typed_errors(serve):
    svc = serve(env={"WARMPOOL_API_KEYS": "k1"})
    with Client(svc.base_url, api_key="k1") as client:
        result = client.execute("import sys; print('out'); print('err', file=sys.stderr); raise SystemExit(3)",
                                ram="64MiB", stdin="")
        assert isinstance(result, ExecuteResult) and not result.ok
        assert (result.status, result.exit_code, result.stdout, result.stderr, result.tier) == (
            "failed", 3, "out\n", "err\n", "one")
        assert result.raw["id"] == result.id and result.timings["total_ms"] > 0
        assert client.execute("import sys; print(sys.stdin.read()[::-1])", stdin="abc").stdout == "cba\n"

        accepted = client.submit("import time; time.sleep(1); print('later')", ram="64MiB")
        assert accepted.status == "queued" and accepted.link == f"/v1/tasks/{accepted.id}"
        pending = client.get(accepted.id)
        assert isinstance(pending, TaskPending) and pending.status in ("queued", "running")
        done = client.get(accepted.id, wait_s=30)
        assert isinstance(done, ExecuteResult) and done.stdout == "later\n"
        ids = [t.id for t in client.batch(["print(1)", {"code": "print(2)", "ram": "200MiB"}])]
        assert [client.wait(i).stdout for i in ids] == ["1\n", "2\n"]

        with pytest.raises(InvalidRequest) as invalid:
            client.execute("print(1)", ram="lots")
        assert invalid.value.status == 422 and invalid.value.detail[0]["loc"] == ["body", "resources", "ram"]
        assert "resources.ram" in str(invalid.value)
        with pytest.raises(InvalidRequest) as batch_invalid:
            client.batch(["print(1)", {"code": "print(2)", "timeout_s": 10_000}])
        assert batch_invalid.value.detail[0]["loc"] == ["body", "tasks", 1, "timeout_s"]
        with pytest.raises(PayloadTooLarge):
            client.execute("#" * (2 << 20))
        with pytest.raises(NotFound) as missing:
            client.get("0" * 32)
        assert missing.value.status == 404 and "no task" in missing.value.detail
    with Client(svc.base_url, api_key="wrong") as stranger, pytest.raises(AuthError) as denied:
        stranger.execute("print(1)")
    assert denied.value.status == 403 and isinstance(denied.value, WarmpoolError)


def test_the_client_retries_429_after_retry_after(serve):
    svc = serve(env={"WARMPOOL_RATE_LIMIT_PER_S": "1", "WARMPOOL_RATE_LIMIT_BURST": "1"})
    with Client(svc.base_url, max_retries=0) as impatient:
        impatient.execute("print(1)")
        with pytest.raises(RateLimited) as limited:
            impatient.execute("print(2)")
        assert limited.value.status == 429 and limited.value.retry_after_s == 1
    with Client(svc.base_url, max_retries=3) as patient:
        results = [patient.execute(f"print({i})").stdout for i in range(3)]  # the bucket holds one at a time
    assert results == ["0\n", "1\n", "2\n"]


def test_the_async_client_does_the_same(serve):
    svc = serve()

    async def main() -> None:
        async with AsyncClient(svc.base_url) as client:
            result = await client.execute("print(6 * 7)", ram="64MiB")
            assert (result.status, result.stdout) == ("succeeded", "42\n")
            accepted = await client.submit("import time; time.sleep(0.5); print('async later')")
            assert (await client.wait(accepted.id, timeout_s=60)).stdout == "async later\n"
            batch = await client.batch(["print('a')", "print('b')"])
            done = await asyncio.gather(*(client.wait(t.id) for t in batch))
            assert [d.stdout for d in done] == ["a\n", "b\n"]
            tiers = await client.tiers()
            assert [t["name"] for t in tiers] == ["one", "two"]
            with pytest.raises(InvalidRequest):
                await client.execute("print(1)", cpu=-1)
            code = "import sys; print('o', flush=True); print('e', file=sys.stderr, flush=True)"
            events = [e async for e in client.stream(code)]
            assert [e.kind for e in events] == ["stdout", "stderr", "result"]
            assert events[0].text == "o\n" and events[-1].result is not None and events[-1].result.ok
    asyncio.run(main())


def test_stream_gives_output_then_the_result(serve):
    """Works with any server: streamed as it arrives where the server streams, else from the result."""
    svc = serve()
    with Client(svc.base_url) as client:
        events = list(client.stream("import sys; print('one'); print('two', file=sys.stderr); raise SystemExit(2)"))
    assert "".join(e.text for e in events if e.kind == "stdout") == "one\n"
    assert "".join(e.text for e in events if e.kind == "stderr") == "two\n"
    assert events[-1].kind == "result" and events[-1].result is not None
    assert (events[-1].result.status, events[-1].result.exit_code) == ("failed", 2)


def test_the_readme_client_example_runs(serve):
    """The README's client example, run as it is printed there, prints what the README shows."""
    svc = serve()
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- client-example -->")
    code = readme[readme.index("```python\n", start) + 10:readme.index("```\n", readme.index("```python\n", start))]
    shown_at = readme.index("```text\n", start) + 8
    shown = readme[shown_at:readme.index("```", shown_at)]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "WARMPOOL_URL": svc.base_url})
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown




def test_stream_and_events_arrive_chunk_by_chunk(serve):
    svc = serve()
    code = "import time\nprint('a', flush=True)\ntime.sleep(0.5)\nprint('b', flush=True)\n"
    with Client(svc.base_url) as client:
        events = list(client.stream(code))
        assert [(e.kind, e.text) for e in events[:-1]] == [("stdout", "a\n"), ("stdout", "b\n")]
        accepted = client.submit(code)
        later = list(client.events(accepted.id))
    assert later[-1].result is not None and later[-1].result.stdout == "a\nb\n"


def test_sessions_keep_state_until_closed(serve):
    svc = serve()
    with Client(svc.base_url) as client:
        with client.session({"ram": "64MiB"}, idle_timeout_s=60) as session:
            assert session.info.tier == "one" and session.info.idle_timeout_s == 60
            assert session.execute("x = 41 + 1").ok
            assert session.execute("print(x)").stdout == "42\n"
            assert [e.text for e in session.stream("print(x + 1)") if e.kind == "stdout"] == ["43\n"]
            # files go in with one call and stay; outputs of a later call bring back what an earlier one wrote
            assert session.execute("import pathlib; pathlib.Path('out.bin').write_bytes(b'x' * x)",
                                   files={"in.bin": b"\x01\x02"}).ok
            later = session.execute("print(open('in.bin', 'rb').read())", outputs=["*.bin"])
            assert later.stdout == "b'\\x01\\x02'\n"
            assert [(f.path, f.content) for f in later.files] == [("in.bin", b"\x01\x02"), ("out.bin", b"x" * 42)]
        with pytest.raises(NotFound):
            session.refresh()


def test_files_go_in_and_come_back(serve, tmp_path):
    svc = serve()
    with Client(svc.base_url) as client:
        code = "import pathlib; pathlib.Path('out.bin').write_bytes(pathlib.Path('in.bin').read_bytes()[::-1])"
        result = client.execute(code, files={"in.bin": b"\x01\x02\x03"}, outputs=["out.bin"])
        assert [(f.path, f.content) for f in result.files] == [("out.bin", b"\x03\x02\x01")]
        assert result.files[0].save(tmp_path).read_bytes() == b"\x03\x02\x01"
        assert "python" in {image["name"] for image in client.images()}
