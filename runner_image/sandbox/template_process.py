"""The template's body: the pristine warm interpreter, forked from PID 1 at start before any frame is
read. It serves one-word commands on its control socket (`spawn`, `kill`, `clean`) and never receives a
task's data: `spawn` brings only the fresh pipe ends of the child it forks."""

import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import NoReturn

from runner_image.sandbox import sibling
from runner_image.sandbox.child import task_child
from runner_image.sandbox.config import KILL_WAIT_S, SCRATCH_DIRS
from runner_image.sandbox.limits import drop_to_sandbox
from runner_image.sandbox.procs import kill_task
from runner_image.sandbox.scratch import remove_contents

CLEANER_WAIT_S = 5.0  # how long the scratch cleaner may take


def template_main(sock: socket.socket) -> NoReturn:
    """Serve commands until PID 1 closes the socket. Never returns."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # out of PID 1's process group and session: a signal aimed at those is not for us
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # the frame channel is PID 1's alone
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        sock.settimeout(None)
        commands: dict[bytes, Callable[..., int]] = {b"spawn": spawn, b"kill": kill, b"clean": clean}
        while True:
            command, fds, _, _ = socket.recv_fds(sock, 64, 8)
            if not command:
                os._exit(0)  # PID 1 is gone
            try:
                handler = commands.get(command)
                answer = f"ok {handler(*fds)}" if handler else f"error unknown command {command!r}"
            except Exception as exc:
                answer = f"error {exc!r}"
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(answer.encode("ascii", "replace")[:256])
    finally:
        os._exit(1)


def spawn(go_r: int, out_w: int, err_w: int, status_w: int, files_w: int) -> int:
    """Fork a task's child as PID 1's (see sibling), so that PID 1 can wait for it (status, rusage) as for
    its own and the template never sees it exit. Returns the child's pid."""
    global _sibling_works
    if _sibling_works:
        try:
            pid = sibling.fork_sibling()
        except OSError:
            _sibling_works = False  # a kernel without CLONE_PARENT: the double fork from now on
        else:
            if pid == 0:
                try:
                    task_child(go_r, out_w, err_w, status_w, files_w)  # never returns
                finally:
                    os._exit(125)
            if not is_own_child(pid):
                return pid
            # gVisor accepts the flag but makes the child ours: it has run nothing yet (it waits for its
            # task on the go pipe), so end it here and use the double fork from now on.
            _sibling_works = False
            kill_task(pid)
            os.waitpid(pid, 0)
    return spawn_through_intermediate(go_r, out_w, err_w, status_w, files_w)


_sibling_works = sibling.available()  # until the kernel shows otherwise


def is_own_child(pid: int) -> bool:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def spawn_through_intermediate(go_r: int, out_w: int, err_w: int, status_w: int, files_w: int) -> int:
    """The portable way, one fork more: an intermediate forks the child and exits at once, and once it is
    reaped the child's parent is PID 1."""
    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(pid_r)
            child = os.fork()
            if child == 0:
                os.close(pid_w)
                task_child(go_r, out_w, err_w, status_w, files_w)  # never returns
            os.write(pid_w, struct.pack(">i", child))
        finally:
            os._exit(0)
    os.close(pid_w)
    try:
        data = os.read(pid_r, 4)
    finally:
        os.close(pid_r)
        os.waitpid(middle, 0)  # once it is reaped, the child's parent is PID 1
    if len(data) != 4:
        raise RuntimeError("the intermediate process died before it forked")
    pid: int = struct.unpack(">i", data)[0]
    return pid


def kill() -> int:
    """One sweep of kill(-1, SIGKILL) as the sandbox uid; PID 1 reaps and checks, and asks again."""
    return run_as_sandbox(kill_all_visible, KILL_WAIT_S)


def kill_all_visible() -> None:
    for _ in range(3):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass


def clean() -> int:
    return run_as_sandbox(remove_all_contents, CLEANER_WAIT_S)


def remove_all_contents() -> None:
    for top in SCRATCH_DIRS:
        remove_contents(top)


def run_as_sandbox(work: Callable[[], object], wait_s: float) -> int:
    """Run `work` in a child of the template as the sandbox uid, for at most `wait_s`; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            drop_to_sandbox()
            work()
        finally:
            os._exit(0)
    deadline = time.monotonic() + wait_s
    pause = 0.0001
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            kill_task(pid)  # if it hung, verification reports what it left
            os.waitpid(pid, 0)
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return pid
