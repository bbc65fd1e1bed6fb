"""Hostile tasks that try to leave something for the next task: processes, files, symlinks."""

from __future__ import annotations

import json

import pytest

from tests.hostile.conftest import container_of_box, execute, run_case, status_is

pytestmark = pytest.mark.docker

# Looks for everything the planting tasks below leave, from the next task on the same container.
INSPECT = r"""
import json, os, time
time.sleep(WAIT_S)
scratch = ('/tmp', '/dev/shm', '/var/tmp', os.environ['HOME'], os.getcwd())
print(json.dumps({
    "entries": {d: sorted(os.listdir(d)) for d in scratch},
    "late": [p for p in ('/tmp/late', '/dev/shm/late') if os.path.lexists(p)],
    # PID 1 and the template are the runner's own (root); no other process may be there.
    "procs": sorted(int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()
                    and os.stat(f'/proc/{p}').st_uid != 0),
    "runner_procs": sum(1 for p in os.listdir('/proc') if p.isdigit() and os.stat(f'/proc/{p}').st_uid == 0),
    "cwd": os.getcwd(), "cwd_real": os.path.realpath(os.getcwd()), "home_real": os.path.realpath(os.environ['HOME']),
    "cwd_is_link": os.path.islink('/tmp/work'), "home_is_link": os.path.islink('/tmp/home'),
    "cwd_owner": os.stat('.').st_uid,
}))
"""


def inspect_next(box, wait_s: float = 0.0) -> dict:
    body = execute(box, INSPECT.replace("WAIT_S", repr(wait_s)))
    assert body["status"] == "succeeded", body
    return json.loads(body["stdout"])


def assert_pristine(seen: dict) -> None:
    assert seen["entries"] == {"/tmp": ["home", "work"], "/dev/shm": [], "/var/tmp": ["home", "work"],
                               "/tmp/home": [], "/tmp/work": []}, seen["entries"]
    assert seen["late"] == [] and seen["procs"] == [] and seen["runner_procs"] == 2, seen
    assert seen["cwd"] == seen["cwd_real"] == "/tmp/work" and seen["home_real"] == "/tmp/home"
    assert not seen["cwd_is_link"] and not seen["home_is_link"] and seen["cwd_owner"] == 10001


DAEMONS = r"""
import os, subprocess, time
def late_writer():
    time.sleep(1.5)
    for path in ('/tmp/late', '/dev/shm/late'):
        open(path, 'w').write('I outlived my task')
# a double-forked daemon in its own session, as a service would start one
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        late_writer()
    os._exit(0)
# a plain background child, a detached subprocess, and one that ignores every catchable signal
if os.fork() == 0:
    late_writer()
    os._exit(0)
subprocess.Popen(['sleep', '300'], start_new_session=True)
subprocess.Popen(['sh', '-c', 'trap "" TERM INT HUP QUIT USR1 USR2; sleep 2; echo late > /tmp/late'],
                 start_new_session=True)
print('planted')
"""


def test_daemons_are_gone_before_the_next_task_and_never_write_late(box):
    host = container_of_box(box)
    for _ in range(2):
        body = execute(box, DAEMONS)
        assert (body["status"], body["stdout"]) == ("succeeded", "planted\n"), body
        # Long enough for every late writer above to have written, had it survived the reset.
        assert_pristine(inspect_next(box, wait_s=3.0))
    assert container_of_box(box) == host


MARKERS = r"""
import os
for d in ('/tmp', '/dev/shm', '/var/tmp', os.environ['HOME'], os.getcwd()):
    for name in ('marker', '.hidden'):
        open(os.path.join(d, name), 'w').write('from the last task')
    os.makedirs(os.path.join(d, 'deep', 'er', 'est'), exist_ok=True)
    open(os.path.join(d, 'deep', 'er', 'est', 'marker'), 'w').write('x')
os.mkfifo('/tmp/fifo')
os.chmod(os.path.join(os.getcwd(), 'deep'), 0)  # a dir its owner cannot even list
os.chmod(os.environ['HOME'], 0o500)
import socket
socket.socket(socket.AF_UNIX).bind('/dev/shm/sock')
print('planted')
"""


def test_marker_files_in_every_scratch_dir_are_gone_for_the_next_task(box):
    def check(body):
        assert (body["status"], body["stdout"]) == ("succeeded", "planted\n"), body
        assert_pristine(inspect_next(box))

    run_case(box, MARKERS, check)


SYMLINKS = r"""
import os
links = {
    # where the runner makes the next task's cwd and HOME
    '/tmp/work': '/etc', '/tmp/home': '/',
    # where it cleans: pointing at the runner, PID 1's files, the frame channel, loops and dangling names
    '/tmp/runner': '/opt/warmpool/runner.py', '/dev/shm/pid1': '/proc/1/environ', '/tmp/fd': '/proc/1/fd/1',
    '/tmp/loop-a': '/tmp/loop-b', '/tmp/loop-b': '/tmp/loop-a', '/dev/shm/nowhere': '/no/such/path',
    '/tmp/root': '/',
}
os.chdir('/')
for name in ('/tmp/work', '/tmp/home'):
    os.rmdir(name)
for name, target in links.items():
    os.symlink(target, name)
os.mkdir('/tmp/nest')
os.symlink('/etc', '/tmp/nest/etc')
os.symlink('/tmp/nest', '/tmp/nest/self')
os.chmod('/tmp/nest', 0)
print('planted')
"""


def test_symlinks_where_the_runner_writes_or_cleans_are_never_followed(box):
    def check(body):
        assert (body["status"], body["stdout"]) == ("succeeded", "planted\n"), body
        assert_pristine(inspect_next(box))
        # what the links pointed at is untouched (the root is read-only anyway; the runner too must be)
        probe = execute(box, "import os\nprint(os.path.getsize('/opt/warmpool/runner.py') > 0, "
                             "os.path.isdir('/etc'), len(os.listdir('/etc')) > 5)")
        assert probe["stdout"] == "True True True\n", probe

    run_case(box, SYMLINKS, check)


def test_sysv_ipc_left_behind_retires_the_container(box):
    """SysV shared memory outlives its processes and only its owner may remove it: the reset sees it, calls
    the container unclean, and the tier replaces it; the next task sees none of it."""
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget(0x5157, 4096, 0o1666) >= 0)"
    run_case(box, code, status_is("succeeded"), same_container=False)
    code = "import ctypes\nprint(ctypes.CDLL(None).shmget(0x5157, 4096, 0o666))"  # no IPC_CREAT: find only
    body = execute(box, code)
    assert body["stdout"] == "-1\n", body
