"""Hostile tasks that try to exhaust something: processes, memory, scratch space, output, time."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time

import pytest

from tests.hostile.conftest import (
    DEADLINE_GRACE_S,
    MIB,
    OUTPUT_LIMIT_BYTES,
    PIDS_LIMIT,
    STORAGE_BYTES,
    TASK_TIMEOUT_S,
    box_container,
    execute,
    run_case,
    server_rss_bytes,
    status_is,
)

pytestmark = pytest.mark.docker


def timed_out_in_time(body):
    assert body["status"] == "timed_out", body
    assert body["elapsed_s"] < TASK_TIMEOUT_S + DEADLINE_GRACE_S, body


def test_fork_bomb_hits_the_pids_limit_then_the_deadline(box):
    run_case(box, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
             timed_out_in_time)


def test_forks_stop_at_the_pids_limit(box):
    code = """
import os, time
count = 0
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        print(count, exc.errno)
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    count += 1
"""

    def check(body):
        status_is("succeeded")(body)
        count, errno = map(int, body["stdout"].split())
        assert errno == 11 and 0 < count <= PIDS_LIMIT  # EAGAIN, within the tier's pids_limit

    run_case(box, code, check, timeout_s=20)  # forking is slow under gVisor


@pytest.mark.parametrize("code", [
    "x = bytearray(2 << 30)\nx[::4096] = b'1' * len(x[::4096])",
    "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))",
], ids=["one-block", "growing"])
def test_memory_bomb_is_memory_exceeded_not_a_timeout(box, code):
    # The tier retires a container after memory_exceeded (its state is not vouched for), so no reuse check.
    run_case(box, code, status_is("memory_exceeded"), same_container=False, timeout_s=20)


def test_disk_fill_of_every_scratch_dir_stops_at_its_cap(box, docker_client):
    code = """
import errno, json, os
found = {}
for d in ('/tmp', '/dev/shm', '/var/tmp', os.environ['HOME'], os.getcwd(), '/', '/opt', '/etc'):
    d = {os.environ['HOME']: '/tmp/home', os.getcwd(): '/tmp/work'}.get(d, d)
    path = os.path.join(d, 'fill')
    try:
        with open(path, 'wb') as f:
            while True:
                f.write(b'x' * (1 << 20))
                f.flush()
    except OSError as exc:
        found[d] = errno.errorcode[exc.errno]
    try:
        os.unlink(path)
    except OSError:
        pass
print(json.dumps(found))
"""

    def check(body):
        assert body["status"] == "succeeded", body
        found = json.loads(body["stdout"])
        for scratch in ("/tmp", "/dev/shm", "/var/tmp", "/tmp/home", "/tmp/work"):
            assert found[scratch] in ("ENOSPC", "EFBIG"), found
        for read_only in ("/", "/opt", "/etc"):
            assert found[read_only] in ("EROFS", "EACCES", "EPERM"), found

    run_case(box, code, check)
    # Nothing reached the host's disk: the container's writable layer is still empty.
    container = box_container(box, docker_client)
    size_rw = subprocess.run(["docker", "inspect", "--size", "--format", "{{.SizeRw}}", container.id],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert int(size_rw or 0) < 1024 * 1024, f"the container's writable layer holds {size_rw} bytes"


FILL_THEN_SLEEP = """
import os, time
written_mib = 0
try:
    with open('fill', 'wb') as f:
        while True:
            f.write(b'x' * (1 << 20))
            f.flush()
            written_mib += 1
except OSError as exc:
    print(written_mib, exc.errno, flush=True)
time.sleep(3600)
"""


def test_filling_storage_then_sleeping_times_out_and_the_reset_frees_the_space(box):
    def check(body):
        timed_out_in_time(body)
        written_mib, errno = map(int, body["stdout"].split())
        assert errno == 28 and 0.8 * STORAGE_BYTES <= written_mib * MIB <= STORAGE_BYTES, body["stdout"]  # ENOSPC

    run_case(box, FILL_THEN_SLEEP, check)
    # The same container's next task finds its filesystem empty again (the files of the task that
    # filled it are gone with it; ext4 keeps back ~2% of the blocks from every user).
    body = execute(box, "import os\nfs = os.statvfs('.')\nprint(fs.f_bavail / fs.f_blocks, sorted(os.listdir('/tmp')))")
    assert body["status"] == "succeeded", body
    free_share, listing = body["stdout"].split(" ", 1)
    assert float(free_share) > 0.95 and listing.strip() == "['home', 'work']", body["stdout"]


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_cut_at_the_limit_and_the_server_stays_flat(box, stream):
    code = f"import sys\nchunk = 'x' * 65536\nwhile True:\n    sys.{stream}.write(chunk)"

    def check(body):
        assert body["status"] == "output_limit_exceeded", {k: v for k, v in body.items() if k != stream}
        assert body[f"{stream}_truncated"] is True and len(body[stream]) == OUTPUT_LIMIT_BYTES

    execute(box, code, timeout_s=TASK_TIMEOUT_S)  # warm-up: the first flood sizes the server's buffers
    rss_before = server_rss_bytes(box)
    for _ in range(3):
        run_case(box, code, check)
    growth = server_rss_bytes(box) - rss_before
    # Six more 1 MiB floods: the server holds each only while answering it.
    assert growth < 32 * 1024 * 1024, f"server RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import time\ntime.sleep(3600)",
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
    "import subprocess, time\nsubprocess.Popen(['sh', '-c', 'trap \"\" TERM INT HUP; while :; do :; done'],"
    " start_new_session=True)\ntime.sleep(3600)",
], ids=["busy-loop", "long-sleep", "ignores-sigterm", "child-ignores-signals"])
def test_endless_tasks_time_out_within_the_deadline(box, code):
    run_case(box, code, timed_out_in_time)


def test_closing_its_standard_streams_does_not_escape_the_deadline(box):
    run_case(box, "import os\nfor fd in (0, 1, 2):\n    os.close(fd)\nwhile True:\n    pass", timed_out_in_time)


def test_binary_garbage_on_stdout_gives_valid_json(box):
    def check(body):
        assert body["status"] == "output_limit_exceeded" and body["stdout_truncated"] is True, body["status"]
        assert isinstance(body["stdout"], str) and "\ufffd" in body["stdout"]

    run_case(box, "import os\nfor _ in range(8):\n    os.write(1, os.urandom(1 << 20))", check)


def test_invalid_utf8_on_both_streams_gives_valid_json(box):
    code = "import os, sys\nos.write(1, b'ok \\xff\\xfe \\xc3( \\xed\\xa0\\x80 end' * 1000)\n" \
           "sys.stdout.flush()\nos.write(2, b'\\x00\\x1b[2J\\xc0\\xaf' * 1000)\nsys.stdout.write('\\udcff')"

    def check(body):
        assert body["status"] == "succeeded", body
        assert body["stdout"].startswith("ok \ufffd\ufffd ") and body["stdout"].endswith("\ufffd")
        assert body["stderr"].startswith("\x00\x1b[2J\ufffd\ufffd")

    run_case(box, code, check)


def test_a_sandbox_killed_through_the_engine_is_a_sandbox_error_not_memory(box, docker_client):
    """Under gVisor the engine may lose the OOM record, so a SIGKILLed sandbox with no `kill` asked of the
    engine counts as memory_exceeded; one that `docker kill` ended must still say sandbox_error."""
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        pending = executor.submit(execute, box, "import time; time.sleep(30)", timeout_s=40)
        time.sleep(2)
        box_container(box, docker_client).kill()
        body = pending.result(timeout=60)
    assert body["status"] == "sandbox_error", body
    after = execute(box, "print('still serving')")
    assert (after["status"], after["stdout"]) == ("succeeded", "still serving\n"), after
