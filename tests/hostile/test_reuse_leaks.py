"""The reuse rule, attacked: nothing a task saw, wrote or was sent reaches the next task on the container.

Each case is a pair: a task that holds or plants something, then a task on the same one-container tier
that looks for it everywhere it could be reachable: the interpreter's frames and objects, every byte of
its own memory, shared pages, inherited file descriptors, the status it reports, and the network
namespace's sockets and connection states. Findings 1-4 of issue 9; they run on runc and runsc.
"""

from __future__ import annotations

import json
import secrets

import pytest

from tests.hostile.conftest import container_of_box, execute

pytestmark = pytest.mark.docker

# The prefix every planted secret starts with. The looking task holds it too (it has to search for it),
# so it reports what follows each occurrence: only a planted secret is followed by its random part.
PREFIX = "WPLEAK-"

# Runs in the later task: searches its frames, its objects and every readable byte of its memory for
# PREFIX, and prints what follows each hit. It plants one value of its own first, so that a scanner
# that finds nothing because it is broken fails the test instead of passing it.
LOOK_EVERYWHERE = r"""
import ctypes, gc, json, re, sys
prefix = bytes(PREFIX_LIST).decode()
own = prefix + 'selfcheck' + 'x' * 8
pattern = re.compile(re.escape(prefix.encode()) + rb'[0-9a-z]{4,40}')
found = set()

frame = sys._getframe()
while frame is not None:  # the frames that led here: today's leak walked these up to PID 1's loop
    for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
        found.update(m.decode() for m in pattern.findall(repr(value).encode('utf-8', 'replace')))
    frame = frame.f_back

for obj in gc.get_objects():
    if isinstance(obj, (dict, list, tuple)):
        found.update(m.decode() for m in pattern.findall(repr(obj)[:1 << 20].encode('utf-8', 'replace')))

memory_read = 0
for line in open('/proc/self/maps'):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split('-'))
    path = fields[5] if len(fields) > 5 else ''
    if fields[1][0] != 'r' or path in ('[vvar]', '[vsyscall]', '[vvar_vclock]'):
        continue
    for chunk_start in range(start, end, 1 << 20):
        size = min(1 << 20, end - chunk_start)
        try:
            data = ctypes.string_at(chunk_start, size)
        except Exception:
            continue
        memory_read += size
        found.update(m.decode() for m in pattern.findall(data))
print(json.dumps({"found": sorted(found), "memory_read": memory_read}))
""".replace("PREFIX_LIST", repr(list(PREFIX.encode())))


def look_everywhere(box) -> set[str]:
    body = execute(box, LOOK_EVERYWHERE, timeout_s=20)
    assert body["status"] == "succeeded", (body["stderr"][-2000:], body["message"])
    seen = json.loads(body["stdout"])
    assert seen["memory_read"] > 1 << 20, seen  # it really read its memory
    assert any(hit.startswith(PREFIX + "selfcheck") for hit in seen["found"]), seen["found"][:20]
    return set(seen["found"])


def test_a_task_finds_nothing_of_the_previous_tasks_request_or_output(box):
    """Finding 1: the next task's child was forked from the process holding the previous request."""
    code_secret, stdin_secret, output_number = (secrets.token_hex(8), secrets.token_hex(8),
                                                secrets.randbelow(1 << 60) + (1 << 60))
    output_secret = format(output_number, "x")
    before = container_of_box(box)
    planter = (f"# {PREFIX}code{code_secret}\n"
               f"import sys\nsecret = sys.stdin.read()\n"
               f"print('{PREFIX}out' + format({output_number}, 'x'))\n"
               f"print('{PREFIX}err' + format({output_number}, 'x'), file=sys.stderr)\n")
    for _ in range(2):  # twice: what one task leaves, a later reset may not clear
        body = execute(box, planter, stdin=f"{PREFIX}stdin{stdin_secret}")
        assert body["status"] == "succeeded" and output_secret in body["stdout"], body
    found = look_everywhere(box)
    assert container_of_box(box) == before, "the tier has one container: the looking task must reuse it"
    leaked = [hit for hit in found if any(s in hit for s in (code_secret, stdin_secret, output_secret))]
    assert not leaked, f"the next task found the previous task's data: {leaked}"


PLANT_IN_SHARED_PAGES = r"""
import ctypes, os
planted = 0
for line in open('/proc/self/maps'):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split('-'))
    if fields[1][:2] == 'rw' and fields[1][3] == 's':  # writable and shared with another process
        for offset in range(64, end - start, 4096):
            ctypes.memmove(start + offset, MARK, len(MARK))
        planted += 1
print(planted)
"""

READ_SHARED_PAGES = r"""
import ctypes
hits = []
for line in open('/proc/self/maps'):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split('-'))
    if fields[1][0] == 'r' and fields[1][3] == 's':
        data = ctypes.string_at(start, end - start)
        hits.append(data.count(MARK))
print(sum(hits))
"""


def test_a_shared_page_written_by_a_task_is_not_seen_by_the_next(box):
    """Finding 2: the status page was shared with every child and only its first byte was reset."""
    mark = repr(f"{PREFIX}page{secrets.token_hex(6)}".encode())
    planted = execute(box, PLANT_IN_SHARED_PAGES.replace("MARK", mark))
    assert planted["status"] == "succeeded", planted
    seen = execute(box, READ_SHARED_PAGES.replace("MARK", mark))
    assert (seen["status"], seen["stdout"]) == ("succeeded", "0\n"), seen


# Everything a task can reach that might be the runner's status channel: shared pages (byte 0 set as the
# old status flag read it) and every inherited descriptor, written the runner's status words; then it
# exits 0. The result must still say exit 0, succeeded.
FORGE_STATUS = r"""
import ctypes, os
for line in open('/proc/self/maps'):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split('-'))
    if fields[1][:2] == 'rw' and fields[1][3] == 's':
        ctypes.memset(start, FLAG, 1)
for fd in range(3, 64):
    for word in (b'M', b'R', b'\x01', b'\x02'):
        try:
            os.write(fd, word)
        except OSError:
            pass
print('forged', flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("flag", [1, 2], ids=["memory_exceeded", "setup_failed"])
def test_a_task_cannot_forge_its_status(box, flag):
    """Finding 3: a task that set the status flag and exited 0 was reported memory_exceeded."""
    before = container_of_box(box)
    body = execute(box, FORGE_STATUS.replace("FLAG", str(flag)))
    assert (body["status"], body["exit_code"], body["stdout"]) == ("succeeded", 0, "forged\n"), body
    assert container_of_box(box) == before


LEAVE_TIME_WAIT = r"""
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(('127.0.0.1', 7777))
server.listen()
for _ in range(3):
    client = socket.create_connection(('127.0.0.1', 7777))
    accepted, _ = server.accept()
    accepted.close()  # the side that closes first keeps TIME_WAIT for about a minute
    client.close()
server.close()
print('left')
"""

SEE_NETWORK = r"""
import json, os, socket
tables = {}
for name in ('tcp', 'tcp6', 'udp', 'udp6'):
    try:
        tables[name] = open(f'/proc/net/{name}').read().splitlines()[1:]
    except OSError:
        pass
probe = socket.socket()  # no SO_REUSEADDR: a TIME_WAIT on the port makes this fail
try:
    probe.bind(('127.0.0.1', 7777))
    bind = 'ok'
except OSError as exc:
    bind = exc.strerror
print(json.dumps({"interfaces": sorted(os.listdir('/sys/class/net')), "tables": tables, "bind": bind}))
"""


def test_network_state_of_a_task_does_not_reach_the_next(box):
    """Finding 4: a port left in TIME_WAIT stayed taken, and visible, for the next task."""
    # Only loopback exists in a sandbox: see it before anything is bound or connected.
    interfaces = execute(box, "import os; print(sorted(os.listdir('/sys/class/net')))")
    assert interfaces["stdout"].strip() == "['lo']", interfaces
    left = execute(box, LEAVE_TIME_WAIT)
    assert (left["status"], left["stdout"]) == ("succeeded", "left\n"), left
    seen = execute(box, SEE_NETWORK)
    assert seen["status"] == "succeeded", seen
    state = json.loads(seen["stdout"])
    assert state["bind"] == "ok", state
    assert all(rows == [] for rows in state["tables"].values()), state["tables"]


def test_a_task_that_uses_no_network_keeps_its_container(box):
    """The network check must not retire containers for nothing: plain tasks, and sockets that leave
    no state (a unix socket pair, a UDP socket bound and closed), reuse the container."""
    before = container_of_box(box)
    quiet = ("import socket\na, b = socket.socketpair(); a.send(b'x'); b.recv(1); a.close(); b.close()\n"
             "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0)); u.close()\n"
             "print('quiet')")
    for _ in range(3):
        body = execute(box, quiet)
        assert (body["status"], body["stdout"]) == ("succeeded", "quiet\n"), body
    assert container_of_box(box) == before


# The DONE record (PROTOCOL.md) is the child's last word: a task can write one of its own. Bytes that read
# as "M" inside it must never count as a MemoryError, whichever of the record or the exit PID 1 sees first.
FORGE_DONE = r"""
import os, struct
os.write(4, b'D' + struct.pack('>iqq', EXIT, 0x4d4d4d4d4d4d4d4d, 0x4d4d4d4d))
print('forged', flush=True)
os._exit(EXIT)
"""


@pytest.mark.parametrize("exit_code", [0, 1])
def test_a_forged_done_record_is_only_the_tasks_own_word(box, exit_code):
    before = container_of_box(box)
    for _ in range(3):
        body = execute(box, FORGE_DONE.replace("EXIT", str(exit_code)))
        assert (body["status"], body["exit_code"]) == (("succeeded", 0) if exit_code == 0 else ("failed", 1)), body
    # A record written early ends the task early, with the status it says; its process is then killed.
    early = execute(box, "import os, struct, time\nos.write(4, b'D' + struct.pack('>iqq', 7, 0, 0))\n"
                         "time.sleep(30)\nprint('never')", timeout_s=60)
    assert (early["status"], early["exit_code"], early["stdout"]) == ("failed", 7, ""), early
    assert early["timings"]["run_ms"] < 10_000
    assert container_of_box(box) == before
