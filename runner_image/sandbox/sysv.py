"""SysV IPC objects left in the container. They outlive their processes, and only their owner may remove
them. /proc/sysvipc lists them under runc, but gVisor has no /proc/sysvipc (a segment left there reached the
next task), so the kernel is asked for the counts: the *_INFO command of each call, and where its struct
says how many exist. PID 1 only."""

import ctypes
import os
from collections.abc import Callable

LIBC = ctypes.CDLL(None, use_errno=True)
IntArray = ctypes.Array[ctypes.c_int]
COUNTS: tuple[tuple[str, Callable[[IntArray], int], int], ...] = (
    ("shared memory segment(s)", lambda buf: int(LIBC.shmctl(0, 14, buf)), 0),  # SHM_INFO: used_ids
    ("message queue(s)", lambda buf: int(LIBC.msgctl(0, 12, buf)), 0),  # MSG_INFO: msgpool
    ("semaphore set(s)", lambda buf: int(LIBC.semctl(0, 0, 19, buf)), 7))  # SEM_INFO: semusz


def leftovers() -> list[str]:
    """What is left, as problems ('1 SysV IPC message queue(s) left'); empty when none."""
    problems = []
    ints = (ctypes.c_int * 64)()
    for what, info, index in COUNTS:
        if info(ints) < 0:
            problems.append(f"cannot count SysV IPC {what}: {os.strerror(ctypes.get_errno())}")
        elif ints[index]:
            problems.append(f"{ints[index]} SysV IPC {what} left")
    return problems
