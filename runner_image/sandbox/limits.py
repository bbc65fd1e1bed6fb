"""The sandbox a task's child enters (as root, then never again): its own session, the OOM killer's first
choice, the sandbox uid, rlimits, and the task's dirs. Also used by start-up to make the dirs while the
image's modules are preloaded."""

import math
import os
import resource

from runner_image.sandbox.config import CACHE_LINKS, CPUS, SANDBOX_GID, SANDBOX_UID, TASK_DIRS, WORK_DIR


def enter_sandbox() -> None:
    """What every task gets, done before its code is known: a new session, the sandbox uid, no core."""
    os.setsid()
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)  # the OOM killer should take the task, not PID 1
    os.write(fd, b"1000")
    os.close(fd)
    drop_to_sandbox()
    if os.getresuid() != (SANDBOX_UID,) * 3 or os.getresgid() != (SANDBOX_GID,) * 3 or os.getgroups():
        raise PermissionError("could not drop to the sandbox uid")
    set_limit(resource.RLIMIT_CORE, 0)
    os.umask(0o022)


def drop_to_sandbox() -> None:
    """Become the sandbox uid and gid, with no supplementary groups (and no capabilities left)."""
    os.setgroups([])
    os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)


def apply_task_limits(timeout_s: float | None, fsize_limit: int, nofile_limit: int, nproc_limit: int) -> None:
    """The task's own limits, and its work and home dirs (made now: a waiting child leaves /tmp empty).
    A session passes no timeout_s: its interpreter outlives many calls, so no CPU budget fits it (PID 1's
    deadline and SIGKILL are what bound each call)."""
    # RLIMIT_CPU is only a backstop for the wall clock: allow every usable core busy until the deadline.
    limits = [(resource.RLIMIT_FSIZE, fsize_limit), (resource.RLIMIT_NOFILE, nofile_limit)]
    if timeout_s is not None:
        limits.append((resource.RLIMIT_CPU, math.ceil(timeout_s * CPUS) + 1))
    for res, value in limits:
        set_limit(res, value)
    if nproc_limit:
        # Only where the host asks (gVisor): there the count is the sandbox's own, while on a shared
        # kernel RLIMIT_NPROC counts the sandbox uid's processes in every container on the host.
        set_limit(resource.RLIMIT_NPROC, nproc_limit)
    make_task_dirs()
    os.chdir(WORK_DIR)


def set_limit(res: int, value: int) -> None:
    hard = resource.getrlimit(res)[1]  # soft = hard, so that the task cannot raise them
    resource.setrlimit(res, (value, value) if hard == resource.RLIM_INFINITY else (min(value, hard),) * 2)


def make_task_dirs() -> None:
    """The task's work and home dirs (and matplotlib's), with the image's built caches linked in."""
    for path in TASK_DIRS:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    for target, link in CACHE_LINKS:
        try:
            os.symlink(target, link)
        except OSError:
            pass  # a cache missed costs time, not correctness
