"""The service end to end on the real Docker engine: contract, statuses, limits, reuse, faults."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import pytest

from tests.conftest import SCRATCH_ROOT, containers_of, scratch_left

pytestmark = pytest.mark.docker

SEED = {"task_type": "execute_code", "code": "print('Hello, World!')",
        "resources": {"cpu": "2", "gpu": "0", "ram": "512MB", "storage": "1GB"}}
MIB = 1024 ** 2


@pytest.fixture
def service(serve):
    return serve()


def test_seed_examples_with_default_tiers(serve):
    svc = serve(tiers=None, env={"WARMPOOL_TIERS_FILE": ""})
    body = svc.client.post("/v1/execute", json=SEED).json()
    assert body["status"] == "succeeded" and body["exit_code"] == 0
    assert body["stdout"] == "Hello, World!\n" and body["stderr"] == ""
    assert body["tier"] == "small"
    assert body["resources"] == {"cpu": 2.0, "gpu": 0, "ram_bytes": 512 * MIB, "storage_bytes": 1024 * MIB}
    assert set(body["timings"]) == {"queue_ms", "run_ms", "total_ms"}
    second = svc.client.post("/v1/execute", json={"code": "import math\nprint(math.factorial(20))",
                                                  "resources": {"cpu": 0.5, "ram": "128MiB"}}).json()
    assert second["stdout"] == "2432902008176640000\n" and second["tier"] == "nano"


@pytest.mark.parametrize(("code", "status", "exit_code"), [
    ("print('ok')", "succeeded", 0),
    ("import sys; sys.exit(3)", "failed", 3),
    ("raise ValueError('boom')", "failed", 1),
    ("while True: pass", "timed_out", None),
    ("import time; time.sleep(60)", "timed_out", None),
    ("x = bytearray(400 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])", "memory_exceeded", None),
    ("import sys\nwhile True: sys.stdout.write('x' * 65536)", "output_limit_exceeded", None),
])
def test_each_status_from_a_real_snippet(service, code, status, exit_code):
    body = service.execute(code, timeout_s=2, resources={"ram": "200MiB"}).json()
    assert body["status"] == status, body
    if exit_code is not None:
        assert body["exit_code"] == exit_code
    assert service.execute("print('after')", resources={"ram": "200MiB"}).json()["stdout"] == "after\n"


def test_failure_output_is_captured_separately(service):
    body = service.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\nraise KeyError('k')").json()
    assert body["stdout"] == "out\n"
    assert body["stderr"].startswith("err\n") and "KeyError" in body["stderr"]


def test_stdin_and_main_guard(service):
    code = "import sys\nif __name__ == '__main__':\n    print(sys.stdin.read().upper())"
    assert service.execute(code, stdin="hi there").json()["stdout"] == "HI THERE\n"


def test_limits_are_really_applied(service, docker_client):
    code = """
import os
def read(path):
    try:
        return open(path).read().strip()
    except OSError:
        return "?"
print(read('/sys/fs/cgroup/memory/memory.limit_in_bytes'))
print(read('/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes'))
print(read('/sys/fs/cgroup/pids/pids.max'))
st = os.statvfs('/tmp'); print(st.f_blocks * st.f_frsize)
print(os.getuid())
"""
    body = service.execute(code, resources={"ram": "200MiB"}).json()
    memory, memsw, pids, tmp_size, uid = body["stdout"].split()
    assert int(memory) == 256 * MIB and memsw in (str(256 * MIB), "?")
    # /tmp is a filesystem of the tier's storage: its size less ext4's own metadata (test_scratch.py)
    assert 0.9 * 128 * MIB < int(tmp_size) <= 128 * MIB and uid == "10001"
    container = containers_of(docker_client, service.instance_id)[0]
    host = docker_client.api.inspect_container(container.id)["HostConfig"]
    tier_ram = {"one": 96 * MIB, "two": 256 * MIB}
    assert host["Memory"] in tier_ram.values() and host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] in (500_000_000, 1_000_000_000) and host["PidsLimit"] == 128
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert pids == "128"


def test_files_and_processes_do_not_survive_into_the_next_task(service):
    """Tier "one" has one container, so both tasks run on it; the second sees nothing of the first."""
    plant = """
import os, socket, subprocess
for d in ('/tmp', '/dev/shm', '/var/tmp', os.environ['HOME'], os.getcwd()):
    open(os.path.join(d, 'marker'), 'w').write('x')
subprocess.Popen(['sleep', '300'], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        import time; time.sleep(1.5); open('/tmp/late', 'w').write('late')
    os._exit(0)
print(socket.gethostname())
"""
    check = """
import os, socket, time
time.sleep(2)
found = [p for p in ('/tmp/marker', '/dev/shm/marker', '/var/tmp/marker', '/tmp/late',
                     os.path.join(os.environ['HOME'], 'marker'), os.path.join(os.getcwd(), 'marker'))
         if os.path.exists(p)]
# PID 1 and the template are the runner's own (root): no other process may be left.
procs = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid() and os.stat(f'/proc/{p}').st_uid != 0]
print(socket.gethostname(), found, procs)
"""
    first = service.execute(plant, resources={"ram": "64MiB"}).json()
    assert first["tier"] == "one" and first["status"] == "succeeded", first
    second = service.execute(check, resources={"ram": "64MiB"}).json()
    host, rest = second["stdout"].split(" ", 1)
    assert host == first["stdout"].strip(), "the tier has one container, so the same one must be reused"
    assert rest.strip() == "[] []"


def test_twenty_concurrent_requests_all_succeed(service):
    with concurrent.futures.ThreadPoolExecutor(20) as executor:
        bodies = list(executor.map(lambda i: service.execute(f"print({i} * 2)").json(), range(20)))
    assert [b["stdout"] for b in bodies] == [f"{i * 2}\n" for i in range(20)]
    assert all(b["status"] == "succeeded" for b in bodies)


@pytest.mark.parametrize(("body", "status", "field"), [
    ({}, 422, "code"),
    ({"code": ""}, 422, "code"),
    ({"code": "print(1)", "task_type": "shell"}, 422, "task_type"),
    ({"code": "print(1)", "resources": {"ram": "lots"}}, 422, "ram"),
    ({"code": "print(1)", "resources": {"cpu": "-1"}}, 422, "cpu"),
    ({"code": "print(1)", "resources": {"cpu": "NaN"}}, 422, "cpu"),
    ({"code": "print(1)", "resources": {"storage": "1XB"}}, 422, "storage"),
    ({"code": "print(1)", "resources": {"gpu": 1}}, 422, "gpu"),
    ({"code": "print(1)", "resources": {"ram": "64GiB"}}, 422, "ram"),
    ({"code": "print(1)", "resources": {"disk": "1G"}}, 422, "disk"),
    ({"code": "print(1)", "timeout_s": -1}, 422, "timeout_s"),
    ({"code": "print(1)", "timeout_s": 10_000}, 422, "timeout_s"),
    ({"code": 5}, 422, "code"),
    ({"code": "x" * (1024 * 1024 + 1)}, 413, None),
])
def test_bad_input_is_a_4xx_naming_the_field_and_the_pool_keeps_serving(service, body, status, field):
    response = service.client.post("/v1/execute", json=body)
    assert response.status_code == status, response.text
    if field is not None:
        assert field in response.text
    assert service.execute("print('still here')").json()["stdout"] == "still here\n"


def test_garbage_bodies_are_4xx(service):
    for raw, content_type in ((b"{not json", "application/json"), (b"\xff\xfe", "application/json"),
                              (b"[]", "application/json"), (b"code=1", "text/plain")):
        response = service.client.post("/v1/execute", content=raw, headers={"content-type": content_type})
        assert 400 <= response.status_code < 500, (raw, response.status_code)


def test_tiers_route_lists_tiers_smallest_first(service):
    tiers = service.client.get("/v1/tiers").json()
    assert [t["name"] for t in tiers] == ["one", "two"]
    assert tiers[0]["ram_bytes"] == 96 * MIB and tiers[0]["runtime"] == "runc"


def test_health_and_readiness(service):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz").json()
    assert ready["ready"] is True and all(ready["checks"].values())


def test_container_killed_from_outside_is_replaced(service, docker_client):
    """An idle container killed by `docker kill` is replaced; a busy one gives its task sandbox_error."""
    idle = [c for c in containers_of(docker_client, service.instance_id) if c.labels["warmpool.tier"] == "one"]
    idle[0].kill()
    _wait_for(lambda: service.execute("print(1)", resources={"ram": "64MiB"}).json()["status"] == "succeeded")

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        pending = executor.submit(service.execute, "import time; time.sleep(30)", resources={"ram": "64MiB"})
        time.sleep(1.5)
        (busy,) = [c for c in containers_of(docker_client, service.instance_id)
                   if c.labels["warmpool.tier"] == "one" and c.status == "running"]
        busy.kill()
        body = pending.result(timeout=30).json()
    assert body["status"] == "sandbox_error" and body["message"]
    assert service.execute("print(2)", resources={"ram": "64MiB"}).json()["stdout"] == "2\n"


def test_shutdown_removes_every_container(serve, docker_client):
    svc = serve()
    assert containers_of(docker_client, svc.instance_id)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status still says why it stopped
    assert svc.stop() in (0, -signal.SIGTERM)
    assert containers_of(docker_client, svc.instance_id) == []


def test_orphans_of_a_dead_pool_are_removed_at_start(serve, docker_client):
    svc = serve()
    svc.process.kill()  # no shutdown: its containers and their scratch filesystems stay behind as orphans
    svc.process.wait()
    assert containers_of(docker_client, svc.instance_id)
    assert len([path for path in scratch_left(svc.instance_id) if path.startswith(SCRATCH_ROOT)]) >= 3
    serve()
    assert containers_of(docker_client, svc.instance_id) == []
    assert scratch_left(svc.instance_id) == []  # mounts, loop devices and the state dir, all gone


def _wait_for(predicate, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_docker_outage_gives_503_and_the_service_recovers(serve, tmp_path):
    """The service's engine goes away (through a proxy we cut) and comes back."""
    from tests.docker_proxy import DockerProxy

    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    proxy.start()
    svc = serve(env={"DOCKER_HOST": proxy.url})
    try:
        assert svc.execute("print('before')").json()["stdout"] == "before\n"
        proxy.cut()
        time.sleep(1.0)
        response = svc.execute("print('during')")
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert svc.client.get("/readyz").status_code == 503
        proxy.start()
        _wait_for(lambda: svc.client.get("/readyz").status_code == 200, timeout_s=60)
        assert svc.execute("print('after')").json()["stdout"] == "after\n"
    finally:
        svc.stop()  # while the proxy is up, so that shutdown can remove its containers
        proxy.close()


def test_cold_mode_starts_a_container_per_task(serve, docker_client):
    """WARMPOOL_MODE=cold (for comparison benchmarks): ready at once, a fresh container for every task."""
    svc = serve(env={"WARMPOOL_MODE": "cold"})
    assert containers_of(docker_client, svc.instance_id) == []
    hosts = {svc.execute("import socket; print(socket.gethostname())").json()["stdout"] for _ in range(3)}
    assert len(hosts) == 3
    _wait_for(lambda: containers_of(docker_client, svc.instance_id) == [])
