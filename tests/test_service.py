"""The service end to end on the real Docker engine: contract, statuses, limits, reuse, faults."""

from __future__ import annotations

import concurrent.futures
import json
import signal

import pytest

from tests.conftest import ADMIN_KEY, SCRATCH_ROOT, containers_of, idle_again, scratch_left, tier_view
from tests.polling import wait_for

pytestmark = pytest.mark.docker

SEED = {"task_type": "execute_code", "code": "print('Hello, World!')",
        "resources": {"cpu": "2", "gpu": "0", "ram": "512MB", "storage": "1GB"}}
MIB = 1024 ** 2


@pytest.fixture
def service(serve):
    return serve(env={"WARMPOOL_ADMIN_KEY": ADMIN_KEY})


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


LIMITS_SEEN_INSIDE = """
import json, os, socket
def read(*paths):  # cgroup v1's file, else v2's
    for path in paths:
        if os.path.exists(path):
            return open(path).read().strip()
    raise SystemExit(f"none of {paths} exists")
st = os.statvfs('/tmp')
v1 = os.path.exists('/sys/fs/cgroup/memory')
print(json.dumps({
    "cgroup": "v1" if v1 else "v2",
    "memory": read('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory.max'),
    # memory+swap (v1), or swap alone (v2): its file must be there, or swap is not limited
    "swap": read('/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes' if v1 else '/sys/fs/cgroup/memory.swap.max'),
    "pids": read('/sys/fs/cgroup/pids/pids.max', '/sys/fs/cgroup/pids.max'),
    # quota and period in microseconds: v1's two files, or v2's cpu.max ("quota period")
    "cpu": (read('/sys/fs/cgroup/cpu/cpu.cfs_quota_us') + ' ' + read('/sys/fs/cgroup/cpu/cpu.cfs_period_us')) if v1
           else read('/sys/fs/cgroup/cpu.max'),
    "tmp_bytes": st.f_blocks * st.f_frsize, "uid": os.getuid(), "host": socket.gethostname()}))
"""


def test_the_cpu_period_setting_reaches_the_kernel(serve):
    """WARMPOOL_CPU_PERIOD_US: the same share of cpu (the quota scales with it), enforced over that period."""
    svc = serve(env={"WARMPOOL_CPU_PERIOD_US": "10000"})
    body = svc.execute(LIMITS_SEEN_INSIDE, resources={"ram": "64MiB"}).json()
    assert (body["status"], body["tier"]) == ("succeeded", "one"), body
    assert json.loads(body["stdout"])["cpu"] == "5000 10000", "0.5 cpu: 5 ms in every 10 ms"


@pytest.mark.parametrize(("ram", "tier", "ram_bytes", "quota_us", "tmp_bytes"), [
    ("64MiB", "one", 96 * MIB, 50_000, 32 * MIB),
    ("200MiB", "two", 256 * MIB, 100_000, 128 * MIB),
])
def test_limits_are_really_applied(service, docker_client, ram, tier, ram_bytes, quota_us, tmp_bytes):
    """The container that ran the task has its own tier's limits, seen from inside and by the engine."""
    body = service.execute(LIMITS_SEEN_INSIDE, resources={"ram": ram}).json()
    assert (body["status"], body["tier"]) == ("succeeded", tier), body
    inside = json.loads(body["stdout"])
    no_swap = str(ram_bytes) if inside["cgroup"] == "v1" else "0"  # memory+swap == memory, or swap 0
    assert int(inside["memory"]) == ram_bytes and inside["swap"] == no_swap
    assert inside["pids"] == "128" and inside["uid"] == 10001
    assert inside["cpu"] == f"{quota_us} 100000", "the tier's cpus over Docker's default 100 ms period"
    # /tmp is a filesystem of the tier's storage: its size less ext4's own metadata (test_scratch.py)
    assert 0.9 * tmp_bytes < inside["tmp_bytes"] <= tmp_bytes
    # The hostname is the container's short id: inspect that very container.
    inspect = docker_client.api.inspect_container(inside["host"])
    assert inspect["Config"]["Labels"]["warmpool.tier"] == tier
    assert inspect["Config"]["Labels"]["warmpool.instance"] == service.instance_id
    host = inspect["HostConfig"]
    assert (host["Memory"], host["MemorySwap"]) == (ram_bytes, ram_bytes)
    assert (host["CpuQuota"], host["CpuPeriod"], host["NanoCpus"]) == (quota_us, 100_000, 0)
    assert host["PidsLimit"] == 128 and host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    (scratch,) = inspect["Mounts"]  # its own scratch filesystem, made for it
    assert (scratch["Type"], scratch["Destination"]) == ("bind", "/tmp") and not host.get("Tmpfs")
    assert scratch["Source"].startswith(f"{SCRATCH_ROOT}/{service.instance_id}/{tier}-")


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


@pytest.mark.parametrize(("raw", "content_type", "error_type"), [
    (b"{not json", "application/json", "json_invalid"),
    (b"\xff\xfe", "application/json", "json_invalid"),
    (b"[]", "application/json", "model_attributes_type"),
    (b"code=1", "text/plain", "model_attributes_type"),
])
def test_garbage_bodies_are_422_located_at_the_body(service, raw, content_type, error_type):
    response = service.client.post("/v1/execute", content=raw, headers={"content-type": content_type})
    assert response.status_code == 422, (raw, response.status_code, response.text)
    (error,) = response.json()["detail"]
    assert error["type"] == error_type and error["loc"][0] == "body", error


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
    (idle,) = [c for c in containers_of(docker_client, service.instance_id) if c.labels["warmpool.tier"] == "one"]
    idle.kill()
    wait_for(lambda: service.execute("print(1)", resources={"ram": "64MiB"}).json()["status"] == "succeeded",
             "a task on tier one's replacement container")
    assert tier_view(service, "one")["replaced"] == {"runner_lost": 1}
    idle_again(service, "one")

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        pending = executor.submit(service.execute, "import time; time.sleep(30)", resources={"ram": "64MiB"})
        wait_for(lambda: tier_view(service, "one")["busy"] == 1, "tier one busy with the task")
        (busy,) = [c for c in containers_of(docker_client, service.instance_id)
                   if c.labels["warmpool.tier"] == "one" and c.id != idle.id]
        busy.kill()
        body = pending.result(timeout=30).json()
    assert body["status"] == "sandbox_error" and body["message"]
    assert service.execute("print(2)", resources={"ram": "64MiB"}).json()["stdout"] == "2\n"
    assert tier_view(service, "one")["replaced"] == {"runner_lost": 1, "sandbox_error": 1}


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


def test_docker_outage_gives_503_and_the_service_recovers(serve, tmp_path):
    """The service's engine goes away (through a proxy we cut) and comes back."""
    from tests.docker_proxy import DockerProxy

    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    proxy.start()
    svc = serve(env={"DOCKER_HOST": proxy.url})
    try:
        assert svc.execute("print('before')").json()["stdout"] == "before\n"
        proxy.cut()
        wait_for(lambda: svc.client.get("/readyz").status_code == 503, "the service to see the engine gone")
        response = svc.execute("print('during')")
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        proxy.start()
        wait_for(lambda: svc.client.get("/readyz").status_code == 200, "the service to see the engine back",
                 timeout_s=60)
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
    wait_for(lambda: containers_of(docker_client, svc.instance_id) == [], "every task's container removed")
