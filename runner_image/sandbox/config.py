"""What PID 1 and the processes it starts agree on: the sandbox uid, its dirs and environment, the task
child's fds and the bytes it says on its status pipe. Constants only, computed once at import (before the
template is forked), plus the task dirs and cache links that start-up sets (pid1.image_environment)."""

import os
import struct
import sys

SANDBOX_UID = SANDBOX_GID = 10001
# POSIX message queues live in /dev/mqueue where the engine mounts it (runc does, gVisor does not).
SCRATCH_DIRS = ("/tmp", "/dev/shm") + (("/dev/mqueue",) if os.path.isdir("/dev/mqueue") else ())
WORK_DIR, HOME_DIR = "/tmp/work", "/tmp/home"
TASK_ENV = {"HOME": HOME_DIR, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "TMPDIR": "/tmp", "USER": "sandbox"}
# What the image's environment says to its libraries, kept for the tasks: matplotlib draws with Agg and
# keeps its config and cache in MPLCONFIGDIR (on /tmp, since the root is read-only).
IMAGE_ENV = ("MPLBACKEND", "MPLCONFIGDIR")
# matplotlib's font list, made at build time (the scan takes ~150 ms): linked into each task's MPLCONFIGDIR.
MPL_BUILT_CACHE = "/opt/warmpool/matplotlib"
# Made by each task's child; start-up adds MPLCONFIGDIR when the image sets it (before the template forks).
TASK_DIRS = [WORK_DIR, HOME_DIR]
CACHE_LINKS: list[tuple[str, str]] = []  # (target, link): the built caches, linked into a task's MPLCONFIGDIR
KILL_WAIT_S = 6.0  # how long the reset keeps killing before it calls the container dirty (host waits 15 s):
# generous, as killing a fork bomb's 64 processes under gVisor on two loaded cores can take seconds
READ_CHUNK = 1 << 16
PYTHON_VERSION = ".".join(map(str, sys.version_info[:3]))
CPUS = len(os.sched_getaffinity(0))

# Each task child gets a status pipe of its own (made fresh per task, so nothing carries over): it writes
# READY once it is sandboxed and limited, just before the task's code runs (so the task cannot unwrite
# it), and MEMORY_ERROR if the code dies of an uncaught MemoryError. The task can write to the pipe too:
# only READY as the first byte counts, and MEMORY_ERROR only with the exit status a MemoryError gives.
STATUS_READY, STATUS_MEMORY_ERROR, STATUS_DONE = b"R", b"M", b"D"
GO_FD = 3  # in the task child: the go pipe, on which PID 1 sends the task (go_pipe)
STATUS_FD = 4  # in the task child
# When the code has ended and its outputs are sent, the child writes a DONE record (its exit status and its
# usage) just before it exits. PID 1 answers on it rather than on the child's exit, which for a datascience
# interpreter comes 3 to 8 ms later (the kernel tearing down ~100 MB of address space); the child is killed
# and reaped after the answer has gone out. A task can write a DONE record too: then its answer comes early,
# with what it wrote, and its process is killed: it changes nothing but its own result. (A session's calls
# say CALL_DONE, with a nonce: see sessions.)
DONE = struct.Struct(">ciqq")  # b"D", exit status, cpu microseconds (its own and its waited children's), max rss KiB
# Output files and figures go to PID 1 as records (taskfiles) on a pipe of their own, made fresh per task.
FILES_FD = 5  # in the task child
DEFAULT_OUTPUT_FILES_BYTES = 16 << 20
# A session call's end, on the status pipe: D, the call's nonce (8 bytes), its exit status, its flags.
CALL_DONE = b"D"
CALL_MEMORY_ERROR = 1  # flag: the call died of an uncaught MemoryError
