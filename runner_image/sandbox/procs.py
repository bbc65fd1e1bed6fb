"""Processes of the sandbox as PID 1 sees them: exits, kills, reaping, the container's OOM kills."""

import os
import signal

OOM_FILES = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")  # v1, v2


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:  # gVisor has no pidfd_open: the caller polls with a short tick instead
        return None


def has_exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie, so that wait4 can still collect its status and rusage.
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def kill_task(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # its process group (setsid made it leader), then the child itself
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def reap_zombies() -> None:
    # The task's child and the daemons it left are reparented to PID 1; their exit status is ours.
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def oom_kills() -> int:
    """The container's OOM-kill counter (cgroup v1 or v2), or 0 where the kernel does not say."""
    for path in OOM_FILES:
        try:
            with open(path, "rb", buffering=0) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        return next((int(line.split()[1]) for line in lines if line.startswith(b"oom_kill ")), 0)
    return 0
