"""Hostile tasks that reach for what they must not have: the kernel, PID 1, root, the network."""

from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest

from tests.hostile.conftest import execute, redis_port, run_case
from tests.hostile.test_hardening import IMAGE_ENV

pytestmark = pytest.mark.docker


def outcomes_of(body) -> dict:
    assert body["status"] == "succeeded", body
    return json.loads(body["stdout"])


KERNEL = r"""
import json, os
def attempt(what, action):
    try:
        data = action()
        return "allowed: " + repr(data)[:200]
    except OSError as exc:
        return "denied: " + os.strerror(exc.errno)
def read(path):
    with open(path, 'rb') as f:
        data = f.read(4096)
    if not data:
        raise OSError(61, 'empty')  # ENODATA: a masked file reads as nothing
    return data
def write(path, data):
    with open(path, 'wb') as f:
        f.write(data)
results = {
    "read /proc/kcore": attempt("", lambda: read('/proc/kcore')),
    "write /proc/sysrq-trigger": attempt("", lambda: write('/proc/sysrq-trigger', b'h')),
    "write /proc/sys/kernel/hostname": attempt("", lambda: write('/proc/sys/kernel/hostname', b'x')),
    "write /proc/1/oom_score_adj": attempt("", lambda: write('/proc/1/oom_score_adj', b'1000')),
    "read /proc/1/mem": attempt("", lambda: read('/proc/1/mem')),
    "open /proc/1/fd/3": attempt("", lambda: os.open('/proc/1/fd/3', os.O_WRONLY)),
    "open /proc/1/fd/4": attempt("", lambda: os.open('/proc/1/fd/4', os.O_WRONLY)),
    "write runner.py": attempt("", lambda: write('/opt/warmpool/runner.py', b'x')),
    "write the runner package": attempt("", lambda: write('/opt/warmpool/runner_image/sandbox/pid1.py', b'x')),
}
for root, _, files in os.walk('/sys/fs/cgroup'):
    for name in files:
        if name in ('memory.limit_in_bytes', 'memory.max', 'pids.max', 'cgroup.procs', 'cpu.cfs_quota_us',
                    'memory.memsw.limit_in_bytes', 'release_agent', 'notify_on_release'):
            path = os.path.join(root, name)
            results["write " + path] = attempt("", lambda: write(path, b'-1'))
results["cgroup files tried"] = sum(1 for k in results if k.startswith("write /sys"))
try:
    environ = open('/proc/1/environ', 'rb').read().decode('latin-1')
    results["/proc/1/environ"] = sorted(kv.split('=', 1)[0] for kv in environ.split('\0') if kv)
except OSError as exc:
    results["/proc/1/environ"] = "denied: " + os.strerror(exc.errno)
print(json.dumps(results))
"""


def test_kernel_and_pid1_interfaces_are_denied(box):
    def check(body):
        results = outcomes_of(body)
        cgroup_tries = results.pop("cgroup files tried")
        environ = results.pop("/proc/1/environ")
        allowed = {what: outcome for what, outcome in results.items() if not outcome.startswith("denied")}
        assert allowed == {}, allowed
        if box.runtime == "runc":
            assert cgroup_tries > 0 and environ.startswith("denied"), (cgroup_tries, environ)
        else:
            # gVisor (20221219) lets any uid read /proc/1/environ. It holds only what the engine gave the
            # runner at exec (the image's own variables, HOSTNAME, HOME): the server's settings never go there.
            assert isinstance(environ, str) or set(environ) <= IMAGE_ENV | {"HOSTNAME", "HOME"}, environ

    run_case(box, KERNEL, check)


PRIVILEGE = r"""
import ctypes, json, os, shutil, subprocess
def attempt(action):
    try:
        return "allowed: " + repr(action())[:200]
    except (OSError, subprocess.SubprocessError) as exc:
        return "denied: " + str(exc)[:200]
libc = ctypes.CDLL(None, use_errno=True)
def libc_call(name, *args):
    if getattr(libc, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), name)
    return 0
def su():
    done = subprocess.run(['su', 'root', '-c', 'id -u'], input='', capture_output=True, text=True, timeout=20)
    if done.returncode != 0 or done.stdout.strip() != '0':
        raise OSError(1, f'su exit {done.returncode}: {done.stderr.strip()[-100:]}')
    return done.stdout
def setuid_copy(directory):
    path = os.path.join(directory, 'myid')
    shutil.copy('/usr/bin/id', path)
    os.chmod(path, 0o4755)
    done = subprocess.run([path, '-u'], capture_output=True, text=True)
    if done.returncode < 0:
        # gVisor's own mount of /tmp does not show the host mount's noexec, but the binary's pages cannot
        # be mapped executable from there: the process dies of SIGSEGV as soon as they are touched.
        raise OSError(1, f'killed by signal {-done.returncode}, output {done.stdout!r}')
    return done.stdout
results = {
    "setuid(0)": attempt(lambda: os.setuid(0)),
    "setgid(0)": attempt(lambda: os.setgid(0)),
    "setgroups([0])": attempt(lambda: os.setgroups([0])),
    "su root": attempt(su),
    "setuid copy in /tmp": attempt(lambda: setuid_copy('/tmp')),
    "setuid copy in /dev/shm": attempt(lambda: setuid_copy('/dev/shm')),
    "mount tmpfs": attempt(lambda: libc_call('mount', b'x', b'/tmp', b'tmpfs', 0, None)),
    "chroot": attempt(lambda: os.chroot('/tmp')),
    "ptrace PID 1": attempt(lambda: libc_call('ptrace', 16, 1, None, None)),  # PTRACE_ATTACH
    # last: where it works, the task holds every capability inside its new namespace from then on
    "unshare(CLONE_NEWUSER)": attempt(lambda: libc_call('unshare', 0x10000000)),
}
print(json.dumps(results))
"""


def test_no_way_back_to_root(box):
    def check(body):
        results = outcomes_of(body)
        allowed = {what for what, outcome in results.items() if not outcome.startswith("denied")}
        # Docker's seccomp profile refuses new user namespaces under runc. gVisor implements them in its own
        # kernel and allows them: capabilities there reach only that namespace, nothing of the host's kernel,
        # and nothing that outlives the task (run_case checks the next tasks on the same container).
        assert allowed == (set() if box.runtime == "runc" else {"unshare(CLONE_NEWUSER)"}), results

    run_case(box, PRIVILEGE, check, timeout_s=20)  # su alone takes ~1.7 s under gVisor


SIGNALS = r"""
import json, os, signal
results = {}
for name, target in (("PID 1", 1), ("parent", os.getppid())):
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
        try:
            os.kill(target, sig)
            results[f"{sig.name} {name}"] = "sent"
        except OSError as exc:
            results[f"{sig.name} {name}"] = "denied: " + os.strerror(exc.errno)
for name, action in (("PID 1's group", lambda: os.killpg(os.getpgid(1), signal.SIGKILL)),
                     ("every process", lambda: os.kill(-1, signal.SIGTERM))):
    try:
        action()
        results[name] = "sent"
    except OSError as exc:
        results[name] = "denied: " + os.strerror(exc.errno)
# What the kernel answers for a group is no proof either way: what matters is whether the runner's own
# processes (root: PID 1 and the template) are still there and not stopped.
import time
time.sleep(0.1)
results["runner states"] = sorted(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0]
                                  for p in os.listdir('/proc') if p.isdigit() and os.stat(f'/proc/{p}').st_uid == 0)
print(json.dumps(results), flush=True)
os.killpg(0, signal.SIGKILL)  # its own process group, itself included
"""


def test_killing_pid1_the_parent_or_the_process_group_harms_only_the_task(box):
    def check(body):
        assert body["status"] == "failed" and body["exit_code"] is None, body  # died of its own SIGKILL
        results = json.loads(body["stdout"])
        # kill(-1) as the sandbox uid reaches only the sandbox uid's own processes, and the namespace's init
        # ignores what it has no handler for: for these two only the effect below tells
        sent = {what for what, outcome in results.items() if outcome == "sent"} - {"every process", "PID 1's group"}
        assert sent == set(), results
        assert results.pop("runner states") in (["S", "S"], ["R", "S"], ["S", "R"]), results

    run_case(box, SIGNALS, check)


def test_killing_every_process_it_can_ends_only_itself(box):
    # kill(-1) never signals the caller. With no other process it may signal, Linux answers ESRCH (an
    # uncaught error: failed) or, where root's processes are there to be refused, 0; either way only the
    # task's own processes can die, and run_case checks that the same container serves the next task.
    def check(body):
        assert (body["status"], body["stdout"]) in (("failed", ""), ("succeeded", "survived\n")), body

    run_case(box, "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('survived')", check)


INTERFACES = "import json, socket\nprint(json.dumps(sorted(name for _, name in socket.if_nameindex())))"

REACH = r"""
import json, socket
results = {}
try:
    results["lookup"] = "resolved: " + repr(socket.getaddrinfo('pypi.org', 443)[:1])
except OSError as exc:
    results["lookup"] = "failed: " + str(exc)
for name, port in PORTS.items():
    try:
        socket.create_connection(('127.0.0.1', port), timeout=2).close()
        results[name] = "connected"
    except OSError as exc:
        results[name] = "failed: " + str(exc)
print(json.dumps(results))
"""


def test_network_has_only_loopback_and_reaches_nothing(box):
    # First make sure the sandbox has no way out at all: only then is a lookup or a connection safe to try.
    body = execute(box, INTERFACES)
    assert body["status"] == "succeeded", body
    assert json.loads(body["stdout"]) == ["lo"], body["stdout"]
    # The host's own services listen on the host's loopback, which is not this loopback.
    ports = {"API port": urlparse(box.base_url).port, "Redis port": redis_port()}

    def check(body):
        results = outcomes_of(body)
        assert all(outcome.startswith("failed") for outcome in results.values()), results

    run_case(box, REACH.replace("PORTS", repr(ports)), check)
