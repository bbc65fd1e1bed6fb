"""Sessions, attacked: a session may do anything to its own interpreter and container, and once it is
deleted the next lease of that container (the one-container `box` tier) finds none of it. On runc and runsc.

Each case opens a session on the box, plants something across calls (checking that the session itself
sees it, so that a plant that silently failed cannot pass the test), deletes the session, then looks from
a plain task and from a new session: same container (the reset verified it clean) and nothing left.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import pytest

from tests.hostile.conftest import STORAGE_BYTES, container_of_box, execute
from tests.hostile.test_files_hostile import PLANT
from tests.hostile.test_reuse_leaks import PREFIX, look_everywhere

pytestmark = pytest.mark.docker

# What a clean container shows a task: PID 1 and the template (root) and itself; empty scratch dirs; the
# interpreter as a fresh one has it.
LOOK = r"""
import builtins, json, os, resource, signal, sys, threading
procs = [p for p in os.listdir('/proc') if p.isdigit()]
statvfs = os.statvfs('/tmp')
print(json.dumps({
    "procs": len(procs), "tmp": sorted(os.listdir('/tmp')), "work": os.listdir('/tmp/work'),
    "shm": os.listdir('/dev/shm'), "free_bytes": statvfs.f_bavail * statvfs.f_frsize,
    "env": sorted(k for k in os.environ if k.startswith('WP')), "cwd": os.getcwd(), "umask": os.umask(0o022),
    "print_is_builtin": type(builtins.print).__name__, "json_is_real": hasattr(json, 'JSONDecoder'),
    "recursion": sys.getrecursionlimit(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    "sigint": str(signal.getsignal(signal.SIGINT)), "threads": threading.active_count(),
    "trace": sys.gettrace() is None, "planted": [n for n in dir(builtins) if n.startswith('wp')],
    "secret_global": 'secret' in globals(),
}))
"""


def open_session(box) -> str:
    response = box.client.post("/v1/sessions", json={"idle_timeout_s": 60})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def call(box, session_id: str, code: str, **fields: Any) -> dict[str, Any]:
    response = box.client.post(f"/v1/sessions/{session_id}/execute", json={"code": code, "timeout_s": 10, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def delete(box, session_id: str) -> None:
    assert box.client.delete(f"/v1/sessions/{session_id}").status_code == 204


def looks_clean(box, before: str) -> dict[str, Any]:
    """From a plain task, then a new session: the same container, and nothing of the deleted session."""
    assert container_of_box(box) == before, "the session's container should have been reset clean and reused"
    seen = json.loads(execute(box, LOOK)["stdout"])
    sid = open_session(box)
    try:
        in_session = json.loads(call(box, sid, LOOK)["stdout"])
    finally:
        delete(box, sid)
    for view in (seen, in_session):
        assert (view["procs"], view["tmp"], view["work"], view["shm"]) == (3, ["home", "work"], [], []), view
        assert view["env"] == [] and view["cwd"] == "/tmp/work" and view["umask"] == 0o022, view
        assert (view["print_is_builtin"], view["json_is_real"], view["trace"]) == (
            "builtin_function_or_method", True, True), view
        assert (view["recursion"], view["threads"], view["planted"], view["secret_global"]) == (1000, 1, [], False)
        assert view["nofile"] == 256, view  # the service's nofile limit, not the session's 16
    # Python's own SIGINT handler in a task; the runner's call interrupter in a session (PROTOCOL.md)
    assert "default_int_handler" in seen["sigint"] and "interrupt_call" in in_session["sigint"], (seen, in_session)
    return seen


def deleted_leaves_nothing(box, session_id: str, before: str, secret: str) -> None:
    """Delete the session; then the container looks clean, and no byte of a later task's memory holds `secret`."""
    delete(box, session_id)
    looks_clean(box, before)
    found = look_everywhere(box)
    assert not [hit for hit in found if secret[len(PREFIX):] in hit], found


def test_a_daemon_planted_by_a_session_is_gone_for_the_next_lease(box):
    before = container_of_box(box)
    secret = f"{PREFIX}daemon{secrets.token_hex(8)}"
    sid = open_session(box)
    plant = (f"import os, subprocess, time\nsecret = '{secret}'\n"
             "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
             "        os.execvp('sh', ['sh', '-c', f'while :; do echo {secret} > /tmp/beacon; sleep 0.1; done'])\n"
             "    os._exit(0)\n"
             "subprocess.Popen(['sleep', '600'], start_new_session=True)\ntime.sleep(0.5)")
    assert call(box, sid, plant)["status"] == "succeeded"
    later = call(box, sid, "print(open('/tmp/beacon').read().strip(), secret)")
    assert later["stdout"] == f"{secret} {secret}\n", later  # the daemon runs, and the session keeps its state
    deleted_leaves_nothing(box, sid, before, secret)


def test_a_session_that_fills_its_storage_leaves_it_empty_for_the_next_lease(box):
    before = container_of_box(box)
    sid = open_session(box)
    fill = ("import os\nwritten = 0\ntry:\n    with open('/tmp/work/fill', 'wb') as f:\n"
            "        while True:\n            f.write(b'x' * (1 << 20))\n            f.flush()\n"
            "            written += 1 << 20\nexcept OSError as exc:\n    print(exc.strerror)\n")
    body = call(box, sid, fill)
    assert body["status"] == "succeeded" and body["stdout"] in ("No space left on device\n", "File too large\n"), body
    assert call(box, sid, "import os; print(os.path.getsize('/tmp/work/fill') > 0)")["stdout"] == "True\n"
    delete(box, sid)
    seen = looks_clean(box, before)
    assert seen["free_bytes"] > STORAGE_BYTES // 2, seen  # the space is back


def test_a_session_that_changes_its_interpreter_deeply_leaves_no_trace(box):
    before = container_of_box(box)
    secret = f"{PREFIX}deep{secrets.token_hex(8)}"
    sid = open_session(box)
    deep = (f"import builtins, json, os, resource, signal, sys, threading, time\nsecret = '{secret}'\n"
            "builtins.print = lambda *a, **k: None\nbuiltins.wp_planted = secret\n"
            "sys.modules['json'] = type(sys)('json')\nos.environ['WPLEAK'] = secret\nos.umask(0)\n"
            "sys.setrecursionlimit(50)\nresource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\nsys.settrace(lambda *a: None)\n"
            "threading.Thread(target=lambda: time.sleep(600), daemon=True).start()\n"
            "open('/dev/shm/wp', 'w').write(secret)\nos.chdir('/tmp')")
    assert call(box, sid, deep)["status"] == "succeeded"
    changed = call(box, sid, "import os, sys\nsys.stdout.write(str(builtins.wp_planted == secret) + ' '"
                             " + os.environ['WPLEAK'][:7] + ' ' + str(sys.getrecursionlimit()))")
    assert changed["stdout"] == f"True {PREFIX} 50", changed  # the session lives with what it did
    deleted_leaves_nothing(box, sid, before, secret)


def test_symlinks_and_fifos_a_session_planted_are_never_followed_and_its_files_go_with_it(box):
    """A session plants symlinks (to /etc/passwd, /proc/1/environ, /dev/zero, /, /etc) and a FIFO in one
    call; a later call's outputs match them all and get only the regular files, promptly (the FIFO was
    never opened). Once deleted, the next lease sees none of the session's files."""
    before = container_of_box(box)
    secret = f"{PREFIX}files{secrets.token_hex(8)}"
    sid = open_session(box)
    sent = call(box, sid, PLANT, files=[{"path": "in/secret.txt", "content": secret}])
    assert (sent["status"], sent["stdout"]) == ("succeeded", "planted\n"), sent
    collected = call(box, sid, "print('collecting')",
                     outputs=["*", "*/*", "root/etc/*", "etc/**", "sub/*", "in/*"])
    assert collected["status"] == "succeeded", collected
    assert sorted((e["path"], base64.b64decode(e["content"])) for e in collected["files"]) == [
        ("in/secret.txt", secret.encode()), ("ok.txt", b"ok")], collected["files"]
    assert collected["files_truncated"] is False
    # A file sent onto a planted symlink replaces the link; it never writes through it.
    through = call(box, sid, "import os\nprint(os.path.islink('passwd.txt'), open('/etc/passwd').read()[:5])",
                   files=[{"path": "passwd.txt", "content": "mine"}])
    assert through["stdout"] == "False root:\n", through
    deleted_leaves_nothing(box, sid, before, secret)
