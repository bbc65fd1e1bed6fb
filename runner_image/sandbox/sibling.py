"""One fork per task instead of two: the template forks each task's child with clone(CLONE_PARENT), so the
child is born PID 1's (PID 1 waits for it, gets its status and rusage) and the template never sees it exit.

os.fork cannot ask for CLONE_PARENT, and a double fork (an intermediate that forks the child and exits at
once) copies the template's page tables twice per task; the first copy was a sixth of the sandbox's cpu
per hello task (benchmarks/RESULTS.md). So the clone syscall is made here directly, wrapped in the same
interpreter hooks os.fork calls (PyOS_BeforeFork / PyOS_AfterFork_Child / PyOS_AfterFork_Parent: the
import lock, the thread states, the GIL, signal state and os.register_at_fork handlers such as random's
reseed), with the GIL held throughout (ctypes.PyDLL never releases it).

What glibc's fork does besides, and why skipping it is safe in the template: it runs pthread_atfork
handlers and re-initialises locks other threads may hold, but the template is single-threaded and starts
no library threads (OpenBLAS's pool was shut down by its own handler when PID 1 forked the template with
os.fork, and the template never calls BLAS); it records the child's tid in the thread's descriptor, which
only recursive and robust mutexes read, and those see one consistent value in the child (the kernel's
gettid is used for raise and pthread_kill on oneself); glibc has not cached the pid since 2.25.
`available()` is False where the syscall number is unknown, and the caller falls back to the double fork."""

import ctypes
import os
import platform
import signal

CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
_libc = ctypes.PyDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_void_p]
_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_fork_child = ctypes.pythonapi.PyOS_AfterFork_Child
_after_fork_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
for _hook in (_before_fork, _after_fork_child, _after_fork_parent):
    _hook.argtypes, _hook.restype = [], None


def available() -> bool:
    return _SYS_CLONE is not None


def fork_sibling() -> int:
    """Fork as os.fork does, but make the child a child of this process's parent. Returns 0 in the child
    and the child's pid in the caller; OSError if the kernel refused."""
    if _SYS_CLONE is None:
        raise OSError(f"clone(CLONE_PARENT) is not wired for {platform.machine()}")
    _before_fork()
    # No stack: the child continues on a copy of this one, as after fork(). Exit signal SIGCHLD, to the
    # parent we share: PID 1, which reaps it.
    pid = _syscall(_SYS_CLONE, CLONE_PARENT | signal.SIGCHLD, None, None, None, None)
    if pid == 0:
        _after_fork_child()
        return 0
    errno = ctypes.get_errno() if pid < 0 else 0
    _after_fork_parent()
    if pid < 0:
        raise OSError(errno, f"clone(CLONE_PARENT): {os.strerror(errno)}")
    return int(pid)
