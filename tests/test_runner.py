"""The in-container runner (runner_image/runner.py, runner_image/sandbox/) over its frame protocol, in sandbox
containers the pool's own code creates (tests/runner_harness.py): its backend, its host config for a test tier,
its labels, from the image the service runs. The `runner` fixture removes every container it started, even on failure.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from pool.engine.docker_backend import DockerBackend
from pool.engine.scratch import ScratchStore
from tests.runner_harness import RunnerContainer, containers_left, label_args, product_image, runner_scratch

pytestmark = pytest.mark.docker

# A task sees PID 1, the template (both root: the runner's own) and itself, and nothing else.
ONLY_RUNNER_AND_ME = """
import os
others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]
print(len(others) == 2 and '1' in others and all(os.stat(f'/proc/{p}').st_uid == 0 for p in others))
"""

RESULT_KEYS = {"op", "id", "status", "exit_code", "signal", "stdout", "stderr", "stdout_truncated",
               "stderr_truncated", "run_ms", "usage", "files", "files_truncated"}


@pytest.fixture(scope="session")
def engine(docker_client) -> Iterator[DockerBackend]:
    """The pool's own Docker backend (`docker_client` fails the test when there is no engine)."""
    backend = DockerBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def runner_image(engine: DockerBackend) -> str:
    """The image the service runs, which must hold this working tree's runner: a stale one fails, never skips."""
    try:
        return product_image(engine)
    except AssertionError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def scratch() -> Iterator[ScratchStore | None]:
    """The pool's disk scratch store for the runner tests' containers; closed (and checked gone) at the end."""
    store = runner_scratch()
    yield store
    if store is not None:
        store.close()
        assert not os.path.exists(store.instance_dir), "the scratch store removed its directory"


@pytest.fixture
def runner(runner_image: str, engine: DockerBackend,
           scratch: ScratchStore | None) -> Iterator[Callable[..., RunnerContainer]]:
    """Start runner containers (`runner(runtime=...)`); all are removed afterwards, and the engine must agree."""
    started: list[RunnerContainer] = []

    def start(runtime: str = "runc") -> RunnerContainer:
        box = RunnerContainer(runner_image, engine, scratch, runtime=runtime)
        started.append(box)
        return box

    yield start
    for box in started:
        box.close()
    left = set(containers_left(engine)) & {box.name for box in started}
    assert not left, f"containers left behind: {sorted(left)}"
    assert scratch is None or scratch.slots_out == 0, "every container's scratch given back"


@pytest.fixture
def box(runner) -> RunnerContainer:
    return runner()


def require_gvisor(engine: DockerBackend) -> None:
    assert "runsc" in engine.info().runtimes, "the engine has no runsc runtime (scripts/ensure-docker.sh adds it)"


def run_ok(box: RunnerContainer, code: str, **fields) -> dict:
    """Run a task that must succeed and leave the container clean; returns the result."""
    result, reset = box.run(code, **fields)
    assert result["status"] == "succeeded", result
    assert reset == {"op": "reset", "id": result["id"], "clean": True, "detail": ""}
    return result


# ---- results --------------------------------------------------------------------------------------

def test_hello_world(box):
    pong = box.ping()
    assert pong == {"op": "pong", "id": pong["id"], "clean": True, "detail": "", "python": "3.11.2"}
    result = run_ok(box, "print('Hello, World!')")
    assert set(result) == RESULT_KEYS
    assert (result["stdout"], result["stderr"], result["exit_code"], result["signal"]) == \
        ("Hello, World!\n", "", 0, None)
    assert result["stdout_truncated"] is result["stderr_truncated"] is False
    assert set(result["usage"]) == {"cpu_s", "max_rss_bytes"}
    assert result["usage"]["max_rss_bytes"] > 1 << 20 and result["run_ms"] > 0


def test_stdin_is_passed_through(box):
    result = run_ok(box, "import sys\nprint(sys.stdin.read().upper(), end='')", stdin="héllo\nwörld\n")
    assert result["stdout"] == "HÉLLO\nWÖRLD\n"
    assert run_ok(box, "import sys\nprint(repr(sys.stdin.read()))")["stdout"] == "''\n"


def test_stderr_is_separate(box):
    result = run_ok(box, "import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (result["stdout"], result["stderr"]) == ("out\n", "err\n")


@pytest.mark.parametrize(("code", "exit_code"), [
    ("import sys; sys.exit(3)", 3), ("raise SystemExit('bye')", 1), ("import os; os._exit(7)", 7)])
def test_exit_code_gives_failed(box, code, exit_code):
    result, reset = box.run(code)
    assert (result["status"], result["exit_code"], result["signal"]) == ("failed", exit_code, None)
    assert reset["clean"] is True


def test_uncaught_exception_prints_a_traceback(box):
    result, _ = box.run("x = 1\nraise ValueError('boom')")
    assert (result["status"], result["exit_code"]) == ("failed", 1)
    assert result["stderr"].startswith("Traceback (most recent call last):\n")
    assert 'File "<task>", line 2, in <module>' in result["stderr"]
    assert "raise ValueError('boom')" in result["stderr"]  # the task's source line
    assert result["stderr"].endswith("ValueError: boom\n")
    assert "/opt/warmpool" not in result["stderr"]  # no frame of the runner's own
    syntax, _ = box.run("print(")
    assert syntax["status"] == "failed" and "SyntaxError" in syntax["stderr"]


@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(100)"])
def test_deadline_gives_timed_out(box, code):
    box.ping()
    started = time.monotonic()
    result, reset = box.run(code, timeout_s=1)
    assert time.monotonic() - started < 4  # the deadline plus a loose grace
    assert (result["status"], result["exit_code"], result["signal"]) == ("timed_out", None, 9)
    assert result["run_ms"] >= 1000
    assert reset["clean"] is True


def test_exit_of_the_task_ends_the_wait_even_if_a_daemon_holds_its_pipes(box):
    started = time.monotonic()
    result, reset = box.run("import subprocess\nsubprocess.Popen(['sleep', '100'])\nprint('bye')", timeout_s=30)
    assert time.monotonic() - started < 5
    assert (result["status"], result["stdout"], reset["clean"]) == ("succeeded", "bye\n", True)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_gives_output_limit_exceeded(box, stream):
    result, reset = box.run(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000)",
                            output_limit_bytes=10_000, timeout_s=10)
    other = "stderr" if stream == "stdout" else "stdout"
    assert (result["status"], result["signal"]) == ("output_limit_exceeded", 9)
    assert result[stream] == "x" * 10_000 and result[f"{stream}_truncated"] is True
    assert result[other] == "" and result[f"{other}_truncated"] is False
    assert reset["clean"] is True


def test_output_exactly_at_the_limit_is_not_truncated(box):
    result = run_ok(box, "print('x' * 99)", output_limit_bytes=100)
    assert result["stdout"] == "x" * 99 + "\n" and result["stdout_truncated"] is False


@pytest.mark.parametrize("code", [
    "b = bytearray(512 * 1024 * 1024)",                             # the OOM killer
    "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))",  # the OOM killer, gradually
    "b = bytearray(1 << 44)",                                        # an uncaught MemoryError
])
def test_memory_bomb_gives_memory_exceeded_and_the_runner_survives(box, code):
    result, reset = box.run(code, timeout_s=20)
    assert result["status"] == "memory_exceeded", result
    assert reset["clean"] is True
    assert run_ok(box, "print('still here')")["stdout"] == "still here\n"


def test_invalid_utf8_output_gives_a_valid_frame(box):
    result = run_ok(box, "import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok')\n"
                         "sys.stderr.buffer.write(b'\\xc3')")
    assert (result["stdout"], result["stderr"]) == ("\ufffd\ufffdok", "\ufffd")


def test_task_runs_as_main_script(box):
    code = ("import __main__, sys\nprint(__name__, sys.argv, __main__.__dict__ is globals())\n"
            "def f(): pass\nimport pickle\nprint(pickle.loads(pickle.dumps(f)) is f)")
    assert run_ok(box, code)["stdout"] == "__main__ ['<task>'] True\nTrue\n"


def test_replaced_or_closed_streams_are_handled_like_python(box):
    code = ("import io, sys\nsys.stdout = io.TextIOWrapper(sys.stdout.buffer, encoding='utf-8')\n"
            "print('via a new wrapper', end='')\nprint('on stderr', file=sys.__stderr__)\nsys.stderr.close()")
    result = run_ok(box, code)
    assert (result["stdout"], result["stderr"]) == ("via a new wrapper", "on stderr\n")
    assert run_ok(box, "import sys\nsys.stdout = None\nprint('lost')")["stdout"] == ""


def test_threads_and_atexit_finish_like_python(box):
    code = ("import atexit, threading, time\natexit.register(print, 'atexit')\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()")
    assert run_ok(box, code)["stdout"] == "thread\natexit\n"


# ---- the sandbox ----------------------------------------------------------------------------------

def test_task_is_unprivileged(box):
    code = """
import os, json
status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines())
print(json.dumps({'ids': [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
                  'cap': status['CapEff'], 'nnp': status['NoNewPrivs'], 'cwd': os.getcwd(),
                  'env': dict(os.environ), 'sid': os.getsid(0) == os.getpid(),
                  'oom': open('/proc/self/oom_score_adj').read().strip()}))
"""
    info = json.loads(run_ok(box, code)["stdout"])
    assert info["ids"] == [10001, 10001, 10001, []]
    assert info["cap"] == "0000000000000000" and info["nnp"] == "1"
    assert info["cwd"] == "/tmp/work" and info["sid"] is True and info["oom"] == "1000"
    assert info["env"] == {"HOME": "/tmp/home", "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                           "TMPDIR": "/tmp", "USER": "sandbox"}


def test_scratch_is_the_containers_own_filesystem_as_the_pool_makes_it(box, scratch):
    """The harness's container is the pool's: /tmp is a filesystem of the tier's storage from the pool's
    scratch store (a tmpfs of that size when WARMPOOL_SCRATCH=memory)."""
    size = int(run_ok(box, "import os\nst = os.statvfs('/tmp')\nprint(st.f_blocks * st.f_frsize)")["stdout"])
    storage_bytes = box.tier.resources.storage_bytes
    inspect = box.backend.inspect(box.container_id)
    if scratch is None:
        assert size == storage_bytes and list(inspect["HostConfig"]["Tmpfs"]) == ["/tmp"]
        return
    assert 0.9 * storage_bytes < size <= storage_bytes  # less ext4's own metadata
    (mount,) = inspect["Mounts"]
    assert (mount["Destination"], mount["Source"]) == ("/tmp", os.path.join(scratch.instance_dir, box.name))


def test_files_left_behind_are_gone_for_the_next_task(box):
    litter = """
import os
paths = ['/tmp/a', '/dev/shm/b', '/var/tmp/c', os.path.expanduser('~/d'), 'e', '/tmp/.hidden']
for path in paths:
    open(path, 'w').write('secret')
os.makedirs('/tmp/deep/er/est')
open('/tmp/deep/er/est/f', 'w').write('secret')
os.chmod('/tmp/deep/er', 0)            # a dir its owner cannot enter or empty
os.symlink('/etc', '/tmp/etc-link')    # must be removed, never followed
os.symlink('/etc/passwd', '/dev/shm/passwd-link')
os.mkfifo('/tmp/fifo')
print(sorted(os.listdir('/tmp')))
"""
    first = run_ok(box, litter)
    assert "deep" in first["stdout"]
    check = ("import os\nprint(sorted(os.listdir('/tmp')), os.listdir('/dev/shm'), os.listdir('/tmp/work'),\n"
             "      os.listdir('/tmp/home'), os.path.exists('/etc/passwd'))")
    assert run_ok(box, check)["stdout"] == "['home', 'work'] [] [] [] True\n"
    assert box.ping()["clean"] is True


def test_background_processes_are_gone_for_the_next_task(box):
    spawn = """
import os, subprocess, time
subprocess.Popen(['sleep', '100'])
if os.fork() == 0:
    time.sleep(100)
    os._exit(0)
print(len([p for p in os.listdir('/proc') if p.isdigit()]))
"""
    assert int(run_ok(box, spawn)["stdout"]) >= 4  # runner, task, sleep, fork
    procs = ONLY_RUNNER_AND_ME
    assert run_ok(box, procs)["stdout"] == "True\n"


def test_double_forked_daemon_cannot_reach_the_next_task(box):
    daemon = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1)
        for path in ('/tmp/late', '/dev/shm/late'):
            open(path, 'w').write('from the previous task')
    os._exit(0)
print('started')
"""
    assert run_ok(box, daemon)["stdout"] == "started\n"
    later = "import os, time\ntime.sleep(1.5)\nprint(os.path.exists('/tmp/late'), os.path.exists('/dev/shm/late'))"
    assert run_ok(box, later)["stdout"] == "False False\n"


def test_fork_bomb_is_contained_and_cleaned_up(box):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result, reset = box.run(bomb, timeout_s=2)
    assert result["status"] == "timed_out"
    assert reset["clean"] is True, reset
    assert run_ok(box, "print('ok')")["stdout"] == "ok\n"


LIBC = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
"""


def test_posix_message_queues_are_removed(box):
    mq_open = LIBC + "assert libc.mq_open(b'/leftover', os.O_CREAT | os.O_RDWR, 0o600, None) >= 0\n" \
                     "print(os.listdir('/dev/mqueue'))"
    assert run_ok(box, mq_open)["stdout"] == "['leftover']\n"  # run_ok: and the reset is clean
    assert run_ok(box, "import os\nprint(os.listdir('/dev/mqueue'))")["stdout"] == "[]\n"


def test_sysv_ipc_left_behind_makes_the_reset_dirty(box):
    # Only its owner could remove a SysV segment, and nothing of the sandbox uid is left to do it.
    result, reset = box.run(LIBC + "assert libc.shmget(0, 4096, 0o1000 | 0o600) >= 0  # IPC_PRIVATE, IPC_CREAT")
    assert result["status"] == "succeeded", result
    assert reset["clean"] is False and "SysV IPC" in reset["detail"]


def test_rlimits_apply(box):
    write = "import os\nwith open('big', 'wb') as f:\n    f.write(b'x' * 5000)"
    result, _ = box.run(write, fsize_limit_bytes=4096)
    assert result["status"] == "failed" and "File too large" in result["stderr"]  # python ignores SIGXFSZ
    assert run_ok(box, write, fsize_limit_bytes=5000)["stderr"] == ""
    many = "import os\nfds = []\ntry:\n    while True:\n        fds.append(os.open('/dev/null', 0))\n" \
           "except OSError:\n    print(len(fds))"
    assert int(run_ok(box, many, nofile_limit=32)["stdout"]) < 32


# ---- protocol -------------------------------------------------------------------------------------

def frame_bytes(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_malformed_frames_get_errors_and_the_runner_keeps_serving(box):
    box.send_raw(frame_bytes(b"{not json"))
    assert box.recv() | {"detail": ""} == {"op": "error", "id": None, "detail": ""}
    box.send_raw(frame_bytes(b"\xff\xfe"))
    assert box.recv()["op"] == "error"
    box.send_raw(frame_bytes(b"[1, 2]"))
    assert box.recv()["op"] == "error"
    box.send({"op": "launch", "id": "x1"})
    assert box.recv() | {"detail": ""} == {"op": "error", "id": "x1", "detail": ""}
    box.send({"op": "run", "id": "x2", "code": 42, "stdin": "", "timeout_s": 1, "output_limit_bytes": 10,
              "fsize_limit_bytes": 10, "nofile_limit": 10})
    reply = box.recv()
    assert (reply["op"], reply["id"]) == ("error", "x2") and "code" in reply["detail"]
    box.send({"op": "run", "id": "x3", "code": "print(1)", "timeout_s": -1, "output_limit_bytes": 10,
              "fsize_limit_bytes": 10, "nofile_limit": 10})
    assert box.recv()["op"] == "error"
    assert box.ping()["clean"] is True
    run_ok(box, "print('fine')")


def test_oversized_frame_is_refused(box):
    box.send_raw(struct.pack(">I", (64 << 20) + 1))
    reply = box.recv()
    assert (reply["op"], reply["id"]) == ("error", None)
    assert box.wait(timeout_s=20) == 1  # no frame boundary left to trust: the runner exits


def test_eof_on_stdin_stops_the_runner(box):
    box.ping()
    box.close_stdin()
    assert box.wait(timeout_s=20) == 0


def test_runner_refuses_to_start_unless_pid_1(runner_image):
    name = f"warmpool-runner-test-notpid1-{time.monotonic_ns()}"
    try:
        done = subprocess.run(
            ["docker", "run", "--rm", "--name", name, *label_args(),
             "--network", "none", "--entrypoint", "sh", runner_image, "-c",
             "python3 -I /opt/warmpool/runner.py; echo rc=$?"],
            capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert "refusing to start: not PID 1" in done.stderr
    assert done.stdout.strip() == "rc=1"


def test_works_under_gvisor(runner, engine):
    require_gvisor(engine)
    # The pool's runsc host config: the pids cgroup only a backstop (sandbox_spec.SENTRY_THREADS_ALLOWANCE).
    box = runner(runtime="runsc")
    assert box.ping()["clean"] is True
    assert run_ok(box, "print('hello')")["stdout"] == "hello\n"
    result, reset = box.run("import subprocess, time\nsubprocess.Popen(['sleep', '100'])\ntime.sleep(100)",
                            timeout_s=1)
    assert result["status"] == "timed_out" and reset["clean"] is True
    procs = ONLY_RUNNER_AND_ME
    assert run_ok(box, procs)["stdout"] == "True\n"


def test_each_task_costs_the_template_one_fork_on_runc(box):
    # The template forks each task's child straight into PID 1's care (clone(CLONE_PARENT), sibling.py), not
    # through an intermediate process: with nothing else forking between hello tasks, their pids step by one.
    # (runsc makes the flag's child the template's own: the template then falls back to the intermediate.)
    pids = [int(run_ok(box, "import os\nprint(os.getpid())")["stdout"]) for _ in range(6)]
    assert [b - a for a, b in zip(pids, pids[1:], strict=False)] == [1] * 5, pids


def test_under_gvisor_the_template_falls_back_to_the_intermediate(runner, engine):
    require_gvisor(engine)
    box = runner(runtime="runsc")
    pids = [int(run_ok(box, "import os\nprint(os.getpid(), os.getppid())")["stdout"].split()[0])
            for _ in range(4)]
    parents = {run_ok(box, "import os\nprint(os.getppid())")["stdout"] for _ in range(2)}
    assert parents == {"1\n"}  # PID 1 waits for every child, whichever way it was forked
    assert [b - a for a, b in zip(pids, pids[1:], strict=False)] == [2] * 3, pids
